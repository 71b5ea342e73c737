"""State db faults (#16 finding 6, and the zero-byte db of finding 3): a lock held past the busy
timeout does not kill the watchdog, a deleted lock file does not let a second watchdog start, and a
corrupt or truncated state.db is an error (one line, exit 2), never silently recreated."""

from __future__ import annotations

import sqlite3
import time

import pytest

from cloudtune.run import state as S
from cloudtune.run.watchdog import ensure_watchdog, lock_path
from tests._faults_util import end, sleeper_job, start_watchdog, wait_beat
from tests._run_util import cli, cli_env, our_processes


def test_db_locked_past_the_busy_timeout_does_not_kill_the_watchdog(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "dblockjb")
    wd = start_watchdog(_isolated_home, "dblockjb", CLOUDTUNE_DB_BUSY_S="0.3")
    try:
        wait_beat(db, "dblockjb", 0)
        hold = sqlite3.connect(_isolated_home / "state.db", timeout=5, isolation_level=None)
        hold.execute("BEGIN EXCLUSIVE")  # every write of the watchdog now waits 0.3 s and fails
        time.sleep(3.0)
        assert wd.poll() is None, "the watchdog died while the db was locked"
        hold.execute("ROLLBACK")
        hold.close()
        released = time.time()
        wait_beat(db, "dblockjb", released, timeout=30)  # it came back and beats again
        assert wd.poll() is None
        log = (_isolated_home / "watchdog-dblockjb.test.log").read_text()
        assert "database is locked" in log  # it met the fault, logged it and kept going
    finally:
        end(wd, mid)


def test_deleting_the_lock_file_does_not_start_a_second_watchdog(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "dblockfl")
    wd = start_watchdog(_isolated_home, "dblockfl")
    try:
        wait_beat(db, "dblockfl", 0)
        lock_path("dblockfl").unlink()
        assert ensure_watchdog(db, "dblockfl", "test") is False
        out = cli(cli_env(_isolated_home), "status", "dblockfl", timeout=60)
        assert out.returncode == 0, out.stderr
        assert "restarted" not in out.stderr + out.stdout
        time.sleep(1.0)
        watchdogs = [p for p in our_processes("dblockfl") if "cloudtune.run.watchdog" in p]
        assert len(watchdogs) == 1, watchdogs
    finally:
        end(wd, mid)


def test_a_second_watchdog_with_its_own_lock_exits_on_the_lease(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "dbleasej")
    first = start_watchdog(_isolated_home, "dbleasej")
    second = None
    try:
        wait_beat(db, "dbleasej", 0)
        lock_path("dbleasej").unlink()  # the second one gets a fresh, unheld lock file
        second = start_watchdog(_isolated_home, "dbleasej")
        assert second.wait(30) == 0
        assert first.poll() is None and db.watchdog_row("dbleasej")["pid"] == first.pid
    finally:
        end(second)
        end(first, mid)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_damaged_state_db_is_an_error_not_a_fresh_db(tmp_path, _isolated_home, damage):
    path = _isolated_home / "state.db"
    db = S.StateDB()
    db.insert_job(id="keepme11", name="k", provider="local", store_url="file:///s", spec_json="{}", plan_json="[]")
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    for extra in ("-wal", "-shm"):
        (path.parent / f"state.db{extra}").unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "garbage": b"not a database at all " * 300, "truncated": data[:100]}[damage])
    before = path.read_bytes()
    env = cli_env(_isolated_home)
    for args in (["status"], ["gc", "--provider", "local"], ["cost"]):
        out = cli(env, *args, timeout=60)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "state database" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert path.read_bytes() == before, "the damaged db must be left for the user to restore, not rewritten"
