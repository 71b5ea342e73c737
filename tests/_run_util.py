"""Helpers for the lifecycle tests: quickstart-derived specs, the CLI as a subprocess, process checks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests._trainer_util import deep_update  # noqa: F401 - re-exported for the run tests

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def quickstart_spec(tmp: Path, file_stem: str, /, **over: Any) -> Path:
    """The quickstart job with a store under `tmp` and the given overrides (`name=` too), written as YAML."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["data"]["train"] = str(ROOT / "examples" / "data" / "reverse.jsonl")
    spec["store"] = {"url": f"file://{tmp / 'store'}"}
    deep_update(spec, over)
    path = tmp / f"{file_stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "CLOUDTUNE_HOME": str(home),
        "CLOUDTUNE_HEARTBEAT_S": "0.3",
        "CLOUDTUNE_CONTROL_POLL_S": "0.3",
        "CLOUDTUNE_WATCHDOG_POLL_S": "0.3",
        "CLOUDTUNE_IMDS_ENDPOINT": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def db_rows(home: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    conn = sqlite3.connect(home / "state.db", timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def jobs_rows(home: Path) -> list[dict[str, Any]]:
    """All job rows, or [] while the db is not created yet (another process may be creating it)."""
    if not (home / "state.db").exists():
        return []
    try:
        return db_rows(home, "SELECT * FROM jobs")
    except sqlite3.OperationalError:
        return []


def wait_for(pred, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def our_processes(job_id: str) -> list[str]:
    """Live processes that belong to the job: trainer and supervisor (by env) and its watchdog (by argv)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if "cloudtune.run.watchdog" in cmd and job_id in cmd:
                found.append(f"{p.pid} {cmd}")
            elif p.environ().get("CLOUDTUNE_JOB_ID") == job_id:
                found.append(f"{p.pid} {cmd}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_nothing_left(job_id: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    left = our_processes(job_id)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = our_processes(job_id)
    assert not left, f"processes left behind by job {job_id}: {left}"
