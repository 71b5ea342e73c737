"""The watchdog's rules with the real trainer on the local provider: stop, a dead watchdog restarted
by `status`, a hung machine (stale heartbeat) replaced, and a dollar budget enforced mid-run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cloudtune.planner.plan import plan_for_spec
from cloudtune.spec import load_spec
from cloudtune.store import layout, open_store
from tests._run_util import assert_nothing_left, cli, cli_env, db_rows, last_json, quickstart_spec, wait_for

pytestmark = pytest.mark.slow

# Long enough to be stopped mid-run, short enough that the estimate stays under the quickstart's limits.max_hours.
LONG = {"training": {"max_steps": 20000}, "checkpoint": {"every_steps": 10}}


def _start(tmp: Path, env, name: str, **over) -> str:
    spec = quickstart_spec(tmp, name, **{**LONG, **over})
    out = cli(env, "run", str(spec), "--yes", "--detach", "--json")
    assert out.returncode == 0, out.stderr
    return last_json(out.stdout)["job_id"]


def _job(home: Path, job_id: str) -> dict:
    return db_rows(home, "SELECT * FROM jobs WHERE id = ?", job_id)[0]


def _training(home: Path, job_id: str, attempt: int = 1):
    return wait_for(lambda: (lambda j: j if j["state"] == "running" and j["current_attempt"] == attempt
                             and (j["step"] or 0) >= 1 else None)(_job(home, job_id)),
                    240, f"job {job_id} attempt {attempt} to train")


def _kinds(home: Path, job_id: str) -> list[str]:
    return [e["kind"] for e in db_rows(home, "SELECT kind FROM events WHERE job_id = ? ORDER BY id", job_id)]


def test_stop_and_dead_watchdog_restarted_by_status(tmp_path):
    env = cli_env(tmp_path / "home")
    home = tmp_path / "home"
    job_id = _start(tmp_path, env, "stopme")
    _training(home, job_id)
    wd = db_rows(home, "SELECT pid FROM watchdogs WHERE job_id = ?", job_id)[0]["pid"]
    os.kill(wd, signal.SIGKILL)
    wait_for(lambda: not _pid_alive(wd), 10, "the watchdog to die")
    out = cli(env, "status", job_id, "--json")
    assert out.returncode == 0 and "restarted" in out.stderr
    assert json.loads(out.stdout)[0]["state"] == "running"
    assert "watchdog_restarted" in _kinds(home, job_id)

    out = cli(env, "stop", job_id, "--json")
    assert out.returncode == 0, out.stderr
    assert last_json(out.stdout) == {"job_id": job_id, "state": "stopped"}
    att = db_rows(home, "SELECT * FROM attempts WHERE job_id = ?", job_id)
    assert len(att) == 1 and att[0]["exit_code"] == 76  # the trainer checkpointed and stopped on request
    store = open_store(f"file://{tmp_path / 'store'}")
    assert store.read_json(layout.latest_key(job_id)) is not None
    assert "stopping" in _kinds(home, job_id)  # the watchdog wrote control.json (the trainer consumes it)
    assert_nothing_left(job_id)
    again = cli(env, "stop", job_id)
    assert again.returncode != 0 and again.stderr.strip() == f"error: job {job_id} is already stopped; nothing to stop"


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_hung_machine_is_replaced_then_stopped(tmp_path):
    env = cli_env(tmp_path / "home")
    home = tmp_path / "home"
    job_id = _start(tmp_path, env, "hang", limits={"heartbeat_timeout_s": 8, "max_restarts": 2})
    _training(home, job_id)
    mdir = next((home / "local" / "machines").glob(f"cloudtune-{job_id}-1-*"))
    trainer = json.loads((mdir / "status.json").read_text())["trainer_pid"]  # the machine's entrypoint
    import psutil

    entry = psutil.Process(trainer)
    for p in [entry, *entry.children(recursive=True)]:
        p.suspend()  # a hung machine: alive, billing, silent (SIGSTOP, entrypoint and trainer alike)
    _training(home, job_id, attempt=2)
    att = db_rows(home, "SELECT * FROM attempts WHERE job_id = ? ORDER BY n", job_id)
    assert att[0]["end_reason"].startswith("heartbeat stale") and att[0]["state"] == "ended"
    assert not _pid_alive(trainer)
    assert "stale" in _kinds(home, job_id)
    out = cli(env, "stop", job_id, "--json")
    assert last_json(out.stdout)["state"] == "stopped"
    assert_nothing_left(job_id)


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(proc, how: str) -> None:
    import psutil

    try:
        getattr(proc, how)()
    except psutil.NoSuchProcess:
        pass


def test_budget_reached_mid_run_checkpoints_and_stops(tmp_path):
    """A job planned under its budget whose trainer then runs slower than estimated (it stalls: alive,
    billing, heartbeat within the timeout) is stopped by the watchdog when the spending reaches the
    budget, and the trainer checkpoints before it goes."""
    env = cli_env(tmp_path / "home")
    home = tmp_path / "home"
    # $3600/h is $1/s; the budget is the plan's own estimate plus 8 s, so check_budget lets it start.
    # 200 steps leave a few seconds to catch the trainer mid-run even on a fast CPU.
    over = {"training": {"max_steps": 200}, "checkpoint": {"every_steps": 1000}, "local": {"price_hr": 3600.0}}
    est = plan_for_spec(load_spec(quickstart_spec(tmp_path, "estimate", **over))).choice.est_cost_usd
    budget = round(est + 8, 2)
    job_id = _start(tmp_path, env, "budget", **over, limits={"max_cost_usd": budget})
    assert _job(home, job_id)["est_cost_usd"] == pytest.approx(est, abs=0.01) and est < budget
    # Stall the trainer once it trains (if the budget has not already stopped a slow start-up).
    job = wait_for(lambda: (lambda j: j if (j["state"] == "running" and (j["step"] or 0) >= 1)
                            or j["state"] in ("stopping", "stopped") else None)(_job(home, job_id)),
                   240, "training or the budget stop")
    mdir = next((home / "local" / "machines").glob(f"cloudtune-{job_id}-1-*"))
    trainer = json.loads((mdir / "status.json").read_text())["trainer_pid"]
    stalled = job["state"] == "running" and _pid_alive(trainer)
    tree = _tree(trainer) if stalled else []
    for p in tree:
        _signal(p, "suspend")  # the machine's entrypoint and the trainer under it
    try:
        wait_for(lambda: "stopping" in _kinds(home, job_id), 120, "the watchdog to stop the job on its budget")
    finally:
        if stalled:
            for p in tree:
                _signal(p, "resume")  # it reads control.json, checkpoints and exits 76
    final = wait_for(lambda: (lambda j: j if j["state"] in ("stopped", "done", "failed") else None)(
        _job(home, job_id)), 120, "the budget stop")
    assert final["state"] == "stopped" and final["reason"].startswith("budget reached"), final["reason"]
    assert final["step"] < 200  # stopped mid-run, not at the end
    att = db_rows(home, "SELECT * FROM attempts WHERE job_id = ?", job_id)
    assert len(att) == 1 and att[0]["exit_code"] == 76  # checkpointed and stopped on the controller's request
    store = open_store(f"file://{tmp_path / 'store'}")
    latest = store.read_json(layout.latest_key(job_id))
    assert latest is not None and 1 <= latest["step"] < 200, latest  # the checkpoint the stop made
    cost = json.loads(cli(env, "cost", job_id, "--json").stdout)["jobs"][0]
    assert budget <= cost["cost_usd"] < budget + 70  # the budget, plus at most the stop grace and a poll
    assert_nothing_left(job_id)
