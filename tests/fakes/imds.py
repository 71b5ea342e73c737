"""An EC2 instance metadata service (IMDSv2) on loopback, for the spot interruption-notice path.

Follows the documented behaviour (../shared/providers.md §5, AWS "Instance metadata" docs):
- `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1..21600) returns a token;
  a PUT without the header is 400.
- every `GET /latest/meta-data/...` needs `X-aws-ec2-metadata-token` (IMDSv2 required, as our
  launch sets `HttpTokens=required`): 401 without a valid token.
- `spot/instance-action` is 404 until an interruption is scheduled, then
  `{"action": "terminate", "time": "2026-...Z"}`; `events/recommendations/rebalance` likewise with
  `{"noticeTime": ...}`.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime, timedelta

from tests.fakes.server import FakeServer, Request, Response, route

_NOT_FOUND = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n<html><head><title>404 - Not Found</title></head>'
    "<body><h1>404 - Not Found</h1></body></html>\n"
)


class IMDSFake(FakeServer):
    def __init__(self, instance_id: str = "i-0123456789abcdef0", region: str = "us-east-1",
                 zone: str = "us-east-1a", lifecycle: str = "spot") -> None:
        super().__init__(api_key=None)
        self.instance_id = instance_id
        self.region = region
        self.zone = zone
        self.lifecycle = lifecycle
        self.tokens: dict[str, float] = {}  # token -> expiry (unix s)
        self.instance_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None

    # ------------------------------------------------------------ test controls

    def schedule_interruption(self, action: str = "terminate", in_s: float = 120.0) -> dict[str, str]:
        """What AWS does two minutes before reclaiming a spot instance."""
        when = (datetime.now(UTC) + timedelta(seconds=in_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.lock:
            self.instance_action = {"action": action, "time": when}
            return dict(self.instance_action)

    def recommend_rebalance(self) -> None:
        with self.lock:
            self.rebalance = {"noticeTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    # ------------------------------------------------------------ routes

    @staticmethod
    def _text(body: str, status: int = 200) -> Response:
        return Response(status, body, content_type="text/plain")

    @route("PUT", r"/latest/api/token")
    def token(self, req: Request) -> Response:
        ttl = req.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._text("", 400)
        tok = secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[tok] = time.time() + int(ttl)
        return Response(200, tok, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl}, content_type="text/plain")

    def _authorized(self, req: Request) -> bool:
        tok = req.headers.get("x-aws-ec2-metadata-token", "")
        with self.lock:
            return self.tokens.get(tok, 0) > time.time()

    @route("GET", r"/latest/meta-data/(?P<path>.*)")
    def meta_data(self, req: Request) -> Response:
        if not self._authorized(req):
            return self._text("", 401)
        path = req.params["path"].rstrip("/")
        with self.lock:
            values: dict[str, str | None] = {
                "instance-id": self.instance_id,
                "instance-life-cycle": self.lifecycle,
                "placement/region": self.region,
                "placement/availability-zone": self.zone,
                "spot/instance-action": json.dumps(self.instance_action) if self.instance_action else None,
                "events/recommendations/rebalance": json.dumps(self.rebalance) if self.rebalance else None,
            }
        value = values.get(path)
        if value is None:
            return Response(404, _NOT_FOUND, content_type="text/html")
        return self._text(value)
