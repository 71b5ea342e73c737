"""`cloudtune push` to a local fake of the Hugging Face Hub HTTP API (tests/fakes/hub_fake.py).

The CLI runs as a real process with HF_ENDPOINT pointing at the fake (huggingface_hub reads it at
import), HF_TOKEN from the environment, and HF_HUB_DISABLE_XET=1: the fake speaks the LFS upload
protocol, not Xet's CAS, so the weights take the preupload -> LFS batch -> PUT -> commit path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _export_util import save_random_adapter
from _trainer_util import ROOT

from tests.fakes.hub_fake import HubFake

TOKEN = "hf_S3cr3tT0kenForTheFake"


@pytest.fixture
def hub():
    with HubFake(token=TOKEN, user="alice") as fake:
        yield fake


def _push(home: Path, hub: HubFake, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(CLOUDTUNE_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "cloudtune", "push", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=180)


@pytest.fixture
def job(_isolated_home: Path) -> str:
    """A finished job `j1` in the default store: final/ = a LoRA adapter on tiny:reverse + summary.json
    (the trainer's final/ layout; the adapter's weights are random, which is all a push needs)."""
    from cloudtune.tiny import ensure_tiny_model

    final = _isolated_home / "store" / "j1" / "final"
    save_random_adapter(ensure_tiny_model("tiny:reverse"), final)
    (final / "summary.json").write_text(json.dumps({"model": "tiny:reverse", "job_id": "j1"}))
    return "j1"


def test_push_adapter_then_merged(hub: HubFake, job: str, _isolated_home: Path):
    final = _isolated_home / "store" / job / "final"
    r = _push(_isolated_home, hub, job, "--repo", "alice/tiny-lora", "--private")
    assert r.returncode == 0, r.stderr
    repo = hub.repos["alice/tiny-lora"]
    assert repo.private
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert repo.files == local  # every file, byte for byte
    assert "adapter_model.safetensors" in repo.lfs_paths and "adapter_config.json" not in repo.lfs_paths
    assert hub.calls("PUT", r"^/lfs-upload/") and len(repo.commits) == 1
    assert r.stdout.strip() == f"{hub.url}/alice/tiny-lora/commit/{repo.commits[0]['oid']}"
    assert all(req.bearer == TOKEN for req in hub.calls("POST"))
    assert TOKEN not in r.stdout + r.stderr

    # --merged: merged locally (the job has no final/merged), a plain model, into a second repo
    r = _push(_isolated_home, hub, job, "--repo", "alice/tiny-merged", "--merged")
    assert r.returncode == 0, r.stderr
    files = hub.repos["alice/tiny-merged"].files
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files
    assert json.loads(files["config.json"])["model_type"] == "llama"
    assert TOKEN not in r.stdout + r.stderr
    assert not list((_isolated_home / "cache" / "exports").glob("cloudtune-push-*"))  # temp merge removed

    # pushing the same adapter again: preupload's oids say nothing changed, so no new upload
    puts = len(hub.calls("PUT"))
    r = _push(_isolated_home, hub, job, "--repo", "alice/tiny-lora")
    assert r.returncode == 0, r.stderr
    assert len(hub.calls("PUT")) == puts


def test_push_refusals(hub: HubFake, job: str, _isolated_home: Path):
    r = _push(_isolated_home, hub, job, "--repo", "alice/x", token=None)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: HF_TOKEN is not set; create a write token at https://huggingface.co/settings/tokens and export "
        "HF_TOKEN=... (it is read from the environment only, never from flags)"]
    r = _push(_isolated_home, hub, job, "--repo", "not a repo")
    assert r.returncode == 2 and "--repo 'not a repo' is not a Hub repo id" in r.stderr
    assert not hub.log  # both refused before any request
    wrong = "hf_wrongTokenValue123"
    r = _push(_isolated_home, hub, job, "--repo", "alice/x", token=wrong)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the Hub refused HF_TOKEN for alice/x (401)")
    assert wrong not in r.stdout + r.stderr and "Traceback" not in r.stderr
    r = _push(_isolated_home, hub, job, "--repo", "bob/x")  # someone else's namespace
    assert r.returncode == 3 and "(403)" in r.stderr and "bob/x" not in hub.repos
