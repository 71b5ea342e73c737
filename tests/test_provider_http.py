"""providers/http.py against a real local HTTP server: retries, Retry-After, timeouts, mapping."""

from __future__ import annotations

import time

import pytest
from cloudtune.providers.base import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    QuotaError,
    RateLimitedError,
    TransientError,
)
from cloudtune.providers.http import HttpClient, RetryPolicy, parse_retry_after, redact

from tests.fakes.server import FakeServer, Response, route

KEY = "sk-test-secret-123456"
FAST = RetryPolicy(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05)


class Echo(FakeServer):
    @route("GET", r"/items/(?P<id>\w+)")
    def get_item(self, req):
        return Response(200, {"id": req.params["id"]})

    @route("POST", r"/items")
    def create(self, req):
        return Response(201, {"created": req.json})


@pytest.fixture
def server():
    with Echo(api_key=KEY) as s:
        yield s


def client(server, **kw):
    kw.setdefault("retry", FAST)
    return HttpClient("acme", server.url, kw.pop("key", KEY), auth_hint="set ACME_API_KEY", **kw)


def test_ok_and_bearer(server):
    assert client(server).get_json("/items/a1") == {"id": "a1"}
    assert server.log[-1].bearer == KEY


def test_missing_key_is_auth_error_without_request(server):
    with pytest.raises(AuthError, match="no acme API key found; set ACME_API_KEY"):
        client(server, key=None).get_json("/items/a")
    assert server.log == []


def test_401_maps_to_auth_error_and_never_shows_key(server):
    with pytest.raises(AuthError) as info:
        client(server, key="sk-wrong-key-999").get_json("/items/a")
    assert "sk-wrong-key-999" not in str(info.value)
    assert "set ACME_API_KEY" in str(info.value)
    assert len(server.log) == 1  # not retried


def test_429_retry_after_is_honoured(server):
    server.inject("GET", "/items", status=429, headers={"Retry-After": "1"}, body={"title": "slow down"})
    t0 = time.monotonic()
    assert client(server).get_json("/items/b") == {"id": "b"}
    assert time.monotonic() - t0 >= 0.95
    assert len(server.calls("GET", "/items")) == 2


def test_429_without_retry_after_backs_off_then_gives_up(server):
    server.inject("GET", "/items", status=429, body="API requests too frequent", content_type="text/plain", times=10)
    with pytest.raises(RateLimitedError):
        client(server).get_json("/items/c")
    assert len(server.calls("GET", "/items")) == FAST.max_attempts


def test_5xx_is_retried_for_idempotent_calls(server):
    server.inject("GET", "/items", status=503, times=2)
    assert client(server).get_json("/items/d") == {"id": "d"}
    assert len(server.calls("GET", "/items")) == 3


def test_5xx_on_create_is_not_retried(server):
    server.inject("POST", "/items", status=500, after_handler=True)
    with pytest.raises(TransientError, match="HTTP 500"):
        client(server).post_json("/items", {"x": 1}, idempotent=False)
    assert len(server.calls("POST", "/items")) == 1


def test_timeout_is_transient(server):
    server.inject("GET", "/items", status=0, delay_s=1.0, times=10)
    c = client(server, timeout_s=0.2, retry=RetryPolicy(max_attempts=2, backoff_initial_s=0.01))
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        c.get_json("/items/e")
    assert time.monotonic() - t0 < 1.5
    assert len(server.calls("GET", "/items")) == 2


def test_connect_error_is_transient():
    c = HttpClient("acme", "http://127.0.0.1:9", KEY, retry=RetryPolicy(max_attempts=2, backoff_initial_s=0.01))
    with pytest.raises(TransientError, match="cannot connect"):
        c.get_json("/x")


@pytest.mark.parametrize(
    "status,exc", [(402, QuotaError), (404, NotFoundError), (410, NotFoundError), (400, InvalidRequestError)]
)
def test_status_mapping(server, status, exc):
    server.inject("GET", "/items", status=status, body={"detail": "nope"})
    with pytest.raises(exc):
        client(server).get_json("/items/f")


def test_body_echoing_the_key_is_redacted(server):
    server.inject("GET", "/items", status=400, body={"detail": f"bad key {KEY}"})
    with pytest.raises(InvalidRequestError) as info:
        client(server).get_json("/items/g")
    assert KEY not in str(info.value) and "***" in str(info.value)
    assert KEY not in repr(client(server))


def test_parse_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert redact("a secret-value b", ["secret-value"]) == "a *** b"
