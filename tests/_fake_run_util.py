"""Helpers for full `cloudtune run` tests through the RunPod and Vast fakes.

The pieces are all real: the CLI and its detached watchdog as subprocesses, the provider adapter
talking HTTP to the fake, the trainer started by the fake as a local process group (the pod's
"container"), and an S3 store on the session's moto_server. The fake's machines inherit this test
process's environment (plus what the launch request carries), so `machine_env` puts this venv's
`python` first on PATH and shortens the trainer's heartbeat and control polling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests._run_util import QUICKSTART, ROOT, cli, cli_env, deep_update, wait_for

# Short enough for < 30 s per run on 2 cores, long enough to interrupt between checkpoints.
FAST_TRAINING = {"max_steps": 40, "logging_steps": 5}
FAST_CHECKPOINT = {"every_steps": 10, "every_minutes": None, "keep": 2}


def machine_env(monkeypatch) -> None:
    """What the fake's "container" inherits: this venv's python, fast heartbeats, no IMDS."""
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("CLOUDTUNE_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("CLOUDTUNE_CONTROL_POLL_S", "0.3")
    monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", "")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


def s3_job_spec(tmp: Path, endpoint: str, bucket: str, **over: Any) -> Path:
    """The quickstart job, shortened, with its store in `bucket` on moto and no pinned provider."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["data"]["train"] = str(ROOT / "examples" / "data" / "reverse.jsonl")
    spec["resources"] = {}
    spec["store"] = {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint}
    deep_update(spec, {"training": dict(FAST_TRAINING), "checkpoint": dict(FAST_CHECKPOINT),
                       "limits": {"heartbeat_timeout_s": 120, "max_restarts": 3}})
    deep_update(spec, over)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli_over_environ(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`cloudtune ARGS` with `env` on top of this process's environment (conftest's isolated home)."""
    return cli({**os.environ, **env}, *args, timeout=120)


def s3_quickstart(tmp: Path) -> Path:
    """The quickstart with an S3 store: a cloud machine cannot read a file:// store (a dry run talks to neither)."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["data"]["train"] = str(ROOT / "examples" / "data" / "reverse.jsonl")
    spec["store"] = {"url": "s3://my-bucket/cloudtune"}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "job.yaml"


def s3_bucket(endpoint: str, bucket: str):
    """A fresh bucket on moto, and the client that made it (the tests read the job's store with it)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    return s3


def runpod_env(home: Path, fake: Any, key: str, **extra: str) -> dict[str, str]:
    """The CLI's environment for a run through the RunPod fake, with its catalog refreshed from it."""
    env = fake_cli_env(home, RUNPOD_API_KEY=key, CLOUDTUNE_PROVIDER_CONFIG=json.dumps(
        {"runpod": {"base_url": fake.url + "/v2"}}), **extra)
    refresh = cli_run({**env, "CLOUDTUNE_RUNPOD_API_URL": fake.url + "/v2"},
                      "catalog", "refresh", "--provider", "runpod")
    assert refresh.returncode == 0, refresh.stderr
    return env


def vast_env(home: Path, fake: Any, key: str, **extra: str) -> dict[str, str]:
    """The CLI's environment for a run through the Vast fake, with its catalog refreshed from it."""
    env = fake_cli_env(home, VAST_API_KEY=key, CLOUDTUNE_PROVIDER_CONFIG=json.dumps({"vast": {"base_url": fake.url}}),
                       **extra)
    refresh = cli_run({**env, "CLOUDTUNE_VAST_API_URL": fake.url}, "catalog", "refresh", "--provider", "vast")
    assert refresh.returncode == 0, refresh.stderr
    return env


def fake_cli_env(home: Path, **extra: str) -> dict[str, str]:
    return cli_env(home, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", **extra)


def cli_run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


class RunProcess:
    """`cloudtune run ...` in the background, its output in files (no pipe can fill up and block it)."""

    def __init__(self, env: dict[str, str], tmp: Path, *args: str, tag: str = "run") -> None:
        self.out_path, self.err_path = tmp / f"{tag}.out", tmp / f"{tag}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cloudtune", "run", *args], stdout=out, stderr=err,
                                         env=env, cwd=ROOT)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"`cloudtune run` did not end in {timeout:.0f}s; stderr:\n"
                                 f"{self.err_path.read_text()[-3000:]}") from None
        return code, self.out_path.read_text(), self.err_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def s3_json(s3, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None
    except json.JSONDecodeError:  # caught mid-write: no news
        return None


def s3_keys(s3, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def wait_committed_checkpoint(s3, bucket: str, job: str, attempt: int, min_step: int, timeout: float) -> int:
    """Block until attempt `attempt` has committed a checkpoint >= min_step and heartbeats past it."""

    def ready() -> int | None:
        latest = s3_json(s3, bucket, f"jobs/{job}/LATEST.json")
        hb = s3_json(s3, bucket, f"jobs/{job}/heartbeat.json")
        if not latest or not hb or int(hb.get("attempt", -1)) != attempt:
            return None
        step = int(latest["step"])
        if step >= min_step and int(hb.get("step") or 0) >= step:
            return step
        return None

    return wait_for(ready, timeout, f"attempt {attempt} to commit a checkpoint >= {min_step}", every=0.1)


def wait_job_id(home: Path, timeout: float = 60) -> str:
    from tests._run_util import jobs_rows

    rows = wait_for(lambda: jobs_rows(home), timeout, "the job row")
    return rows[0]["id"]
