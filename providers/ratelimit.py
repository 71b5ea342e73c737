"""Reading a provider's rate-limit headers: `RateLimit` / `RateLimit-Policy` (IETF draft) and Retry-After.

Why a module: RunPod's v2 API answers every authenticated request with

    RateLimit: "minute";r=0;t=12, "hour";r=2800;t=1812, "day";r=49500;t=45012
    RateLimit-Policy: "minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400

(runpod/openapi-v2.json components.schemas.RateLimitHeader / RateLimitPolicyHeader). A window
with `r=0` means the next request will be refused for `t` seconds, so the shared HTTP client
waits that long *before* sending instead of spending a request on a 429; and a 429 without
Retry-After still says how long to wait. Pure functions, no imports beyond the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MEMBER = re.compile(r'\s*(?:"(?P<qname>[^"]*)"|(?P<name>[A-Za-z0-9_*-]+))(?P<params>(?:\s*;\s*[A-Za-z0-9_*-]+(?:=[^;,]*)?)*)')


@dataclass(frozen=True)
class Window:
    """One member of a RateLimit header: name, remaining requests `r`, seconds to reset `t`."""

    name: str
    remaining: int | None
    reset_s: float | None


def _params(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            out[key.strip()] = value.strip().strip('"')
    return out


def parse_ratelimit(value: str | None) -> list[Window]:
    """The windows of a structured-field `RateLimit` header ([] when absent or unreadable)."""
    if not value:
        return []
    windows = []
    for member in value.split(","):
        m = _MEMBER.match(member)
        if not m:
            continue
        params = _params(m.group("params") or "")
        try:
            remaining = int(params["r"]) if "r" in params else None
            reset = float(params["t"]) if "t" in params else None
        except ValueError:
            continue
        windows.append(Window(m.group("qname") or m.group("name") or "", remaining, reset))
    return windows


def exhausted_delay(headers: object) -> float | None:
    """Seconds until the longest exhausted window (`r=0`) resets; None when no window is exhausted."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    waits = [w.reset_s for w in parse_ratelimit(get("RateLimit") or get("ratelimit"))
             if w.remaining is not None and w.remaining <= 0 and w.reset_s is not None]
    return max(waits) if waits else None
