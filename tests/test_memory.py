"""The memory estimator's parts, each against the number its source gives."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cloudtune.errors import UserError
from cloudtune.planner.memory import (
    GIB,
    TRAINER_STACK,
    estimate_memory,
    estimate_peak,
    lora_groups,
    lora_params,
    with_stack,
)
from cloudtune.planner.models import resolve_model
from cloudtune.planner.types import BREAKDOWN_KEYS, TrainConfig

L8 = resolve_model("meta-llama/Llama-3.1-8B")
L70 = resolve_model("70b")
BF16_BASE = with_stack(TRAINER_STACK, kbit_upcast=False)  # torchtune/Unsloth keep embeddings in bf16
HF_LOSS = with_stack(TRAINER_STACK, logits="fp32")  # transformers' unfused logits + cross-entropy


def cfg(**kw) -> TrainConfig:
    base = dict(method="qlora", quant_bits=4, seq_len=2048, micro_batch=1)
    base.update(kw)
    if base["method"] != "qlora" and "quant_bits" not in kw:
        base["quant_bits"] = 16
    return TrainConfig(**base)


def test_breakdown_has_the_contract_keys_and_sums_to_the_total():
    for method in ("full", "lora", "qlora"):
        for gpus, sharding in ((1, None), (2, "ddp"), (4, None), (4, "zero3")):
            for gc in (True, False):
                est = estimate_memory(L8, cfg(method=method, gradient_checkpointing=gc), gpus, sharding)
                assert tuple(est.breakdown_gib) == BREAKDOWN_KEYS
                assert sum(est.breakdown_gib.values()) == pytest.approx(est.per_gpu_gib, abs=0.01)
                assert all(v >= 0 for v in est.breakdown_gib.values())
                assert est.gpus == gpus


def test_lora_params_llama3_8b_r16_all_linear():
    assert lora_params(L8, 16, "all-linear") == 41_943_040  # 41.9 M, vram_notes.md
    assert lora_params(L8, 16, "attention") == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    # module-name lists, HF and fused Qwen-1/Phi-3 names
    assert lora_params(L8, 16, ("q_proj", "v_proj")) == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert lora_params(L8, 16, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj") == 41_943_040
    assert lora_groups("c_attn,c_proj") == [("q", "k", "v"), ("o",), ("down",)]
    assert lora_params(L8, 8, ("lm_head",)) == 8 * (4096 + 128256)
    with pytest.raises(UserError, match="unknown LoRA target module 'foo_proj'"):
        lora_params(L8, 16, "foo_proj")


def test_nf4_weights_of_8b_match_the_documented_numbers():
    """vram_notes.md: NF4 part ~3.6 GB, fp32 embeddings + lm_head 4.2 GB (prepare_model_for_kbit_training)
    -> ~7.8 GB on the HF+PEFT path; ~2.1 GB of bf16 embeddings where they are not upcast."""
    hf = estimate_peak(L8, cfg(), stack=TRAINER_STACK).breakdown_gib["weights"] * GIB / 1e9
    bf16 = estimate_peak(L8, cfg(), stack=BF16_BASE).breakdown_gib["weights"] * GIB / 1e9
    assert hf == pytest.approx(3.6 + 4.2, rel=0.02)
    assert bf16 == pytest.approx(3.6 + 2.1, rel=0.02)
    no_dq = estimate_peak(L8, cfg(), stack=with_stack(BF16_BASE, double_quant=False)).breakdown_gib["weights"]
    # double quant saves 0.373 bit/param of the quantized linears (QLoRA paper: ~3 GB on 65B)
    assert (no_dq * GIB - bf16 * 1e9) * 8 / 6.98e9 == pytest.approx(0.373, rel=0.03)
    eight = estimate_peak(L8, cfg(quant_bits=8), stack=BF16_BASE).breakdown_gib["weights"] * GIB / 1e9
    assert eight == pytest.approx(6.98 + 2.1, rel=0.02)


def test_torchtune_nf4_saving_matches_tt17_vs_tt18():
    """TT-17 (LoRA) - TT-18 (QLoRA), Llama-3.2-3B, same flags: 8.5 - 4.6 = 3.9 GiB, all of it weights."""
    l3 = resolve_model("3b")
    lora = estimate_peak(l3, cfg(method="lora"), stack=BF16_BASE).breakdown_gib["weights"]
    qlora = estimate_peak(l3, cfg(), stack=BF16_BASE).breakdown_gib["weights"]
    assert lora - qlora == pytest.approx(3.9, rel=0.10)


def test_trainable_state_bytes_per_param():
    lora = estimate_peak(L8, cfg(method="lora", optimizer="adamw_torch_fused")).breakdown_gib
    n = 41_943_040 / GIB
    # PEFT fp32 adapters: 4 B weights + 4 B grads + 8 B AdamW states
    assert lora["trainable"] == pytest.approx(4 * n, rel=0.01)
    assert lora["gradients"] == pytest.approx(4 * n, rel=0.01)
    assert lora["optimizer"] == pytest.approx(8 * n, rel=0.01)
    q = estimate_peak(L8, cfg(optimizer="adamw_torch_fused")).breakdown_gib
    assert q["trainable"] == pytest.approx(2 * n, rel=0.01)  # TRL casts a quantized model's adapters to bf16
    assert q["optimizer"] == pytest.approx(4 * n, rel=0.01)  # torch AdamW states follow the param dtype
    eight = estimate_peak(L8, cfg(method="lora", optimizer="adamw_8bit")).breakdown_gib["optimizer"]
    assert eight == pytest.approx(2 * n, rel=0.01)
    assert estimate_peak(L8, cfg(method="lora", optimizer="sgd")).breakdown_gib["optimizer"] == 0
    ada = estimate_peak(L8, cfg(method="lora", optimizer="adafactor")).breakdown_gib["optimizer"]
    assert 0 < ada < 0.5 * eight
    paged = estimate_peak(L8, cfg(method="lora", optimizer="paged_adamw_32bit"))
    assert any("paged" in note for note in paged.notes)
    with pytest.raises(UserError, match="unknown optimizer 'adamz'"):
        estimate_peak(L8, cfg(optimizer="adamz"))


def test_full_finetune_bytes_per_param_follow_full_precision():
    est = estimate_peak(L8, cfg(method="full", optimizer="adamw_torch_fused", seq_len=512, full_precision="mixed"))
    b = est.breakdown_gib
    states = (b["weights"] + b["gradients"] + b["optimizer"]) * GIB / 8.03e9
    assert states == pytest.approx(18, rel=0.02)  # fp32 master 4 + autocast copy 2 + grads 4 + AdamW 8
    assert est.full_precision == "mixed"
    foreach = estimate_peak(L8, cfg(method="full", optimizer="adamw_torch", seq_len=512,
                                    full_precision="mixed")).breakdown_gib
    assert foreach["optimizer"] > b["optimizer"]  # foreach AdamW allocates sqrt(v) during step()
    # the default: pure bf16 weights, grads and AdamW states (the trainer loads bf16 weights)
    pure = estimate_peak(L8, cfg(method="full", optimizer="adamw_torch_fused", seq_len=512))
    bf16 = pure.breakdown_gib
    assert pure.full_precision == "bf16"
    assert (bf16["weights"] + bf16["gradients"] + bf16["optimizer"]) * GIB / 8.03e9 == pytest.approx(8, rel=0.02)
    eight = estimate_peak(L8, cfg(method="full", optimizer="adamw_8bit", seq_len=512)).breakdown_gib
    assert (eight["weights"] + eight["gradients"] + eight["optimizer"]) * GIB / 8.03e9 == pytest.approx(6, rel=0.02)
    stack_bf16 = estimate_peak(L8, cfg(method="full", optimizer="adamw_torch_fused", seq_len=512,
                                       full_precision="mixed"),
                               stack=with_stack(TRAINER_STACK, full_weight_bytes=2)).breakdown_gib
    assert stack_bf16 == bf16  # a stack that fixes its weight dtype ignores the config's mode


def test_activations_grow_with_seq_len_and_drop_with_checkpointing():
    acts = [estimate_peak(L8, cfg(seq_len=s)).breakdown_gib["activations"] for s in (1024, 2048, 8192)]
    assert acts[0] < acts[1] < acts[2]
    assert acts[2] / acts[1] == pytest.approx(4, rel=0.15)  # about linear in tokens with sdpa
    no_gc = estimate_peak(L8, cfg(seq_len=2048, gradient_checkpointing=False)).breakdown_gib["activations"]
    assert no_gc > 8 * acts[1]
    # with checkpointing, what stays is one bf16 layer input per layer: 2 * hidden * layers bytes per token
    per_token = acts[2] * GIB / 8192
    assert 2 * 4096 * 32 < per_token < 4 * 2 * 4096 * 32
    # batch and sequence both count as tokens
    assert estimate_peak(L8, cfg(seq_len=1024, micro_batch=2)).breakdown_gib["activations"] == pytest.approx(
        acts[1], rel=0.01)


def test_torchtune_checkpointing_saving_is_bracketed():
    """TT-12 -> TT-13 (Llama-3.2-3B full, 2 x 4096, compiled torchtune): checkpointing saved 18.0 GiB. HF's
    eager layers save at least what compiled kernels do, and not wildly more."""
    l3 = resolve_model("3b")
    on = estimate_peak(l3, cfg(method="full", seq_len=4096, micro_batch=2)).breakdown_gib["activations"]
    off = estimate_peak(l3, cfg(method="full", seq_len=4096, micro_batch=2, gradient_checkpointing=False))
    saved = off.breakdown_gib["activations"] - on
    assert 18.0 <= saved <= 1.5 * 18.0


def test_eager_attention_adds_a_quadratic_term():
    sdpa = [estimate_peak(L8, cfg(seq_len=s, gradient_checkpointing=False)).breakdown_gib["activations"]
            for s in (2048, 4096)]
    eager = [estimate_peak(L8, cfg(seq_len=s, gradient_checkpointing=False, attention="eager"))
             .breakdown_gib["activations"] for s in (2048, 4096)]
    extra = [e - s for e, s in zip(eager, sdpa, strict=True)]
    assert extra[0] > 0 and extra[1] / extra[0] == pytest.approx(4, rel=0.01)  # heads x s^2


def test_logits_scale_with_vocab_on_the_hf_path_and_stay_bounded_on_ours():
    qwen = resolve_model("Qwen/Qwen2.5-7B")  # 152K vocab
    llama2 = resolve_model("meta-llama/Llama-2-7b-hf")  # 32K vocab
    big = estimate_peak(qwen, cfg(seq_len=4096), stack=HF_LOSS).breakdown_gib["logits"]
    small = estimate_peak(llama2, cfg(seq_len=4096), stack=HF_LOSS).breakdown_gib["logits"]
    assert big / small == pytest.approx(152064 / 32000, rel=0.01)
    assert big == pytest.approx(4096 * 152064 * 16 / GIB, rel=0.01)
    # TRL's fused LM head never builds T x V: at 16K tokens it is a fraction of the HF path
    ours = estimate_peak(qwen, cfg(seq_len=16384)).breakdown_gib["logits"]
    hf = estimate_peak(qwen, cfg(seq_len=16384), stack=HF_LOSS).breakdown_gib["logits"]
    assert ours < hf / 10


def test_fsdp_divides_parameters_gradients_and_states():
    one = estimate_peak(L8, cfg(method="full", optimizer="adamw_torch_fused", full_precision="mixed"), 1).breakdown_gib
    four = estimate_peak(L8, cfg(method="full", optimizer="adamw_torch_fused", full_precision="mixed"), 4)
    assert four.sharding == "fsdp"  # the default on several GPUs
    b = four.breakdown_gib
    assert b["gradients"] == pytest.approx(one["gradients"] / 4, rel=0.01)
    assert b["optimizer"] == pytest.approx(one["optimizer"] / 4, rel=0.01)
    # weights: a quarter of the fp32 shards plus gathered bf16 layers and the root unit, no autocast copies
    assert 8.03e9 * 4 / 4 / GIB < b["weights"] < one["weights"] / 2
    assert estimate_memory(L8, cfg(method="full"), 8).per_gpu_gib < estimate_memory(L8, cfg(method="full"), 4).per_gpu_gib
    ddp = estimate_peak(L8, cfg(method="lora"), 4, "ddp").breakdown_gib
    assert ddp["weights"] == pytest.approx(estimate_peak(L8, cfg(method="lora"), 1).breakdown_gib["weights"])


def test_qlora_base_is_not_sharded_by_zero3_but_is_by_fsdp():
    single = estimate_peak(L70, cfg(), 1).breakdown_gib["weights"]
    zero3 = estimate_peak(L70, cfg(), 4, "zero3")
    fsdp = estimate_peak(L70, cfg(), 4, "fsdp")
    assert zero3.breakdown_gib["weights"] == pytest.approx(single)
    assert any("ZeRO-3 does not shard" in n for n in zero3.notes)
    assert single / 4 < fsdp.breakdown_gib["weights"] < single / 2  # a quarter + gathered units
    assert any("quant_storage" in n for n in fsdp.notes)
    assert zero3.breakdown_gib["optimizer"] == pytest.approx(
        estimate_peak(L70, cfg(), 1).breakdown_gib["optimizer"] / 4, rel=0.01)


def test_70b_qlora_needs_more_than_one_48gb_card_and_fits_two_80gb():
    one = estimate_memory(L70, cfg(), 1).per_gpu_gib
    assert 44 < one < 80
    assert estimate_memory(L70, cfg(), 2).per_gpu_gib < 40


def test_moe_counts_every_expert():
    mix = resolve_model("8x7b")
    w = estimate_peak(mix, cfg(method="lora"), stack=BF16_BASE).breakdown_gib["weights"]
    assert w * GIB == pytest.approx(46.7e9 * 2, rel=0.01)


@pytest.mark.parametrize(
    "kw,gpus,sharding,match",
    [
        (dict(quant_bits=16), 1, None, "qlora needs --quant-bits 4 or 8, got 16"),
        (dict(method="lora", quant_bits=4), 1, None, "--quant-bits 4 needs --method qlora"),
        (dict(lora_rank=0), 1, None, "--lora-rank must be >= 1, got 0"),
        (dict(seq_len=0), 1, None, "--seq-len must be >= 1, got 0"),
        (dict(micro_batch=0), 1, None, "--batch-size must be >= 1, got 0"),
        ({}, 0, None, "--gpus must be >= 1, got 0"),
        ({}, 2, "tp", "unknown sharding 'tp'"),
        ({}, 2, "none", "sharding 'none' means one GPU"),
    ],
)
def test_bad_input_is_a_user_error(kw, gpus, sharding, match):
    with pytest.raises(UserError, match=match):
        estimate_memory(L8, cfg(**kw), gpus, sharding)


def test_fast_and_import_light():
    c = cfg()
    t0 = time.perf_counter()
    for _ in range(2000):
        estimate_memory(L70, c, 2)
    assert (time.perf_counter() - t0) / 2000 < 0.001
    code = ("import sys, cloudtune.planner.memory, cloudtune.planner.models as m; m.resolve_model('70b'); "
            "bad = [x for x in ('torch', 'httpx', 'transformers', 'pandas') if x in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_moe_qlora_budgets_the_fused_experts_in_bf16_not_4bit():
    """bitsandbytes quantizes nn.Linear only; transformers' fused MoE experts stay bf16 (issue #13,
    measured on a tiny Qwen3-MoE: 33% of block weights quantized), so the planner must not budget 4-bit."""
    from cloudtune.planner.memory import estimate_memory
    from cloudtune.planner.models import resolve_model
    from cloudtune.planner.types import TrainConfig

    arch = resolve_model("8x7b")
    est = estimate_memory(arch, TrainConfig(method="qlora", quant_bits=4), gpus=1)
    experts = arch.layers * 3 * arch.hidden * arch.intermediate * arch.num_experts
    assert est.breakdown_gib["weights"] * 2**30 >= experts * 2  # at least the experts at 2 B/param
    assert any("MoE QLoRA" in n for n in est.notes)


def test_kbit_recast_keeps_embeddings_bf16_in_training_but_fp32_at_load():
    """qlora.py / TRL <= 0.12 peft_module_casting_to_bf16: after prepare_model_for_kbit_training the
    embeddings and lm_head go back to bf16, so training holds 2 B less per embedding parameter than our
    trainer (which leaves them fp32); the fp32 copies existed at load time, and the fit test keeps that."""
    recast = with_stack(TRAINER_STACK, kbit_recast_bf16=True)
    ours = estimate_peak(L8, cfg(), stack=TRAINER_STACK)
    back = estimate_peak(L8, cfg(), stack=recast)
    p_embed = 2 * L8.vocab * L8.hidden
    assert ours.breakdown_gib["weights"] - back.breakdown_gib["weights"] == pytest.approx(2 * p_embed / GIB, abs=0.01)
    assert any("back to bf16" in n for n in back.notes)
    assert ours.fit_gib > back.fit_gib
    # a tiny step on a 70B: the load-time peak (NF4 base + fp32 embeddings + one bf16 linear) decides
    tiny = cfg(seq_len=16, optimizer="paged_adamw_32bit")
    peak = estimate_peak(L70, tiny, stack=recast)
    nf4 = L70.layers * (2 * L70.hidden * L70.heads * L70.head_dim + 2 * L70.hidden * L70.kv_heads * L70.head_dim
                        + 3 * L70.hidden * L70.intermediate) * (0.5 + 1 / 64 + 4 / (64 * 256))
    load = nf4 + 4 * 2 * L70.vocab * L70.hidden + 2 * L70.hidden * L70.intermediate
    assert peak.fit_gib >= load / GIB


def test_fit_test_is_the_card_and_the_slack_shrinks_as_the_card_fills():
    """`fits`: the pressed footprint within the card (context already counted), not 92% of it; on a card
    between the pressed and the unpressed peak, nvidia-smi reads about the card (`peak_on_card`)."""
    from cloudtune.planner.memory import fits, peak_on_card

    est = estimate_memory(L8, cfg(seq_len=8192, micro_batch=2, length_spread=1.0))
    assert est.per_gpu_gib > est.fit_gib
    assert fits(est, est.fit_gib) and fits(est, est.fit_gib + 0.01)
    assert not fits(est, est.fit_gib - 0.01)
    between = (est.fit_gib + est.per_gpu_gib) / 2
    assert peak_on_card(est, between) == pytest.approx(between)
    assert peak_on_card(est, est.per_gpu_gib + 10) == pytest.approx(est.per_gpu_gib)
    assert peak_on_card(est, est.fit_gib - 1) == pytest.approx(est.fit_gib)
