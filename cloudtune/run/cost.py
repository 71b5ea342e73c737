"""The cost ledger's arithmetic and the `cloudtune cost` report.

Why a ledger: a bill must be explainable after the fact, and after the catalog has moved on. Each
attempt's row keeps the provider, offer, GPU, spot flag, the price *at launch*, the on-demand price
of the same offer at launch, and the billing granularity; the report prices history from those
rows only, never from today's catalog (the SkyPilot failure mode: a retired instance type breaks
the report).
"""

from __future__ import annotations

import csv
import io
import math
import time
from datetime import UTC, datetime
from typing import Any


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts is not None else None


def billed_seconds(started_at: float, ended_at: float | None, granularity_s: int, now: float | None = None) -> float:
    """Seconds the provider bills: the run time rounded up to the billing granularity."""
    end = ended_at if ended_at is not None else (now if now is not None else time.time())
    elapsed = max(0.0, end - started_at)
    g = max(1, int(granularity_s or 1))
    return math.ceil(elapsed / g) * g if elapsed > 0 else 0.0


def attempt_cost(row: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """One ledger row priced: run hours, billed cost, and what on-demand would have cost."""
    billed = billed_seconds(row["started_at"], row.get("ended_at"), row["billing_granularity_s"], now)
    cost = row["price_hr"] * billed / 3600.0
    od_price = row.get("on_demand_price_hr")
    on_demand = od_price * billed / 3600.0 if od_price is not None else None
    end = row.get("ended_at") or (now if now is not None else time.time())
    return {
        "n": row["attempt"],
        "provider": row["provider"],
        "offer_id": row["offer_id"],
        "gpu": row["gpu"],
        "gpu_count": row["gpu_count"],
        "region": row.get("region"),
        "spot": bool(row["spot"]),
        "price_hr": row["price_hr"],
        "on_demand_price_hr": od_price,
        "price_as_of": row.get("price_as_of"),
        "billing_granularity_s": row["billing_granularity_s"],
        "started_at": iso(row["started_at"]),
        "ended_at": iso(row.get("ended_at")),
        "hours": round(max(0.0, end - row["started_at"]) / 3600.0, 6),
        "billed_s": billed,
        "cost_usd": round(cost, 6),
        "on_demand_cost_usd": round(on_demand, 6) if on_demand is not None else None,
        "end_reason": row.get("end_reason"),
        # True when the end is ours, not the provider's: still open (priced to now) or closed at the
        # moment the watchdog noticed the machine gone because the provider gave no end time.
        "estimated": row.get("ended_at") is None or bool(row.get("end_estimated")),
    }


def job_cost_usd(db, job_id: str, now: float | None = None) -> float:
    return sum(attempt_cost(r, now)["cost_usd"] for r in db.ledger(job_id))


def job_report(db, job, now: float | None = None, *, attend: bool = False) -> dict[str, Any]:
    """One job's bill. `attend`: also who attends it (run/watchdog.py attendance, as `status` shows it);
    an unattended job's open row is priced to now, so its cost is an estimate since `cost_estimated_since`."""
    attempts = [attempt_cost(r, now) for r in db.ledger(job.id)]
    cost = sum(a["cost_usd"] for a in attempts)
    spot_savings = sum(
        (a["on_demand_cost_usd"] - a["cost_usd"])
        for a in attempts
        if a["spot"] and a["on_demand_cost_usd"] is not None
    )
    hours = sum(a["hours"] for a in attempts)
    first = min((r["started_at"] for r in db.ledger(job.id)), default=None)
    wall_end = job.ended_at or (now if now is not None else time.time())
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "provider": job.provider,
        "cost_usd": round(cost, 6),
        "est_cost_usd": job.est_cost_usd,
        "est_hours": job.est_hours,
        "machine_hours": round(hours, 6),
        "wall_hours": round((wall_end - first) / 3600.0, 6) if first is not None else 0.0,
        "spot_savings_usd": round(spot_savings, 6),
        "attempts": attempts,
        **(_attendance(db, job) if attend else {}),
    }


def _attendance(db, job) -> dict[str, Any]:
    from cloudtune.run.watchdog import attendance

    a = attendance(db, job)
    return {"attended_by": a.attended_by, "cost_estimated_since": iso(a.unattended_since)}


def report(db, jobs) -> dict[str, Any]:
    now = time.time()
    out = [job_report(db, j, now, attend=True) for j in jobs]
    return {"jobs": out, "total_usd": round(sum(j["cost_usd"] for j in out), 6)}


CSV_FIELDS = [
    "job_id", "job_state", "n", "provider", "offer_id", "gpu", "gpu_count", "region", "spot", "price_hr",
    "on_demand_price_hr", "price_as_of", "billing_granularity_s", "started_at", "ended_at", "hours",
    "billed_s", "cost_usd", "on_demand_cost_usd", "end_reason", "estimated",
]


def to_csv(rep: dict[str, Any]) -> str:
    """One row per attempt: what a spreadsheet or a finance export wants."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for j in rep["jobs"]:
        for a in j["attempts"]:
            w.writerow({"job_id": j["id"], "job_state": j["state"], **{k: a.get(k) for k in CSV_FIELDS[2:]}})
    return buf.getvalue()


def _money(v: float | None) -> str:
    if v is None:
        return "-"
    return f"${v:,.4f}" if abs(v) < 1 else f"${v:,.2f}"


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    s = int(round(h * 3600))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _short(reason: str | None) -> str:
    """The first clause of an end reason, for a table cell (the full text is in --json/--csv)."""
    if not reason:
        return "running"
    if reason.startswith("the trainer wrote DONE.json"):
        return "done"
    head = reason.split(":")[0].split(" (")[0]
    return head if len(head) <= 32 else head[:31] + "…"


def render(rep: dict[str, Any], console) -> None:
    """Human report: one table per job (attempts), then the estimate-vs-actual line and a total."""
    from rich.table import Table

    for j in rep["jobs"]:
        t = Table(title=f"job {j['id']} ({j['name']}) - {j['state']}", title_justify="left")
        for col in ("#", "where", "gpu", "spot", "$/h", "per", "time", "cost"):
            t.add_column(col, no_wrap=True)
        t.add_column("ended by", overflow="ellipsis", no_wrap=True)
        for a in j["attempts"]:
            gpu = f"{a['gpu_count']}x {a['gpu']}" if a["gpu_count"] else a["gpu"]
            t.add_row(
                str(a["n"]), a["provider"] if a["offer_id"] == a["provider"] else f"{a['provider']}/{a['offer_id']}", gpu,
                "yes" if a["spot"] else "no", _money(a["price_hr"]), f"{a['billing_granularity_s']}s",
                _hours(a["hours"]), ("~" if a["estimated"] else "") + _money(a["cost_usd"]), _short(a["end_reason"]),
            )
        console.print(t)
        star = "*" if j.get("cost_estimated_since") else ""
        console.print(
            f"  cost {_money(j['cost_usd'])}{star} (estimate {_money(j['est_cost_usd'])}), "
            f"machine time {_hours(j['machine_hours'])} (estimate {_hours(j['est_hours'])}), "
            f"spot savings {_money(j['spot_savings_usd'])}"
        )
        if j.get("cost_estimated_since"):  # nobody attends it: the open row is priced to now
            console.print(f"  * UNATTENDED since {j['cost_estimated_since']} (no watchdog beat or controller lease): "
                          f"its cost is an estimate since then; `cloudtune status {j['id']}` restarts its watchdog",
                          markup=False, soft_wrap=True)
    console.print(f"total {_money(rep['total_usd'])}")
