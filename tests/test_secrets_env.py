"""Spec `env:` / `secrets:`: only the named variables (plus HF_TOKEN and the store's credentials) reach a
machine; a third-party machine gets STS credentials scoped to the job's prefix, not the user's own keys.

STS and S3 are moto_server over real HTTP; the launch request is the orchestrator's own build_request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from cloudtune.providers.base import Offer

from cloudtune.errors import SpecError
from cloudtune.preflight import check_forwarded
from cloudtune.run.forward_env import job_policy
from cloudtune.run.orchestrator import Draft, Option, build_request, create_job
from cloudtune.run.state import StateDB
from cloudtune.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "data" / "reverse.jsonl"
USER_SECRET = "user-long-lived-secret-key-0123456789"


def _offer(provider: str) -> Offer:
    return Offer(provider=provider, offer_id="o1", gpu="A10", gpu_count=1, vram_gib_per_gpu=22.0,
                 region="us-east-1", price_hr=0.75, as_of="2026-11-01")


@pytest.fixture
def env(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUSERLONGLIVED01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", USER_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("MY_FLAG", "flag-value")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value")
    monkeypatch.setenv("UNNAMED_SECRET", "must-not-travel")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    name = f"ct-env-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1").create_bucket(Bucket=name)
    return aws_env, name


def _request(endpoint: str, bucket: str, provider: str, **over):
    raw = {"name": "envjob", "model": "tiny:reverse", "data": {"train": str(TRAIN)}, "training": {"max_steps": 2},
           "store": {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint},
           "env": ["MY_FLAG"], "secrets": ["WANDB_API_KEY"], **over}
    option = Option(_offer(provider), False, 0.75, 0.1, 0.075)
    db = StateDB()
    job_id = create_job(db, Draft(spec=parse_spec(raw), provider=provider, options=[option]))
    job = db.get_job(job_id)
    return job, build_request(job, job.spec, option, 1)


def test_third_party_machines_get_scoped_sts_credentials_and_only_named_variables(env, provider="runpod"):
    endpoint, bucket = env
    job, req = _request(endpoint, bucket, provider)
    everything = {**req.env, **req.secret_env}
    assert req.env["MY_FLAG"] == "flag-value" and "MY_FLAG" not in req.secret_env
    assert req.secret_env["WANDB_API_KEY"] == "wandb-secret-value" and "WANDB_API_KEY" not in req.env
    assert req.secret_env["HF_TOKEN"] == "hf_secret_token"
    assert "UNNAMED_SECRET" not in everything and "must-not-travel" not in json.dumps(everything)
    assert USER_SECRET not in json.dumps(everything)  # never the user's own long-lived keys
    assert req.secret_env["AWS_ACCESS_KEY_ID"] != "AKIAUSERLONGLIVED01" and req.secret_env["AWS_SESSION_TOKEN"]
    # the minted credentials work against the store (moto does not enforce the session policy itself)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=req.secret_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=req.secret_env["AWS_SECRET_ACCESS_KEY"],
                      aws_session_token=req.secret_env["AWS_SESSION_TOKEN"])
    assert s3.get_object(Bucket=bucket, Key=f"jobs/{job.id}/spec.json")["Body"].read()


def test_naming_the_keys_in_secrets_sends_them_and_local_or_aws_machines_get_them(env):
    endpoint, bucket = env
    _, req = _request(endpoint, bucket, "lambda", secrets=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    assert req.secret_env["AWS_SECRET_ACCESS_KEY"] == USER_SECRET and "AWS_SESSION_TOKEN" not in req.secret_env
    _, req = _request(endpoint, bucket, "local")
    assert req.secret_env["AWS_SECRET_ACCESS_KEY"] == USER_SECRET  # this machine: same shell, same keys


def test_the_session_policy_is_scoped_to_the_job_prefix():
    pol = job_policy("s3://bkt/team/jobs", "abc123", ["s3://data-bkt/sets/train.jsonl"])
    rw, lst, read = pol["Statement"]
    assert rw["Resource"] == "arn:aws:s3:::bkt/team/jobs/abc123/*" and "s3:PutObject" in rw["Action"]
    assert lst["Condition"]["StringLike"]["s3:prefix"] == ["team/jobs/abc123/*", "team/jobs/abc123"]
    assert read == {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data-bkt/sets/train.jsonl*"}
    assert job_policy("s3://bkt", "j")["Statement"][0]["Resource"] == "arn:aws:s3:::bkt/j/*"


def test_bad_names_and_unset_names_are_one_line_each(monkeypatch):
    with pytest.raises(SpecError, match="'WANDB-KEY' is not an environment variable name"):
        parse_spec({"model": "tiny:reverse", "data": {"train": "x.jsonl"}, "secrets": ["WANDB-KEY"]})
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    spec = parse_spec({"model": "tiny:reverse", "data": {"train": "x.jsonl"}, "env": ["NOT_SET_HERE"]})
    (problem,) = check_forwarded(spec, ["local"], "file:///tmp/x")
    assert problem.startswith("env: NOT_SET_HERE is named in the spec but not set")


def test_dry_run_shows_plain_env_and_hides_secrets(tmp_path):
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec.update(resources={}, store={"url": "s3://some-bucket/jobs"}, env=["MY_FLAG"], secrets=["WANDB_API_KEY"])
    spec["data"]["train"] = str(TRAIN)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "MY_FLAG": "flag-value",
           "WANDB_API_KEY": "wandb-secret-value", "AWS_ACCESS_KEY_ID": "AKIADRY", "AWS_SECRET_ACCESS_KEY": USER_SECRET}
    proc = subprocess.run([sys.executable, "-m", "cloudtune", "run", str(tmp_path / "job.yaml"), "-p", "runpod",
                           "--dry-run", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "flag-value" in proc.stdout and "WANDB_API_KEY" in proc.stdout
    assert "wandb-secret-value" not in out and USER_SECRET not in out


def test_vast_gets_scoped_sts_credentials_too(env):
    """Vast's 256 characters per variable no longer force the user's own keys onto a marketplace host:
    the adapter splits the session token in parts (tests/test_contract_vast.py joins them)."""
    endpoint, bucket = env
    spec = parse_spec({"model": "tiny:reverse", "data": {"train": str(TRAIN)},
                       "store": {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint}})
    assert check_forwarded(spec, ["vast"], spec.store.url) == []
    _, req = _request(endpoint, bucket, "vast")
    assert USER_SECRET not in json.dumps(req.secret_env) and req.secret_env["AWS_SESSION_TOKEN"]
    assert req.secret_env["AWS_ACCESS_KEY_ID"] != "AKIAUSERLONGLIVED01"
