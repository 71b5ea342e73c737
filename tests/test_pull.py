"""`cloudtune pull JOB [DIR]`: a job's final/ (a real PEFT adapter of a tiny random Llama, laid out as the
trainer writes it) from an S3 store on moto_server, into a folder that the printed snippet loads."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from tests._kernel_fs import mounts  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, moto_server):
    """A job row and store written by the real create_job, and final/ holding a real adapter + merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloudtune.run.orchestrator import create_job, plan_job
    from cloudtune.run.state import StateDB
    from cloudtune.spec import parse_spec
    from cloudtune.store import layout, open_store

    tmp_path = tmp_path_factory.mktemp("pull")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLOUDTUNE_HOME": str(tmp_path / "home"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # module scope: the autouse per-test home does not exist yet
    aws_env = moto_server
    bucket = f"ct-pull-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    raw = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    raw["data"]["train"] = str(REPO / "examples" / "data" / "reverse.jsonl")
    raw["store"] = {"url": f"s3://{bucket}/jobs", "endpoint_url": aws_env}
    spec = parse_spec(raw)
    job_id = create_job(StateDB(), plan_job(spec, ["local"]))

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    base.save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    final = tmp_path / "final"
    peft_model.save_pretrained(final)
    peft_model.merge_and_unload().save_pretrained(final / "merged")
    (final / "summary.json").write_text('{"final_loss": 1.0}')
    store = open_store(spec.store.url, endpoint_url=aws_env)
    for f in sorted(final.rglob("*")):
        if f.is_file():
            store.upload_file(f, layout.final_prefix(job_id) + f.relative_to(final).as_posix())
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return tmp_path, env, job_id


def test_pull_fetches_final_and_the_printed_snippet_loads_it(finished):
    tmp, env, job_id = finished
    dest = tmp / "result"
    proc = cli(env, "pull", job_id, str(dest))
    assert proc.returncode == 0, proc.stderr
    assert (dest / "adapter_config.json").is_file() and (dest / "adapter_model.safetensors").is_file()
    assert (dest / "summary.json").is_file() and (dest / "merged" / "config.json").is_file()
    assert not (tmp / "result.partial").exists()
    assert "AutoPeftModelForCausalLM.from_pretrained" in proc.stdout and str(dest / "merged") in proc.stdout
    assert "pulled" in proc.stderr

    snippet = "\n".join(ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("  ") and "#" not in ln)
    scope: dict = {}
    exec(snippet, scope)  # the printed snippet, as a user would paste it
    assert scope["model"].peft_config["default"].r == 4

    lean = tmp / "lean"
    proc = cli(env, "pull", job_id, str(lean), "--no-merged")
    assert proc.returncode == 0 and not (lean / "merged").exists() and (lean / "adapter_config.json").is_file()


def test_pull_refuses_a_non_empty_folder_and_an_unknown_job(finished):
    tmp, env, job_id = finished
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = cli(env, "pull", job_id, str(busy))
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    proc = cli(env, "pull", "no-such-job", str(tmp / "nope"))
    assert proc.returncode == 2 and "no job with id" in proc.stderr
    assert not (tmp / "nope").exists()


def test_pull_onto_a_full_disk_is_one_line_and_leaves_nothing(finished, tmp_path, mounts):  # noqa: F811 - the fixture imported above
    """A destination disk that fills up mid-download (a real tmpfs): one line naming the disk, exit 2, no
    DIR and no DIR.partial left behind (before: the store's retry wrapper's "store ...: could not ..." line,
    which blames the store)."""
    from tests._kernel_fs import fill

    if mounts is None:
        return
    tmp, env, job_id = finished
    disk = mounts.tmpfs(tmp_path / "disk", "64k")
    fill(disk)
    proc = cli(env, "pull", job_id, str(disk / "result"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"error: {disk}: the disk is full (0.0 MiB free"), lines
    assert "free some space or pass a DIR on another disk" in lines[-1], lines
    assert sorted(p.name for p in disk.iterdir()) == ["ballast"]


def test_pull_reads_a_read_only_home(finished, tmp_path, mounts):  # noqa: F811 - the fixture imported above
    """`pull` only reads the state db: it opens it read-only, so a read-only $CLOUDTUNE_HOME still pulls."""
    import shutil
    import sqlite3

    if mounts is None:
        return
    tmp, env, job_id = finished
    src = Path(env["CLOUDTUNE_HOME"]) / "state.db"
    conn = sqlite3.connect(src)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, as a closed db is
    conn.close()
    home = mounts.tmpfs(tmp_path / "home", "4m")
    shutil.copyfile(src, home / "state.db")
    mounts.read_only(home)
    proc = cli({**env, "CLOUDTUNE_HOME": str(home)}, "pull", job_id, str(tmp_path / "got"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "got" / "adapter_config.json").is_file()
