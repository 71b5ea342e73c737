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
from pathlib import Path

from cloudtune.home import home

POLL_S = float(os.environ.get("CLOUDTUNE_WATCHDOG_POLL_S", "1.0"))


def lock_path(job_id: str) -> Path:
    d = home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"watchdog-{job_id}.lock"


def log_path(job_id: str) -> Path:
    d = home() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"watchdog-{job_id}.log"


def watchdog_alive(job_id: str) -> bool:
    """True while some process holds the job's watchdog lock."""
    path = lock_path(job_id)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def ensure_watchdog(db, job_id: str, who: str) -> bool:
    """Restart the watchdog of an unfinished job when it is dead. True when one was started."""
    job = db.get_job(job_id)
    if job is None:
        return False
    from cloudtune.run import state as S

    live_attempt = any(a["state"] in (S.A_RUNNING, S.A_PROVISIONING) for a in db.attempts(job_id))
    if job.is_terminal and not live_attempt:
        return False
    if watchdog_alive(job_id) or db.lease_holder(job_id) is not None:
        return False
    row = db.watchdog_row(job_id)
    db.event(job_id, "watchdog_restarted",
             f"{who} found no live watchdog (last beat "
             f"{time.time() - row['beat_at']:.0f}s ago, pid {row['pid']}); started a new one" if row else
             f"{who} found no live watchdog; started one")
    start_watchdog(job_id)
    return True


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
    if not control.begin(defer_to_controller=True):
        db.event(job_id, "watchdog", f"job is controlled by {control.holder_now()}; this watchdog stands by")
        log.info("job %s is leased by %s; exiting", job_id, control.holder_now())
        return 0
    if control.previous and not control._same_db(control.previous):
        orch = Orchestrator(db, job_id)  # the state was imported from the store: start from it
    db.event(job_id, "watchdog", f"watchdog started (pid {os.getpid()})")
    log.info("watching job %s", job_id)
    errors = 0
    while not stop["flag"]:
        if not control.keep():
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
