"""Hand-over from the laptop's watchdog to another controller mid-job, with a spot preemption in
between while no controller runs (issue #17): the other controller (its own state.db, state taken
from the store) relaunches, the job ends done, and the adapter is byte-identical to an
uninterrupted run's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cloudtune.run.job_state import registry_key, state_key
from cloudtune.run.lease import Lease
from cloudtune.store import layout, open_store
from tests._run_util import (
    ROOT,
    assert_nothing_left,
    cli,
    cli_env,
    db_rows,
    last_json,
    quickstart_spec,
    wait_for,
)

pytestmark = pytest.mark.slow

JOB = {"training": {"max_steps": 300, "logging_steps": 1}, "checkpoint": {"every_steps": 5},
       "limits": {"max_restarts": 3, "heartbeat_timeout_s": 120}}
ADAPTER = ("adapter_model.safetensors", "adapter_config.json")


def _final(store, job_id: str) -> dict[str, bytes]:
    return {n: store.get_bytes(f"{layout.final_prefix(job_id)}{n}") for n in ADAPTER}


def test_laptop_hands_over_then_preemption_then_the_other_controller_finishes(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home, CLOUDTUNE_LEASE_TTL_S="5")
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    # The reference, uninterrupted, runs at the same time (one-thread trainers overlap on two cores).
    ref = cli(env, "run", str(quickstart_spec(tmp_path, "ref", name="ref", **JOB)), "--yes", "--detach", "--json")
    assert ref.returncode == 0, ref.stderr
    ref_id = last_json(ref.stdout)["job_id"]
    preempted = {**JOB, "local": {"preempt_after_s": 6.0, "notice_s": 3.0, "preempt_max": 1,
                                  "preempt_clock": "training"}}
    out = cli(env, "run", str(quickstart_spec(tmp_path, "job", name="handed", **preempted)), "--yes", "--detach",
              "--json")
    assert out.returncode == 0, out.stderr
    job_id = last_json(out.stdout)["job_id"]
    wait_for(lambda: (db_rows(home, "SELECT step FROM jobs WHERE id = ?", job_id)[0]["step"] or 0) >= 1, 240,
             "the job to train under the laptop's watchdog")

    handed = cli(env, "controller", "hand-over", job_id, "--to", "cron")
    assert handed.returncode == 0, handed.stderr
    assert "watchdog exited" in handed.stdout
    assert store.read_json(registry_key(job_id))["controller"] == "cron"
    info, _ = Lease(store, job_id, "observer").read()
    assert info is not None and not info.live(__import__("time").time())  # released, not left to expire
    # While no controller runs, the laptop's `status` must not take the job back.
    assert cli(env, "status", job_id, "--json").returncode == 0

    mdir = wait_for(lambda: next((home / "local" / "machines").glob(f"cloudtune-{job_id}-1-*"), None), 10, "machine")
    wait_for(lambda: json.loads((mdir / "status.json").read_text()).get("state") == "preempted", 120,
             "the spot preemption while no controller runs")
    lease_holder = Lease(store, job_id, "observer").read()[0].holder
    assert lease_holder.startswith("watchdog:")  # nobody took it in between

    ctl_env = {**env, "CLOUDTUNE_CONTROLLER_DB": str(tmp_path / "controller.db")}
    ctl = subprocess.run([sys.executable, "-m", "cloudtune", "controller", "tick", "--store", store_url,
                          "--until-done", "--seconds", "30", "--poll", "0.3", "--json"],
                         capture_output=True, text=True, env=ctl_env, timeout=400, cwd=ROOT)
    assert ctl.returncode == 0, ctl.stderr
    assert json.loads(ctl.stdout.strip().splitlines()[-1])[0] == {"job_id": job_id, "action": "finished",
                                                                   "state": "done", "detail": ""}
    snap = store.read_json(state_key(job_id))
    assert snap["job"]["state"] == "done"
    attempts = [a for a in snap["attempts"] if a["state"] != "launch_failed"]
    assert [a["n"] for a in attempts] == [1, 2] and "preempt" in attempts[0]["end_reason"]
    kinds = [e["kind"] for e in snap["events"]]
    assert "controller" in kinds and "recovering" in kinds
    assert not store.exists(registry_key(job_id))  # finished jobs leave the controller's list

    wait_for(lambda: db_rows(home, "SELECT state FROM jobs WHERE id = ?", ref_id)[0]["state"] == "done", 300,
             "the reference job")
    assert _final(store, job_id) == _final(store, ref_id)
    assert_nothing_left(job_id)
    assert_nothing_left(ref_id)
