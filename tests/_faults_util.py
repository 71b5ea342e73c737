"""Helpers for the fault tests: a job whose machine is a local sleeper, so a real watchdog can watch
it for as long as a test needs without training anything (cheap on two cores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cloudtune.providers import get_provider
from cloudtune.providers.base import LaunchRequest

from cloudtune.run import state as S
from cloudtune.spec import parse_spec
from tests._run_util import ROOT, cli_env, wait_for


def sleeper_job(tmp: Path, job_id: str, *, seconds: int = 120, **limits) -> tuple[S.StateDB, str]:
    """A running job (attempt 1 = a local machine running `sleep`) recorded in this $CLOUDTUNE_HOME."""
    db = S.StateDB()
    spec = parse_spec({"name": "sleeper", "model": "tiny:reverse", "data": {"train": str(tmp / "x.jsonl")},
                       "store": {"url": f"file://{tmp / 'store'}"},
                       "limits": {"heartbeat_timeout_s": 3600, **limits}})
    db.insert_job(id=job_id, name="sleeper", provider="local", store_url=f"file://{tmp / 'store'}",
                  spec_json=spec.to_json(), plan_json="[]", state=S.RUNNING)
    p = get_provider("local")
    req = LaunchRequest(job_id=job_id, attempt=1, offer=p.offers()[0], spot=False, image="-",
                        command=[sys.executable, "-c", f"import time; time.sleep({seconds})"])
    m = p.launch(req)
    db.insert_attempt(job_id, 1, m.name, "local", "local")
    db.update_attempt(job_id, 1, machine_id=m.machine_id, state=S.A_RUNNING)
    db.open_ledger(job_id, 1, provider="local", offer_id="local", gpu="CPU", gpu_count=1, spot=0, price_hr=0.0,
                   on_demand_price_hr=0.0, billing_granularity_s=1, started_at=time.time())
    db.set_state(job_id, S.RUNNING)
    return db, m.machine_id


def start_watchdog(home: Path, job_id: str, **extra: str) -> subprocess.Popen:
    env = cli_env(home, **extra)
    log = open(home / f"watchdog-{job_id}.test.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "cloudtune.run.watchdog", job_id], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def wait_beat(db: S.StateDB, job_id: str, after: float, timeout: float = 30.0) -> dict:
    return wait_for(lambda: (r := db.watchdog_row(job_id)) and r["beat_at"] > after and r, timeout,
                    f"a watchdog beat of {job_id} after {after:.1f}")


def end(proc: subprocess.Popen | None, machine_id: str | None = None) -> None:
    """Stop what a test started: its watchdog process (by pid) and its local machine."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if machine_id:
        get_provider("local").terminate(machine_id)
