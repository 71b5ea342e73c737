"""`cloudtune run --provider modal --dry-run` and `cloudtune plan` with Modal, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_lambda_cli import job_file

SECRETS = ("hf_modaldrysecret", "modal-aws-secret-key")


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
           "HF_TOKEN": SECRETS[0], "AWS_ACCESS_KEY_ID": "AKIAMODALDRY", "AWS_SECRET_ACCESS_KEY": SECRETS[1]}
    env.pop("MODAL_TOKEN_ID", None)
    env.pop("MODAL_TOKEN_SECRET", None)
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)


def test_dry_run_shows_the_sandbox_definition_without_credentials_or_secrets(tmp_path):
    job = job_file(tmp_path, "s3://my-bucket/cloudtune")
    proc = cli(tmp_path, "run", str(job), "--provider", "modal", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    choice = out["plan"][0]["offer"]
    (sandbox,) = out["launch"]
    assert sandbox["call"] == "modal.Sandbox.create" and sandbox["name"] == "cloudtune-<job-id>-1"
    assert sandbox["gpu"].split(":")[0] in ("T4", "L4", "A10", "L40S", "A100-40GB", "A100-80GB", "H100", "H200", "B200")
    assert choice["offer_id"].startswith("modal-")
    assert 0 < sandbox["timeout"] <= 86400
    # the default image is a public PyTorch one: the sandbox bootstraps the staged wheel, then launches
    assert sandbox["args"][0] == "timeout" and sandbox["args"][-3:-1] == ["sh", "-c"]
    assert "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL" in sandbox["args"][-1]  # the stub: fetch the staged boot script, run it
    assert "AWS_SECRET_ACCESS_KEY" in sandbox["secrets"][0] and "***" in sandbox["secrets"][0]
    assert "AWS_SECRET_ACCESS_KEY" not in sandbox["env"]


def test_dry_run_with_a_local_store_is_one_clear_error(tmp_path):
    job = job_file(tmp_path, f"file://{tmp_path}/store")
    proc = cli(tmp_path, "run", str(job), "--provider", "modal", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: modal: the store file://")


def test_plan_ranks_modal_per_second_with_vm_clouds_in_one_list(tmp_path):
    proc = cli(tmp_path, "plan", "-m", "8b", "--method", "lora", "-p", "lambda", "-p", "modal", "-p", "aws",
               "--on-demand", "--json", "--top", "2000")
    assert proc.returncode == 0, proc.stderr
    opts = json.loads(proc.stdout)["options"]
    providers = [o["provider"] for o in opts]
    assert {"modal", "lambda", "aws"} <= set(providers)
    from tests._ranking_util import assert_ranked

    assert_ranked(opts)  # one ranking by whole-job cost across serverless and VMs (planner/plan.py rank_hygiene)

    def pick(provider: str, gpu: str) -> dict:
        return next(o for o in opts if o["provider"] == provider and o["gpu"] == gpu and o["gpu_count"] == 1)

    modal, lam = pick("modal", "A100-40GB"), pick("lambda", "A100-40GB")
    # same GPU, same training time: Modal's hours carry no idle tail and a shorter start, and
    # per-second billing charges exactly those hours; Lambda rounds up to the minute
    assert modal["est_hours"] < lam["est_hours"]
    assert modal["est_cost_usd"] == __import__("pytest").approx(modal["price_hr"] * modal["est_hours"], abs=0.01)
    assert lam["est_cost_usd"] >= lam["price_hr"] * lam["est_hours"] - 0.01
