"""The family matrix: every tiny family model through lora, qlora and full (the MoE too), plus DPO.

Each cell runs the real trainer in process (cli.main: data check, chat-template labels, TRL, PEFT,
bitsandbytes 4-bit on CPU, checkpoints, final/, held-out generation) on multi-turn chat data for 4
steps and checks: it finishes, the losses are finite, held-out generation ran, the final folder is
complete. Some cells also check resume (a job started from the reference run's step-2 checkpoint
ends byte-identical to it), merge (merged weights give base+adapter's logits) and the MoE rules
(no router adapter, expert tensors as target_parameters, sorted, output_router_logits off).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from _families import FAMILIES, build_all, conversations
from _trainer_util import final_files

from cloudtune.trainer import contract
from cloudtune.trainer.cli import main


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory)

pytestmark = pytest.mark.slow

CELLS = [(f, m) for f in FAMILIES for m in ("lora", "qlora", "full")]
RESUME = {("llama", "qlora"), ("qwen3_moe", "lora"), ("phi3", "full")}
MERGE = {("phi3", "lora"), ("qwen3_moe", "lora")}


def _data(tmp: Path, name: str) -> tuple[Path, Path]:
    fam = FAMILIES[name]
    rows = [{"messages": c} for c in conversations(16, system=fam.system)]
    train, val = tmp / "train.jsonl", tmp / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))
    return train, val


def _spec(tmp: Path, model: Path, method: str, train: Path, val: Path, **over) -> dict:
    spec = {
        "name": "f", "model": str(model), "method": method,
        "lora": {"rank": 4, "alpha": 8},  # default dropout 0.05: MoE must cope with it
        "data": {"train": str(train), "validation": str(val), "max_seq_len": 96},
        "training": {"max_steps": 4, "micro_batch": 4, "learning_rate": 0.01, "seed": 3,
                     "gradient_checkpointing": False, "logging_steps": 1, "lr_scheduler": "linear"},
        "checkpoint": {"every_steps": 2, "every_minutes": None, "keep": 2},
        "store": {"url": f"file://{tmp / 'store'}"},
    }
    spec.update(over)
    return spec


def _run(tmp: Path, job: str, spec: dict) -> Path:
    path = tmp / f"{job}.json"
    path.write_text(json.dumps(spec))
    rc = main(["--spec", str(path), "--job-id", job])
    store = tmp / "store" / job
    assert rc == contract.EXIT_DONE, (store / "FAILED.json").read_text() if (store / "FAILED.json").exists() else rc
    return store


def _logits(model_dir: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok.apply_chat_template([{"role": "user", "content": "Reverse abcd"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits[0]


@pytest.mark.parametrize("name,method", CELLS, ids=[f"{f}-{m}" for f, m in CELLS])
def test_family_trains(family_dirs, tmp_path: Path, monkeypatch, name, method):
    monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", "")
    fam = FAMILIES[name]
    train, val = _data(tmp_path, name)
    merge = (name, method) in MERGE
    over = {"lora": {"rank": 4, "alpha": 8, "targets": "attention"}} if name == "phi3" else {}
    spec = _spec(tmp_path, family_dirs[name], method, train, val, merge=merge, **over)
    job = _run(tmp_path, "ref", spec)
    final = job / "final"
    summary = json.loads((final / "summary.json").read_text())
    assert summary["steps"] == 4
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["eval_loss"]), summary
    gen = summary["generation_eval"]
    assert gen is not None and gen["source"] == "validation" and gen["examples"] == 4, summary
    assert all(isinstance(s["after"], str) for s in gen["samples"])
    if method == "qlora":
        assert summary["quantized_linears"] > 0
        # bnb quantizes nn.Linear only: the fused experts of an MoE stay 16-bit (the planner must know)
        share = summary["quantized_weight_share"]
        assert (0.2 < share < 0.5) if fam.moe else share == 1.0, share
    if method == "full":
        cfg = json.loads((final / "config.json").read_text())
        assert not cfg.get("output_router_logits")  # TRL's aux-loss switch stays out of the saved model
        assert (final / "model.safetensors").is_file()
    else:
        acfg = json.loads((final / "adapter_config.json").read_text())
        for key in ("target_modules", "target_parameters"):
            if isinstance(acfg.get(key), list):
                assert acfg[key] == sorted(acfg[key]), acfg[key]
        if fam.moe:
            assert acfg["lora_dropout"] == 0.0
            assert sorted(acfg["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
            assert "gate" not in acfg["target_modules"]
            from safetensors import safe_open

            with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
                keys = list(f.keys())
            assert not [k for k in keys if ".mlp.gate." in k], "router got an adapter"
            assert [k for k in keys if ".experts." in k]
        if name == "phi3":  # lora.targets: attention takes the fused qkv_proj, not o_proj alone
            assert sorted(acfg["target_modules"]) == ["o_proj", "qkv_proj"], acfg["target_modules"]
    if name == "gemma2":
        assert json.loads((final / "config.json").read_text() if method == "full" else "{}").get(
            "_attn_implementation") in (None, "eager")
    if merge:
        import torch

        merged = _logits(final / "merged")
        combined = _logits(family_dirs[name], final)
        assert torch.allclose(merged, combined, atol=0.05, rtol=0.05), (merged - combined).abs().max()
        assert (combined - _logits(family_dirs[name])).abs().max() > 1e-4  # the adapter changed something
    if (name, method) in RESUME:
        # a second job that starts from the reference's step-2 checkpoint (as after a preemption there)
        ckpts = sorted((job / "checkpoints").iterdir())
        assert [p.name for p in ckpts][-2:] == ["00000002", "00000004"], ckpts
        dest = tmp_path / "store" / "again" / "checkpoints" / ckpts[-2].name
        shutil.copytree(ckpts[-2], dest)
        resumed = _run(tmp_path, "again", _spec(tmp_path, family_dirs[name], method, train, val, merge=merge,
                                                **over))
        assert final_files(resumed) == final_files(job)


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_family_dpo_with_implicit_prompts(family_dirs, tmp_path: Path, monkeypatch, name):
    """DPO on a chat family from conversational pairs without a prompt field (TRL's implicit prompt)."""
    monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", "")
    rows = []
    for conv in conversations(8, system=False):
        good, bad = conv[:2], [conv[0], {"role": "assistant", "content": conv[1]["content"][::-1]}]
        rows.append({"chosen": good, "rejected": bad})
    train = tmp_path / "pref.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(tmp_path, family_dirs[name], "lora", train, train, stage="dpo")
    spec["data"].pop("validation")
    spec["training"]["max_steps"] = 2
    job = _run(tmp_path, "dpo", spec)
    summary = json.loads((job / "final" / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["steps"] == 2 and math.isfinite(summary["final_loss"])


@pytest.mark.parametrize("config,model,kw", [
    ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                              "shared_expert_intermediate_size": 64}),
])
def test_other_moe_layouts_get_expert_adapters_and_no_router_adapter(config, model, kw):
    """Mixtral and Qwen2-MoE (shared expert + its scalar gate) under the same rules as the trained qwen3_moe."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from cloudtune.trainer.families import moe_lora

    m = getattr(transformers, model)(getattr(transformers, config)(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **kw))
    args = moe_lora(m, "all-linear", 0.05)
    assert args["lora_dropout"] == 0.0 and args["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    peft = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **args))
    trained = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert not [n for n in trained if ".mlp.gate." in n or "shared_expert_gate" in n], trained
    assert [n for n in trained if ".experts." in n] and [n for n in trained if "self_attn.q_proj" in n]
    if "shared_expert_intermediate_size" in kw:
        assert [n for n in trained if "shared_expert.up_proj" in n]
