"""One polling budget per provider, shared by every process that asks a provider about machines.

Why: the watchdog ticks every second per job, `cloudtune status` and `gc` poll too, and the providers
meter the account, not the process: RunPod documents about 3000 requests/hour (its v2 API's
RateLimit-Policy: 60/minute, 3000/hour), Lambda about 1 request/second per account (launch about 1
per 12 s), Vast per-endpoint thresholds (shared/apis/vast/endpoints/*.yaml), EC2 a token bucket per
API family. So:
- a token bucket per provider lives in $CLOUDTUNE_HOME/locks/poll-<provider>.json, updated under an
  flock, so jobs, `status` and `gc` in any number of processes draw from one budget;
- a 429 / RateLimitedError with Retry-After (or an exhausted RateLimit window) stops everyone's
  calls to that provider until then (`penalize`);
- `StatusPoller` decides *when* a machine is worth asking about: slowly (HEALTHY_INTERVAL_S) while it
  runs and the store's heartbeat shows the trainer alive, fast (ACTIVE_INTERVAL_S) around launch and
  teardown or when the heartbeat is missing; in between it answers from the last status.
Stdlib only; nothing here calls a provider itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Budget for one provider: sustained requests/second and the burst the bucket holds."""

    rate_per_s: float
    burst: float
    source: str  # where the provider's number comes from
    healthy_interval_s: float = 30.0  # status poll period while running with a fresh heartbeat


# We take about half of what each provider allows, since other tools may share the account.
LIMITS: dict[str, Limits] = {
    "runpod": Limits(3000 / 3600 / 2, 20, "RunPod REST v2 RateLimit-Policy: 60/minute, 3000/hour"),
    "lambda": Limits(0.5, 5, "Lambda Cloud API: about 1 request/second per account (launch ~1 per 12 s)"),
    "vast": Limits(0.5, 5, "Vast.ai per-endpoint thresholds (shared/apis/vast/endpoints/*.yaml)"),
    "aws": Limits(5.0, 50, "EC2 request throttling: token bucket per API family (describe calls ~20/s)"),
    "modal": Limits(2.0, 20, "Modal publishes no control-plane limit; a conservative default"),
    "local": Limits(1000.0, 1000, "the local provider is this machine", healthy_interval_s=1.0),
}
DEFAULT_LIMITS = Limits(0.5, 5, "unknown provider: conservative")

HEALTHY_INTERVAL_S = 30.0  # machine running and the trainer's heartbeat fresh: the store says enough
ACTIVE_INTERVAL_S = 5.0  # launch, teardown, no heartbeat yet: the state is changing
HEARTBEAT_FRESH_S = 90.0  # the trainer beats every <= 30 s (trainer/contract.py)


def _state_path(provider: str) -> Path:
    from cloudtune.home import home

    d = home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"poll-{provider}.json"


class PollBudget:
    """A token bucket for one provider, persisted and flock'ed so every process shares it."""

    def __init__(self, provider: str, *, limits: Limits | None = None, path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.provider = provider
        self.limits = limits or LIMITS.get(provider, DEFAULT_LIMITS)
        self.path = path or _state_path(provider)
        self._clock = clock

    def _update(self, fn: Callable[[dict[str, Any], float], Any]) -> Any:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 4096)
            try:
                state = json.loads(raw) if raw else {}
            except ValueError:
                state = {}
            now = self._clock()
            tokens = float(state.get("tokens", self.limits.burst))
            updated = float(state.get("updated", now))
            state["tokens"] = min(self.limits.burst, tokens + max(0.0, now - updated) * self.limits.rate_per_s)
            state["updated"] = now
            out = fn(state, now)
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(state).encode())
            return out
        finally:
            os.close(fd)  # closing drops the flock

    def try_acquire(self, cost: float = 1.0) -> float:
        """Take `cost` tokens: 0.0 when granted, else the seconds until it would be (nothing taken)."""

        def take(state: dict[str, Any], now: float) -> float:
            blocked = float(state.get("not_before", 0.0)) - now
            if blocked > 0:
                return blocked
            if state["tokens"] >= cost:
                state["tokens"] -= cost
                return 0.0
            return (cost - state["tokens"]) / self.limits.rate_per_s

        return float(self._update(take))

    def wait(self, cost: float = 1.0, max_wait_s: float = 60.0) -> bool:
        """Block until `cost` tokens are granted (True) or `max_wait_s` has passed (False): for one-off
        callers such as `gc`, which share the watchdogs' budget instead of bursting past it."""
        import time

        deadline = time.time() + max_wait_s
        while True:
            wait = self.try_acquire(cost)
            if wait <= 0:
                return True
            if time.time() + wait > deadline:
                return False
            time.sleep(min(wait, 5.0))

    def penalize(self, retry_after_s: float | None, *, default_s: float = 30.0) -> None:
        """The provider said 429 (Retry-After, RateLimit) or throttled: everyone waits that long."""
        wait = retry_after_s if retry_after_s and retry_after_s > 0 else default_s

        def block(state: dict[str, Any], now: float) -> None:
            state["not_before"] = max(float(state.get("not_before", 0.0)), now + wait)
            state["tokens"] = 0.0

        self._update(block)

    def blocked_for(self) -> float:
        return float(self._update(lambda state, now: max(0.0, float(state.get("not_before", 0.0)) - now)))


@dataclass
class _Seen:
    at: float
    machine: Any


class StatusPoller:
    """When to ask a provider for a machine's status, and what to answer in between."""

    def __init__(self, budget: PollBudget, *, clock: Callable[[], float] = time.time,
                 healthy_interval_s: float | None = None, active_interval_s: float = ACTIVE_INTERVAL_S) -> None:
        self.budget = budget
        self._clock = clock
        self.healthy_interval_s = (healthy_interval_s if healthy_interval_s is not None
                                   else budget.limits.healthy_interval_s)
        self.active_interval_s = active_interval_s
        self._seen: dict[str, _Seen] = {}
        self.calls = 0

    def interval(self, machine: Any, heartbeat_age_s: float | None) -> float:
        running = getattr(getattr(machine, "state", None), "value", None) == "running"
        if running and heartbeat_age_s is not None and heartbeat_age_s < HEARTBEAT_FRESH_S:
            return self.healthy_interval_s
        return self.active_interval_s

    def status(self, machine_id: str, fetch: Callable[[], Any], *, heartbeat_age_s: float | None) -> Any:
        """The machine's status: the last one while it is recent enough, else `fetch()` within budget.
        A RateLimitedError from `fetch` penalizes the provider's budget and is re-raised."""
        now = self._clock()
        seen = self._seen.get(machine_id)
        if seen is not None:
            if now - seen.at < self.interval(seen.machine, heartbeat_age_s):
                return seen.machine
            if self.budget.try_acquire() > 0:
                return seen.machine  # over budget: the last answer stands a little longer
        else:
            self.budget.try_acquire()  # the first look is never skipped; it still counts
        from cloudtune.providers.base import RateLimitedError

        self.calls += 1
        try:
            machine = fetch()
        except RateLimitedError as err:
            self.budget.penalize(err.retry_after_s)
            raise
        self._seen[machine_id] = _Seen(now, machine)
        return machine

    def forget(self, machine_id: str) -> None:
        """Teardown or a decision about the machine: the next look goes to the provider."""
        self._seen.pop(machine_id, None)
