"""Pre-flight (`cloudtune check`, and `run` before it writes anything): all problems at once, exit 2.

The store checks run against moto_server over real HTTP; a missing extra is simulated the way Python
documents blocking an import (sys.modules[name] = None), not by patching cloudtune.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from cloudtune.preflight import (
    bootable,
    check_arch,
    check_extras,
    check_model_access,
    check_provider_settings,
    check_store,
    preflight,
)
from cloudtune.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "data" / "reverse.jsonl"
CRED_VARS = ("RUNPOD_API_KEY", "VAST_API_KEY", "LAMBDA_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET",
             "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CLOUDTUNE_LAMBDA_SSH_KEY", "AWS_PROFILE")


def _bucket(endpoint: str) -> str:
    name = f"ct-check-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _spec_file(tmp_path: Path, **over) -> Path:
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["data"]["train"] = str(TRAIN)
    spec["resources"] = {}
    spec.update(over)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CRED_VARS}
    base.update(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), CLOUDTUNE_HOME=str(tmp_path / "home"), **env)
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True,
                          env=base, timeout=120, cwd=tmp_path)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in CRED_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path


def test_check_reports_every_problem_at_once_in_one_line_each(tmp_path, aws_env):
    missing = f"ct-missing-{uuid.uuid4().hex[:8]}"
    job = _spec_file(tmp_path, model="meta-llama/Llama-3.1-8B",
                     store={"url": f"s3://{missing}/jobs", "endpoint_url": aws_env})
    proc = _cli(tmp_path, "check", str(job), "-p", "runpod,lambda", AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("  - ")]
    text = "\n".join(lines)
    assert "RUNPOD_API_KEY" in text and "LAMBDA_API_KEY" in text  # both providers' keys
    assert "CLOUDTUNE_LAMBDA_SSH_KEY" in text  # Lambda's SSH key setting
    assert "HF_TOKEN" in text and "meta-llama/Llama-3.1-8B" in text  # gated model
    assert missing in text  # the bucket
    assert len(lines) == 5, text
    assert "testing" not in proc.stderr  # no secret echoed


def test_run_refuses_before_writing_a_job_row_or_uploading(tmp_path, aws_env):
    name = _bucket(aws_env)
    job = _spec_file(tmp_path, store={"url": f"s3://{name}/jobs", "endpoint_url": aws_env})
    proc = _cli(tmp_path, "run", str(job), "-p", "vast", "--yes", AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    assert proc.returncode == 2 and "VAST_API_KEY" in proc.stderr and "Traceback" not in proc.stderr
    listing = boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1").list_objects_v2(Bucket=name)
    assert listing.get("KeyCount", 0) == 0  # no upload, and the writability probe was deleted
    db = tmp_path / "home" / "state.db"
    if db.exists():
        assert sqlite3.connect(db).execute("select count(*) from jobs").fetchone()[0] == 0


def test_unreadable_data_is_one_problem_among_all_not_the_only_one(tmp_path):
    """The training set on S3 without credentials used to end `run` (and `--dry-run`) with that error
    alone, before the provider keys were even looked at: now it is listed with every other problem.
    The dry run still shows the plan and the launch, and exits 2."""
    job = _spec_file(tmp_path, data={"train": "s3://ct-nobody/train.jsonl", "format": "messages"},
                     store={"url": "s3://ct-nobody/jobs"})
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    run = _cli(tmp_path, "run", str(job), "-p", "runpod", "--yes", **env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    problems = [ln for ln in run.stderr.splitlines() if ln.startswith("  - ")]
    assert any("RUNPOD_API_KEY" in p for p in problems) and any(p.startswith("  - data: ") for p in problems)
    assert not (tmp_path / "home" / "state.db").exists() or sqlite3.connect(tmp_path / "home" / "state.db").execute(
        "select count(*) from jobs").fetchone()[0] == 0
    dry = _cli(tmp_path, "run", str(job), "-p", "runpod", "--dry-run", **env)
    assert dry.returncode == 2 and "Traceback" not in dry.stderr, dry.stderr
    assert "launch: runpod" in dry.stdout + dry.stderr and "  - data: " in dry.stderr


def test_check_passes_when_ready_and_dry_run_shows_the_checks(tmp_path):
    job = _spec_file(tmp_path)
    ok = _cli(tmp_path, "check", str(job))
    assert ok.returncode == 0 and ok.stdout.startswith("ready:"), ok.stderr
    dry = _cli(tmp_path, "run", str(job), "--dry-run")
    assert dry.returncode == 0 and "check: ready" in dry.stderr, dry.stderr


def test_check_without_a_spec_lists_each_provider(tmp_path):
    proc = _cli(tmp_path, "check", "-p", "runpod,vast", RUNPOD_API_KEY="rp-secret-value")
    assert proc.returncode == 2
    assert "runpod: ready" in proc.stdout and "vast: not ready" in proc.stdout and "VAST_API_KEY" in proc.stdout
    assert "rp-secret-value" not in proc.stdout + proc.stderr


def test_missing_extras_are_named_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # how Python blocks an import
    monkeypatch.setitem(sys.modules, "modal", None)
    problems = check_extras(["aws", "modal", "runpod"], "s3://b/p")
    assert len(problems) == 2
    assert "provider aws and the s3:// store" in problems[0] and "pip install 'cloudtune[aws]'" in problems[0]
    assert "pip install 'cloudtune[modal]'" in problems[1]
    assert check_extras(["runpod", "vast", "lambda"], "file:///x") == []


def test_store_probe_against_moto(aws_env):
    name = _bucket(aws_env)
    assert check_store(f"s3://{name}/p", aws_env, "us-east-1") == []
    s3 = boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1")
    assert s3.list_objects_v2(Bucket=name).get("KeyCount", 0) == 0  # probe cleaned up
    (problem,) = check_store(f"s3://ct-nope-{uuid.uuid4().hex[:8]}/p", aws_env, "us-east-1")
    assert problem.startswith("store s3://ct-nope-")


def test_file_store_must_be_a_writable_folder(tmp_path):
    assert check_store(f"file://{tmp_path}/new/store") == []
    (tmp_path / "afile").write_text("x")
    (problem,) = check_store(f"file://{tmp_path}/afile/store")
    assert "not a writable folder" in problem
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_gated_models_need_a_token(clean_env, monkeypatch):
    assert check_model_access("meta-llama/Llama-3.1-8B")
    assert check_model_access("google/gemma-2-9b")
    assert check_model_access("Qwen/Qwen2.5-7B") == []
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert check_model_access("mistralai/Mistral-7B-v0.3") == []
    monkeypatch.delenv("HF_TOKEN")
    (clean_env / "hf").mkdir()
    (clean_env / "hf" / "token").write_text("hf_from_login\n")  # what `huggingface-cli login` writes
    assert check_model_access("meta-llama/Llama-3.1-8B") == []


def test_lambda_ssh_key_from_env_or_providers_yaml(clean_env, monkeypatch):
    assert check_provider_settings(["lambda"])
    monkeypatch.setenv("CLOUDTUNE_PROVIDER_CONFIG", '{"lambda": {"ssh_key_name": "laptop"}}')
    assert check_provider_settings(["lambda"]) == []
    assert check_provider_settings(["runpod"]) == []


def test_arm_machines_are_refused_for_the_amd64_image(clean_env):
    from cloudtune.run.orchestrator import plan_job

    spec = parse_spec({"model": "tiny:reverse", "data": {"train": str(TRAIN)},
                       "resources": {"gpu": "GH200", "provider": "lambda"},
                       "store": {"url": "s3://some-bucket/x"}})
    options = plan_job(spec, ["lambda"]).options
    assert options and all(o.offer.gpu == "GH200" for o in options)
    (problem,) = check_arch(spec.resources.image, options)
    assert "arm64" in problem and "lambda/GH200" in problem
    assert check_arch("myrepo/trainer:arm64-multiarch", options) == []
    assert any("arm64" in p for p in preflight(spec, ["lambda"], options, probe_store=False))


def test_arm_fallbacks_are_dropped_not_refused(clean_env):
    from cloudtune.run.orchestrator import plan_job

    spec = parse_spec({"model": "tiny:reverse", "data": {"train": str(TRAIN)}, "resources": {"provider": "lambda"},
                       "store": {"url": "s3://some-bucket/x"}})
    options = plan_job(spec, ["lambda"]).options
    assert any(o.offer.gpu == "GH200" for o in options)  # the catalog does offer ARM machines here
    assert check_arch(spec.resources.image, options) == []
    kept = bootable(spec.resources.image, options)
    assert kept and all(o.offer.gpu != "GH200" for o in kept)


def test_plan_takes_the_spec_as_an_argument_and_agrees_with_run(tmp_path):
    import json

    job = _spec_file(tmp_path, model="8b", method="qlora", store={"url": "s3://some-bucket/jobs"},
                     resources={"provider": ["runpod", "lambda"]})
    plan = _cli(tmp_path, "plan", str(job), "--json", "--top", "3")
    assert plan.returncode == 0, plan.stderr
    dry = _cli(tmp_path, "run", str(job), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    first = json.loads(plan.stdout)["options"][0]
    chosen = json.loads(dry.stdout)["plan"][0]["offer"]
    assert (first["provider"], first["gpu"], first["gpu_count"]) == (chosen["provider"], chosen["gpu"],
                                                                     chosen["gpu_count"])
    same = _cli(tmp_path, "plan", "--spec", str(job), "--json", "--top", "3")
    assert json.loads(same.stdout)["options"][0] == first
    both = _cli(tmp_path, "plan", str(job), "-m", "8b")
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
