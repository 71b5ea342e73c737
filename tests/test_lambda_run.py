"""The full `cloudtune run --provider lambda` through the Lambda fake: the real CLI, orchestrator,
watchdog and trainer; the fake "boots" the VM by running the launch's user_data script, whose
`docker run` starts the trainer as a local process; the store is S3 on a local moto_server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from tests.fakes.lambda_fake import LambdaFake

REPO = Path(__file__).resolve().parents[1]
KEY = "lambda-run-key-5150"


@pytest.mark.slow
def test_cloudtune_run_on_lambda_through_the_fake(tmp_path, aws_env):
    endpoint = aws_env
    bucket = "ct-lambda-full-run"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["resources"] = {}
    spec["store"] = {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    bindir = str(Path(sys.executable).parent)  # `python` inside the "container" is this venv's
    with LambdaFake(api_key=KEY, run_user_data=True, extra_path=bindir) as fake:
        env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "LAMBDA_API_KEY": KEY,
               "CLOUDTUNE_LAMBDA_API_URL": fake.url + "/api/v1", "CLOUDTUNE_LAMBDA_SSH_KEY": "my-key",
               "HF_TOKEN": "hf_fullrunsecret", "PATH": bindir + os.pathsep + os.environ["PATH"]}
        refresh = subprocess.run([sys.executable, "-m", "cloudtune", "catalog", "refresh", "--provider", "lambda"],
                                 capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert refresh.returncode == 0, refresh.stderr
        proc = subprocess.run(
            [sys.executable, "-m", "cloudtune", "run", str(tmp_path / "job.yaml"), "--provider", "lambda",
             "--yes", "--json"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for secret in (KEY, "hf_fullrunsecret", "testing"):
            assert secret not in proc.stdout + proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["state"] == "done"
        job = result["job_id"]
        (inst,) = fake.instances.values()  # live offers only: the first launch had capacity
        assert inst.name == f"cloudtune-{job}-1" and inst.region in ("us-east-1", "us-west-1")
        assert fake.wait_boot_exit(inst.id, timeout_s=60) == 0
        assert "trainer exited with 0" in fake.bootstrap_log(inst.id)
        assert inst.status in ("terminating", "terminated")
        assert fake.calls("POST", "/instance-operations/terminate")
        assert "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL" in fake.docker_log.read_text()  # the stub; boot.sh runs the launcher
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"jobs/{job}/").get("Contents", [])]
    assert f"jobs/{job}/DONE.json" in keys
    assert f"jobs/{job}/inputs/train/reverse.jsonl" in keys  # the local data file, staged for the VM
    assert any(k.startswith(f"jobs/{job}/final/") and k.endswith(".safetensors") for k in keys)
