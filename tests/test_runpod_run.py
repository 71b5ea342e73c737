"""The full `cloudtune run --provider runpod` through the RunPod fake, with an interruption.

Real CLI, watchdog, orchestrator, RunPod adapter (HTTP to the fake) and trainer (a local process
group the fake starts as the pod's container); the store is S3 on moto_server. After attempt 1
commits a checkpoint, the fake makes its pod EXITED (SIGTERM, then SIGKILL: what RunPod does to a
reclaimed or failed pod); the watchdog must delete that pod, launch attempt 2, and the trainer must
resume from the store and finish. Teardown: no pod left, one ledger row per launch."""

from __future__ import annotations

import json
import math
import time

import pytest

from tests._fake_run_util import (
    FAST_TRAINING,
    RunProcess,
    cli_run,
    machine_env,
    runpod_env,
    s3_bucket,
    s3_job_spec,
    s3_keys,
    wait_committed_checkpoint,
    wait_job_id,
)
from tests._run_util import assert_nothing_left, db_rows, last_json
from tests.fakes.runpod_fake import RunPodFake

KEY = "rp-full-run-key-8841"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_runpod_run_survives_an_interruption(tmp_path, aws_env, monkeypatch):
    t0 = time.time()
    bucket = "ct-runpod-full-run"
    s3 = s3_bucket(aws_env, bucket)
    spec = s3_job_spec(tmp_path, aws_env, bucket)
    home = tmp_path / "home"
    machine_env(monkeypatch)
    with RunPodFake(api_key=KEY, run_commands=True, cwd=str(tmp_path), log_dir=str(tmp_path)) as fake:
        env = runpod_env(home, fake, KEY)

        run = RunProcess(env, tmp_path, str(spec), "--provider", "runpod", "--yes", "--json")
        try:
            job = wait_job_id(home)
            ckpt = wait_committed_checkpoint(s3, bucket, job, attempt=1, min_step=10, timeout=90)
            (pod1,) = fake.alive()
            assert pod1["name"] == f"cloudtune-{job}-1" and pod1["status"] == "RUNNING"
            t_ckpt = time.time() - t0
            assert fake.workloads.returncode(pod1["id"]) is None, "attempt 1 ended before it could be interrupted"
            fake.interrupt(pod1["id"])  # SIGTERM, 5 s, SIGKILL; the pod reads EXITED
            t_int = time.time() - t0
            code, out, err = run.wait(timeout=150)
        finally:
            run.kill()
        assert code == 0, err[-3000:]
        assert last_json(out) == {"job_id": job, "state": "done"}
        for secret in (KEY, "testing"):
            assert secret not in out + err

        # Two pods, both created by name, both deleted; none alive in the fake.
        pods = sorted(fake.pods.values(), key=lambda p: p["id"])
        assert [p["name"] for p in pods] == [f"cloudtune-{job}-1", f"cloudtune-{job}-2"]
        assert fake.alive() == []
        deleted = {r.path.rsplit("/", 1)[-1] for r in fake.calls("DELETE", r"^/v2/pods/")}
        assert {p["id"] for p in pods} <= deleted
        assert len(fake.calls("POST", r"^/v2/pods$")) == 2
        # The create carried the trainer command and the job's environment, keys never in the clear.
        create = fake.calls("POST", r"^/v2/pods$")[0].json
        # the default public PyTorch image bootstraps the staged wheel, then runs the launcher (run/bootstrap.py)
        assert create["args"].startswith("sh -c ") and create["env"]["CLOUDTUNE_JOB_ID"] == job
        assert "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL" in create["args"]  # the stub; the staged boot.sh execs the launcher
        assert "cloudtune bootstrap: cloudtune is already installed; starting the trainer" in \
            fake.workloads.output(pods[0]["id"])  # the stub fetched the staged script and ran it
        assert create["cloud"] in ("SECURE", "COMMUNITY") and create["gpu"]["count"] == 1

        # Attempt 2 resumed from the store rather than starting over.
        log2 = fake.workloads.output(pods[1]["id"])
        resumed = [int(line.rsplit(" ", 1)[-1]) for line in log2.splitlines() if "resuming from checkpoint" in line]
        assert resumed and resumed[0] >= ckpt, log2[-2000:]

        ev = [(e["kind"], e["attempt"]) for e in db_rows(home, "SELECT * FROM events WHERE job_id=? ORDER BY id", job)]
        assert ("recovering", 1) in ev and ("launch", 2) in ev and ("done", None) in ev
        preempt = db_rows(home, "SELECT end_reason FROM attempts WHERE job_id=? AND n=1", job)[0]["end_reason"]
        # the controller sees the interrupted pod EXITED, or already gone: the entrypoint's self-terminate
        # hook deletes a pod whose trainer exited (RunPod would restart the container otherwise)
        assert ("preempted" in preempt and "EXITED" in preempt) or "machine lost (not found)" in preempt, preempt

        ledger = db_rows(home, "SELECT * FROM ledger WHERE job_id=? ORDER BY attempt", job)
        assert [r["attempt"] for r in ledger] == [1, 2]
        assert all(r["provider"] == "runpod" and r["ended_at"] and r["ended_at"] >= r["started_at"] for r in ledger)

        cost = cli_run(env, "cost", job, "--json")
        assert cost.returncode == 0, cost.stderr
        rep = json.loads(cost.stdout)
        (j,) = rep["jobs"]
        assert j["id"] == job and j["state"] == "done"
        assert [a["n"] for a in j["attempts"]] == [1, 2]
        for a, row in zip(j["attempts"], ledger, strict=True):
            assert a["provider"] == "runpod" and a["price_hr"] == pytest.approx(pods[a["n"] - 1]["_price"])
            assert a["gpu"] == "RTX4090" and a["spot"] is False and a["cost_usd"] > 0
            assert a["billed_s"] == math.ceil(row["ended_at"] - row["started_at"])  # per-second billing
            assert a["cost_usd"] == pytest.approx(a["price_hr"] * a["billed_s"] / 3600, abs=1e-6)
        assert j["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in j["attempts"]), abs=1e-6)
        assert rep["total_usd"] == pytest.approx(j["cost_usd"], abs=1e-6)
        assert_nothing_left(job)

    keys = s3_keys(s3, bucket, f"jobs/{job}/")
    assert f"jobs/{job}/DONE.json" in keys
    assert f"jobs/{job}/final/adapter_model.safetensors" in keys
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"jobs/{job}/final/summary.json")["Body"].read())
    assert summary["attempt"] == 2 and summary["steps"] == FAST_TRAINING["max_steps"]
    print(f"runpod full run: checkpoint {ckpt} at {t_ckpt:.1f}s, interrupted by {t_int:.1f}s, "
          f"done at {time.time() - t0:.1f}s")
