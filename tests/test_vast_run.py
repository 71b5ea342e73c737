"""The full `cloudtune run --provider vast` on an interruptible (bid) instance that gets outbid.

Real CLI, watchdog, orchestrator, Vast adapter (HTTP to the fake) and trainer (a local process the
fake starts as the instance's container); the store is S3 on moto_server. After attempt 1 commits
a checkpoint, the fake pauses the instance the way Vast does when a higher bid wins: the container
dies without notice (SIGKILL) and the instance reads stopped while its disk keeps billing. The
watchdog must destroy it (not leave it paused), bid again, and the trainer must resume from the
last committed checkpoint and finish."""

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
    s3_bucket,
    s3_job_spec,
    s3_keys,
    vast_env,
    wait_committed_checkpoint,
    wait_job_id,
)
from tests._run_util import assert_nothing_left, db_rows, last_json
from tests.fakes.vast_fake import VastFake

KEY = "vast-full-run-key-3317"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vast_bid_run_survives_being_outbid(tmp_path, aws_env, monkeypatch):
    t0 = time.time()
    bucket = "ct-vast-full-run"
    s3 = s3_bucket(aws_env, bucket)
    spec = s3_job_spec(tmp_path, aws_env, bucket, resources={"spot": True},
                       secrets=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])  # Vast: no room for STS tokens
    home = tmp_path / "home"
    machine_env(monkeypatch)
    with VastFake(api_key=KEY, run_commands=True, cwd=str(tmp_path), log_dir=str(tmp_path)) as fake:
        env = vast_env(home, fake, KEY)

        run = RunProcess(env, tmp_path, str(spec), "--provider", "vast", "--yes", "--json")
        try:
            job = wait_job_id(home)
            ckpt = wait_committed_checkpoint(s3, bucket, job, attempt=1, min_step=10, timeout=90)
            (inst1,) = fake.alive()
            assert inst1["label"] == f"cloudtune-{job}-1" and inst1["is_bid"] is True
            assert fake.workloads.returncode(str(inst1["id"])) is None, "attempt 1 ended before being outbid"
            fake.outbid(inst1["id"])  # SIGKILL, no notice; the instance reads stopped
            t_int = time.time() - t0
            code, out, err = run.wait(timeout=150)
        finally:
            run.kill()
        assert code == 0, err[-3000:]
        assert last_json(out) == {"job_id": job, "state": "done"}
        for secret in (KEY, "testing"):
            assert secret not in out + err

        # Two bids on the cheapest reliable ask, both instances destroyed; nothing left paused and billing.
        creates = fake.calls("PUT", r"^/api/v0/asks/\d+/$")
        assert len(creates) == 2
        assert [c.json["label"] for c in creates] == [f"cloudtune-{job}-1", f"cloudtune-{job}-2"]
        for c in creates:
            ask = int(c.path.strip("/").rsplit("/", 1)[-1])
            offer = next(o for o in fake.offers if o["id"] == ask)
            assert offer["reliability2"] >= 0.98 and offer["verified"] and not offer["external"]
            assert c.json["price"] >= offer["min_bid"] and c.json["args"][:2] == ["sh", "-c"] \
                and "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL" in c.json["args"][-1]  # the stub, after the env joiner
        assert fake.alive() == []
        destroyed = [int(r.path.strip("/").rsplit("/", 1)[-1]) for r in fake.calls("DELETE", r"^/api/v0/instances/")]
        assert inst1["id"] in destroyed and len(set(destroyed)) == 2

        # Attempt 2 resumed from the committed checkpoint (the outbid container had no time to save).
        inst2 = max(set(destroyed))
        log2 = fake.workloads.output(str(inst2))
        resumed = [int(line.rsplit(" ", 1)[-1]) for line in log2.splitlines() if "resuming from checkpoint" in line]
        assert resumed and resumed[0] >= ckpt, log2[-2000:]

        preempt = db_rows(home, "SELECT end_reason FROM attempts WHERE job_id=? AND n=1", job)[0]["end_reason"]
        assert "preempted" in preempt and "outbid" in preempt
        ev = [(e["kind"], e["attempt"]) for e in db_rows(home, "SELECT * FROM events WHERE job_id=? ORDER BY id", job)]
        assert ("terminated", 1) in ev and ("launch", 2) in ev and ("done", None) in ev

        ledger = db_rows(home, "SELECT * FROM ledger WHERE job_id=? ORDER BY attempt", job)
        assert [r["attempt"] for r in ledger] == [1, 2]
        cost = cli_run(env, "cost", job, "--json")
        assert cost.returncode == 0, cost.stderr
        rep = json.loads(cost.stdout)
        (j,) = rep["jobs"]
        assert j["state"] == "done" and [a["n"] for a in j["attempts"]] == [1, 2]
        for a, row, c in zip(j["attempts"], ledger, creates, strict=True):
            assert a["provider"] == "vast" and a["spot"] is True and a["gpu"] == "RTX4090"
            assert a["price_hr"] == pytest.approx(c.json["price"])  # what we bid, not the on-demand price
            assert a["on_demand_price_hr"] > a["price_hr"]
            assert a["billed_s"] == math.ceil(row["ended_at"] - row["started_at"])
            assert a["cost_usd"] == pytest.approx(a["price_hr"] * a["billed_s"] / 3600, abs=1e-6)
        assert rep["total_usd"] == pytest.approx(sum(a["cost_usd"] for a in j["attempts"]), abs=1e-6)
        assert_nothing_left(job)

    keys = s3_keys(s3, bucket, f"jobs/{job}/")
    assert f"jobs/{job}/DONE.json" in keys and f"jobs/{job}/final/adapter_model.safetensors" in keys
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"jobs/{job}/final/summary.json")["Body"].read())
    assert summary["attempt"] == 2 and summary["steps"] == FAST_TRAINING["max_steps"]
    print(f"vast full run: checkpoint {ckpt}, outbid at {t_int:.1f}s, done at {time.time() - t0:.1f}s")
