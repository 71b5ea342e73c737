"""The container entrypoint: lifetime cap, signal forwarding, self-terminate hook, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from cloudtune.trainer import contract
from cloudtune.trainer.entrypoint import supervise

# A stand-in trainer: on SIGTERM it "checkpoints" (writes a file) and exits 75, like the real one.
CHILD = textwrap.dedent("""
    import signal, sys, time, pathlib
    out = pathlib.Path(sys.argv[1])
    def term(*_):
        out.write_text("checkpointed")
        sys.exit(75)
    signal.signal(signal.SIGTERM, term)
    out.write_text("started")
    time.sleep(float(sys.argv[2]))
    sys.exit(int(sys.argv[3]))
""")


def _child(tmp: Path, sleep: float, code: int = 0, ignore_term: bool = False) -> list[str]:
    script = tmp / "child.py"
    body = CHILD.replace("signal.signal(signal.SIGTERM, term)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)") \
        if ignore_term else CHILD
    script.write_text(body)
    return [sys.executable, str(script), str(tmp / "state.txt"), str(sleep), str(code)]


def _hook(tmp: Path) -> str:
    return f"echo terminated-$SECRET_TOKEN > {tmp / 'hook.txt'}"


def test_normal_exit_runs_hook_and_keeps_code(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t")
    out = supervise(_child(tmp_path, 0.1, code=0), self_terminate=_hook(tmp_path))
    assert out.exit_code == 0 and not out.lifetime_exceeded and out.hook_exit == 0
    assert (tmp_path / "hook.txt").read_text().strip() == "terminated-s3cr3t"
    out = supervise(_child(tmp_path, 0.1, code=3), self_terminate="exit 4")
    assert out.exit_code == 3 and out.hook_exit == 4  # a failing hook does not hide the trainer's code


def test_lifetime_cap_stops_trainer_gracefully_then_terminates(tmp_path: Path):
    t0 = time.monotonic()
    out = supervise(_child(tmp_path, 60), max_lifetime_s=1.0, stop_grace_s=20, self_terminate=_hook(tmp_path))
    assert time.monotonic() - t0 < 15
    assert out.lifetime_exceeded and not out.killed and out.exit_code == contract.EXIT_PREEMPTED
    assert (tmp_path / "state.txt").read_text() == "checkpointed"
    assert (tmp_path / "hook.txt").exists()


def test_lifetime_cap_kills_a_stuck_trainer(tmp_path: Path):
    out = supervise(_child(tmp_path, 60, ignore_term=True), max_lifetime_s=0.5, stop_grace_s=1.0,
                    self_terminate=_hook(tmp_path))
    assert out.killed and out.exit_code == contract.EXIT_PREEMPTED and (tmp_path / "hook.txt").exists()


def test_sigterm_is_forwarded(tmp_path: Path):
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    out = supervise(_child(tmp_path, 60), self_terminate=_hook(tmp_path))
    assert out.signals_forwarded == ["SIGTERM"] and out.exit_code == contract.EXIT_PREEMPTED
    assert (tmp_path / "state.txt").read_text() == "checkpointed" and (tmp_path / "hook.txt").exists()


def test_main_as_a_process_reads_env_and_never_prints_the_hook(tmp_path: Path):
    env = {**os.environ, "CLOUDTUNE_MAX_LIFETIME_S": "1", "CLOUDTUNE_STOP_GRACE_S": "20",
           "CLOUDTUNE_SELF_TERMINATE": f"curl -H 'Authorization: Bearer tok-123' x; {_hook(tmp_path)}",
           "SECRET_TOKEN": "abc"}
    proc = subprocess.run([sys.executable, "-m", "cloudtune.trainer.entrypoint", "--", *_child(tmp_path, 60)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == contract.EXIT_PREEMPTED
    assert "maximum lifetime" in proc.stderr and "self-terminate hook exited" in proc.stderr
    assert "tok-123" not in proc.stderr + proc.stdout
    assert (tmp_path / "hook.txt").read_text().strip() == "terminated-abc"


def test_unstartable_command_still_terminates(tmp_path: Path):
    out = supervise([str(tmp_path / "does-not-exist")], self_terminate=_hook(tmp_path))
    assert out.exit_code == contract.EXIT_FAILED and (tmp_path / "hook.txt").exists()
