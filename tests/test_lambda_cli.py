"""`cloudtune run --provider lambda --dry-run` through the real CLI process, against the Lambda fake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fakes.lambda_fake import LambdaFake

REPO = Path(__file__).resolve().parents[1]
KEY = "lambda-cli-secret-key-77"


def job_file(tmp_path: Path, store: str) -> Path:
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["resources"] = {}
    spec["store"] = {"url": store}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
            "HF_TOKEN": "hf_lambdadrysecret", **env}
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True,
                          env=full, timeout=120, cwd=tmp_path)


def test_dry_run_prints_the_launch_request_redacted_and_sends_nothing(tmp_path):
    job = job_file(tmp_path, "s3://my-bucket/cloudtune")
    with LambdaFake(api_key=KEY) as fake:
        url = fake.url
        env = {"LAMBDA_API_KEY": KEY, "CLOUDTUNE_LAMBDA_API_URL": url + "/api/v1",
               "CLOUDTUNE_LAMBDA_SSH_KEY": "my-key"}
        proc = cli(tmp_path, "run", str(job), "--provider", "lambda", "--dry-run", "--json", **env)
        assert proc.returncode == 0, proc.stderr
        assert not fake.log  # a dry run talks to nobody
    for secret in (KEY, "hf_lambdadrysecret"):
        assert secret not in proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    choice = out["plan"][0]["offer"]
    assert choice["provider"] == "lambda"
    post = out["launch"][-1]
    assert post["url"] == url + "/api/v1/instance-operations/launch"
    body = post["body"]
    assert body["instance_type_name"] == choice["offer_id"] and body["region_name"] == choice["region"]
    assert body["ssh_key_names"] == ["my-key"] and body["name"] == "cloudtune-<job-id>-1"
    assert "HF_TOKEN=***" in body["user_data"] and "CLOUDTUNE_STORE=s3://my-bucket/cloudtune" in body["user_data"]


def test_dry_run_with_a_local_store_is_one_clear_error(tmp_path):
    job = job_file(tmp_path, f"file://{tmp_path}/store")
    proc = cli(tmp_path, "run", str(job), "--provider", "lambda", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: lambda: the store file://") and "s3://" in last
