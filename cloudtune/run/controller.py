"""A controller that is not the laptop: the same `Orchestrator.tick()`, driven from the store.

Why: the watchdog on the user's machine stops when the laptop closes. A controller elsewhere (a
scheduled Modal Function, an AWS Lambda on an EventBridge schedule, a cron job on any box) runs
`control()` every minute: for each job handed to it (`_controller/jobs/<id>.json` in the store) it
takes the job's lease (cloudtune.run.lease), imports the job's state from the store into its own
state.db (cloudtune.run.job_state), ticks for a bounded time, writes the state back, and keeps the
lease while the job lives. Between invocations nothing runs and nothing bills; the machines guard
themselves meanwhile (cloudtune/trainer/guards.py).

The laptop's watchdog takes the same lease, so the two never act on one job at once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.run import job_state as J
from cloudtune.run import state as S
from cloudtune.run.lease import Lease, holder_site, new_holder

log = logging.getLogger("cloudtune.controller")

DEFAULT_SECONDS = 50.0  # one invocation of a per-minute schedule
DEFAULT_POLL_S = 2.0
# A job handed to a controller goes back to a laptop's watchdog only after the controller has been
# silent this long (its lease lapsed and nobody renewed it): e.g. after `controller remove`.
HANDOVER_QUIET_S = float(os.environ.get("CLOUDTUNE_HANDOVER_QUIET_S", "600"))


class JobControl:
    """The lease and the state mirror of one job, for one controller (watchdog or serverless)."""

    def __init__(self, db: S.StateDB, store: Any, job_id: str, holder: str, proven_dead: Any = None) -> None:
        self.db, self.store, self.job_id, self.holder = db, store, job_id, holder
        self.lease = Lease(store, job_id, holder, proven_dead=proven_dead)
        self.mirror = J.StateMirror(db, store, job_id)
        self.previous: str | None = None  # who held the lease before us

    def begin(self, defer_to_controller: bool = False) -> bool:
        """Take the lease; import the store's state when someone else acted last. False: leased elsewhere.

        With `defer_to_controller` (a laptop's watchdog), a job handed to a controller is left to it
        while that controller is recently active, even between its ticks when the lease is free."""
        info, _ = self.lease.read()
        if defer_to_controller and self._controller_active(info):
            return False
        if not self.lease.acquire():
            return False
        self.previous = info.holder if info else None
        if not self.db.job_exists(self.job_id) or (self.previous and not self._same_db(self.previous)):
            J.pull(self.db, self.store, self.job_id)
        if self.db.job_exists(self.job_id):
            self.mirror.push()
        return True

    def _controller_active(self, info: Any) -> bool:
        entry = self.store.read_json(J.registry_key(self.job_id))
        if not isinstance(entry, dict):
            return False
        last = max(float(entry.get("time") or 0), info.expires_at if info else 0.0)
        return time.time() - last < HANDOVER_QUIET_S

    def _same_db(self, holder: str) -> bool:
        """A holder that wrote this very state.db (ours, or this host's earlier watchdog) left nothing
        newer in the store than in the db; anyone else's decisions must be imported first."""
        return holder == self.holder or holder_site(holder) == holder_site(self.holder) == ("watchdog", self.site)

    @property
    def site(self) -> str:
        return holder_site(self.holder)[1]

    def keep(self) -> bool:
        return self.lease.hold()

    def after_tick(self) -> None:
        self.mirror.push()

    def holder_now(self) -> str | None:
        info, _ = self.lease.read()
        return info.holder if info and info.live(time.time()) else None


def watchdog_site() -> str:
    """This host and $CLOUDTUNE_HOME: the watchdogs that share one state.db and one flock."""
    import hashlib
    import socket

    from cloudtune.home import home

    return f"{socket.gethostname()}/{hashlib.sha256(str(home()).encode()).hexdigest()[:8]}"


def register(store: Any, job_id: str, controller: str) -> None:
    store.put_json(J.registry_key(job_id), {"job_id": job_id, "controller": controller, "time": time.time()})


def registered(store: Any) -> list[str]:
    return sorted(Path(k).stem for k in store.list(J.REGISTRY_PREFIX) if k.endswith(".json"))


@dataclass
class TickReport:
    job_id: str
    action: str  # ticked | leased-elsewhere | finished | error
    state: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "action": self.action, "state": self.state, "detail": self.detail}


def control(
    store: Any,
    *,
    holder: str | None = None,
    db: S.StateDB | None = None,
    seconds: float = DEFAULT_SECONDS,
    poll_s: float = DEFAULT_POLL_S,
    jobs: list[str] | None = None,
) -> list[TickReport]:
    """One invocation: tick every registered job this controller can lease, for about `seconds`."""
    from cloudtune.run.orchestrator import Orchestrator

    holder = holder or new_holder("controller")
    db = db or S.StateDB(controller_db_path())
    reports: dict[str, TickReport] = {}
    controls: dict[str, tuple[JobControl, Orchestrator]] = {}
    for job_id in jobs if jobs is not None else registered(store):
        jc = JobControl(db, store, job_id, holder)
        try:
            if not jc.begin():
                reports[job_id] = TickReport(job_id, "leased-elsewhere", detail=jc.holder_now() or "")
                continue
            if not db.job_exists(job_id):
                reports[job_id] = TickReport(job_id, "error", detail="no controller state in the store")
                continue
            controls[job_id] = (jc, Orchestrator(db, job_id))
            if jc.previous and jc.previous != holder:
                db.event(job_id, "controller", f"{holder} took over the job from {jc.previous}")
        except Exception as err:  # noqa: BLE001 - one job's trouble must not stop the others
            log.exception("job %s", job_id)
            reports[job_id] = TickReport(job_id, "error", detail=f"{type(err).__name__}: {err}")
    deadline = time.time() + seconds
    while controls:
        for job_id, (jc, orch) in list(controls.items()):
            try:
                if not jc.keep():
                    reports[job_id] = TickReport(job_id, "leased-elsewhere", detail=jc.holder_now() or "")
                    del controls[job_id]
                    continue
                more = orch.tick()
                jc.after_tick()
            except Exception as err:  # noqa: BLE001 - retried at the next tick, like the watchdog does
                log.exception("tick of %s failed", job_id)
                db.event(job_id, "controller_error", f"{type(err).__name__}: {err} (retrying)")
                reports[job_id] = TickReport(job_id, "error", detail=f"{type(err).__name__}: {err}")
                continue
            job = db.get_job(job_id)
            reports[job_id] = TickReport(job_id, "ticked", job.state if job else None)
            if not more:
                jc.lease.release()
                store.delete(J.registry_key(job_id))
                reports[job_id] = TickReport(job_id, "finished", job.state if job else None)
                del controls[job_id]
        if time.time() >= deadline or not controls:
            break
        time.sleep(poll_s)
    return list(reports.values())


def controller_db_path() -> Path:
    from cloudtune.home import home

    override = os.environ.get("CLOUDTUNE_CONTROLLER_DB")
    return Path(override) if override else home() / "controller" / "state.db"


CONTROLLERS = ("modal", "aws-lambda", "cron")


def check_handover(controller: str, store_url: str) -> None:
    """Before a job is created: can that controller reach this job? One line, exit 2, if not."""
    from cloudtune.errors import UserError

    if controller not in CONTROLLERS:
        raise UserError(f"--controller {controller!r} is not known; use modal or aws-lambda (a deployed "
                        f"`cloudtune controller`) "
                        f"or cron (whatever runs `cloudtune controller tick --store {store_url}`)")
    if controller in ("modal", "aws-lambda"):
        from cloudtune.cli.controller_cmd import deployments

        if not store_url.startswith("s3://"):
            raise UserError(f"--controller {controller} cannot reach the store {store_url!r}; set store.url to an "
                            f"s3:// store, or use --controller cron on this machine")
        if not any(d.get("store_url") == store_url.rstrip("/") and d.get("on") == controller for d in deployments()):
            raise UserError(f"no controller is deployed for the store {store_url} on {controller}; run `cloudtune "
                            f"controller deploy --on {controller} --store {store_url}` first")


def hand_over(db: S.StateDB, store: Any, job_id: str, controller: str) -> None:
    """Give a new job to a controller elsewhere: its state into the store, then the job into its list.

    The order matters: a controller that finds the job listed must find its state too."""
    db.event(job_id, "controller", f"handed to the {controller} controller; no watchdog on this machine")
    J.StateMirror(db, store, job_id).push(force=True)
    register(store, job_id, controller)
