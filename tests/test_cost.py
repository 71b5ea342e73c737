"""The cost ledger's arithmetic and the `cloudtune cost` contract (JSON fields, CSV rows)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

from cloudtune.run import state as S
from cloudtune.run.cost import attempt_cost, billed_seconds, job_report, report, to_csv


def test_billing_granularity_rounds_up():
    assert billed_seconds(0, 61, 60) == 120
    assert billed_seconds(0, 60, 60) == 60
    assert billed_seconds(0, 61.2, 1) == 62
    assert billed_seconds(0, 3601, 3600) == 7200
    assert billed_seconds(10, 10, 60) == 0
    assert billed_seconds(0, None, 1, now=30) == 30


def _ledger_job(db: S.StateDB, job_id="costjobx") -> None:
    db.insert_job(id=job_id, name="c", provider="aws", store_url="file:///s", spec_json="{}", plan_json="[]",
                  est_hours=1.0, est_cost_usd=2.5)
    # attempt 1: spot, 1 h at $1/h (on-demand $4/h), preempted; attempt 2: 30 min + 1 s, hourly billing.
    db.open_ledger(job_id, 1, provider="aws", offer_id="g5.xlarge", gpu="A10G", gpu_count=1, spot=1,
                   price_hr=1.0, on_demand_price_hr=4.0, billing_granularity_s=1, started_at=0.0,
                   price_as_of="2026-08-01")
    db.close_ledger(job_id, 1, 3600.0, "preempted: spot interruption")
    db.open_ledger(job_id, 2, provider="lambda", offer_id="gpu_1x_a10", gpu="A10", gpu_count=1, spot=0,
                   price_hr=0.75, on_demand_price_hr=0.75, billing_granularity_s=3600, started_at=4000.0)
    db.close_ledger(job_id, 2, 5801.0, "the trainer wrote DONE.json")
    db.set_state(job_id, S.DONE)


def test_report_prices_history_from_the_ledger_only(tmp_path):
    db = S.StateDB(tmp_path / "s.db")
    _ledger_job(db)
    rep = job_report(db, db.get_job("costjobx"))
    a1, a2 = rep["attempts"]
    assert a1["cost_usd"] == 1.0 and a1["on_demand_cost_usd"] == 4.0 and a1["spot"] is True
    assert a2["cost_usd"] == 0.75  # 1801 s billed as one full hour
    assert rep["cost_usd"] == 1.75
    assert rep["spot_savings_usd"] == 3.0
    assert rep["est_cost_usd"] == 2.5 and rep["est_hours"] == 1.0
    assert abs(rep["machine_hours"] - (1 + 1801 / 3600)) < 1e-5
    assert a1["started_at"] == "1970-01-01T00:00:00Z" and a1["end_reason"].startswith("preempted")


def test_cost_json_and_csv_contract(tmp_path):
    db = S.StateDB()
    _ledger_job(db)
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "cloudtune", "cost", "--json"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert set(rep) >= {"jobs", "total_usd"} and rep["total_usd"] == 1.75
    job = rep["jobs"][0]
    assert {"id", "state", "cost_usd", "est_cost_usd", "attempts"} <= set(job)
    for a in job["attempts"]:
        assert {"n", "provider", "gpu", "gpu_count", "spot", "price_hr", "started_at", "ended_at", "cost_usd",
                "end_reason"} <= set(a)
    rows = list(csv.DictReader(io.StringIO(to_csv(report(db, db.list_jobs())))))
    assert [r["n"] for r in rows] == ["1", "2"] and rows[1]["cost_usd"] == "0.75"
    bad = subprocess.run([sys.executable, "-m", "cloudtune", "cost", "nojobxyz"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no job with id 'nojobxyz'")
    assert "Traceback" not in bad.stderr


def test_running_attempt_accrues_cost(tmp_path):
    db = S.StateDB(tmp_path / "s.db")
    db.insert_job(id="runjobxx", name="r", provider="local", store_url="file:///s", spec_json="{}", plan_json="[]")
    db.open_ledger("runjobxx", 1, provider="local", offer_id="local", gpu="CPU", gpu_count=1, spot=0,
                   price_hr=36.0, on_demand_price_hr=36.0, billing_granularity_s=1, started_at=1000.0)
    row = db.ledger("runjobxx")[0]
    assert attempt_cost(row, now=1100.0)["cost_usd"] == 1.0
    assert attempt_cost(row, now=1100.0)["ended_at"] is None
