"""Helpers shared by the trainer tests: tiny specs, running the trainer in or out of process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "reverse.jsonl"


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def tiny_spec(tmp: Path, **over: Any) -> dict[str, Any]:
    """A spec that trains tiny:reverse for a handful of steps in a few seconds on CPU."""
    spec: dict[str, Any] = {
        "name": "t",
        "model": "tiny:reverse",
        "method": "lora",
        "lora": {"rank": 8, "alpha": 32, "dropout": 0.1},
        "data": {"train": str(DATA), "max_seq_len": 48},
        "training": {"max_steps": 12, "micro_batch": 8, "learning_rate": 0.02, "seed": 7,
                     "gradient_checkpointing": False, "logging_steps": 1, "lr_scheduler": "linear"},
        "checkpoint": {"every_steps": 4, "every_minutes": None, "keep": 2},
        "store": {"url": f"file://{tmp / 'store'}"},
    }
    return deep_update(spec, over)


def write_spec(tmp: Path, spec: dict[str, Any], name: str = "job.json") -> Path:
    p = tmp / name
    p.write_text(json.dumps(spec))
    return p


# What a test trainer runs with on top of the test's environment: fast heartbeats, no IMDS.
TRAINER_ENV = {"CLOUDTUNE_HEARTBEAT_S": "0.2", "CLOUDTUNE_CONTROL_POLL_S": "0.2", "CLOUDTUNE_IMDS_ENDPOINT": "",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def trainer_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **TRAINER_ENV, **extra}


def start_trainer(spec_path: Path, job: str, attempt: int, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cloudtune.trainer", "--spec", str(spec_path), "--job-id", job,
         "--attempt", str(attempt)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=trainer_env(**env), cwd=ROOT,
    )


def heartbeat(store_dir: Path, job: str) -> dict[str, Any]:
    try:
        return json.loads((store_dir / job / "heartbeat.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def wait_for(pred: Any, timeout: float = 90.0, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def interrupt_at(proc: subprocess.Popen, store_dir: Path, job: str, step: int, sig: int = signal.SIGTERM) -> int:
    """Send sig once the heartbeat shows `step` reached; return the exit code."""
    wait_for(lambda: (heartbeat(store_dir, job).get("step") or 0) >= step, proc=proc, what=f"step {step}")
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def sigterm_at(store: Path, job: str, step: int) -> threading.Thread:
    """SIGTERM this process once `job`'s heartbeat reaches `step`, for a trainer run in process
    (cli.main in the main thread). Sent only if the trainer's handler is installed: a default handler
    would kill pytest instead. The thread's `error` says why it sent nothing."""

    def send() -> None:
        try:
            wait_for(lambda: (heartbeat(store, job).get("step") or 0) >= step, timeout=120, what=f"step {step}")
        except AssertionError as err:
            t.error = str(err)  # type: ignore[attr-defined]
            return
        handler = signal.getsignal(signal.SIGTERM)
        if "install_signal_handlers" not in getattr(handler, "__qualname__", ""):
            t.error = f"SIGTERM handler is {handler!r}, not the trainer's"  # type: ignore[attr-defined]
            return
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=send, daemon=True)
    t.error = None  # type: ignore[attr-defined]
    t.start()
    return t


def final_files(job_dir: Path) -> dict[str, str]:
    """sha256 of every file of a job's final/ folder but summary.json (it holds wall times)."""
    final = job_dir / "final"
    return {p.relative_to(final).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(final.rglob("*")) if p.is_file() and p.name != "summary.json"}
