"""The watchdog's rules with the real trainer on the local provider: stop, a dead watchdog restarted
by `status`, a hung machine (stale heartbeat) replaced, and a dollar budget enforced."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cloudtune.store import layout, open_store
from tests._run_util import assert_nothing_left, cli, cli_env, db_rows, last_json, quickstart_spec, wait_for

pytestmark = pytest.mark.slow

LONG = {"training": {"max_steps": 100000}, "checkpoint": {"every_steps": 10}}


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


def test_hung_machine_is_replaced_then_budget_stops_it(tmp_path):
    env = cli_env(tmp_path / "home")
    home = tmp_path / "home"
    job_id = _start(tmp_path, env, "hang", limits={"heartbeat_timeout_s": 8, "max_restarts": 2})
    _training(home, job_id)
    mdir = next((home / "local" / "machines").glob(f"cloudtune-{job_id}-1-*"))
    trainer = json.loads((mdir / "status.json").read_text())["trainer_pid"]
    os.kill(trainer, signal.SIGSTOP)  # a hung machine: alive, billing, silent
    _training(home, job_id, attempt=2)
    att = db_rows(home, "SELECT * FROM attempts WHERE job_id = ? ORDER BY n", job_id)
    assert att[0]["end_reason"].startswith("heartbeat stale") and att[0]["state"] == "ended"
    assert not _pid_alive(trainer)
    assert "stale" in _kinds(home, job_id)
    out = cli(env, "stop", job_id, "--json")
    assert last_json(out.stdout)["state"] == "stopped"
    assert_nothing_left(job_id)


def test_budget_reached_checkpoints_and_stops(tmp_path):
    env = cli_env(tmp_path / "home")
    home = tmp_path / "home"
    # $3600/h is $1/s: a $15 budget runs out 15 s after launch.
    job_id = _start(tmp_path, env, "budget", local={"price_hr": 3600.0}, limits={"max_cost_usd": 15})
    final = wait_for(lambda: (lambda j: j if j["state"] in ("stopped", "done", "failed") else None)(
        _job(home, job_id)), 240, "the budget stop")
    assert final["state"] == "stopped" and final["reason"].startswith("budget reached"), final["reason"]
    assert "stopping" in _kinds(home, job_id)
    cost = json.loads(cli(env, "cost", job_id, "--json").stdout)["jobs"][0]
    assert 15 <= cost["cost_usd"] < 15 + 70  # the budget, plus at most the stop grace and a poll
    assert_nothing_left(job_id)
