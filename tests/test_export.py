"""Merge (SFT, then DPO continued from it) and GGUF export through llama.cpp's real converter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _export_util import save_bpe_llama, save_random_adapter
from _trainer_util import ROOT, tiny_spec, write_spec

pytestmark = pytest.mark.slow

PROMPT = "Reverse the string.\n\nabcde"


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`cloudtune ARGS` in this process (torch is imported once for the module, not per command), with
    the real entry point's error handling: exit code, stdout, stderr."""
    import contextlib
    import io

    from cloudtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["cloudtune", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def sft_dpo(tmp_path_factory) -> Path:
    """A store holding job `sft` (LoRA, 6 steps) and job `dpo` (continues sft's adapter, 4 steps)."""
    from cloudtune.trainer.cli import main

    tmp = tmp_path_factory.mktemp("sft_dpo")
    old = {k: os.environ.get(k) for k in ("CLOUDTUNE_HOME", "CLOUDTUNE_IMDS_ENDPOINT")}
    os.environ.update(CLOUDTUNE_HOME=str(tmp / "home"), CLOUDTUNE_IMDS_ENDPOINT="")
    try:
        assert main(["--spec", str(write_spec(tmp, tiny_spec(tmp, training={"max_steps": 6}), "sft.json")),
                     "--job-id", "sft"]) == 0
        dpo = tiny_spec(tmp, stage="dpo", dpo={"base_adapter": "sft"},
                        data={"train": str(ROOT / "examples/data/reverse_preference.jsonl"), "max_seq_len": 64},
                        training={"max_steps": 4, "learning_rate": 0.01, "micro_batch": 4})
        assert main(["--spec", str(write_spec(tmp, dpo, "dpo.json")), "--job-id", "dpo"]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return tmp / "store"


def _with_store(home: Path, store: Path) -> None:
    """Point this test's $CLOUDTUNE_HOME default store at the module's jobs (no state row: trainer-only runs)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "store").symlink_to(store)


def _last_logits(model_dir: str, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits[0, -1]


def test_merge_sft_then_dpo_equals_base_plus_adapter(sft_dpo: Path, _isolated_home: Path):
    from cloudtune.tiny import ensure_tiny_model

    _with_store(_isolated_home, sft_dpo)
    out = _isolated_home / "dpo-merged"
    r = _cli("merge", "dpo", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    meta = json.loads((out / "cloudtune_merge.json").read_text())
    assert meta["base"] == "tiny:reverse" and meta["job_id"] == "dpo"  # base from the job, not the machine path
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    base = str(ensure_tiny_model("tiny:reverse"))
    merged = _last_logits(str(out))
    with_dpo = _last_logits(base, sft_dpo / "dpo" / "final")
    with_sft = _last_logits(base, sft_dpo / "sft" / "final")
    plain = _last_logits(base)
    assert (merged - with_dpo).abs().max() < 1e-4  # fp32 merge == base + adapter
    assert (merged - with_sft).abs().max() > 1e-3  # DPO moved on from the SFT adapter it continued
    assert (with_sft - plain).abs().max() > 1e-3
    # OUT exists now: refused before loading anything, nothing overwritten
    again = _cli("merge", "dpo", str(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: output {out} already exists; choose another path or remove it"]
    missing = _cli("merge", "nosuchjob")
    assert missing.returncode == 2 and "no job or folder 'nosuchjob'" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture(scope="session")
def converter() -> str:
    """convert_hf_to_gguf.py from the pinned llama-cpp-python sdist, fetched once per machine by cloudtune's
    own code (or $CLOUDTUNE_LLAMA_CPP when the caller provides one)."""
    if os.environ.get("CLOUDTUNE_LLAMA_CPP"):
        return os.environ["CLOUDTUNE_LLAMA_CPP"]
    from cloudtune.export import llama_cpp

    dest = Path.home() / ".cache" / "cloudtune-tests" / f"llama-cpp-python-{llama_cpp.VERSION}"
    return str(llama_cpp.download(dest) if not (dest / llama_cpp.SCRIPT).is_file() else dest / llama_cpp.SCRIPT)


def test_gguf_q8_0_from_adapter_reads_back(tmp_path: Path, converter: str):
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors.torch import load_file

    base = save_bpe_llama(tmp_path / "base")
    adapter = save_random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "model-q8_0.gguf"
    r = _cli("export", "gguf", str(adapter), str(out), "--quant", "q8_0", "--converter", converter, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    info = json.loads(r.stdout[r.stdout.index("{"):])
    assert info["architecture"] == "llama" and info["tokenizer"] == "llama" and info["vocab"] == 360
    reader = GGUFReader(str(out))  # PyPI's gguf, independent of the converter's own copy
    names = {t.name: t for t in reader.tensors}
    assert len(names) == 3 + 2 * 9  # embeddings, norm, output + 9 per layer
    assert names["blk.0.attn_v.weight"].tensor_type.name == "Q8_0"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 360
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    # the GGUF holds the *merged* weights: v_proj (not permuted by the converter) == base + B@A * scale
    t = names["blk.0.attn_v.weight"]
    v = dequantize(t.data, t.tensor_type).reshape(-1, 64)
    base_w = load_file(base / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"].numpy()
    lora = load_file(adapter / "adapter_model.safetensors")
    a = lora["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].numpy()
    b = lora["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].numpy()
    expected = base_w + (8 / 4) * b @ a
    assert np.abs(v - expected).max() < 2e-3 < np.abs(v - base_w).max()
    assert not list(tmp_path.glob(".model-q8_0.gguf-*"))  # no temporary left


def test_gguf_refusals_come_first(tmp_path: Path):
    r = _cli("export", "gguf", "nosuchjob", "--quant", "q4_k_m")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "llama-quantize" in r.stderr and "Q4_K_M" in r.stderr
    r = _cli("export", "gguf", "nosuchjob", "--quant", "q9")
    assert r.returncode == 2 and "--quant 'q9' is not a GGUF type" in r.stderr


def test_gguf_refuses_a_tokenizer_the_converter_cannot_read(tmp_path: Path, _isolated_home: Path):
    """tiny.py's character-level WordLevel tokenizer: llama.cpp's converter fails on it after loading the
    whole model ("BPE pre-tokenizer was not recognized"); cloudtune refuses it first, in one line."""
    from cloudtune.tiny import build_tokenizer

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny:reverse"}))
    build_tokenizer().save_pretrained(folder)
    out = tmp_path / "tiny.gguf"
    r = _cli("export", "gguf", str(folder), str(out), "--converter", str(tmp_path / "never-used"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {folder / 'tokenizer.json'}: a WordLevel tokenizer, which llama.cpp's convert_hf_to_gguf.py cannot "
        "convert; GGUF needs a sentencepiece or BPE tokenizer (real model families have one)"]
    assert not out.exists() and not (_isolated_home / "cache" / "tiny").exists()  # no model was even built

