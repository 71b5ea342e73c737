"""The watchdog: a detached process per job that drives it to an end and makes the machine go away.

Why detached: the expensive failure is the machine that keeps billing after the terminal that
started it is gone. `cloudtune run` starts `python -m cloudtune.run.watchdog JOB` in its own
session (stdin closed, output to $CLOUDTUNE_HOME/logs/watchdog-JOB.log), so closing the terminal,
Ctrl-C or killing the CLI does not stop it. It is the only process that launches, relaunches and
terminates (see cloudtune.run.orchestrator for the rules).

Liveness: the watchdog holds an exclusive flock on $CLOUDTUNE_HOME/locks/watchdog-JOB.lock for its
whole life (the kernel drops it when the process dies, however it dies) and holds a lease row in the
state db (pid, beat, lease_until), renewed every tick. Deleting the lock file defeats the flock (the
new file has no holder), so both are checked: a second watchdog starts only when neither the lock
nor a live lease holder exists, and a watchdog that finds its lease taken exits. `cloudtune status` and `stop` call `ensure_watchdog`, which restarts a dead watchdog of
an unfinished job, so a crash of the watchdog costs a pause, never a forgotten machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.home import home

POLL_S = float(os.environ.get("CLOUDTUNE_WATCHDOG_POLL_S", "1.0"))


def fresh_s() -> float:
    """How old a live watchdog's beat may be and still count as attending. Longer than the longest tick
    (a verified terminate backs off for up to 120 s between beats); a watchdog silent longer is hung or
    stopped, and `status` shows its job as unattended."""
    try:
        return max(1.0, float(os.environ.get("CLOUDTUNE_WATCHDOG_FRESH_S", "180")))
    except ValueError:
        return 180.0


def lock_path(job_id: str) -> Path:
    d = home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"watchdog-{job_id}.lock"


def log_path(job_id: str) -> Path:
    d = home() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"watchdog-{job_id}.log"


def watchdog_alive(job_id: str) -> bool | None:
    """True while some process holds the job's watchdog lock; None when the lock cannot be opened (a
    read-only or full $CLOUDTUNE_HOME): then the watchdog's lease row is the only evidence."""
    try:
        path = lock_path(job_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def start_watchdog(job_id: str) -> subprocess.Popen:
    """Start the detached watchdog; it survives the caller (own session, no terminal)."""
    log = open(log_path(job_id), "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "cloudtune.run.watchdog", job_id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=os.environ.copy(),
        )
    finally:
        log.close()


def stop_watchdog(job_id: str, timeout_s: float = 30.0) -> bool:
    """SIGTERM this home's watchdog of the job (it releases the lease, the job keeps running) and wait
    until it is gone. True when one was running."""
    from cloudtune.run.state import StateDB

    row = StateDB().watchdog_row(job_id)
    if not row or not watchdog_alive(job_id):
        return False
    try:
        os.kill(int(row["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + timeout_s
    while watchdog_alive(job_id) and time.time() < deadline:
        time.sleep(0.2)
    return True


def _needs_owner(db, job) -> bool:
    """An unfinished job, or a finished one whose machine may still exist: someone must attend it."""
    from cloudtune.run import state as S

    live_attempt = any(a["state"] in (S.A_RUNNING, S.A_PROVISIONING) for a in db.attempts(job.id))
    return not job.is_terminal or live_attempt


@dataclass
class Attendance:
    """Who attends a job now (`cloudtune status`): this home's watchdog, a controller holding the job's
    lease in the store, or nobody since `unattended_since`. `action` says what `status` did about it."""

    attended_by: str | None  # "watchdog (pid N, beat 3 s ago)" | "controller modal/app (lease until ...)"
    kind: str | None  # watchdog | controller | None (unattended, or nothing to attend)
    unattended_since: float | None = None
    action: str | None = None  # restarted | lease held elsewhere | --no-restart | ...
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        from cloudtune.run.cost import iso

        return {"attended_by": self.attended_by, "unattended_since": iso(self.unattended_since),
                "attendance_action": self.action}


STORE_READ_S = float(os.environ.get("CLOUDTUNE_STATUS_STORE_S", "10"))


def _store_read(job, fn) -> tuple[Any, str | None]:
    """(fn(store), None) or (None, error): one read of the job's store, no retries, within STORE_READ_S
    (an S3 endpoint that accepts and never answers must not hang `status`)."""
    import threading

    from cloudtune.store import open_store

    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["value"] = fn(open_store(job.store_url, endpoint_url=job.store_endpoint, retry_s=0))
        except Exception as err:  # noqa: BLE001 - an unreachable store is shown, not raised
            msg = str(err).splitlines()[0] if str(err) else ""
            out["error"] = f"{type(err).__name__}: {msg[:160]}".rstrip(": ")

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(STORE_READ_S)
    if t.is_alive():
        return None, f"no answer in {STORE_READ_S:g} s"
    return out.get("value"), out.get("error")


def _store_lease(job) -> tuple[Any, str | None]:
    """(LeaseInfo or None, error) of the job's lease in its store."""
    from cloudtune.run.lease import Lease

    return _store_read(job, lambda store: Lease(store, job.id, holder="status").read()[0])


def _ago(t: float, now: float) -> str:
    s = max(0, int(now - t))
    return f"{s} s" if s < 120 else (f"{s // 60} min" if s < 7200 else f"{s // 3600} h")


def attendance(db, job, *, now: float | None = None) -> Attendance:
    """Who attends the job, from this home's watchdog row (pid alive and beat within its lease) and the
    job's lease in the store (a controller elsewhere, or another home's watchdog, renewing it)."""
    from cloudtune.run.cost import iso
    from cloudtune.run.lease import holder_site

    now = time.time() if now is None else now
    if not _needs_owner(db, job):
        return Attendance(None, None)
    row = db.watchdog_row(job.id)
    pid = db.lease_holder(job.id)
    if row is not None and pid is not None and now - float(row["beat_at"]) < fresh_s():
        return Attendance(f"watchdog (pid {pid}, beat {_ago(row['beat_at'], now)} ago)", "watchdog", pid=pid)
    if pid is None and watchdog_alive(job.id):  # a new watchdog holds the lock, before its first beat
        return Attendance("watchdog (starting)", "watchdog")
    info, err = _store_lease(job)
    from cloudtune.run.controller import watchdog_site

    ours = info is not None and holder_site(info.holder) == ("watchdog", watchdog_site())
    if info is not None and info.live(now) and not ours:
        kind, site = holder_site(info.holder)
        return Attendance(f"{kind} {site} (lease until {iso(info.expires_at)})", "controller")
    last = [float(row["beat_at"])] if row is not None else []
    if info is not None and not ours and info.holder != "<unreadable>" and info.expires_at > 0:
        last.append(info.expires_at - _lease_ttl())  # when the other holder last renewed it
    since = max(last) if last else float(job.created_at)
    a = Attendance(None, None, unattended_since=since, pid=pid)
    if err is not None:
        a.action = f"store unreachable ({err}); controller lease unknown"
    return a


def _lease_ttl() -> float:
    from cloudtune.run.lease import lease_ttl_s

    return lease_ttl_s()


def restart_blocker(db, job) -> str | None:
    """Why a new watchdog must not be started for the job now, or None when one may be."""
    from cloudtune.run.state import _fs_fault

    fault = "full or read-only" if getattr(db, "read_only", False) else _fs_fault(db.path)
    if fault:
        return f"not restarted: the state db's disk is {fault} (a watchdog could not write it)"
    row = db.watchdog_row(job.id)
    if watchdog_alive(job.id) or db.lease_holder(job.id) is not None:
        pid = db.lease_holder(job.id) or (row["pid"] if row else "?")
        return (f"not restarted: watchdog pid {pid} still holds the job's lock/lease but has not beaten "
                f"for {_ago(row['beat_at'], time.time()) if row else '?'} (stopped or hung?)")
    info, err = _store_lease(job)
    if err is not None:
        return None  # the new watchdog retries the store itself; a job must not stay ownerless
    from cloudtune.run.controller import HANDOVER_QUIET_S, watchdog_site
    from cloudtune.run.lease import holder_site

    now = time.time()
    if info is not None and info.live(now) and holder_site(info.holder) != ("watchdog", watchdog_site()):
        return f"not restarted: the lease is held elsewhere ({info.holder})"
    from cloudtune.run.job_state import registry_key

    entry, _ = _store_read(job, lambda store: store.read_json(registry_key(job.id)))
    if isinstance(entry, dict):
        last = max(float(entry.get("time") or 0), info.expires_at if info else 0.0)
        if now - last < HANDOVER_QUIET_S:
            return (f"not restarted: handed to the {entry.get('controller')} controller, silent "
                    f"{_ago(last, now)}; a watchdog takes over after {HANDOVER_QUIET_S:.0f} s of silence")
    return None


def ensure_watchdog(db, job_id: str, who: str) -> bool:
    """Restart the watchdog of an unfinished job when it is dead. True when one was started."""
    job = db.get_job(job_id)
    if job is None or not _needs_owner(db, job):
        return False
    if restart_blocker(db, job) is not None:
        return False
    restart(db, job, who)
    return True


def restart(db, job, who: str) -> subprocess.Popen:
    """Start a new watchdog for the job and record why (the caller checked `restart_blocker`)."""
    row = db.watchdog_row(job.id)
    db.event(job.id, "watchdog_restarted",
             f"{who} found no live watchdog (last beat "
             f"{time.time() - row['beat_at']:.0f}s ago, pid {row['pid']}); started a new one" if row else
             f"{who} found no live watchdog; started one")
    return start_watchdog(job.id)


def _event(db, job_id: str, kind: str, message: str) -> None:
    try:
        db.event(job_id, kind, message)
    except Exception:  # noqa: BLE001 - the db itself may be the fault; the log has it
        pass


def _store_retrying(fn, stop: dict, log, db, job_id: str):
    """fn() retried with backoff while the store fails (full, read-only, unreachable): the watchdog waits
    for its store instead of dying. None when asked to exit meanwhile."""
    tries = 0
    while not stop["flag"]:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            tries += 1
            log.warning("job %s: the store cannot be used yet (%s); retrying", job_id, err)
            if tries in (1, 10) or tries % 100 == 0:
                _event(db, job_id, "watchdog_error", f"cannot take the job's lease: {type(err).__name__}: {err} "
                       f"(retrying)")
            time.sleep(min(30.0, POLL_S * 2 ** min(tries, 5)))
    return None


def run(job_id: str) -> int:
    from cloudtune.run.orchestrator import Orchestrator
    from cloudtune.run.state import StateDB

    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog[%(process)d] %(message)s")
    log = logging.getLogger("cloudtune.watchdog")
    fd = os.open(lock_path(job_id), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.time() + 3.0  # `status` may hold the lock for an instant while probing it
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() >= deadline:
                log.info("another watchdog owns job %s; exiting", job_id)
                return 0
            time.sleep(0.1)

    stop = {"flag": False}

    def _sig(signum, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    db = StateDB()
    started = time.time()
    holder = db.lease_holder(job_id)
    if holder is not None and holder != os.getpid():
        log.info("watchdog %s holds the lease of job %s (its lock file was replaced); exiting", holder, job_id)
        return 0
    try:
        orch = Orchestrator(db, job_id)
    except KeyError:
        log.error("job %s does not exist", job_id)
        return 2
    # The job's lease in its store: one controller at a time, whether this watchdog, another
    # laptop's or a serverless one (cloudtune.run.controller); the state follows the lease.
    from cloudtune.run.controller import JobControl, watchdog_site
    from cloudtune.run.lease import holder_site, new_holder

    site = watchdog_site()
    # We hold this home's flock for the job, so an earlier watchdog of this home is dead, whatever
    # its lease says: take over at once instead of waiting for it to expire.
    control = JobControl(db, orch.store, job_id, new_holder("watchdog", site),
                         proven_dead=lambda holder: holder_site(holder) == ("watchdog", site))
    began = _store_retrying(lambda: control.begin(defer_to_controller=True), stop, log, db, job_id)
    if began is None:  # asked to exit while the store was unusable
        return 0
    if not began:
        db.event(job_id, "watchdog", f"job is controlled by {control.holder_now()}; this watchdog stands by")
        log.info("job %s is leased by %s; exiting", job_id, control.holder_now())
        return 0
    if control.previous and not control._same_db(control.previous):
        orch = Orchestrator(db, job_id)  # the state was imported from the store: start from it
    db.event(job_id, "watchdog", f"watchdog started (pid {os.getpid()})")
    log.info("watching job %s", job_id)
    errors = 0
    while not stop["flag"]:
        # The lease lives in the store: a full, read-only or unreachable store must not kill the job's
        # only owner. While the lease cannot be renewed the watchdog acts only until its lease lapses
        # (after that another controller, which can reach the store, may hold it), then waits.
        try:
            kept = control.keep()
        except Exception as err:  # noqa: BLE001 - the store's fault, retried with backoff below
            kept = None
            errors += 1
            log.warning("cannot renew the job's lease in its store: %s", err)
            if errors in (1, 10) or errors % 100 == 0:
                _event(db, job_id, "watchdog_error", f"cannot renew the job's lease: {type(err).__name__}: {err} "
                       f"(retrying; acting only until the lease lapses)")
            if time.time() >= control.lease._expires_at:
                try:  # alive and waiting for its store: `status` shows this watchdog, not "unattended"
                    db.watchdog_beat(job_id, os.getpid(), started)
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(min(30.0, POLL_S * 2 ** min(errors, 5)))
                continue
        if kept is False:
            db.event(job_id, "watchdog", f"lease lost to {control.holder_now()}; this watchdog stands down")
            return 0
        # The beat is a db write like any other: a db locked past its busy timeout, a full disk or an
        # I/O error is retried with backoff here, never allowed to kill the only process that owns
        # the job's machines.
        try:
            if not db.watchdog_beat(job_id, os.getpid(), started):
                log.warning("another watchdog took the lease of job %s; exiting", job_id)
                return 0
            more = orch.tick()
            control.after_tick()
            if kept:
                errors = 0
        except Exception as err:  # noqa: BLE001 - keep watching: the next tick retries the decision
            errors += 1
            log.exception("tick failed")
            if errors in (1, 10) or errors % 100 == 0:
                try:
                    db.event(job_id, "watchdog_error", f"{type(err).__name__}: {err} (retrying)")
                except Exception:  # noqa: BLE001 - the db itself may be the fault; the log has it
                    pass
            time.sleep(min(30.0, POLL_S * 2 ** min(errors, 5)))
            continue
        if not more:
            control.lease.release()
            break
        time.sleep(POLL_S)
    for _ in range(30):  # the final beat and events: the job is already decided, keep trying a while
        try:
            db.watchdog_beat(job_id, os.getpid(), started)
            job = db.get_job(job_id)
            break
        except Exception:  # noqa: BLE001
            time.sleep(1.0)
    else:
        return 1
    if stop["flag"] and job is not None and not job.is_terminal:
        control.lease.release()  # the next controller (a hand-over, a restarted watchdog) takes over at once
        db.event(job_id, "watchdog", "watchdog asked to exit (SIGTERM); the job keeps running, "
                 "`cloudtune status` restarts the watchdog")
    else:
        db.event(job_id, "watchdog", "watchdog exiting: job finished and its machines are gone")
    log.info("done: job %s is %s", job_id, job.state if job else "?")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m cloudtune.run.watchdog JOB_ID", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1]))
