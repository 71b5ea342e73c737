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


def test_ledger_closes_at_the_providers_end_time_not_when_noticed(tmp_path, _isolated_home):
    """#16 finding 7: a machine that ran ~1 s is billed ~1 s, even when the watchdog looks 4 s later."""
    import time

    from cloudtune.providers import get_provider
    from cloudtune.providers.base import LaunchRequest

    from cloudtune.run.orchestrator import Orchestrator
    from cloudtune.spec import parse_spec

    db = S.StateDB()
    spec = parse_spec({"name": "billed", "model": "tiny:reverse", "data": {"train": str(tmp_path / "x.jsonl")},
                       "store": {"url": f"file://{tmp_path / 'store'}"}, "limits": {"max_restarts": 0}})
    db.insert_job(id="billjob1", name="billed", provider="local", store_url=f"file://{tmp_path / 'store'}",
                  spec_json=spec.to_json(), plan_json="[]", state=S.RUNNING)
    p = get_provider("local")
    req = LaunchRequest(job_id="billjob1", attempt=1, offer=p.offers()[0], spot=False, image="-",
                        command=[sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(75)"])
    started = time.time()
    m = p.launch(req)
    db.insert_attempt("billjob1", 1, m.name, "local", "local")
    db.update_attempt("billjob1", 1, machine_id=m.machine_id, state=S.A_RUNNING)
    db.open_ledger("billjob1", 1, provider="local", offer_id="local", gpu="CPU", gpu_count=1, spot=0, price_hr=3600.0,
                   on_demand_price_hr=3600.0, billing_granularity_s=1, started_at=started)
    while p.status(m.machine_id).state.is_alive:
        time.sleep(0.1)
    time.sleep(4.0)  # the watchdog notices late
    Orchestrator(db, "billjob1").tick()
    row = db.ledger("billjob1")[0]
    assert row["ended_at"] is not None and row["end_estimated"] == 0
    assert row["ended_at"] - started < 3.5, f"billed {row['ended_at'] - started:.1f}s for a ~1 s machine"
    assert attempt_cost(row)["estimated"] is False
    open_row = {**row, "ended_at": None}
    assert attempt_cost(open_row)["estimated"] is True
