"""The wheelhouse (cloudtune/run/wheelhouse.py, wheelhouse_boot.py): content-addressed, manifest last,
write-once, and a damaged one is refused by the machine before pip sees it.

The machine-side program runs as the boot script runs it (a separate python, stdlib only, file://
URLs as a local store hands out); the end-to-end boots against moto S3 are in tests/test_bootstrap.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from cloudtune.run import wheelhouse as WH
from cloudtune.store import open_store

BOOT = Path(WH.__file__).with_name("wheelhouse_boot.py")
TORCH = "2.6.0+cu124"


def make_wheel(path: Path, name: str = "ctprobe", version: str = "1.0") -> Path:
    """A valid pure-Python wheel (PEP 427), written by hand so the tests need no build backend."""
    whl = path / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: cloudtune-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{info}/RECORD", record)
    return whl


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def expect(data: bytes) -> str:
    tag = sys.implementation.cache_tag
    return f"{hashlib.sha256(data).hexdigest()} {tag} {sysconfig.get_platform()} {TORCH}"


def run_fetch(tmp_path: Path, tar: bytes, expected: str) -> subprocess.CompletedProcess:
    src = tmp_path / "store" / "wheels.tar"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(tar)
    env = {"PATH": os.environ["PATH"], "CLOUDTUNE_TORCH": TORCH, "CLOUDTUNE_BOOT_TRIES": "1",
           WH.ENV_GET: src.as_uri(), WH.ENV_EXPECT: expected}
    return subprocess.run([sys.executable, "-I", str(BOOT), "fetch", str(tmp_path / "wh")], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def good_wheel(tmp_path) -> bytes:
    return make_wheel(tmp_path).read_bytes()


def test_a_good_wheelhouse_unpacks_its_wheels(tmp_path, good_wheel):
    tar = tar_of({"ctprobe-1.0-py3-none-any.whl": good_wheel})
    proc = run_fetch(tmp_path, tar, expect(tar))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "wh" / "ctprobe-1.0-py3-none-any.whl").read_bytes() == good_wheel


def test_a_replaced_tar_is_refused_by_its_digest(tmp_path, good_wheel):
    tar = tar_of({"ctprobe-1.0-py3-none-any.whl": good_wheel})
    damaged = tar_of({"ctprobe-1.0-py3-none-any.whl": good_wheel[: len(good_wheel) // 2]})
    proc = run_fetch(tmp_path, damaged, expect(tar))  # the manifest describes the good one
    assert proc.returncode == 1 and "does not match its manifest" in proc.stderr
    assert not (tmp_path / "wh" / "ctprobe-1.0-py3-none-any.whl").exists()


def test_a_truncated_wheel_is_refused_even_with_a_consistent_digest(tmp_path, good_wheel):
    tar = tar_of({"ctprobe-1.0-py3-none-any.whl": good_wheel[:-40]})  # the central directory is cut off
    proc = run_fetch(tmp_path, tar, expect(tar))
    assert proc.returncode == 1 and "unusable" in proc.stderr, proc.stderr
    assert not (tmp_path / "wh").exists()  # nothing half-unpacked is left for pip


@pytest.mark.parametrize("name", ["../evil.whl", "/tmp/evil.whl", "sub/x.whl", "setup.py"])
def test_a_crafted_member_never_lands_outside(tmp_path, good_wheel, name):
    tar = tar_of({name: good_wheel})
    proc = run_fetch(tmp_path, tar, expect(tar))
    assert proc.returncode == 1 and "unexpected member" in proc.stderr
    assert not (tmp_path / "evil.whl").exists() and not Path("/tmp/evil.whl").exists()


def test_a_wheelhouse_built_for_another_python_or_torch_is_not_used(tmp_path, good_wheel):
    tar = tar_of({"ctprobe-1.0-py3-none-any.whl": good_wheel})
    other = expect(tar).replace(TORCH, "2.5.1+cu121")
    proc = run_fetch(tmp_path, tar, other)
    assert proc.returncode == 1 and "built for" in proc.stderr and "2.5.1+cu121" in proc.stderr


def test_the_key_is_a_content_address():
    base = WH.cache_key(["a==1", "b==2"], ("train", "s3"), "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime", "amd64")
    assert base == WH.cache_key(["b==2", "a==1"], ("s3", "train"), "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime",
                                "amd64")
    assert base != WH.cache_key(["a==1", "b==3"], ("train", "s3"), "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime",
                                "amd64")
    assert base != WH.cache_key(["a==1", "b==2"], ("train", "s3"), "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime",
                                "arm64")
    assert base != WH.cache_key(["a==1", "b==2"], ("train", "s3"), "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
                                "amd64")


def _manifest(k: str, **over) -> bytes:
    doc = {"format": 1, "key": k, "tar": "wheels-j1-1.tar", "tar_sha256": "a" * 64, "python": "cpython-311",
           "platform": "linux-x86_64", "torch": TORCH, "files": []}
    doc.update(over)
    return json.dumps(doc).encode()


def test_publish_urls_only_while_no_valid_manifest_exists(tmp_path, monkeypatch):
    """Write-once: once a wheelhouse exists no machine gets a URL that could replace it."""
    monkeypatch.delenv(WH.ENV_SWITCH, raising=False)
    store = open_store(f"file://{tmp_path}/store")
    key = WH.cache_key(["ctprobe==1.0"], (), "img", "amd64")
    env, secret = WH.attempt_env(store, key, "j1", 1, 600)
    assert set(secret) == {WH.ENV_PUT_TAR, WH.ENV_PUT_MANIFEST} and env[WH.ENV_NAME] == "wheels-j1-1.tar"
    assert secret[WH.ENV_PUT_MANIFEST].endswith(WH.manifest_key(key))

    for bad in (b"not json", b"", _manifest(key, key="other"), _manifest(key, tar="../x.tar"),
                _manifest(key, tar_sha256="zz"), _manifest(key, torch="2.6 with spaces")):
        store.put_bytes(WH.manifest_key(key), bad)
        assert WH.read_manifest(store, key) is None  # damaged: ignored, rebuilt by the next cold boot
        assert WH.ENV_PUT_MANIFEST in WH.attempt_env(store, key, "j1", 2, 600)[1]

    store.put_bytes(WH.manifest_key(key), _manifest(key))
    env, secret = WH.attempt_env(store, key, "j2", 1, 600)
    assert set(secret) == {WH.ENV_GET} and secret[WH.ENV_GET].endswith(f"{key}/wheels-j1-1.tar")
    assert env[WH.ENV_EXPECT] == f"{'a' * 64} cpython-311 linux-x86_64 {TORCH}"

    monkeypatch.setenv(WH.ENV_SWITCH, "off")
    assert WH.attempt_env(store, key, "j2", 1, 600) == ({}, {})


def test_the_planner_charges_the_first_start_cold_and_a_relaunch_warm():
    """A spot relaunch costs the warm bootstrap (store wheelhouse), the first start the cold one."""
    from cloudtune.catalog import gpu_specs
    from cloudtune.planner import throughput as tp
    from cloudtune.planner.types import TrainConfig
    from tests.test_throughput import LLAMA8B

    kw = dict(provider="runpod", spot=True, checkpoint_minutes=10)
    gpu = gpu_specs()["A100-80GB"]
    work = tp.Workload(20000, 512)
    boot = tp.estimate_time(LLAMA8B, TrainConfig(), work, gpu, bootstrap=True, **kw)
    own = tp.estimate_time(LLAMA8B, TrainConfig(), work, gpu, bootstrap=False, **kw)
    assert boot.startup_hours * 3600 == pytest.approx(own.startup_hours * 3600 + tp.BOOTSTRAP_COLD_S)
    assert tp.BOOTSTRAP_WARM_S < tp.BOOTSTRAP_COLD_S
    hazard = tp.SPOT_HAZARD_PER_H["runpod"]
    run_h = boot.startup_hours + boot.train_hours
    restart_h = (own.startup_hours * 3600 + tp.BOOTSTRAP_WARM_S) / 3600
    loss = hazard * (10 / 60 / 2 + restart_h)
    assert boot.preemption_hours == pytest.approx(run_h / (1 - loss) - run_h)
    assert tp.assumptions()["bootstrap_warm_s"] == pytest.approx(tp.BOOTSTRAP_WARM_S, abs=0.1)
