"""Local inputs of a cloud job: staged into the job's S3 store before launch, refused when they cannot be.

S3 is a real moto_server over HTTP; the launch request is the orchestrator's own `build_request`;
the staged objects are read back with the trainer's own readers (data and dpo.base_adapter).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from cloudtune.providers.base import Offer

from cloudtune.errors import UserError
from cloudtune.run.orchestrator import Draft, Option, build_request, create_job
from cloudtune.run.state import StateDB
from cloudtune.spec import parse_spec
from tests.fakes.s3_proxy import S3Proxy

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "data" / "reverse.jsonl"
LAMBDA = Offer(provider="lambda", offer_id="gpu_1x_a10", gpu="A10", gpu_count=1, vram_gib_per_gpu=22.0,
               region="us-east-1", price_hr=0.75, as_of="2026-11-01")


def bucket(endpoint: str) -> str:
    name = f"ct-stage-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def keys(endpoint: str, name: str, prefix: str = "") -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", []))


def inputs(tmp: Path) -> dict[str, Path]:
    """A train file, a validation folder of two files, and a finished adapter folder."""
    val = tmp / "val"
    val.mkdir()
    lines = TRAIN.read_text().splitlines(keepends=True)
    (val / "a.jsonl").write_text("".join(lines[:3]))
    (val / "b.jsonl").write_text("".join(lines[3:5]))
    (val / "README.md").write_text("not data")
    adapter = tmp / "sft-final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(256))
    return {"train": TRAIN, "val": val, "adapter": adapter}


def draft(store: str, endpoint: str | None, **over) -> Draft:
    spec = {"name": "stage", "model": "tiny:reverse", "method": "lora", "data": {"train": str(TRAIN)},
            "store": {"url": store, "endpoint_url": endpoint}, "training": {"max_steps": 5}}
    spec.update(over)
    return Draft(spec=parse_spec(spec), provider="lambda", options=[Option(LAMBDA, False, 0.75, 0.1, 0.075)])


def shipped_spec(req) -> dict:
    raw = req.env["CLOUDTUNE_SPEC"]
    assert raw.startswith("b64:")
    return json.loads(base64.b64decode(raw[4:]))


def test_local_data_and_adapter_are_uploaded_and_the_shipped_spec_points_at_them(tmp_path, aws_env, monkeypatch):
    endpoint, name = aws_env, bucket(aws_env)
    f = inputs(tmp_path)
    d = draft(f"s3://{name}/jobs", endpoint, stage="dpo",
              data={"train": str(f["train"]), "validation": f"file://{f['val']}"},
              dpo={"base_adapter": str(f["adapter"])})
    db = StateDB()
    job_id = create_job(db, d)

    root = f"s3://{name}/jobs/{job_id}/inputs"
    assert keys(endpoint, name, f"jobs/{job_id}/inputs/") == [
        f"jobs/{job_id}/inputs/base_adapter/adapter_config.json",
        f"jobs/{job_id}/inputs/base_adapter/adapter_model.safetensors",
        f"jobs/{job_id}/inputs/train/reverse.jsonl",
        f"jobs/{job_id}/inputs/validation/a.jsonl",
        f"jobs/{job_id}/inputs/validation/b.jsonl",
    ]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    body = s3.get_object(Bucket=name, Key=f"jobs/{job_id}/inputs/train/reverse.jsonl")["Body"].read()
    assert body == TRAIN.read_bytes()

    job = db.get_job(job_id)
    req = build_request(job, job.spec, Option(LAMBDA, False, 0.75, 0.1, 0.075), 1)
    shipped = shipped_spec(req)
    assert shipped["data"]["train"] == f"{root}/train/reverse.jsonl"
    assert shipped["data"]["validation"] == f"{root}/validation/"
    assert shipped["dpo"]["base_adapter"] == f"{root}/base_adapter"
    stored = json.loads(s3.get_object(Bucket=name, Key=f"jobs/{job_id}/spec.json")["Body"].read())
    assert stored["data"] == shipped["data"] and stored["dpo"] == shipped["dpo"]
    assert any(e["kind"] == "staged" for e in db.events(job_id))

    # The machine's side: the trainer's own readers fetch the staged URLs (endpoint from the env, as shipped).
    from cloudtune.trainer.data import read_records
    from cloudtune.trainer.train import fetch_adapter

    monkeypatch.setenv("CLOUDTUNE_STORE_ENDPOINT", req.env["CLOUDTUNE_STORE_ENDPOINT"])
    opts = {"endpoint_url": endpoint, "region": None}
    train, _ = read_records(shipped["data"]["train"], store=opts)
    val, _ = read_records(shipped["data"]["validation"], store=opts)
    assert len(train) == len(TRAIN.read_text().splitlines()) and len(val) == 5
    from cloudtune.store import open_store

    got = Path(fetch_adapter(shipped["dpo"]["base_adapter"], open_store(job.store_url, endpoint_url=endpoint),
                             tmp_path / "work"))
    assert (got / "adapter_model.safetensors").read_bytes() == (f["adapter"] / "adapter_model.safetensors").read_bytes()


def test_a_local_job_ships_its_local_paths_and_uploads_nothing(tmp_path, aws_env):
    endpoint, name = aws_env, bucket(aws_env)
    local = Offer(provider="local", offer_id="local", gpu="CPU", gpu_count=1, vram_gib_per_gpu=8.0,
                  region="local", price_hr=0.0)
    d = Draft(spec=draft(f"s3://{name}", endpoint).spec, provider="local", options=[Option(local, False, 0, None, None)])
    db = StateDB()
    job_id = create_job(db, d)
    assert keys(endpoint, name) == [f"{job_id}/spec.json"]
    req = build_request(db.get_job(job_id), d.spec, d.choice, 1)
    assert shipped_spec(req)["data"]["train"] == str(TRAIN)


def test_a_failed_upload_leaves_nothing_behind(tmp_path, aws_env):
    endpoint, name = aws_env, bucket(aws_env)
    f = inputs(tmp_path)
    with S3Proxy(endpoint) as proxy:
        proxy.deny(r"/inputs/validation/b\.jsonl$")  # train and a.jsonl go up, then a 403
        d = draft(f"s3://{name}/jobs", proxy.url, data={"train": str(f["train"]), "validation": str(f["val"])})
        db = StateDB()
        with pytest.raises(UserError) as err:
            create_job(db, d)
        assert proxy.denied, "the upload never reached the deny rule"
    msg = str(err.value)
    assert "access denied" in msg.lower() and "inputs/validation/b.jsonl" in msg
    assert keys(endpoint, name) == []  # the uploads before the failure were removed again
    assert db.list_jobs() == []


@pytest.mark.parametrize("store", ["file:///tmp/ct-store", ""])
def test_a_cloud_job_with_a_store_on_this_machine_is_refused_before_anything_is_written(tmp_path, store):
    db = StateDB()
    with pytest.raises(UserError) as err:
        create_job(db, draft(store, None))
    msg = str(err.value)
    assert msg.startswith("lambda: the store file://") and "s3://" in msg
    assert db.list_jobs() == [] and not Path("/tmp/ct-store").exists()


def test_a_cloud_job_with_a_local_model_folder_is_refused_before_anything_is_written(tmp_path, aws_env):
    endpoint, name = aws_env, bucket(aws_env)
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    db = StateDB()
    with pytest.raises(UserError) as err:
        create_job(db, draft(f"s3://{name}", endpoint, model=str(model)))
    msg = str(err.value)
    assert str(model) in msg and "hub" in msg and "lambda" in msg
    assert keys(endpoint, name) == [] and db.list_jobs() == []


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True,
                          env=full, timeout=120, cwd=tmp_path)


def test_dry_run_shows_the_staged_urls_and_uploads_nothing(tmp_path, aws_env):
    from tests.fakes.lambda_fake import LambdaFake

    endpoint, name = aws_env, bucket(aws_env)
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["resources"] = {}
    spec["store"] = {"url": f"s3://{name}/jobs", "endpoint_url": endpoint}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    with LambdaFake(api_key="k-stage") as fake:
        proc = _cli(tmp_path, "run", str(tmp_path / "job.yaml"), "--provider", "lambda", "--dry-run", "--json",
                    LAMBDA_API_KEY="k-stage", CLOUDTUNE_LAMBDA_API_URL=fake.url + "/api/v1",
                    CLOUDTUNE_LAMBDA_SSH_KEY="my-key")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    url = f"s3://{name}/jobs/<job-id>/inputs/train/reverse.jsonl"
    assert out["staged"] == [{"local": str(tmp_path / "data" / "reverse.jsonl"), "url": url}]
    assert "CLOUDTUNE_SPEC=b64:" in out["launch"][-1]["body"]["user_data"]
    user_data = out["launch"][-1]["body"]["user_data"]
    b64 = user_data.split("CLOUDTUNE_SPEC=b64:", 1)[1].split()[0].strip("'\"")
    assert json.loads(base64.b64decode(b64))["data"]["train"] == url
    assert keys(endpoint, name) == []  # nothing uploaded


def test_cli_local_model_with_a_cloud_provider_is_one_line(tmp_path, aws_env):
    name = bucket(aws_env)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 1000,
        "max_position_embeddings": 512, "tie_word_embeddings": False}))
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec.update(model="./model", resources={}, store={"url": f"s3://{name}", "endpoint_url": aws_env})
    spec["data"]["train"] = str(TRAIN)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    proc = _cli(tmp_path, "run", str(tmp_path / "job.yaml"), "--provider", "vast", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: model ") and str(tmp_path / "model") in line and "hub" in line
