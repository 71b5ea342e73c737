"""Full, LoRA, QLoRA (bitsandbytes 4-bit on CPU) and DPO, end to end on the tiny model, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _trainer_util import DATA, ROOT, tiny_spec, write_spec

from cloudtune.trainer import contract
from cloudtune.trainer.cli import main

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Reverse the string.\n\nabcde"}]


def _run(tmp: Path, job: str, spec: dict, monkeypatch) -> Path:
    monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", "")
    rc = main(["--spec", str(write_spec(tmp, spec, f"{job}.json")), "--job-id", job])
    assert rc == contract.EXIT_DONE, (tmp / "store" / job / "FAILED.json").read_text() if rc else rc
    return tmp / "store" / job


def _losses_fall(summary: dict, margin: float) -> None:
    assert summary["first_loss"] - summary["final_loss"] > margin, summary


def _logits(model_dir: str, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits[0, -1]


def test_lora_learns_and_changes_outputs(tmp_path: Path, monkeypatch):
    from cloudtune.tiny import ensure_tiny_model

    # The quickstart's hyper-parameters, fewer steps: enough to reverse unseen strings half right.
    spec = tiny_spec(tmp_path, training={"max_steps": 120, "learning_rate": 0.003, "micro_batch": 16,
                                         "logging_steps": 5, "lr_scheduler": "constant"},
                     lora={"rank": 32, "alpha": 64, "dropout": 0.0},
                     data={"val_split": 0.1}, checkpoint={"every_steps": 60}, merge=True)
    job = _run(tmp_path, "lora", spec, monkeypatch)
    summary = json.loads((job / "final" / "summary.json").read_text())
    _losses_fall(summary, 3.0)
    assert summary["steps"] == 120 and summary["eval_loss"] is not None
    # held-out generation: the validation records (never trained on), greedy, without and with the adapter
    gen = summary["generation_eval"]
    assert gen["source"] == "validation" and gen["examples"] == 16 and gen["decoding"] == "greedy"
    assert gen["before"]["exact_match"] == 0 and gen["before"]["char_accuracy"] < 0.1
    assert gen["after"]["char_accuracy"] > 0.5, gen
    assert gen["after"]["char_accuracy"] - gen["before"]["char_accuracy"] > 0.4, gen
    val_inputs = {json.loads(x)["input"] for x in DATA.read_text().splitlines()}
    assert len(gen["samples"]) == 3
    for s in gen["samples"]:
        assert s["prompt"] in val_inputs and s["expected"] == s["prompt"][::-1]
        assert s["correct"] == (s["after"] == s["expected"]) and s["after"] != s["before"]
    assert summary["peak_mem_kind"] == "rss" and summary["peak_mem_bytes"] > 10_000_000
    assert summary["tokens_per_s"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "summary.json"):
        assert (job / "final" / name).is_file(), name
    assert (job / "final" / "merged" / "model.safetensors").is_file()
    done = json.loads((job / "DONE.json").read_text())
    assert done["steps"] == 120
    hb = json.loads((job / "heartbeat.json").read_text())
    assert hb["phase"] == "done" and hb["step"] == 120 and hb["attempt"] == 1
    base = str(ensure_tiny_model("tiny:reverse"))
    before, after = _logits(base), _logits(base, job / "final")
    assert (before - after).abs().max() > 0.1
    merged = _logits(str(job / "final" / "merged"))
    assert (merged.float() - after).abs().max() < 0.1 * after.abs().max()  # bf16 merge ≈ adapter


def test_qlora_4bit_on_cpu(tmp_path: Path, monkeypatch):
    spec = tiny_spec(tmp_path, method="qlora", training={"max_steps": 12, "learning_rate": 0.03},
                     lora={"targets": "attention"})
    job = _run(tmp_path, "qlora", spec, monkeypatch)
    summary = json.loads((job / "final" / "summary.json").read_text())
    _losses_fall(summary, 0.1)
    assert summary["quantized_linears"] == 2 * 7  # every q/k/v/o/gate/up/down of both layers is NF4
    cfg = json.loads((job / "final" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["r"] == 8


def test_full_finetune(tmp_path: Path, monkeypatch):
    spec = tiny_spec(tmp_path, method="full", training={"max_steps": 12, "learning_rate": 0.003})
    job = _run(tmp_path, "full", spec, monkeypatch)
    summary = json.loads((job / "final" / "summary.json").read_text())
    _losses_fall(summary, 0.5)
    assert (job / "final" / "model.safetensors").is_file()
    assert not (job / "final" / "adapter_config.json").exists()
    assert summary["quantized_linears"] == 0 and summary["trainable_params"] > 80_000
    gen = summary["generation_eval"]  # no validation split: fresh tiny:reverse strings; no cheap "before"
    assert gen["source"] == "tiny:reverse held-out" and gen["before"] is None
    assert 0 <= gen["after"]["char_accuracy"] <= 1 and len(gen["samples"]) == 3


def test_dpo_stage_from_sft_adapter(tmp_path: Path, monkeypatch):
    sft = _run(tmp_path, "sft", tiny_spec(tmp_path, training={"max_steps": 8}), monkeypatch)
    spec = tiny_spec(
        tmp_path, stage="dpo",
        data={"train": str(ROOT / "examples/data/reverse_preference.jsonl"), "max_seq_len": 64},
        dpo={"beta": 0.1, "base_adapter": "sft"},  # a job id in the same store
        training={"max_steps": 8, "learning_rate": 0.003, "micro_batch": 4},
    )
    job = _run(tmp_path, "dpo", spec, monkeypatch)
    summary = json.loads((job / "final" / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["steps"] == 8
    assert summary["train_loss"] == pytest.approx(summary["train_loss"])  # finite, not NaN
    assert summary["first_loss"] == pytest.approx(0.6931, abs=0.01)  # policy == reference at step 0
    gen = summary["generation_eval"]  # preference records: prompt -> chosen
    assert gen["examples"] == 16 and gen["source"] == "tiny:reverse held-out"
    assert all(s["instruction"] == "Reverse the string." and s["expected"] == s["prompt"][::-1]
               for s in gen["samples"])
    from safetensors.torch import load_file

    a = load_file(sft / "final" / "adapter_model.safetensors")
    b = load_file(job / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)  # continued from, and moved away from, the SFT adapter
