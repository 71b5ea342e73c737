"""`cloudtune status` says who attends each running job (#16 finding 7): this home's watchdog, a
controller holding the job's lease in the store, or nobody since a given time, and what status did
about it. The jobs are local sleepers (tests/_faults_util.py) watched by real watchdog processes."""

from __future__ import annotations

import json
import os
import signal
import time

from cloudtune.run.lease import Lease
from cloudtune.run.watchdog import ensure_watchdog
from cloudtune.store import open_store
from tests._faults_util import end, sleeper_job, start_watchdog, wait_beat
from tests._run_util import cli, cli_env, our_processes, wait_for


def _status(env, job_id: str, *extra: str) -> dict:
    out = cli(env, "status", job_id, "--json", *extra, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)[0]


def _watchdogs(job_id: str) -> list[str]:
    return [p for p in our_processes(job_id) if "cloudtune.run.watchdog" in p]


def test_a_killed_watchdog_shows_unattended_then_restarted(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "attkill1")
    wd = start_watchdog(_isolated_home, "attkill1")
    env = cli_env(_isolated_home)
    new_pid = None
    try:
        wait_beat(db, "attkill1", 0)
        row = _status(env, "attkill1")
        assert row["attended_by"].startswith(f"watchdog (pid {wd.pid}, beat "), row
        assert row["unattended_since"] is None and row["cost_estimated_since"] is None
        last_beat = db.watchdog_row("attkill1")["beat_at"]
        os.kill(wd.pid, signal.SIGKILL)
        wd.wait(10)

        row = _status(env, "attkill1", "--no-restart")
        assert row["attended_by"] is None and row["state"] == "running"
        assert row["unattended_since"] is not None and row["cost_estimated_since"] == row["unattended_since"]
        since = time.mktime(time.strptime(row["unattended_since"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert abs(since - last_beat) < 2, (row["unattended_since"], last_beat)  # the last attended moment
        assert row["attendance_action"] == "not restarted (--no-restart)"
        assert not _watchdogs("attkill1"), "--no-restart started a watchdog"

        table = cli(env, "status", "attkill1", "--no-restart", timeout=60)
        assert table.returncode == 0 and "UNATTENDED since" in table.stdout and "$0.0000*" in table.stdout, table.stdout

        row = _status(env, "attkill1")  # this one restarts it
        assert row["attended_by"] is None and row["attendance_action"].startswith("restarted its watchdog (pid ")
        new_pid = int(row["attendance_action"].split("pid ")[1].split(")")[0])
        wait_beat(db, "attkill1", time.time())
        row = _status(env, "attkill1")
        assert row["attended_by"].startswith(f"watchdog (pid {new_pid}, beat "), row
        assert row["unattended_since"] is None and row["attendance_action"] is None
        kinds = [e["kind"] for e in db.events("attkill1")]
        assert "watchdog_restarted" in kinds
    finally:
        if new_pid:
            try:
                os.killpg(new_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            wait_for(lambda: not _watchdogs("attkill1"), 20, "the restarted watchdog to exit")
        end(wd, mid)


def test_a_controller_lease_is_shown_and_no_watchdog_is_started(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "attctrl1")
    try:
        store = open_store(f"file://{tmp_path / 'store'}")
        assert Lease(store, "attctrl1", "controller:modal/cloudtune-ctl:0:scheduled").acquire()
        row = _status(cli_env(_isolated_home), "attctrl1")
        assert row["attended_by"].startswith("controller modal/cloudtune-ctl (lease until "), row
        assert row["unattended_since"] is None
        assert ensure_watchdog(db, "attctrl1", "test") is False
        time.sleep(1.0)
        assert not _watchdogs("attctrl1"), "status started a watchdog beside a controller holding the lease"
    finally:
        end(None, mid)


def test_a_hung_watchdog_is_unattended_and_not_doubled(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "atthung1")
    wd = start_watchdog(_isolated_home, "atthung1")
    try:
        wait_beat(db, "atthung1", 0)
        os.kill(wd.pid, signal.SIGSTOP)
        time.sleep(2.5)
        row = _status(cli_env(_isolated_home, CLOUDTUNE_WATCHDOG_FRESH_S="2"), "atthung1")
        assert row["attended_by"] is None and row["unattended_since"] is not None
        assert row["attendance_action"].startswith(f"not restarted: watchdog pid {wd.pid} still holds"), row
        assert len(_watchdogs("atthung1")) == 1
    finally:
        os.kill(wd.pid, signal.SIGCONT)
        end(wd, mid)


def test_a_job_whose_store_is_unreachable(tmp_path, _isolated_home):
    db, mid = sleeper_job(tmp_path, "attnost1")
    try:
        (tmp_path / "store").write_bytes(b"a file where the store folder was")
        row = _status(cli_env(_isolated_home), "attnost1", "--no-restart")
        assert row["attended_by"] is None and row["unattended_since"] is not None
        assert row["attendance_action"].startswith("not restarted (--no-restart); store unreachable ("), row
        out = cli(cli_env(_isolated_home), "status", "--no-restart", timeout=60)
        assert out.returncode == 0 and "Traceback" not in out.stderr and "attnost1" in out.stdout, out.stderr
    finally:
        end(None, mid)
