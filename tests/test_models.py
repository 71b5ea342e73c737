"""Model resolution: every kind of --model value, and every way it can be wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cloudtune.errors import UserError
from cloudtune.planner.models import (
    SHORTHANDS,
    active_params,
    count_params,
    known_models,
    resolve_model,
)

LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


def _dims(m):
    return {k: getattr(m, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim",
                                       "vocab", "tied_embeddings")}


@pytest.mark.parametrize("arch", known_models(), ids=lambda a: a.id)
def test_registry_params_match_the_dims(arch):
    computed = count_params(**_dims(arch), num_experts=arch.num_experts, qkv_bias=arch.qkv_bias) / 1e9
    assert computed == pytest.approx(arch.params_b, rel=0.01)


def test_registry_has_the_csv_rows():
    ids = {m.id for m in known_models()}
    assert len(ids) == 39
    assert {"meta-llama/Llama-3.1-70B", "Qwen/Qwen2.5-7B", "mistralai/Mixtral-8x7B-v0.1"} <= ids


@pytest.mark.parametrize(
    "ref,expected",
    [("70b", "meta-llama/Llama-3.1-70B"), ("8B", "meta-llama/Llama-3.1-8B"), ("1.5b", "Qwen/Qwen2.5-1.5B"),
     ("0.5b", "Qwen/Qwen2.5-0.5B"), ("405b", "meta-llama/Llama-3.1-405B"), ("8x7b", "mistralai/Mixtral-8x7B-v0.1"),
     ("34b", "Qwen/Qwen2.5-32B")],
)
def test_size_shorthands(ref, expected):
    assert resolve_model(ref).id == expected


def test_every_shorthand_points_at_a_registry_model_of_about_that_size():
    for short, model_id in SHORTHANDS.items():
        arch = resolve_model(short)
        assert arch.id == model_id
        if "x" not in short:
            assert 0.75 < arch.params_b / float(short[:-1]) < 1.35, short


def test_size_far_from_any_shorthand_is_an_error():
    with pytest.raises(UserError, match="no representative model near '1000b'"):
        resolve_model("1000b")
    with pytest.raises(UserError, match="MoE"):
        resolve_model("16x3b")


def test_moe_counts_all_experts_for_memory_and_active_ones_for_flops():
    mix = resolve_model("mistralai/Mixtral-8x7B-v0.1")
    assert (mix.num_experts, mix.experts_per_token) == (8, 2)
    assert mix.params_b == pytest.approx(46.7, rel=0.01)
    assert active_params(mix) / 1e9 == pytest.approx(12.9, rel=0.02)


def test_ids_are_case_insensitive_and_work_without_the_org():
    assert resolve_model("META-LLAMA/llama-3.1-8b").id == "meta-llama/Llama-3.1-8B"
    assert resolve_model("Llama-3.1-8B").id == "meta-llama/Llama-3.1-8B"
    assert resolve_model("qwen2.5-7b").id == "Qwen/Qwen2.5-7B"


def test_config_dir_and_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    from_dir = resolve_model(str(tmp_path))
    from_file = resolve_model(str(tmp_path / "config.json"))
    assert from_dir == from_file
    assert from_dir.params_b == pytest.approx(8.03, rel=0.001)
    assert (from_dir.layers, from_dir.kv_heads, from_dir.head_dim, from_dir.vocab) == (32, 8, 128, 128256)


def test_config_with_moe_and_multimodal_text_config(tmp_path):
    mixtral = {**LLAMA_8B_CONFIG, "model_type": "mixtral", "vocab_size": 32000, "num_local_experts": 8,
               "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(mixtral))
    arch = resolve_model(str(tmp_path / "config.json"))
    assert (arch.num_experts, arch.experts_per_token) == (8, 2)
    assert arch.params_b == pytest.approx(46.7, rel=0.01)
    wrapped = tmp_path / "mm"
    wrapped.mkdir()
    (wrapped / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": LLAMA_8B_CONFIG}))
    assert resolve_model(str(wrapped)).layers == 32


def test_malformed_config_is_one_clear_error(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot parse .*config.json.* as JSON"):
        resolve_model(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(UserError, match="has no num_hidden_layers"):
        resolve_model(str(bad))
    bad.write_text(json.dumps({**LLAMA_8B_CONFIG, "num_hidden_layers": -1}))
    with pytest.raises(UserError, match="num_hidden_layers is -1"):
        resolve_model(str(bad))
    with pytest.raises(UserError, match="no such file"):
        resolve_model(str(tmp_path / "missing" / "config.json"))


def test_unknown_id_suggests_the_nearest():
    with pytest.raises(UserError, match=r"did you mean .*Llama-3\.1-8B"):
        resolve_model("Llama-3.1-8")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot fetch config.json for 'someorg/some-model': HF_HUB_OFFLINE is set"):
        resolve_model("someorg/some-model")


def test_hub_id_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(UserError, match=r"network unreachable \(http://127.0.0.1:9\); pass a local config.json path or a size like 8b"):
        resolve_model("someorg/some-model")


class _Hub(BaseHTTPRequestHandler):
    """A hub that serves one repo's config.json, and only with the right token."""

    def do_GET(self):  # noqa: N802
        if self.path == "/acme/llama-ish/resolve/main/config.json":
            body, code = json.dumps(LLAMA_8B_CONFIG).encode(), 200
        elif self.path == "/acme/gated/resolve/main/config.json":
            ok = self.headers.get("Authorization") == "Bearer hf_secret"
            body, code = (json.dumps(LLAMA_8B_CONFIG).encode(), 200) if ok else (b"{}", 401)
        else:
            body, code = b"Repository not found", 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()


def test_hub_fetch_over_http_then_cached(hub, monkeypatch):
    arch = resolve_model("acme/llama-ish")
    assert arch.source == "hub" and arch.params_b == pytest.approx(8.03, rel=0.001)
    hub.shutdown()  # the second resolution must come from $CLOUDTUNE_HOME's cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/llama-ish").layers == 32


def test_hub_gated_needs_token_and_unknown_repo(hub, monkeypatch):
    with pytest.raises(UserError, match="401 .*set HF_TOKEN"):
        resolve_model("acme/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert resolve_model("acme/gated").hidden == 4096
    with pytest.raises(UserError, match="unknown model 'acme/nothing'"):
        resolve_model("acme/nothing")


def test_tiny_ref_needs_no_network():
    from cloudtune import tiny

    arch = resolve_model("tiny:reverse")
    assert arch.layers == tiny.DIMS["layers"] and arch.vocab == tiny.vocab_size()
    with pytest.raises(UserError, match="unknown tiny model"):
        resolve_model("tiny:nope")


def test_models_cli_lists_and_resolves(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cloudtune", "models", "--json"], capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out)
    assert any(r["id"] == "meta-llama/Llama-3.1-8B" and "8b" in r["shorthands"] for r in rows)
    one = json.loads(subprocess.run([sys.executable, "-m", "cloudtune", "models", "70b", "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert one["id"] == "meta-llama/Llama-3.1-70B"
    table = subprocess.run([sys.executable, "-m", "cloudtune", "models"], capture_output=True, text=True, check=True)
    assert "Qwen/Qwen2.5-72B (72b)" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "cloudtune", "models", "nonsense-model"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown model 'nonsense-model'") and "Traceback" not in bad.stderr
