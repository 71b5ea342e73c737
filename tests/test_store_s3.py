"""S3Store over real HTTP against moto_server, and the checkpoint protocol on both store kinds."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from cloudtune.errors import UserError
from cloudtune.store import StoreNotFound, open_store
from cloudtune.store.s3 import S3Store
from cloudtune.trainer.checkpoint import CheckpointStore


def _bucket(aws_env: str, prefix: str = "jobs", **kw) -> S3Store:
    name = f"ct-{uuid.uuid4().hex[:12]}"
    store = S3Store(f"s3://{name}/{prefix}", endpoint_url=aws_env, region="us-east-1", **kw)
    store.create_bucket()
    return store


def test_roundtrip_under_a_prefix(aws_env, tmp_path: Path):
    store = _bucket(aws_env)
    opened = open_store(store.url, endpoint_url=aws_env)
    assert isinstance(opened.inner, S3Store)  # behind the retrying wrapper (cloudtune/store/retry.py)
    store.put_json("job/a.json", {"x": 1})
    store.put_bytes("job/sub/b.bin", b"abc")
    assert store.get_json("job/a.json") == {"x": 1}
    assert store.list("job/") == ["job/a.json", "job/sub/b.bin"]
    assert store.exists("job/a.json") and not store.exists("job/zzz")
    assert store.read_json("job/missing.json") is None
    with pytest.raises(StoreNotFound):
        store.get_bytes("job/missing.json")
    with pytest.raises(StoreNotFound):
        store.download_file("job/missing.bin", tmp_path / "x")
    raw = store.client.list_objects_v2(Bucket=store.bucket)["Contents"]
    assert sorted(o["Key"] for o in raw) == ["jobs/job/a.json", "jobs/job/sub/b.bin"]  # prefix honoured
    store.delete_prefix("job/sub/")
    store.delete("job/never-existed")
    assert store.list("job/") == ["job/a.json"]
    with pytest.raises(ValueError):
        store.put_bytes("../evil", b"x")


def test_large_file_uses_parallel_multipart(aws_env, tmp_path: Path):
    mib = 1024 * 1024
    store = _bucket(aws_env, multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * mib // 256))  # 12 MiB -> 3 parts
    store.upload_file(big, "job/big.bin")
    head = store.client.head_object(Bucket=store.bucket, Key="jobs/job/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: md5-of-md5s + "-<parts>"
    store.download_file("job/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_clear_errors_without_secrets(aws_env, monkeypatch):
    missing = S3Store("s3://ct-no-such-bucket-xyz/p", endpoint_url=aws_env, region="us-east-1")
    with pytest.raises(UserError, match="bucket 'ct-no-such-bucket-xyz' does not exist"):
        missing.put_bytes("k", b"x")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    nocreds = S3Store("s3://ct-any/p", endpoint_url=aws_env, region="us-east-1")
    with pytest.raises(UserError, match="no AWS credentials found for s3://ct-any/p/k") as err:
        nocreds.put_bytes("k", b"x")
    assert "testing" not in str(err.value)
    with pytest.raises(UserError, match="not an S3 URL"):
        S3Store("s3:///nobucket")


def _fake_checkpoint(root: Path, step: int, size: int = 1000) -> Path:
    d = root / f"checkpoint-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(bytes([step % 256]) * size)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "sub" / "extra.bin").write_bytes(b"x" * step)
    return d


@pytest.fixture(params=["file", "s3"])
def any_store(request, tmp_path: Path):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    return _bucket(request.getfixturevalue("aws_env"))


def test_commit_manifest_last_keep_k_and_restore(any_store, tmp_path: Path):
    ckpts = CheckpointStore(any_store, "job", keep=2)
    for step in (10, 20, 30):
        manifest = ckpts.commit(_fake_checkpoint(tmp_path / "local", step), step, {"attempt": 1})
        assert manifest["step"] == step and len(manifest["files"]) == 3
        assert any_store.get_json("job/LATEST.json")["step"] == step
    assert ckpts.committed_steps() == [20, 30]  # keep 2
    assert any_store.list("job/checkpoints/00000010/") == []
    m = ckpts.manifest(30)
    entry = {e["path"]: e for e in m["files"]}["adapter_model.safetensors"]
    assert entry["size"] == 1000 and len(entry["sha256"]) == 64
    step, path = ckpts.restore(tmp_path / "restore")
    assert step == 30 and json.loads((path / "trainer_state.json").read_text())["global_step"] == 30
    assert (path / "sub" / "extra.bin").read_bytes() == b"x" * 30


def test_half_checkpoint_ignored_and_corruption_falls_back(any_store, tmp_path: Path):
    ckpts = CheckpointStore(any_store, "job", keep=3)
    for step in (10, 20):
        ckpts.commit(_fake_checkpoint(tmp_path / "local", step), step)
    # what a SIGKILL mid-upload leaves: files, no manifest
    any_store.put_bytes("job/checkpoints/00000030/adapter_model.safetensors", b"partial")
    assert ckpts.committed_steps() == [10, 20]
    # the newest committed one gets damaged: same size, different bytes
    any_store.put_bytes("job/checkpoints/00000020/adapter_model.safetensors", bytes([99]) * 1000)
    step, _ = ckpts.restore(tmp_path / "restore")
    assert step == 10
    # truncated file: size mismatch is caught too
    any_store.put_bytes("job/checkpoints/00000010/trainer_state.json", b"{}")
    assert ckpts.restore(tmp_path / "restore2") is None
    # the next commit (resumed from scratch at step 5) drops the abandoned, broken and partial folders
    ckpts.commit(_fake_checkpoint(tmp_path / "local", 5), 5)
    assert ckpts.committed_steps() == [5]
    assert any_store.list("job/checkpoints/00000030/") == []
