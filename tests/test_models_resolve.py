"""Model resolution beyond the registry: Instruct/chat/it variants, the local HF cache, and the failure hint.

The HF cache is built in tmp_path with huggingface_hub's published layout
(models--org--name/refs/main + snapshots/<rev>/config.json); no hub is contacted (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os

import pytest

from cloudtune.errors import UserError
from cloudtune.planner.models import hf_hub_cache_dir, resolve_model

QWEN_05B_CONFIG = {  # Qwen/Qwen2.5-0.5B-Instruct's published config.json (the fields the planner reads)
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLOUDTUNE_HOME", str(tmp_path / "ct-home"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _cache_model(hub: os.PathLike, repo_id: str, cfg: dict, *, rev: str = "a" * 40, main: bool = True) -> None:
    repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", rev)
    os.makedirs(snap, exist_ok=True)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(cfg, f)
    if main:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(rev)


@pytest.mark.parametrize(
    ("ref", "base"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
        ("google/gemma-2-9b-it", "google/gemma-2-9b"),
        ("google/gemma-3-12b-it", "google/gemma-3-12b-pt"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-v0.3"),
        ("meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-13b-hf"),
        ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-4B"),
        ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B"),
    ],
)
def test_variant_resolves_to_its_base_architecture(ref, base):
    arch, want = resolve_model(ref), resolve_model(base)
    assert arch.id == ref
    assert (arch.layers, arch.hidden, arch.intermediate, arch.vocab, arch.params_b) == (
        want.layers, want.hidden, want.intermediate, want.vocab, want.params_b)
    assert base in arch.source


def test_suffix_that_is_not_a_variant_token_is_not_stripped():
    # "-it" inside a word, or a different size, must not resolve to some base
    with pytest.raises(UserError):
        resolve_model("Qwen/Qwen2.5-9B-Instruct")
    with pytest.raises(UserError):
        resolve_model("acme/gemma-2-9b-itx")


@pytest.mark.parametrize("layout", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "default"])
def test_hf_cache_is_read_offline(tmp_path, monkeypatch, layout):
    if layout == "HF_HUB_CACHE":
        hub = tmp_path / "hubcache"
        monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    elif layout == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
        hub = tmp_path / "hfhome" / "hub"
    elif layout == "XDG_CACHE_HOME":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        hub = tmp_path / "xdg" / "huggingface" / "hub"
    else:
        hub = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert hf_hub_cache_dir() == hub
    _cache_model(hub, "acme/Tiny-Qwen-0.5B-Instruct", QWEN_05B_CONFIG)
    arch = resolve_model("acme/Tiny-Qwen-0.5B-Instruct")
    assert (arch.layers, arch.hidden, arch.kv_heads, arch.vocab) == (24, 896, 2, 151936)
    assert arch.source.startswith("hf cache") and str(hub) in arch.source
    assert 0.45 < arch.params_b < 0.55  # Qwen2.5-0.5B: 0.49 B published
    # case-insensitive, and the bare name finds models--*--name
    assert resolve_model("ACME/tiny-qwen-0.5b-instruct").layers == 24
    assert resolve_model("Tiny-Qwen-0.5B-Instruct").layers == 24


def test_hf_cache_prefers_refs_main_then_newest_snapshot(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    _cache_model(hub, "acme/m", {**QWEN_05B_CONFIG, "num_hidden_layers": 12}, rev="b" * 40, main=False)
    _cache_model(hub, "acme/m", QWEN_05B_CONFIG, rev="a" * 40, main=True)
    assert resolve_model("acme/m").layers == 24  # refs/main wins over the newer snapshot
    (hub / "models--acme--m" / "refs" / "main").unlink()
    newest = hub / "models--acme--m" / "snapshots" / ("b" * 40) / "config.json"
    os.utime(newest, (2_000_000_000, 2_000_000_000))
    assert resolve_model("acme/m").layers == 12


def test_hf_cache_config_beats_variant_mapping(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    _cache_model(hub, "Qwen/Qwen2.5-7B-Instruct", QWEN_05B_CONFIG)  # the model's own config is the truth
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").hidden == 896


def test_broken_cached_config_names_file_and_fix(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    _cache_model(hub, "acme/broken", {"model_type": "llama"})
    with pytest.raises(UserError) as err:
        resolve_model("acme/broken")
    msg = str(err.value)
    assert "acme/broken" in msg and "config.json" in msg and "\n" not in msg


def test_offline_failure_suggests_nearest_and_config_route():
    with pytest.raises(UserError) as err:
        resolve_model("Qwen/Qwen2.6-7B-Instruct")
    msg = str(err.value)
    assert "did you mean Qwen/Qwen2.5-7B" in msg
    assert "huggingface-cli download Qwen/Qwen2.6-7B-Instruct config.json" in msg
    assert "config.json path" in msg and "\n" not in msg
    with pytest.raises(UserError) as err:
        resolve_model("Lama-3.1-8B-Instrct")
    assert "Llama-3.1-8B" in str(err.value)


def test_cli_models_resolves_variant_offline(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLOUDTUNE_HOME": str(tmp_path / "h"), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cloudtune", "models", "google/gemma-2-9b-it", "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layers"] == 42
    bad = subprocess.run([sys.executable, "-m", "cloudtune", "models", "acme/nothing-here"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "huggingface-cli download" in bad.stderr
