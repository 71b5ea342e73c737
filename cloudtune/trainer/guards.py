"""On-machine guards: the rules a rented machine enforces on itself, with no controller at all.

Why on the machine: the controller (the laptop's watchdog, or a serverless one) can be gone: a
closed laptop, a dead process, an expired lease. A machine that keeps billing then depends on
nobody. So the entrypoint (PID 1 of the image, and the local provider's machine) checks three
things itself and, when one trips, stops the trainer (SIGTERM: it checkpoints if it can), kills it
after the grace period and runs the self-terminate hook:

1. **lifetime**: the hard cap `CLOUDTUNE_MAX_LIFETIME_S`, which the orchestrator derives from the
   job (`limits.max_hours`, the attempt's remaining budget, the estimate) rather than a fixed 72 h;
2. **stall**: the trainer's heartbeat in the store shows no progress (no optimizer step, or no
   heartbeat at all) for `CLOUDTUNE_STALL_TIMEOUT_S` (the job's `limits.heartbeat_timeout_s`);
   a hung trainer's heartbeat *thread* may still beat, so progress is read from `last_step_time`;
3. **budget**: this attempt's own clock times its own price reaches the budget the controller left
   it (`CLOUDTUNE_BUDGET_USD` at `CLOUDTUNE_PRICE_HR`).

The verdict is written to `<job>/guards/attempt-<n>.json` so whichever controller looks next knows
why the machine ended (a stall is relaunched, a budget stop is final).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from cloudtune.trainer.contract import (
    ENV_ATTEMPT,
    ENV_BUDGET_GRACE_S,
    ENV_BUDGET_USD,
    ENV_GUARD_POLL_S,
    ENV_JOB_ID,
    ENV_LOAD_ALLOWANCE_S,
    ENV_PRICE_HR,
    ENV_STALL_TIMEOUT_S,
    ENV_STORE,
    ENV_STORE_ENDPOINT,
)

log = logging.getLogger("cloudtune.guards")

DEFAULT_POLL_S = 30.0
# Loading a model and the first optimizer step can take a while (downloading 140 GB of weights);
# before the first training heartbeat the stall clock allows this much on top of the timeout.
LOAD_ALLOWANCE_S = 1800.0
# The budget guard trips this long after the budget is spent, so a live controller, which stops
# the trainer more gently (control.json: checkpoint, then stop), acts first.
BUDGET_GRACE_S = 60.0
REASON_STALL = "stall"
REASON_BUDGET = "budget"
REASON_LIFETIME = "lifetime"


def guard_key(job_id: str, attempt: int) -> str:
    return f"{job_id}/guards/attempt-{attempt}.json"


def _env_float(env: dict[str, str], name: str) -> float | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        log.error("%s=%r is not a number; ignoring it", name, raw)
        return None
    return value if value > 0 else None


def _grace(env: dict[str, str]) -> float:
    raw = (env.get(ENV_BUDGET_GRACE_S) or "").strip()
    try:
        return max(0.0, float(raw)) if raw else BUDGET_GRACE_S
    except ValueError:
        return BUDGET_GRACE_S


@dataclass
class Verdict:
    reason: str  # stall | budget | lifetime
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "time": time.time()}


class Guards:
    """Evaluated by the entrypoint's loop; reads the store at most every `poll_s` seconds."""

    def __init__(
        self,
        *,
        started: float,
        stall_timeout_s: float | None = None,
        price_hr: float | None = None,
        budget_usd: float | None = None,
        poll_s: float = DEFAULT_POLL_S,
        store: Any = None,
        job_id: str | None = None,
        attempt: int | None = None,
        load_allowance_s: float = LOAD_ALLOWANCE_S,
        budget_grace_s: float = BUDGET_GRACE_S,
    ) -> None:
        self.started = started
        self.stall_timeout_s = stall_timeout_s
        self.price_hr = price_hr
        self.budget_usd = budget_usd
        self.poll_s = poll_s
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.load_allowance_s = load_allowance_s
        self.budget_grace_s = budget_grace_s
        self._next_poll = 0.0
        self._last_progress: float | None = None  # wall time of the last progress we saw
        self._training = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, started: float | None = None) -> Guards:
        env = dict(os.environ if env is None else env)
        store = None
        job_id = env.get(ENV_JOB_ID)
        stall = _env_float(env, ENV_STALL_TIMEOUT_S)
        if env.get(ENV_STORE) and job_id:
            try:
                from cloudtune.store import open_store

                store = open_store(env[ENV_STORE], endpoint_url=env.get(ENV_STORE_ENDPOINT) or None)
            except Exception as err:  # noqa: BLE001 - a guard that cannot read the store still caps time
                log.error("guards cannot open the store (%s): the stall guard is off", type(err).__name__)
        attempt_raw = env.get(ENV_ATTEMPT, "")
        return cls(
            started=time.time() if started is None else started,
            stall_timeout_s=stall,
            price_hr=_env_float(env, ENV_PRICE_HR),
            budget_usd=_env_float(env, ENV_BUDGET_USD),
            poll_s=_env_float(env, ENV_GUARD_POLL_S) or DEFAULT_POLL_S,
            store=store,
            job_id=job_id,
            attempt=int(attempt_raw) if attempt_raw.isdigit() else None,
            load_allowance_s=_env_float(env, ENV_LOAD_ALLOWANCE_S) or LOAD_ALLOWANCE_S,
            budget_grace_s=_grace(env),
        )

    @property
    def budget_deadline(self) -> float | None:
        """Wall time at which this attempt has spent its budget at its own price."""
        if not self.price_hr or self.budget_usd is None:
            return None
        return self.started + self.budget_usd / self.price_hr * 3600.0

    def _read_heartbeat(self) -> dict[str, Any] | None:
        if self.store is None or not self.job_id:
            return None
        from cloudtune.store import layout

        try:
            hb = self.store.read_json(layout.heartbeat_key(self.job_id))
        except Exception as err:  # noqa: BLE001 - an unreadable store is no evidence of a stall
            log.warning("guards could not read the heartbeat: %s", type(err).__name__)
            return None
        if not isinstance(hb, dict):
            return None
        if self.attempt is not None and str(hb.get("attempt")) != str(self.attempt):
            return None  # an older attempt's heartbeat says nothing about this one
        return hb

    def _observe(self, now: float) -> None:
        hb = self._read_heartbeat()
        if hb is None:
            return
        phase = hb.get("phase")
        if phase in ("checkpointing", "saving", "done", "failed", "preempted", "stopped"):
            # Writing a checkpoint or the final adapter is progress even without a new step.
            self._last_progress = max(self._last_progress or 0.0, float(hb.get("time") or now))
            return
        step_time = hb.get("last_step_time")
        if phase == "training" and step_time:
            self._training = True
            self._last_progress = max(self._last_progress or 0.0, float(step_time))
        elif phase == "training" and self._last_progress is None:
            self._training = True
            self._last_progress = float(hb.get("time") or now)

    def check(self, now: float | None = None) -> Verdict | None:
        """The first guard that trips, or None. Cheap between polls."""
        now = time.time() if now is None else now
        deadline = self.budget_deadline
        if deadline is not None and now >= deadline + self.budget_grace_s:
            return Verdict(
                REASON_BUDGET,
                f"budget of ${self.budget_usd:.2f} reached at ${self.price_hr:.2f}/h after "
                f"{(now - self.started) / 3600:.2f} h on this machine's own clock",
            )
        if self.stall_timeout_s is None:
            return None
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            self._observe(now)
        if self._last_progress is not None:
            idle = now - self._last_progress
            if idle > self.stall_timeout_s:
                return Verdict(REASON_STALL, f"no training progress for {idle:.0f}s "
                                             f"(limits.heartbeat_timeout_s={self.stall_timeout_s:g})")
        elif now - self.started > self.stall_timeout_s + self.load_allowance_s:
            return Verdict(REASON_STALL, f"no training heartbeat {now - self.started:.0f}s after start "
                                         f"(limits.heartbeat_timeout_s={self.stall_timeout_s:g} + "
                                         f"{self.load_allowance_s:.0f}s to load)")
        return None

    def record(self, verdict: Verdict) -> None:
        """Leave the verdict in the store for the controller. Best effort: the machine ends anyway."""
        if self.store is None or not self.job_id or self.attempt is None:
            return
        try:
            self.store.put_json(guard_key(self.job_id, self.attempt), verdict.to_dict())
        except Exception as err:  # noqa: BLE001
            log.error("could not record the guard verdict: %s", type(err).__name__)


def read_verdict(store: Any, job_id: str, attempt: int) -> dict[str, Any] | None:
    """What the machine's guards decided for this attempt, if they decided anything."""
    try:
        got = store.read_json(guard_key(job_id, attempt))
    except Exception:  # noqa: BLE001 - missing or unreadable: no verdict
        return None
    return got if isinstance(got, dict) and got.get("reason") else None
