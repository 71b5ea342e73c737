"""One controller per job: a lease object in the job's store prefix, taken with conditional writes.

Why a lease in the store: the laptop's watchdog, a second laptop and a serverless controller can
all reach the store, and only one of them may launch, relaunch or terminate (two owners race on
relaunch and leak machines). The lease names its holder and when it expires; a holder renews it
while it acts, and a dead holder's lease runs out, after which anyone may take it. Every write is a
compare-and-swap on the object's etag (cloudtune.store.conditional), so of several controllers
racing for a free or expired lease exactly one wins.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cloudtune.store.conditional import PreconditionFailed, put_versioned, read_versioned

DEFAULT_TTL_S = 90.0


def lease_ttl_s() -> float:
    try:
        return max(1.0, float(os.environ.get("CLOUDTUNE_LEASE_TTL_S", DEFAULT_TTL_S)))
    except ValueError:
        return DEFAULT_TTL_S


def lease_key(job_id: str) -> str:
    return f"{job_id}/controller/lease.json"


def new_holder(kind: str, site: str | None = None) -> str:
    """`kind:site:pid:nonce`: says who holds it (for `status`) and is unique per process. The site
    says which state.db the holder writes (a watchdog: this host and $CLOUDTUNE_HOME)."""
    return f"{kind}:{site or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def holder_site(holder: str) -> tuple[str, str]:
    kind, _, rest = holder.partition(":")
    return kind, rest.split(":")[0]


@dataclass
class LeaseInfo:
    holder: str
    expires_at: float
    acquired_at: float
    generation: int

    def live(self, now: float) -> bool:
        return now < self.expires_at


class Lease:
    """The lease of one job, as seen by one would-be holder."""

    def __init__(self, store: Any, job_id: str, holder: str, ttl_s: float | None = None,
                 proven_dead: Any = None, key: str | None = None) -> None:
        self.store = store
        # `key`: a lease on something other than a job (e.g. one serverless function's invocations)
        self.key = key or lease_key(job_id)
        # proven_dead(holder) -> True when that holder's live-looking lease may be taken now (e.g. a
        # watchdog of this very home whose flock we hold: it is dead, whatever its lease says).
        self.proven_dead = proven_dead
        self.job_id = job_id
        self.holder = holder
        self.ttl_s = ttl_s or lease_ttl_s()
        self._etag: str | None = None
        self._expires_at = 0.0

    def read(self) -> tuple[LeaseInfo | None, str | None]:
        got = read_versioned(self.store, self.key)
        if got is None:
            return None, None
        data, etag = got
        try:
            raw = json.loads(data)
            info = LeaseInfo(str(raw["holder"]), float(raw["expires_at"]), float(raw.get("acquired_at", 0)),
                             int(raw.get("generation", 0)))
        except (ValueError, KeyError, TypeError):
            info = LeaseInfo("<unreadable>", 0.0, 0.0, 0)  # a damaged lease is an expired one
        return info, etag

    def acquire(self, now: float | None = None) -> bool:
        """Take or renew the lease. False when another live holder has it or won the race."""
        now = time.time() if now is None else now
        info, etag = self.read()
        if info is not None and info.holder != self.holder and info.live(now):
            if not (self.proven_dead and self.proven_dead(info.holder)):
                return False
        mine = info is not None and info.holder == self.holder
        body = {
            "holder": self.holder,
            "expires_at": now + self.ttl_s,
            "acquired_at": info.acquired_at if mine and info else now,
            "generation": (info.generation + (0 if mine else 1)) if info else 1,
            "renewed_at": now,
        }
        try:
            self._etag = put_versioned(self.store, self.key, json.dumps(body).encode(), expect=etag)
        except PreconditionFailed:
            return False
        self._expires_at = body["expires_at"]
        return True

    def hold(self, now: float | None = None) -> bool:
        """Keep the lease: renew it once half its time is gone. Cheap when nothing is due."""
        now = time.time() if now is None else now
        if self._etag is not None and now < self._expires_at - self.ttl_s / 2:
            return True
        return self.acquire(now)

    def release(self) -> None:
        """Let the next controller take over at once (an expired lease in our name)."""
        info, etag = self.read()
        if info is None or info.holder != self.holder:
            return
        body = {"holder": self.holder, "expires_at": 0.0, "acquired_at": info.acquired_at,
                "generation": info.generation, "released_at": time.time()}
        try:
            put_versioned(self.store, self.key, json.dumps(body).encode(), expect=etag)
        except PreconditionFailed:
            pass
        self._etag = None
