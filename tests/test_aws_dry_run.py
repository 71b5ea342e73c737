"""`cloudtune run job.yaml --provider aws --dry-run`: the real CLI prints the EC2 calls, secrets redacted."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, store: str) -> Path:
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["resources"] = {"spot": True, "region": "us-east-1"}
    spec["store"] = {"url": store}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(tmp_path: Path, job: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "HF_TOKEN": "hf_dryrunsecret",
            "AWS_ACCESS_KEY_ID": "AKIADRYRUNKEY", "AWS_SECRET_ACCESS_KEY": "dryrunsecretkey", **env}
    return subprocess.run([sys.executable, "-m", "cloudtune", "run", str(job), "--provider", "aws", "--dry-run", "--json"],
                          capture_output=True, text=True, env=full, timeout=120, cwd=tmp_path)


def test_dry_run_prints_run_instances_with_secrets_redacted(tmp_path):
    job = _job(tmp_path, "s3://my-bucket/cloudtune")
    proc = _run(tmp_path, job, CLOUDTUNE_AWS_INSTANCE_PROFILE="cloudtune-trainer")
    assert proc.returncode == 0, proc.stderr
    for secret in ("hf_dryrunsecret", "AKIADRYRUNKEY", "dryrunsecretkey"):
        assert secret not in proc.stdout and secret not in proc.stderr
    out = json.loads(proc.stdout)
    assert out["plan"][0]["offer"]["provider"] == "aws"
    ssm, put, run = out["launch"]
    assert ssm["operation"] == "GetParameter" and run["operation"] == "RunInstances"
    # The secrets go to an SSM SecureString, printed with the value redacted.
    assert put["operation"] == "PutParameter" and put["region"] == "us-east-1"
    name = put["params"]["Name"]
    assert name.startswith("/cloudtune/cloudtune-") and name.endswith("/env")
    assert put["params"]["Value"] == "***" and put["params"]["Type"] == "SecureString"
    assert put["params"]["KeyId"] == "alias/aws/ssm"
    params = run["params"]
    assert run["region"] == "us-east-1" and params["InstanceType"] == out["plan"][0]["offer"]["offer_id"]
    assert params["InstanceMarketOptions"]["MarketType"] == "spot"
    assert params["IamInstanceProfile"] == {"Name": "cloudtune-trainer"}
    assert "HF_TOKEN" not in params["UserData"]  # not even the name: only the parameter's
    assert f"aws ssm get-parameter --region us-east-1 --name {shlex.quote(name)} --with-decryption" in params["UserData"]
    assert "AWS_SECRET_ACCESS_KEY" not in params["UserData"]
    assert "AWS_SECRET_ACCESS_KEY" in proc.stderr  # the warning names what was dropped


def test_dry_run_with_a_local_store_is_one_clear_error(tmp_path):
    job = _job(tmp_path, f"file://{tmp_path}/store")
    proc = _run(tmp_path, job, CLOUDTUNE_AWS_INSTANCE_PROFILE="cloudtune-trainer")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: aws: the store file://")
    assert "s3://bucket/prefix" in proc.stderr
