"""A loopback HTTP proxy in front of moto_server that refuses chosen S3 writes, as a scoped IAM policy does,
and records every request with the body bytes it answered (what a pre-flight read really transferred).

moto accepts every PUT. Real buckets often do not: a policy that allows `s3:PutObject` only under
some prefixes answers the rest with HTTP 403 and S3's `<Error><Code>AccessDenied</Code>` XML. This
proxy forwards every request to moto byte for byte (raw path and query, so `?delete`, `?uploads`
and `?list-type=2` survive), except PUTs whose path matches a deny rule. boto3 talks to it over
real HTTP (path-style addressing: /bucket/key), so signing, retries and error parsing are the real
ones; nothing in cloudtune is patched.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>")
_HOP = {"host", "content-length", "connection", "transfer-encoding"}


class S3Proxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.deny_put: list[re.Pattern[str]] = []
        self.denied: list[str] = []  # paths answered with 403
        self.requests: list[tuple[str, str, str, int]] = []  # (method, path, Range, response body bytes)
        self.lock = threading.Lock()
        self._http = httpx.Client(timeout=30)
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def body_bytes(self) -> int:
        return sum(r[3] for r in self.requests)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def deny(self, path_regex: str) -> None:
        """Answer every PUT whose path matches with 403 AccessDenied."""
        with self.lock:
            self.deny_put.append(re.compile(path_regex))

    def __enter__(self) -> S3Proxy:
        proxy = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                with proxy.lock:
                    denied = self.command == "PUT" and any(p.search(path) for p in proxy.deny_put)
                    if denied:
                        proxy.denied.append(path)
                if denied:
                    status, payload = 403, ACCESS_DENIED
                    out_headers = {"Content-Type": "application/xml", "Content-Length": str(len(payload))}
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    up = proxy._http.request(self.command, proxy.upstream + self.path, content=body, headers=headers)
                    status, payload = up.status_code, b"" if self.command == "HEAD" else up.content
                    # every header back (ETag, Content-Range, Last-Modified: a ranged read needs them)
                    out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
                    out_headers["Content-Length"] = (up.headers.get("content-length", "0") if self.command == "HEAD"
                                                     else str(len(payload)))
                with proxy.lock:
                    proxy.requests.append((self.command, path, self.headers.get("Range", ""), len(payload)))
                self.send_response(status)
                for k, v in out_headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self._http.close()
