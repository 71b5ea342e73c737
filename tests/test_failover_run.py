"""Launch failures through the RunPod fake, driven by the real CLI and watchdog.

(a) The first planned option answers RunPod's "no longer any instances available" (a 500 whose
    text is the capacity message): the orchestrator records the failed launch and launches the
    plan's next option, where the trainer runs to completion.
(b) The create answers 500 *after* the pod exists, and the adapter's own lookup by name fails too
    (the list endpoint is down through all its retries): the orchestrator must find the pod by its
    deterministic name and adopt it, not launch a second billing pod. The job is then stopped with
    `cloudtune stop` (no trainer runs: this is about the machines) and the pod must be gone.
"""

from __future__ import annotations

import json
import time

import pytest

from tests._fake_run_util import (
    RunProcess,
    cli_run,
    machine_env,
    runpod_env,
    s3_bucket,
    s3_job_spec,
    s3_keys,
    vast_env,
)
from tests._run_util import assert_nothing_left, db_rows, last_json, wait_for
from tests.fakes.runpod_fake import CAPACITY_MSG, RunPodFake, problem

KEY = "rp-failover-key-2209"
FAILOVER_STEPS = 10


def _events(home, job):
    return db_rows(home, "SELECT * FROM events WHERE job_id=? ORDER BY id", job)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_capacity_error_fails_over_to_the_next_option(tmp_path, aws_env, monkeypatch):
    t0 = time.time()
    bucket = "ct-failover-capacity"
    s3 = s3_bucket(aws_env, bucket)
    # Failover is decided before the trainer starts; a few steps show the second option trains to the end.
    spec = s3_job_spec(tmp_path, aws_env, bucket, training={"max_steps": FAILOVER_STEPS})
    home = tmp_path / "home"
    machine_env(monkeypatch)
    with RunPodFake(api_key=KEY, run_commands=True, cwd=str(tmp_path), log_dir=str(tmp_path)) as fake:
        env = runpod_env(home, fake, KEY)
        # RunPod documents capacity exhaustion on create as a 400 whose only signal is the free-text detail
        # (../shared/apis/runpod/openapi-v2.json, createPod); a 500 is a server error, retried on the same offer.
        body = problem(400, "Bad Request", CAPACITY_MSG).body
        fake.inject("POST", r"^/v2/pods$", status=400, body=body, times=1, content_type="application/problem+json")

        run = RunProcess(env, tmp_path, str(spec), "--provider", "runpod", "--yes", "--json")
        try:
            code, out, err = run.wait(timeout=150)
        finally:
            run.kill()
        assert code == 0, err[-3000:]
        result = last_json(out)
        assert result["state"] == "done"
        job = result["job_id"]

        plan = json.loads(db_rows(home, "SELECT plan_json FROM jobs WHERE id=?", job)[0]["plan_json"])
        first, second = plan[0]["offer"]["offer_id"], plan[1]["offer"]["offer_id"]
        attempts = db_rows(home, "SELECT * FROM attempts WHERE job_id=? ORDER BY n", job)
        assert [(a["n"], a["offer_id"], a["state"]) for a in attempts] == [
            (1, first, "launch_failed"), (2, second, "ended")]
        assert "no capacity" in attempts[0]["end_reason"] and attempts[0]["machine_id"] is None
        failed = [e for e in _events(home, job) if e["kind"] == "launch_failed"]
        assert len(failed) == 1 and "CapacityError" in failed[0]["message"] and failed[0]["attempt"] == 1

        # Two creates (the refused one and the next option), one pod, and it is gone now.
        creates = [r.json for r in fake.calls("POST", r"^/v2/pods$")]
        assert [c["name"] for c in creates] == [f"cloudtune-{job}-1", f"cloudtune-{job}-2"]
        assert (creates[0]["gpu"], creates[0]["cloud"]) != (creates[1]["gpu"], creates[1]["cloud"])
        (pod,) = fake.pods.values()
        assert pod["name"] == f"cloudtune-{job}-2" and fake.alive() == []

        # The ledger bills only what ran: one row, for attempt 2, at the second option's price.
        ledger = db_rows(home, "SELECT * FROM ledger WHERE job_id=?", job)
        assert [(r["attempt"], r["offer_id"]) for r in ledger] == [(2, second)]
        assert ledger[0]["price_hr"] == pytest.approx(pod["_price"])
        rep = json.loads(cli_run(env, "cost", job, "--json").stdout)
        assert [a["n"] for a in rep["jobs"][0]["attempts"]] == [2]
        assert rep["total_usd"] == pytest.approx(rep["jobs"][0]["attempts"][0]["cost_usd"])
        assert_nothing_left(job)
    keys = s3_keys(s3, bucket, f"jobs/{job}/")
    assert f"jobs/{job}/DONE.json" in keys and f"jobs/{job}/final/adapter_model.safetensors" in keys
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"jobs/{job}/final/summary.json")["Body"].read())
    assert summary["attempt"] == 2 and summary["steps"] == FAILOVER_STEPS
    print(f"capacity failover run: {time.time() - t0:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_create_500_after_the_pod_exists_is_adopted_by_name(tmp_path, aws_env, monkeypatch):
    t0 = time.time()
    bucket = "ct-failover-adopt"
    s3_bucket(aws_env, bucket)
    spec = s3_job_spec(tmp_path, aws_env, bucket)
    home = tmp_path / "home"
    machine_env(monkeypatch)
    with RunPodFake(api_key=KEY, run_commands=False) as fake:
        env = runpod_env(home, fake, KEY, CLOUDTUNE_STOP_GRACE_S="1")
        fake.inject("POST", r"^/v2/pods$", status=500, body={"title": "Internal Server Error", "status": 500,
                                                              "detail": "upstream timeout"},
                    times=1, after_handler=True, content_type="application/problem+json")
        # The adapter's own lookup (5 tries of GET /v2/pods) fails; the orchestrator's must succeed.
        fake.inject("GET", r"^/v2/pods$", status=503, body={"title": "Service Unavailable", "status": 503},
                    times=5, content_type="application/problem+json")

        run = cli_run(env, "run", str(spec), "--provider", "runpod", "--yes", "--detach", "--json")
        assert run.returncode == 0, run.stderr
        job = last_json(run.stdout)["job_id"]
        wait_for(lambda: any(e["kind"] == "running" for e in _events(home, job)), 60, "the adopted pod to run")

        (pod,) = fake.pods.values()  # exactly one pod was ever created
        assert pod["name"] == f"cloudtune-{job}-1" and pod["status"] == "RUNNING"
        assert len(fake.calls("POST", r"^/v2/pods$")) == 1
        (att,) = db_rows(home, "SELECT * FROM attempts WHERE job_id=?", job)
        assert att["n"] == 1 and att["machine_id"] == pod["id"] and att["state"] == "running"
        adopted = [e for e in _events(home, job) if e["kind"] == "adopted"]
        assert len(adopted) == 1 and pod["id"] in adopted[0]["message"] and "TransientError" in adopted[0]["message"]
        assert not [e for e in _events(home, job) if e["kind"] in ("launch_failed", "launch_retry")]

        stop = cli_run(env, "stop", job, "--json", timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert last_json(stop.stdout) == {"job_id": job, "state": "stopped"}
        assert fake.alive() == [] and fake.calls("DELETE", rf"^/v2/pods/{pod['id']}$")
        (ledger,) = db_rows(home, "SELECT * FROM ledger WHERE job_id=?", job)
        assert ledger["attempt"] == 1 and ledger["ended_at"] and ledger["price_hr"] == pytest.approx(pod["_price"])
        assert_nothing_left(job)
    print(f"adopt-after-500 run: {time.time() - t0:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_vast_failed_create_that_names_a_contract_leaves_no_instance(tmp_path, aws_env, monkeypatch):
    """Vast can answer an error that still carries `new_contract` (a billing instance): it is destroyed,
    the orchestrator's lookup by label finds nothing left, and the retry is the only live instance."""
    from tests.fakes.vast_fake import VastFake

    t0 = time.time()
    bucket = "ct-failover-vast-contract"
    s3_bucket(aws_env, bucket)
    # Vast has no room for STS tokens (256 characters per variable): the job names the keys it sends
    spec = s3_job_spec(tmp_path, aws_env, bucket, secrets=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    home = tmp_path / "home"
    machine_env(monkeypatch)
    key = "vast-failover-key-6021"
    with VastFake(api_key=key, run_commands=False) as fake:
        env = vast_env(home, fake, key, CLOUDTUNE_STOP_GRACE_S="1")
        fake.contract_on_failure = True  # the next create answers 500 with a new_contract that exists

        run = cli_run(env, "run", str(spec), "--provider", "vast", "--yes", "--detach", "--json")
        assert run.returncode == 0, run.stderr
        job = last_json(run.stdout)["job_id"]
        wait_for(lambda: any(e["kind"] == "running" for e in _events(home, job)), 60, "the retried instance to run")

        creates = fake.calls("PUT", r"^/api/v0/asks/\d+/$")
        assert [c.json["label"] for c in creates] == [f"cloudtune-{job}-1", f"cloudtune-{job}-2"]
        (inst,) = fake.alive()  # the orphan of the failed create was destroyed, not adopted or leaked
        assert inst["label"] == f"cloudtune-{job}-2" and inst["id"] != 9001
        assert fake.calls("DELETE", r"^/api/v0/instances/9001/$")
        attempts = db_rows(home, "SELECT * FROM attempts WHERE job_id=? ORDER BY n", job)
        assert [(a["n"], a["state"], a["machine_id"]) for a in attempts] == [
            (1, "launch_failed", None), (2, "running", str(inst["id"]))]
        assert [e["kind"] for e in _events(home, job) if e["attempt"] == 1] == ["launch", "launch_retry"]

        stop = cli_run(env, "stop", job, "--json", timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert last_json(stop.stdout)["state"] == "stopped" and fake.alive() == []
        assert [r["attempt"] for r in db_rows(home, "SELECT * FROM ledger WHERE job_id=?", job)] == [2]
        assert_nothing_left(job)
    print(f"vast new_contract cleanup run: {time.time() - t0:.1f}s")
