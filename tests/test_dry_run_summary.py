"""`cloudtune run --dry-run`: a human summary by default (plan table, launch summary, env/secrets by
name only), the full document with --json; neither writes a job nor prints a secret value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET = "rp-sk-not-a-real-key-4242"


def _dry(tmp_path, *extra):
    job = tmp_path / "job.yaml"
    job.write_text(f"""name: dry
model: 8b
method: qlora
data: {{train: {ROOT / 'examples/data/reverse.jsonl'}}}
store: {{url: s3://dry-bucket/jobs}}
resources: {{provider: runpod}}
limits: {{max_cost_usd: 5}}
""")
    env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "RUNPOD_API_KEY": SECRET,
           "AWS_SECRET_ACCESS_KEY": SECRET + "-aws", "AWS_ACCESS_KEY_ID": "AKIADRYRUN", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cloudtune", "run", str(job), "--dry-run", *extra],
                          capture_output=True, text=True, env=env, timeout=120)


def test_human_summary_shows_plan_launch_headroom_cost_and_names_only(tmp_path):
    p = _dry(tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "Options (" in out and "choice:" in out  # plan_cmd's table
    launch = out[out.index("launch: runpod"):]
    assert "machine: 1x " in launch and "on-demand" in launch
    assert "estimate: ~" in launch and "(cap: max_cost_usd $5)" in launch
    assert "memory headroom: " in launch and "GiB per GPU of" in launch
    assert "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime + bootstrap" in launch
    assert "store: s3://dry-bucket/jobs" in launch and "uploads: 1 local input file(s)" in launch
    assert "secrets (values never shown): " in launch and "AWS_SECRET_ACCESS_KEY" in launch
    assert "CLOUDTUNE_BOOTSTRAP_WHEEL_URL" in launch
    assert SECRET not in out + p.stderr and "{" not in launch  # names, not a JSON document
    assert not (tmp_path / "home" / "state.db").exists() or "dry" not in (tmp_path / "home" / "state.db").read_bytes().decode(errors="ignore")


def test_json_keeps_the_full_document_with_the_bootstrap_command(tmp_path):
    p = _dry(tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["plan"][0]["headroom_gib"] > 0
    assert SECRET not in p.stdout and "AKIADRYRUN" not in p.stdout
    text = json.dumps(doc["launch"])
    assert "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL" in text and "pytorch/pytorch" in text  # the stub fetches the boot script
