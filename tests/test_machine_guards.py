"""The on-machine guards (issue #17, item 1): with the watchdog dead and never restarted, a hung
trainer ends its machine within heartbeat_timeout_s + grace, and a budget overrun ends it too.
The lifetime cap follows the job instead of a fixed 72 h."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cloudtune.run.machine_limits import MARGIN_S, MIN_LIFETIME_S, machine_limits
from cloudtune.store import layout, open_store
from cloudtune.trainer import contract as C
from cloudtune.trainer.guards import Guards, guard_key
from tests._run_util import assert_nothing_left, cli, cli_env, db_rows, last_json, quickstart_spec, wait_for

# ---------------------------------------------------------------- the limits a machine carries


def test_lifetime_follows_max_hours_and_budget_not_a_fixed_72h():
    now = 1_000_000.0
    by_hours = machine_limits(max_hours=1.0, max_cost_usd=None, heartbeat_timeout_s=900, job_created_at=now - 600,
                              est_hours=0.5, price_hr=2.0, now=now)
    assert by_hours.lifetime_s == pytest.approx(3600 - 600 + MARGIN_S)
    assert by_hours.env[C.ENV_STALL_TIMEOUT_S] == "900" and C.ENV_BUDGET_USD not in by_hours.env
    # $10 budget, $4 already spent, $2/h: 3 h left, tighter than max_hours=10
    by_cost = machine_limits(max_hours=10.0, max_cost_usd=10.0, heartbeat_timeout_s=None, job_created_at=now,
                             est_hours=1.0, price_hr=2.0, spent_usd=4.0, now=now)
    assert by_cost.lifetime_s == pytest.approx(3 * 3600 + MARGIN_S)
    assert float(by_cost.env[C.ENV_BUDGET_USD]) == pytest.approx(6.0) and by_cost.env[C.ENV_PRICE_HR] == "2"
    assert "max_cost_usd" in by_cost.why
    spent = machine_limits(max_hours=None, max_cost_usd=1.0, heartbeat_timeout_s=None, job_created_at=now,
                           est_hours=None, price_hr=2.0, spent_usd=5.0, now=now)
    assert spent.lifetime_s == MIN_LIFETIME_S  # the checkpoint and teardown still get their time
    only_estimate = machine_limits(max_hours=None, max_cost_usd=None, heartbeat_timeout_s=None, job_created_at=now,
                                   est_hours=4.0, price_hr=2.0, now=now)
    assert only_estimate.lifetime_s == pytest.approx(12 * 3600)


# ---------------------------------------------------------------- the guards' verdicts


class _Store:
    def __init__(self) -> None:
        self.objects: dict[str, object] = {}

    def read_json(self, key: str):
        return self.objects.get(key)

    def put_json(self, key: str, obj) -> None:
        self.objects[key] = obj


def test_stall_is_judged_by_training_progress_not_by_the_heartbeat_thread():
    store = _Store()
    g = Guards(started=0.0, stall_timeout_s=10, poll_s=0, store=store, job_id="j", attempt=2, load_allowance_s=50)
    assert g.check(now=30) is None  # loading: within timeout + allowance
    hb = {"attempt": 2, "phase": "training", "time": 40, "last_step_time": 40}
    store.objects[layout.heartbeat_key("j")] = hb
    assert g.check(now=41) is None
    hb.update(time=60)  # the heartbeat thread still beats, but no step since t=40
    verdict = g.check(now=60)
    assert verdict is not None and verdict.reason == "stall" and "20s" in verdict.detail
    g.record(verdict)
    assert store.objects[guard_key("j", 2)]["reason"] == "stall"


def test_an_older_attempts_heartbeat_is_no_progress_and_no_heartbeat_at_all_trips_after_the_allowance():
    store = _Store()
    store.objects[layout.heartbeat_key("j")] = {"attempt": 1, "phase": "training", "time": 5, "last_step_time": 5}
    g = Guards(started=0.0, stall_timeout_s=10, poll_s=0, store=store, job_id="j", attempt=2, load_allowance_s=50)
    assert g.check(now=59) is None
    verdict = g.check(now=61)
    assert verdict is not None and verdict.reason == "stall" and "no training heartbeat" in verdict.detail


def test_budget_guard_uses_the_machines_own_clock_and_price_after_a_grace():
    g = Guards(started=100.0, price_hr=3600.0, budget_usd=20.0, budget_grace_s=5)
    assert g.check(now=124) is None  # $24 spent, but the controller gets 5 s to stop it first
    verdict = g.check(now=125.5)
    assert verdict is not None and verdict.reason == "budget" and "$20.00" in verdict.detail


def test_guards_from_env_read_the_contract_variables(tmp_path):
    env = {C.ENV_STALL_TIMEOUT_S: "12", C.ENV_PRICE_HR: "1.5", C.ENV_BUDGET_USD: "3", C.ENV_GUARD_POLL_S: "2",
           C.ENV_STORE: f"file://{tmp_path}", C.ENV_JOB_ID: "abc", C.ENV_ATTEMPT: "3", C.ENV_BUDGET_GRACE_S: "0"}
    g = Guards.from_env(env, started=0.0)
    assert (g.stall_timeout_s, g.price_hr, g.budget_usd, g.poll_s, g.attempt) == (12, 1.5, 3, 2, 3)
    assert g.budget_deadline == pytest.approx(2 * 3600) and g.budget_grace_s == 0
    assert g.store is not None


# ---------------------------------------------------------------- end to end, watchdog dead

LONG = {"training": {"max_steps": 20000}, "checkpoint": {"every_steps": 10}}
FAST_GUARDS = {"CLOUDTUNE_GUARD_POLL_S": "0.3", "CLOUDTUNE_STOP_GRACE_S": "3", "CLOUDTUNE_BUDGET_GRACE_S": "0"}


def _start(tmp: Path, env, name: str, **over) -> str:
    spec = quickstart_spec(tmp, name, **over)
    out = cli(env, "run", str(spec), "--yes", "--detach", "--json")
    assert out.returncode == 0, out.stderr
    return last_json(out.stdout)["job_id"]


def _job(home: Path, job_id: str) -> dict:
    return db_rows(home, "SELECT * FROM jobs WHERE id = ?", job_id)[0]


def _kill_watchdog_once_training(home: Path, job_id: str) -> Path:
    wait_for(lambda: (lambda j: j["state"] == "running" and (j["step"] or 0) >= 1)(_job(home, job_id)),
             240, f"job {job_id} to train")
    wd = db_rows(home, "SELECT pid FROM watchdogs WHERE job_id = ?", job_id)[0]["pid"]
    os.kill(wd, signal.SIGKILL)
    return next((home / "local" / "machines").glob(f"cloudtune-{job_id}-1-*"))


def _machine_status(mdir: Path) -> dict:
    try:
        return json.loads((mdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_hung_trainer_ends_its_machine_with_no_watchdog(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home, **FAST_GUARDS)
    job_id = _start(tmp_path, env, "hang", **LONG, limits={"heartbeat_timeout_s": 6})
    mdir = _kill_watchdog_once_training(home, job_id)
    trainer = _machine_status(mdir)["trainer_pid"]
    # The supervisor's workload is the entrypoint; the trainer is its child. Freeze the trainer.
    import psutil

    child = psutil.Process(trainer).children()[0]
    child.send_signal(signal.SIGSTOP)  # hung: alive, billing, silent
    hung_at = time.time()
    st = wait_for(lambda: (lambda s: s if s.get("state") in ("exited", "lifetime") else None)(_machine_status(mdir)),
                  60, "the machine to end itself")
    took = time.time() - hung_at
    assert took < 6 + 3 + 10, took  # timeout + stop grace + polls and the last heartbeat's age
    store = open_store(f"file://{tmp_path / 'store'}")
    verdict = store.read_json(guard_key(job_id, 1))
    assert verdict["reason"] == "stall", verdict
    assert st["exit_code"] == C.EXIT_PREEMPTED  # killed after the grace: its last checkpoint stands
    assert _job(home, job_id)["state"] == "running"  # nobody told the controller: the machine acted alone
    assert_nothing_left(job_id)


@pytest.mark.slow
def test_budget_overrun_ends_the_machine_with_no_watchdog(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home, **FAST_GUARDS)
    # $3600/h is $1/s. Budget: enough to pass check_budget for 200 steps' estimate, then stalled (SIGSTOP'd
    # but within the heartbeat timeout) so the trainer cannot finish under it.
    from cloudtune.planner.plan import plan_for_spec
    from cloudtune.spec import load_spec

    over = {"training": {"max_steps": 200}, "checkpoint": {"every_steps": 1000}, "local": {"price_hr": 3600.0}}
    est = plan_for_spec(load_spec(quickstart_spec(tmp_path, "estimate", **over))).choice.est_cost_usd
    budget = round(est + 8, 2)
    job_id = _start(tmp_path, env, "budget", **over, limits={"max_cost_usd": budget, "heartbeat_timeout_s": 600})
    wait_for(lambda: (lambda j: j["state"] == "running")(_job(home, job_id)), 240, "the machine")
    wd = db_rows(home, "SELECT pid FROM watchdogs WHERE job_id = ?", job_id)[0]["pid"]
    os.kill(wd, signal.SIGKILL)
    mdir = next((home / "local" / "machines").glob(f"cloudtune-{job_id}-1-*"))
    wait_for(lambda: _machine_status(mdir).get("trainer_pid"), 30, "the workload")
    import psutil

    entry = psutil.Process(_machine_status(mdir)["trainer_pid"])
    child = wait_for(lambda: entry.children(), 30, "the trainer")[0]
    child.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: open_store(f"file://{tmp_path / 'store'}").read_json(guard_key(job_id, 1)),
                 budget + 60, "the budget guard")
    finally:
        try:
            child.send_signal(signal.SIGCONT)  # it gets the SIGTERM now: checkpoint and exit
        except psutil.NoSuchProcess:
            pass
    verdict = open_store(f"file://{tmp_path / 'store'}").read_json(guard_key(job_id, 1))
    assert verdict["reason"] == "budget", verdict
    st = wait_for(lambda: (lambda s: s if s.get("state") in ("exited", "lifetime") else None)(_machine_status(mdir)),
                  60, "the machine to end itself")
    assert st["exit_code"] == C.EXIT_PREEMPTED
    assert_nothing_left(job_id)
