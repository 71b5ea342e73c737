"""Chaos: the quickstart job on the local provider, with real processes throughout.

1. Reference: an uninterrupted run, but the `cloudtune run` process itself is SIGKILLed mid-job:
   the detached watchdog still finishes the job and tears the machine down.
2. Seeded random preemptions, with a notice window (SIGTERM, emergency checkpoint) and without
   (SIGKILL): the job completes, the final adapter is bit-identical to the reference, the ledger
   has one row per launch, nothing is left running, and the state db agrees with the store.

The three jobs run at the same time, in one home (as a user's jobs do): each trainer is one thread
(tests/conftest.py), so on two cores they overlap instead of queueing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloudtune.store import layout, open_store
from tests._fake_run_util import RunProcess
from tests._run_util import (
    ROOT,
    assert_nothing_left,
    cli,
    cli_env,
    db_rows,
    jobs_rows,
    last_json,
    quickstart_spec,
    wait_for,
)

pytestmark = pytest.mark.slow

# 100 steps: a step takes ~25-40 ms here, so training outlasts the seeded first preemption (0.71 s and
# 0.62 s after the first training heartbeat) with room to spare even on a faster CI machine.
CHAOS = {
    "training": {"max_steps": 100, "logging_steps": 1},
    "checkpoint": {"every_steps": 5},
    "limits": {"max_restarts": 4, "heartbeat_timeout_s": 120},
}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
SCENARIOS = {"with-notice": (3.0, 11), "sigkill-no-notice": (0.0, 5)}  # notice_s, seed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One home and store for the module, so the tiny model is built once and adapters compare."""
    tmp = tmp_path_factory.mktemp("chaos")
    return tmp, cli_env(tmp / "home")


def _final(tmp: Path, job_id: str) -> dict[str, bytes]:
    """The adapter's weights and config as bytes (the trainer sorts target_modules, which PEFT
    writes from a set, so the config is byte-identical across processes too)."""
    store = open_store(f"file://{tmp / 'store'}")
    return {name: store.get_bytes(f"{layout.final_prefix(job_id)}{name}") for name in ADAPTER_FILES}


def _check_db_and_store(tmp: Path, home: Path, job_id: str) -> list[dict]:
    """The state db and the store tell the same story about a finished job."""
    store = open_store(f"file://{tmp / 'store'}")
    job = db_rows(home, "SELECT * FROM jobs WHERE id = ?", job_id)[0]
    attempts = db_rows(home, "SELECT * FROM attempts WHERE job_id = ? AND state != 'launch_failed' ORDER BY n",
                       job_id)
    ledger = db_rows(home, "SELECT * FROM ledger WHERE job_id = ? ORDER BY attempt", job_id)
    assert job["state"] == "done" and store.exists(layout.done_key(job_id))
    assert not store.exists(layout.failed_key(job_id))
    assert job["store_url"] == store.url
    # One ledger row per launch, every one closed, and one machine per launch on the provider side.
    assert [r["attempt"] for r in ledger] == [a["n"] for a in attempts]
    assert all(r["ended_at"] and r["end_reason"] for r in ledger)
    assert all(a["state"] == "ended" for a in attempts)
    machines = sorted(p.name for p in (home / "local" / "machines").glob(f"cloudtune-{job_id}-*"))
    assert len(machines) == len(attempts)
    assert all((home / "local" / "machines" / m / "terminated.json").exists() for m in machines)
    # Every launch shipped its trainer output; the heartbeat and the db agree on the last step.
    logs = store.list(f"{job_id}/logs/")
    assert logs == sorted(layout.log_key(job_id, a["n"]) for a in attempts)
    hb = store.get_json(layout.heartbeat_key(job_id))
    assert hb["phase"] == "done" and hb["step"] == job["step"] == job["total_steps"] == CHAOS["training"]["max_steps"]
    assert store.get_json(layout.spec_key(job_id))["name"] == job["name"]
    return ledger


@pytest.fixture(scope="module")
def preempted_runs(world):
    """`cloudtune run` of each preemption scenario, started at once in the background; the tests
    below wait for theirs."""
    tmp, env = world
    runs = {}
    for name, (notice_s, seed) in SCENARIOS.items():
        # With notice, two preemptions: the second resumes from a checkpoint that a resumed attempt
        # took. Without notice one SIGKILL proves the point (a second costs one more trainer start).
        local = {"preempt_random": True, "preempt_every_s": 1.0, "preempt_clock": "training",
                 "preempt_max": 2 if notice_s else 1, "notice_s": notice_s, "seed": seed, "price_hr": 0.36}
        spec = quickstart_spec(tmp, f"chaos-{seed}", name=f"chaos-{seed}", local=local, **CHAOS)
        runs[name] = RunProcess(env, tmp, str(spec), "--yes", "--json", tag=f"chaos-{seed}")
    yield runs
    for run in runs.values():
        run.kill()


@pytest.fixture(scope="module")
def reference(world, preempted_runs):
    """Uninterrupted training, with the CLI killed mid-job: the watchdog finishes and tears down."""
    tmp, env = world
    home = Path(env["CLOUDTUNE_HOME"])
    spec = quickstart_spec(tmp, "reference", name="chaos-reference", **CHAOS)  # told apart by name
    proc = subprocess.Popen([sys.executable, "-m", "cloudtune", "run", str(spec), "--yes", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        job = wait_for(lambda: [
            r for r in jobs_rows(home)
            if r["name"] == "chaos-reference" and r["state"] == "running" and (r["step"] or 0) >= 1
        ], 180, "the reference job to start training")[0]
        assert job["state"] == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job_id = job["id"]
    final = wait_for(lambda: [r for r in db_rows(home, "SELECT * FROM jobs WHERE id = ?", job_id)
                              if r["state"] in ("done", "failed", "stopped")], 240, "the watchdog to finish")[0]
    assert final["state"] == "done", final["reason"]
    ledger = _check_db_and_store(tmp, home, job_id)
    assert len(ledger) == 1 and ledger[0]["end_reason"].startswith("the trainer wrote DONE.json")
    assert_nothing_left(job_id)
    events = [e["kind"] for e in db_rows(home, "SELECT kind FROM events WHERE job_id = ? ORDER BY id", job_id)]
    assert events[-3:] == ["terminated", "done", "watchdog"]
    return _final(tmp, job_id)


def test_cli_killed_mid_job_watchdog_finishes(reference):
    assert set(reference) == set(ADAPTER_FILES) and len(reference["adapter_model.safetensors"]) > 1000


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_random_preemptions_resume_to_identical_adapter(world, reference, preempted_runs, scenario):
    tmp, env = world
    home = Path(env["CLOUDTUNE_HOME"])
    notice_s, _ = SCENARIOS[scenario]
    code, stdout, stderr = preempted_runs[scenario].wait(timeout=300)
    assert code == 0, stderr[-3000:]
    res = last_json(stdout)
    assert res["state"] == "done"
    # the end-of-run report (stderr with --json): loss, then the held-out generations before/after
    assert "training loss" in stderr and "held-out prompts (16" in stderr, stderr[-2000:]
    job_id = res["job_id"]
    ledger = _check_db_and_store(tmp, home, job_id)
    preempted = [r for r in ledger if r["end_reason"].startswith("preempted")]
    assert len(preempted) >= 1, [r["end_reason"] for r in ledger]
    assert len(ledger) == len(preempted) + 1 <= 3
    if notice_s == 0:
        assert all("without notice" in r["end_reason"] for r in preempted)
    else:
        assert all("with 3s notice" in r["end_reason"] for r in preempted)
    assert_nothing_left(job_id)
    final = _final(tmp, job_id)
    # bit-identical weights and adapter config to the uninterrupted run
    assert final["adapter_model.safetensors"] == reference["adapter_model.safetensors"]
    assert final["adapter_config.json"] == reference["adapter_config.json"]

    cost = last_json_blob(cli(env, "cost", job_id, "--json").stdout)
    job = cost["jobs"][0]
    assert [a["n"] for a in job["attempts"]] == [r["attempt"] for r in ledger]
    assert job["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in job["attempts"]))
    assert all(a["price_hr"] == 0.36 and a["provider"] == "local" for a in job["attempts"])
    assert job["cost_usd"] > 0


def last_json_blob(stdout: str) -> dict:
    return json.loads(stdout)
