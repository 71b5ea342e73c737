"""The state db: schema versioning, concurrent writers in separate processes, job ids."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from cloudtune.run import state as S
from cloudtune.run.ids import looks_like_job_id, new_job_id


def _job(db: S.StateDB, job_id: str = "aaaaaaaa") -> None:
    db.insert_job(id=job_id, name="t", provider="local", store_url="file:///tmp/x", spec_json="{}",
                  plan_json="[]")


def test_schema_version_and_wal(tmp_path):
    db = S.StateDB(tmp_path / "s.db")
    assert db.conn.execute("SELECT version FROM schema_version").fetchone()[0] == S.SCHEMA_VERSION
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    _job(db)
    db.close()
    again = S.StateDB(tmp_path / "s.db")  # reopening does not re-run migrations
    assert again.get_job("aaaaaaaa").state == S.PENDING
    assert again.conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(tmp_path):
    from cloudtune.errors import UserError

    S.StateDB(tmp_path / "s.db").close()
    c = sqlite3.connect(tmp_path / "s.db")
    c.execute("UPDATE schema_version SET version = 999")
    c.commit()
    c.close()
    with pytest.raises(UserError, match="newer than this cloudtune"):
        S.StateDB(tmp_path / "s.db")


def _writer(path: str, who: int, n: int) -> None:
    db = S.StateDB(__import__("pathlib").Path(path))
    for i in range(n):
        db.event("aaaaaaaa", "w", f"{who}-{i}")
        db.update_job("aaaaaaaa", step=i)


def test_concurrent_processes_do_not_lose_writes(tmp_path):
    path = tmp_path / "s.db"
    db = S.StateDB(path)
    _job(db)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    msgs = {e["message"] for e in db.events("aaaaaaaa")}
    assert len(msgs) == 450


def test_stop_request_only_for_unfinished_jobs(tmp_path):
    db = S.StateDB(tmp_path / "s.db")
    _job(db)
    assert db.request_stop("aaaaaaaa", "test") is True
    assert db.get_job("aaaaaaaa").stop_requested == "test"
    db.set_state("aaaaaaaa", S.DONE, "finished")
    assert db.get_job("aaaaaaaa").ended_at is not None
    assert db.request_stop("aaaaaaaa", "again") is False
    assert db.request_stop("nosuchjb", "x") is False


def test_attempts_and_ledger_rows(tmp_path):
    db = S.StateDB(tmp_path / "s.db")
    _job(db)
    db.insert_attempt("aaaaaaaa", 1, "cloudtune-aaaaaaaa-1", "local", "local")
    assert db.get_job("aaaaaaaa").current_attempt == 1
    assert [a["n"] for a in db.live_attempts()] == [1]
    db.open_ledger("aaaaaaaa", 1, provider="local", offer_id="local", gpu="CPU", gpu_count=1, spot=1,
                   price_hr=1.0, on_demand_price_hr=2.0, billing_granularity_s=1, started_at=100.0)
    db.close_ledger("aaaaaaaa", 1, 160.0, "preempted")
    db.close_ledger("aaaaaaaa", 1, 999.0, "again")  # closing twice keeps the first end
    row = db.ledger("aaaaaaaa")[0]
    assert (row["ended_at"], row["end_reason"]) == (160.0, "preempted")
    db.update_attempt("aaaaaaaa", 1, state=S.A_ENDED)
    assert db.live_attempts() == []


def test_job_ids_are_short_unique_and_name_safe():
    ids = {new_job_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(looks_like_job_id(i) for i in ids)
    assert not looks_like_job_id("ABCDEFGH") and not looks_like_job_id("abc")
