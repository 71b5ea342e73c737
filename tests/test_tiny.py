"""The tiny model and toy tasks: deterministic, loadable through from_pretrained, import-light."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloudtune import tiny
from cloudtune.errors import UserError


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_loads(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = tiny.save_tiny(tmp_path / "a")
    b = tiny.save_tiny(tmp_path / "b")
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert _sha(a / "tokenizer.json") == _sha(b / "tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert sum(p.numel() for p in model.parameters()) == tiny.param_count()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse the string.\n\nabc"}, {"role": "assistant", "content": "cba"}],
        tokenize=False,
    )
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # char-level: exact round trip
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_ensure_tiny_model_uses_cloudtune_home(_isolated_home: Path):
    path = tiny.ensure_tiny_model("tiny:reverse")
    assert path == _isolated_home / "cache" / "tiny" / "reverse"
    stamp = (path / "cloudtune_tiny.json").stat().st_mtime_ns
    assert tiny.ensure_tiny_model("tiny:reverse") == path
    assert (path / "cloudtune_tiny.json").stat().st_mtime_ns == stamp  # built once


def test_unknown_task_is_a_clear_error():
    with pytest.raises(UserError, match="unknown tiny model 'tiny:nope'.*tiny:reverse"):
        tiny.task_of("tiny:nope")


def test_records_are_deterministic_and_correct():
    recs = tiny.make_records("reverse", 50, seed=3)
    assert recs == tiny.make_records("reverse", 50, seed=3)
    assert recs != tiny.make_records("reverse", 50, seed=4)
    assert all(r["output"] == r["input"][::-1] for r in recs)
    add = tiny.make_records("add", 20)
    assert all(int(r["output"]) == sum(map(int, r["input"].split("+"))) for r in add)
    pref = tiny.make_preference_records("reverse", 5)
    assert all(p["chosen"] != p["rejected"] for p in pref)


def test_committed_example_data_matches_generator():
    root = Path(__file__).resolve().parents[1]
    lines = (root / "examples/data/reverse.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == tiny.make_records("reverse", len(lines), seed=0)


def test_arch_is_import_light():
    code = (
        "import sys; from cloudtune import tiny; a = tiny.arch('tiny:reverse');"
        "assert a.hidden == 64 and a.vocab == tiny.vocab_size();"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stale_cache_is_rebuilt(_isolated_home: Path):
    path = tiny.ensure_tiny_model("tiny:add")
    good = _sha(path / "model.safetensors")
    (path / "cloudtune_tiny.json").write_text('{"old": true}')
    (path / "model.safetensors").write_bytes(b"stale")
    assert _sha(tiny.ensure_tiny_model("tiny:add") / "model.safetensors") == good
