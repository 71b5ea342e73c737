"""Store and state-db faults made by the kernel (#16 finding 5 and 6): a small tmpfs that fills up
(ENOSPC) and a remount read-only (EROFS), instead of a simulation. What they showed that the
simulation missed: sqlite reports a full disk at open as "disk I/O error" (which read as a corrupt db
with the advice to move it away), the lease's compare-and-swap left a partial temp file in the store,
and `status`/`stop` gave tracebacks on a read-only $CLOUDTUNE_HOME."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloudtune.run import state as S
from cloudtune.run.lease import Lease
from cloudtune.store import open_store
from cloudtune.store.retry import StoreUnavailable
from tests._faults_util import end, sleeper_job, wait_beat
from tests._kernel_fs import fill
from tests._run_util import ROOT, cli, cli_env


def _tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*") if not p.name.startswith(".tmp-lock-"))


def _later(seconds: float, fn) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_full_store_is_one_line_leaves_no_partial_files_and_is_ridden_out(tmp_path, mounts):
    if mounts is None:
        return  # ran (and passed) inside `unshare -rm`
    root = mounts.tmpfs(tmp_path / "store", "1m")
    store = open_store(f"file://{root}", retry_s=0)
    store.put_json("jobk1/heartbeat.json", {"n": 1})
    ballast = fill(root)
    big = b"x" * 200_000
    with pytest.raises(StoreUnavailable) as info:
        store.put_bytes("jobk1/checkpoints/00000002/adapter.bin", big)
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    src = tmp_path / "local.bin"
    src.write_bytes(big)
    with pytest.raises(StoreUnavailable):
        store.upload_file(src, "jobk1/checkpoints/00000002/optimizer.pt")
    lease = Lease(store, "jobk1", "watchdog:here:1:abc")
    with pytest.raises(OSError):
        lease.acquire()
    assert _tmp_files(root) == [], "a failed write left a partial temp file in the store"
    assert store.get_json("jobk1/heartbeat.json") == {"n": 1}  # what was there is intact

    patient = open_store(f"file://{root}", retry_s=30)
    _later(1.0, ballast.unlink)  # the user frees space
    t0 = time.monotonic()
    patient.put_bytes("jobk1/checkpoints/00000002/adapter.bin", big)
    assert time.monotonic() - t0 >= 0.9
    assert patient.get_bytes("jobk1/checkpoints/00000002/adapter.bin") == big
    assert lease.acquire()


def test_a_read_only_spell_is_ridden_out(tmp_path, mounts):
    if mounts is None:
        return
    root = mounts.tmpfs(tmp_path / "store", "1m")
    store = open_store(f"file://{root}", retry_s=30)
    store.put_json("jobk2/heartbeat.json", {"n": 1})
    mounts.read_only(root)
    with pytest.raises(StoreUnavailable) as info:
        open_store(f"file://{root}", retry_s=0).put_json("jobk2/heartbeat.json", {"n": 2})
    assert "Read-only file system" in str(info.value)
    _later(1.5, lambda: mounts.read_only(root, False))
    t0 = time.monotonic()
    store.put_json("jobk2/heartbeat.json", {"n": 3})
    assert time.monotonic() - t0 >= 1.0
    assert store.get_json("jobk2/heartbeat.json") == {"n": 3} and _tmp_files(root) == []


def _watchdog(home: Path, log: Path, job_id: str) -> subprocess.Popen:
    with open(log, "ab") as out:  # the log outside the full disk, so the test can read what happened
        return subprocess.Popen([sys.executable, "-m", "cloudtune.run.watchdog", job_id], env=cli_env(home),
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_state_db_on_a_full_disk(tmp_path, _isolated_home, mounts):
    """The watchdog outlives SQLITE_FULL; the CLI reads on, and a write is one line naming the disk."""
    if mounts is None:
        return
    home = mounts.tmpfs(_isolated_home, "4m")
    db, mid = sleeper_job(tmp_path, "kfulldb1")
    log = tmp_path / "wd.log"
    wd = _watchdog(home, log, "kfulldb1")
    try:
        wait_beat(db, "kfulldb1", 0)
        ballast = fill(home)
        time.sleep(3.0)
        assert wd.poll() is None, "the watchdog died on a full disk"
        env = cli_env(home)
        out = cli(env, "status", "kfulldb1", "--json", timeout=60)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert json.loads(out.stdout)[0]["state"] == "running"
        out = cli(env, "stop", "kfulldb1", "--no-wait", timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert "file system is full" in lines[0] and "free some space" in lines[0], lines
        ballast.unlink()
        wait_beat(db, "kfulldb1", time.time(), timeout=60)  # it carries on once there is space
        assert wd.poll() is None
        assert "disk is full" in log.read_text()
    finally:
        end(wd, mid)


def test_cli_on_a_read_only_or_full_home_that_was_closed(tmp_path, _isolated_home, mounts):
    """A closed db on a full disk: opening it (WAL needs -shm/-wal files) fails with "disk I/O error".
    Before: "unreadable ... move it away". Now status/cost/logs read it as it is; stop says why it cannot."""
    if mounts is None:
        return
    home = mounts.tmpfs(_isolated_home, "2m")
    db, mid = sleeper_job(tmp_path, "kclosed1")
    end(None, mid)
    db.close()
    ballast = fill(home)
    env = cli_env(home)
    for fault in ("full", "read-only"):
        if fault == "read-only":
            ballast.unlink()
            mounts.read_only(home)
        for args in (["status", "--no-restart"], ["status"], ["cost", "kclosed1"], ["status", "kclosed1", "--json"]):
            out = cli(env, *args, timeout=60)
            assert out.returncode == 0 and "Traceback" not in out.stderr, (fault, args, out.stderr)
            assert "kclosed1" in out.stdout, (fault, args, out.stdout)
        out = cli(env, "status", "kclosed1", "--json", timeout=60)
        assert "not restarted: the state db" in json.loads(out.stdout)[0]["attendance_action"]
        out = cli(env, "stop", "kclosed1", timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and f"file system is {fault}" in lines[0], (fault, out.stderr)
    mounts.read_only(home, False)
    assert S.StateDB().get_job("kclosed1").state == "running"  # nothing lost


def test_a_store_that_fills_up_mid_training_waits_resumable_then_completes(tmp_path, _isolated_home, mounts):
    """A real local job whose file:// store is a 64 MB tmpfs that fills up after the first checkpoint:
    the trainer retries, then exits 74 (not FAILED); the watchdog ends the machine and waits (no restart
    spent, nothing relaunched onto a full disk); the committed checkpoint still verifies; `logs` shows
    the kernel's reason; once space returns the job resumes and ends done."""
    if mounts is None:
        return
    from cloudtune.trainer.checkpoint import CheckpointStore
    from tests._run_util import db_rows, last_json, quickstart_spec, wait_for

    root = mounts.tmpfs(tmp_path / "store", "64m")
    spec = quickstart_spec(tmp_path, "job", name="kfull", training={"max_steps": 200}, checkpoint={"every_steps": 20})
    env = cli_env(_isolated_home, CLOUDTUNE_STORE_RETRY_S="2")
    out = cli(env, "run", str(spec), "--detach", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    job = last_json(out.stdout)["job_id"]
    store = open_store(f"file://{root}")
    ckpts = CheckpointStore(store, job)
    try:
        step = wait_for(lambda: ckpts.latest_step(), 120, "the first committed checkpoint", every=0.05)
        ballast = fill(root)
        manifest = store.get_bytes(f"{job}/checkpoints/{step:08d}/MANIFEST.json")

        def row():
            return db_rows(_isolated_home, "SELECT state, reason FROM jobs WHERE id = ?", job)[0]

        waiting = wait_for(lambda: (r := row())["reason"] and r["reason"].startswith("waiting for the store") and r,
                           120, "the job to wait for its store")
        assert waiting["state"] == "recovering"
        assert not store.exists(f"{job}/FAILED.json")
        time.sleep(3.0)  # while the disk stays full nothing is relaunched
        attempts = db_rows(_isolated_home, "SELECT n, state, exit_code FROM attempts WHERE job_id = ?", job)
        assert [a["state"] for a in attempts] == ["ended"], attempts
        assert row()["state"] == "recovering"
        assert store.get_bytes(f"{job}/checkpoints/{step:08d}/MANIFEST.json") == manifest
        last_good = max(ckpts.committed_steps())
        ckpts.download(last_good, tmp_path / "verify")  # sizes and sha256 of every file check out
        logs = cli(env, "logs", job, timeout=60)
        assert logs.returncode == 0 and "No space left on device" in logs.stdout, logs.stdout[-2000:]
        assert "stopping resumable" in logs.stdout
        st = json.loads(cli(env, "status", job, "--json", timeout=60).stdout)[0]
        assert st["attended_by"].startswith("watchdog (pid "), st  # waiting, not abandoned

        ballast.unlink()  # space returns
        done = wait_for(lambda: (r := row())["state"] in ("done", "failed", "stopped") and r, 300, "the job to end")
        assert done["state"] == "done", done
        attempts = db_rows(_isolated_home, "SELECT n, state FROM attempts WHERE job_id = ?", job)
        assert len(attempts) == 2, attempts
        kinds = [e["kind"] for e in db_rows(_isolated_home, "SELECT kind FROM events WHERE job_id = ?", job)]
        assert "store_wait" in kinds and "store_back" in kinds
        assert _tmp_files(root) == []
    finally:
        cli(env, "stop", job, "--no-wait", timeout=60)
        from tests._run_util import assert_nothing_left

        assert_nothing_left(job, timeout=60)
