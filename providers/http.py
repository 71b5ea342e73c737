"""One HTTP client for every REST/GraphQL provider adapter (RunPod, Vast.ai, Lambda).

Why one: timeouts, retry policy, Retry-After handling, secret redaction and the mapping of HTTP
failures onto the protocol's typed errors must behave the same for every cloud, and a fix here
fixes all of them. httpx and tenacity are imported lazily so `cloudtune --help` stays fast.

Retry policy:
- 429 and 5xx, timeouts and connection errors are retried with exponential backoff and full
  jitter; a `Retry-After` header (seconds or HTTP date) is honoured when present (capped).
- A request that may create something (``idempotent=False``: pod create, Vast ask accept) is
  *not* retried after the server may have acted on it (5xx, read timeout): the error surfaces as
  `TransientError` and the orchestrator looks the machine up by its deterministic name instead.
  Such a request is still retried on 429 and on connect errors, where nothing reached the server.

Adapters refine the generic mapping with a `classify` hook (e.g. Vast's 404 ``no_such_ask`` is a
`CapacityError`, not a missing machine).
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudtune.providers.base import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    QuotaError,
    RateLimitedError,
    TransientError,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("cloudtune.providers.http")

REDACTED = "***"
_BODY_SNIPPET = 300


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each (non-trivial) secret in `text`."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. Tests shrink the delays; production keeps the defaults."""

    max_attempts: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is surfaced as RateLimitedError
    retry_on_5xx: bool = True


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: U(cap/2, cap), cap = min(max, initial * 2^(n-1))."""
    cap = min(policy.backoff_max_s, policy.backoff_initial_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(cap / 2, cap)


Classifier = Callable[["httpx.Response", Any], ProviderError | None]


class HttpClient:
    """A thin wrapper over `httpx.Client` that speaks the provider protocol's errors.

    `api_key` is sent as a Bearer token and scrubbed from every message this client produces.
    `auth_hint` finishes the AuthError message ("set RUNPOD_API_KEY or ...").
    """

    def __init__(
        self,
        provider: str,
        base_url: str,
        api_key: str | None,
        *,
        auth_hint: str = "",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        classify: Classifier | None = None,
        headers: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.auth_hint = auth_hint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry = retry or RetryPolicy()
        self.classify = classify
        self._extra_headers = dict(headers or {})
        self._sleep = sleep
        self._client: httpx.Client | None = None
        self._not_before = 0.0  # monotonic time before which a RateLimit window says "wait" (ratelimit.py)

    def __repr__(self) -> str:  # never show the key
        return f"HttpClient(provider={self.provider!r}, base_url={self.base_url!r}, api_key={REDACTED})"

    # ------------------------------------------------------------ plumbing

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    def _http(self) -> httpx.Client:
        if self._client is None:
            import httpx

            from cloudtune import __version__

            headers = {"Accept": "application/json", "User-Agent": f"cloudtune/{__version__}"}
            headers.update(self._extra_headers)
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._client = httpx.Client(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                follow_redirects=True,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def url(self, path: str) -> str:
        """The absolute URL of `path` (absolute URLs pass through)."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def _scrub(self, text: str) -> str:
        return redact(text, [self._api_key])

    def _require_key(self) -> None:
        if not self._api_key:
            raise AuthError(f"no {self.provider} API key found; {self.auth_hint}".rstrip("; "), provider=self.provider)

    # ------------------------------------------------------------ requests

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotent: bool | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send one logical request, retrying per the policy; return a 2xx response or raise."""
        import tenacity

        self._require_key()
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "DELETE", "OPTIONS")
        policy = self.retry

        def should_retry(state: tenacity.RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            if not isinstance(exc, ProviderError) or not exc.retryable:
                return False
            if isinstance(exc, RateLimitedError):
                return exc.retry_after_s is None or exc.retry_after_s <= policy.max_retry_after_s
            if getattr(exc, "sent", True) and not idempotent:
                return False  # the server may have acted: let the caller look it up
            if getattr(exc, "status", None) and not policy.retry_on_5xx:
                return False
            return True

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = getattr(exc, "retry_after_s", None)
            delay = min(hinted, policy.max_retry_after_s) if hinted is not None else backoff_delay(
                state.attempt_number, policy
            )
            log.warning(
                "%s %s %s failed (%s); retrying in %.2fs (attempt %d/%d)",
                self.provider, method, path, exc, delay, state.attempt_number, policy.max_attempts,
            )
            return delay

        retrying = tenacity.Retrying(
            retry=should_retry,
            wait=wait,
            stop=tenacity.stop_after_attempt(max(1, policy.max_attempts)),
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(self._send_once, method, path, json, params, timeout_s)

    def _send_once(
        self, method: str, path: str, json: Any, params: dict[str, Any] | None, timeout_s: float | None
    ) -> httpx.Response:
        import httpx

        kwargs: dict[str, Any] = {"json": json, "params": params}
        if timeout_s is not None:
            kwargs["timeout"] = httpx.Timeout(timeout_s, connect=min(timeout_s, self.connect_timeout_s))
        where = f"{method} {self.url(path)}"
        wait = self._not_before - time.monotonic()
        if wait > 0:  # a RateLimit header said this window is spent: wait instead of earning a 429
            self._sleep(min(wait, self.retry.max_retry_after_s))
        try:
            resp = self._http().request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            exc = TransientError(self._scrub(f"{self.provider}: cannot connect for {where}: {err}"), provider=self.provider)
            exc.sent = False  # type: ignore[attr-defined]  # nothing reached the server: safe to retry
            raise exc from None
        except httpx.TimeoutException as err:
            raise TransientError(
                self._scrub(f"{self.provider}: {where} timed out ({type(err).__name__}); the request may have been applied"),
                provider=self.provider,
            ) from None
        except httpx.TransportError as err:
            raise TransientError(
                self._scrub(f"{self.provider}: {where} failed: {type(err).__name__}: {err}"), provider=self.provider
            ) from None
        from cloudtune.providers.ratelimit import exhausted_delay

        spent = exhausted_delay(resp.headers)
        if spent is not None:
            self._not_before = time.monotonic() + spent
        if resp.is_success:
            return resp
        raise self.error_for(resp, where)

    def error_for(self, resp: httpx.Response, where: str) -> ProviderError:
        """Map a non-2xx response onto a typed error (adapter hook first, then by status).

        The parsed body rides along as `err.body` (e.g. Vast's failed create that still names a
        `new_contract` to destroy)."""
        body = _json_or_none(resp)
        err = self._map_error(resp, body, where)
        err.body = body  # type: ignore[attr-defined]
        return err

    def _map_error(self, resp: httpx.Response, body: Any, where: str) -> ProviderError:
        if self.classify is not None:
            mapped = self.classify(resp, body)
            if mapped is not None:
                return mapped
        status = resp.status_code
        snippet = self._scrub(resp.text[:_BODY_SNIPPET].strip().replace("\n", " "))
        msg = f"{self.provider}: {where} -> HTTP {status}" + (f": {snippet}" if snippet else "")
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        if retry_after is None and status == 429:
            from cloudtune.providers.ratelimit import exhausted_delay

            retry_after = exhausted_delay(resp.headers)
        if status in (401, 403):
            hint = f"; {self.auth_hint}" if self.auth_hint else ""
            return AuthError(f"{self.provider} rejected the API key (HTTP {status}){hint}", provider=self.provider)
        if status == 402:
            return QuotaError(msg + " (add credit to the account)", provider=self.provider)
        if status == 429:
            return RateLimitedError(msg, provider=self.provider, retry_after_s=retry_after)
        if status in (404, 410):
            return NotFoundError(msg, provider=self.provider)
        if status >= 500:
            exc = TransientError(msg, provider=self.provider)
            exc.status = status  # type: ignore[attr-defined]
            exc.retry_after_s = retry_after  # type: ignore[attr-defined]
            return exc
        return InvalidRequestError(msg, provider=self.provider)

    # ------------------------------------------------------------ conveniences

    def get_json(self, path: str, **kw: Any) -> Any:
        return _json_or_raise(self.request("GET", path, **kw), self.provider)

    def post_json(self, path: str, body: Any, **kw: Any) -> Any:
        return _json_or_raise(self.request("POST", path, json=body, **kw), self.provider)

    def put_json(self, path: str, body: Any, **kw: Any) -> Any:
        return _json_or_raise(self.request("PUT", path, json=body, **kw), self.provider)


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _json_or_raise(resp: httpx.Response, provider: str) -> Any:
    if resp.status_code == 204 or not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        raise TransientError(
            f"{provider}: expected JSON from {resp.request.method} {resp.request.url}, got "
            f"{resp.headers.get('content-type', 'no content type')!r}",
            provider=provider,
        ) from None
