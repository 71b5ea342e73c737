"""A tiny HTTP server for provider fakes: real sockets on 127.0.0.1, routes, fault injection.

Why not mocks: the adapters must be exercised over real HTTP (headers, status codes, timeouts,
Retry-After), exactly as they will talk to the cloud. Each fake (runpod_fake, vast_fake, the
Lambda fake) subclasses `FakeServer`, declares routes with `@route`, and keeps its state in
plain Python objects guarded by `self.lock`.

Usage in a test:

    with RunPodFake() as fake:           # starts on a free port in a daemon thread
        provider = RunPodProvider(api_url=fake.url + "/v2", ...)
        fake.inject("POST", r"^/v2/pods$", status=500, times=1)   # next create fails
        fake.apply([{"op": "create", "status": 500, "after_effect": True}])  # the same, by fault plan
        ...
        assert fake.calls("POST", "/v2/pods")
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # named groups of the route regex

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def bearer(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes -> as is
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    reset: bool = False  # drop the connection with a TCP RST instead of answering (a connection reset)

    def encode(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@dataclass
class Fault:
    """A canned failure for the next `times` requests matching method + path regex."""

    method: str
    pattern: re.Pattern[str]
    response: Response | None
    times: int
    delay_s: float = 0.0
    then_call: bool = False  # run the real handler first, then answer with `response` (5xx-after-create)
    op: str = ""  # the fault plan's operation name, when it came from one (`FakeServer.apply`)


#: The fault-plan operations every fake understands (tests/_faults_util.py documents the format).
FAULT_OPS = ("create", "status", "list", "terminate", "search")


Handler = Callable[[Request], Response]


def route(method: str, pattern: str) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Declare a handler method of a FakeServer subclass for METHOD + path regex (named groups)."""

    def deco(fn: Callable[..., Response]) -> Callable[..., Response]:
        fn._route = (method.upper(), re.compile(pattern))  # type: ignore[attr-defined]
        return fn

    return deco


class FakeServer:
    """Base class: routing, request log, fault injection, auth check, start/stop."""

    #: The API key the fake accepts (Bearer). None disables the check.
    api_key: str | None = "test-key"

    def __init__(self, api_key: str | None = "test-key") -> None:
        self.api_key = api_key
        self.lock = threading.RLock()
        self.log: list[Request] = []
        self.exchanges: list[tuple[Request, Response]] = []  # every answer, for the contract checks
        self._faults: list[Fault] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        for name in dir(type(self)):
            fn = getattr(type(self), name)
            spec = getattr(fn, "_route", None)
            if spec:
                self._routes.append((spec[0], spec[1], getattr(self, name)))
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeServer:
        fake = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = Request(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                resp = fake.dispatch(req)
                if resp.reset:  # SO_LINGER 0: close() sends RST, the client reads "connection reset"
                    import socket
                    import struct

                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                payload = resp.encode()
                try:
                    self.send_response(resp.status)
                    if payload or resp.status not in (204, 304):
                        self.send_header("Content-Type", resp.content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in resp.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if payload:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout tests)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self.on_stop()

    def on_stop(self) -> None:
        """Subclasses release what they started (local processes)."""

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------ faults and log

    def inject(
        self,
        method: str,
        path_regex: str,
        *,
        status: int = 500,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        delay_s: float = 0.0,
        after_handler: bool = False,
        content_type: str = "application/json",
    ) -> None:
        """Make the next `times` matching requests fail with `status`/`body` (after `delay_s`).

        `after_handler=True` runs the real handler first (state changes happen), then answers
        with the failure: the "500 after the pod was created" case.
        `status=0` with a delay only delays the real answer (slow endpoint).
        """
        resp = None if status == 0 else Response(status, body, dict(headers or {}), content_type)
        with self.lock:
            self._faults.append(
                Fault(method.upper(), re.compile(path_regex), resp, times, delay_s, then_call=after_handler)
            )

    # ------------------------------------------------------------ fault plans (one format for every fake)

    #: op -> (HTTP method, path regex) of the provider's endpoint for that operation; subclasses fill it.
    FAULT_ROUTES: dict[str, tuple[str, str]] = {}

    def fault_response(self, op: str, status: int, code: str | None, retry_after: float | None) -> Response:
        """The provider's own error body for a planned fault (subclasses shape it; `code` is the
        provider's error code, e.g. Lambda's `global/rate-limited`)."""
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return Response(status, {"error": code or f"http_{status}"}, headers)

    def fault(self, op: str, *, status: int = 500, after_effect: bool = False, times: int = 1,
              delay_s: float = 0.0, reset: bool = False, code: str | None = None,
              retry_after: float | None = None) -> None:
        """One entry of a fault plan: the next `times` requests of operation `op` fail.

        `after_effect`: the real handler runs first (the machine is created/destroyed), then the failure
        is answered. `status=0`: no error, only the delay (with `delay_s` over the client's timeout, a
        timeout; with `after_effect`, one that happened after the server acted). `reset`: the connection
        is dropped. `code`/`retry_after`: the provider's error code and Retry-After header."""
        if op not in self.FAULT_ROUTES:
            raise ValueError(f"{type(self).__name__} has no fault route for op {op!r} (known: {sorted(self.FAULT_ROUTES)})")
        method, regex = self.FAULT_ROUTES[op]
        if reset:
            resp: Response | None = Response(0, reset=True)
        elif status == 0:
            resp = None
        else:
            resp = self.fault_response(op, status, code, retry_after)
        with self.lock:
            self._faults.append(Fault(method, re.compile(regex), resp, times, delay_s, then_call=after_effect, op=op))

    def apply(self, plan: list[dict[str, Any]]) -> None:
        """Install a fault plan: a list of `{"op": ..., "status": ..., "after_effect": ..., "times": ...}`."""
        for entry in plan:
            self.fault(**entry)

    def clear_faults(self) -> None:
        """The API recovers: every pending fault is dropped."""
        with self.lock:
            self._faults.clear()

    def calls(self, method: str, path_regex: str = ".*") -> list[Request]:
        pat = re.compile(path_regex)
        with self.lock:
            return [r for r in self.log if r.method == method.upper() and pat.search(r.path)]

    # ------------------------------------------------------------ dispatch

    def unauthorized(self, req: Request) -> Response:
        """The provider's own 401 shape; subclasses override."""
        return Response(401, {"error": "unauthorized"})

    def authorized(self, req: Request) -> bool:
        """Whether the request's credentials are accepted (subclasses add scoped keys)."""
        return self.api_key is None or req.bearer == self.api_key

    def not_found(self, req: Request) -> Response:
        return Response(404, {"error": "not_found", "path": req.path})

    def dispatch(self, req: Request) -> Response:
        """Answer one request and record the (request, response) pair in `exchanges`."""
        resp = self._dispatch(req)
        extra = self.response_headers(req, resp)
        if extra and not resp.reset:
            resp = Response(resp.status, resp.body, {**extra, **resp.headers}, resp.content_type)
        with self.lock:
            self.exchanges.append((req, resp))
        return resp

    def response_headers(self, req: Request, resp: Response) -> dict[str, str]:
        """Headers the provider adds to every answer (RunPod: RateLimit); subclasses override."""
        return {}

    def _dispatch(self, req: Request) -> Response:
        with self.lock:
            self.log.append(req)
            fault = next(
                (f for f in self._faults if f.times > 0 and f.method == req.method and f.pattern.search(req.path)),
                None,
            )
            if fault is not None:
                fault.times -= 1
        if fault is not None and fault.delay_s and not fault.then_call:
            time.sleep(fault.delay_s)
        if fault is not None and fault.response is not None and not fault.then_call:
            return fault.response
        if not self.authorized(req):
            return self.unauthorized(req)
        for method, pattern, handler in self._routes:
            if method != req.method:
                continue
            m = pattern.fullmatch(req.path)
            if m:
                req.params = m.groupdict()
                try:
                    resp = handler(req)
                except Exception as err:  # a bug in the fake: surface it as a 599 the test can see
                    resp = Response(599, {"fake_error": f"{type(err).__name__}: {err}"})
                if fault is not None and fault.then_call:
                    if fault.delay_s:  # the server acted, then the answer comes late (or never in time)
                        time.sleep(fault.delay_s)
                    if fault.response is not None:
                        return fault.response
                return resp
        return self.not_found(req)


class LocalWorkloads:
    """The "container" of a fake machine: its command run as a local process group.

    Why: a full `cloudtune run` against a fake provider needs the trainer to really run; the fake
    starts the launch command here, and interrupting the machine signals the process group.
    """

    def __init__(self, log_dir: str | None = None) -> None:
        import subprocess

        self._subprocess = subprocess
        self.procs: dict[str, Any] = {}
        self.log_dir = log_dir  # when set, each machine's output goes to <log_dir>/<key>.log

    def log_path(self, key: str) -> str | None:
        import os

        return os.path.join(self.log_dir, f"{key}.log") if self.log_dir else None

    def start(self, key: str, command: str | list[str], env: dict[str, str], cwd: str | None = None) -> None:
        import os

        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        path = self.log_path(key)
        out = open(path, "ab") if path else self._subprocess.DEVNULL  # noqa: SIM115 - closed right after Popen
        try:
            self.procs[key] = self._subprocess.Popen(
                argv, env={**os.environ, **env}, cwd=cwd, start_new_session=True,
                stdout=out, stderr=self._subprocess.STDOUT if path else self._subprocess.DEVNULL,
            )
        finally:
            if path:
                out.close()

    def output(self, key: str) -> str:
        """What the machine's command printed so far ("" without a log_dir)."""
        path = self.log_path(key)
        try:
            return open(path, errors="replace").read() if path else ""
        except FileNotFoundError:
            return ""

    def returncode(self, key: str) -> int | None:
        proc = self.procs.get(key)
        return None if proc is None else proc.poll()

    def signal(self, key: str, sig: int, wait_s: float = 0.0) -> None:
        """Signal the process group of `key`; after `wait_s`, SIGKILL what is left."""
        import os
        import signal as _signal

        proc = self.procs.get(key)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if wait_s:
            try:
                proc.wait(timeout=wait_s)
            except self._subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)

    def stop_all(self) -> None:
        import signal as _signal

        for key in list(self.procs):
            self.signal(key, _signal.SIGTERM, wait_s=5.0)
