"""The memory estimator against published measurements (tests/data/vram_calibration.csv).

The rows are the Hugging Face-based peaks of /work/shared/models/vram_measured.csv that the
estimator can express (docs/planner-memory.md lists the rows left out and why). Each row names the
stack that ran it; a stack differs from our trainer only in library code paths (how logits and the
loss are computed, adapter dtypes, whether prepare_model_for_kbit_training upcast the non-quantized
weights), never in a per-row factor. Each row also names the counter it was measured with, and the
estimate is read in that counter: torch allocated, torch reserved, or nvidia-smi (reserved + CUDA
context).

Run with -s to see the per-row table.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from cloudtune.planner.memory import TRAINER_STACK, Stack, estimate_peak, with_stack
from cloudtune.planner.models import count_params, resolve_model
from cloudtune.planner.types import ModelArch, TrainConfig

DATA = Path(__file__).parent / "data"
GIB = float(1 << 30)

# The stacks the published rows ran on, as code paths (see docs/planner-memory.md, "Stacks").
STACKS: dict[str, Stack] = {
    # transformers <= 4.47 Llama (logits.float() then cross-entropy), TRL <= 0.12 SFTTrainer calling
    # peft.prepare_model_for_kbit_training (non-4-bit params to fp32), PEFT fp32 adapters.
    # Unsloth's HF baseline and the Liger examples set lora_dropout=0.
    "hf_legacy": with_stack(TRAINER_STACK, name="hf_legacy", logits="fp32", kbit_upcast=True,
                            lora_adapter_bytes=4, qlora_adapter_bytes=4, lora_dropout=False,
                            full_weight_bytes=2),  # the Liger HF example loads bf16 weights
    # LLaMA-Factory (spring 2024): same HF loss path; its own model prep casts trainable params to
    # fp32 but does not call prepare_model_for_kbit_training (embeddings stay bf16).
    # Its lora_dropout defaults to 0.
    "llamafactory": with_stack(TRAINER_STACK, name="llamafactory", logits="fp32", kbit_upcast=False,
                               lora_adapter_bytes=4, qlora_adapter_bytes=4, lora_dropout=False,
                               full_weight_bytes=2),
    # Answer.AI fsdp_qlora train.py: HF Llama loss path; FSDP needs one dtype per flat parameter, so
    # adapters live in bf16 next to the bf16 (or bf16-stored 4-bit) base. lora_dropout 0.1.
    "answerai": with_stack(TRAINER_STACK, name="answerai", logits="fp32", kbit_upcast=False,
                           lora_adapter_bytes=2, qlora_adapter_bytes=2, lora_dropout=True, full_weight_bytes=2),
    # Qwen-1 remote code: cross-entropy on bf16 logits (no upcast); PEFT of 2023 made fp32 adapters;
    # finetune.py's lora_dropout 0.05.
    "qwen1": with_stack(TRAINER_STACK, name="qwen1", logits="bf16", kbit_upcast=False,
                        lora_adapter_bytes=4, qlora_adapter_bytes=4, lora_dropout=True, full_weight_bytes=2),
}


def _calibration_archs() -> dict[str, ModelArch]:
    archs = {}
    with (DATA / "vram_calibration_archs.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            archs[r["model_id"]] = ModelArch(
                id=r["model_id"], params_b=float(r["params_b"]), layers=int(r["layers"]), hidden=int(r["hidden"]),
                intermediate=int(r["intermediate"]), heads=int(r["heads"]), kv_heads=int(r["kv_heads"]),
                head_dim=int(r["head_dim"]), vocab=int(r["vocab"]), tied_embeddings=r["tied_embeddings"] == "true",
                qkv_bias=r["qkv_bias"] == "true", source="calibration",
            )
    return archs


def _rows() -> list[dict[str, str]]:
    with (DATA / "vram_calibration.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _predict(row: dict[str, str], archs: dict[str, ModelArch]) -> float:
    """The estimate in the row's counter and unit."""
    arch = archs.get(row["model"]) or resolve_model(row["model"], allow_network=False)
    cfg = TrainConfig(
        method=row["method"],  # type: ignore[arg-type]
        quant_bits=int(row["quant_bits"]),
        seq_len=int(row["seq_len"]),
        micro_batch=int(row["micro_batch"]),
        lora_rank=int(row["lora_rank"] or 16),
        lora_targets=row["lora_targets"] or "all-linear",
        gradient_checkpointing=row["grad_ckpt"] == "true",
        optimizer=row["optimizer"],
        attention=row["attention"],
    )
    peak = estimate_peak(arch, cfg, int(row["gpus"]), row["sharding"], stack=STACKS[row["stack"]])
    gib = {"allocated": peak.allocated_gib, "reserved": peak.reserved_gib, "smi": peak.smi_gib}[row["metric"]]
    return gib if row["unit"] == "GiB" else gib * GIB / 1e9


def calibration_table() -> tuple[list[tuple[str, float, float, float]], list[tuple[str, float, float]]]:
    """([(id, measured, predicted, relative error)], [(id, card GiB, predicted GiB) for OOM rows])."""
    archs = _calibration_archs()
    fits, ooms = [], []
    for row in _rows():
        pred = _predict(row, archs)
        if row["kind"] == "oom":
            ooms.append((row["id"], float(row["card_gib"]), pred))
        else:
            meas = float(row["measured"])
            fits.append((row["id"], meas, pred, (pred - meas) / meas))
    return fits, ooms


def format_table() -> str:
    fits, ooms = calibration_table()
    lines = ["| row | measured | predicted | error |", "|---|---:|---:|---:|"]
    lines += [f"| {i} | {m:.2f} | {p:.2f} | {e:+.1%} |" for i, m, p, e in fits]
    med = statistics.median(abs(e) for *_, e in fits)
    lines.append(f"\nmedian absolute relative error: {med:.1%} over {len(fits)} rows")
    lines += ["", "| OOM row | card (GiB) | predicted | |", "|---|---:|---:|---|"]
    lines += [f"| {i} | {c:.0f} | {p:.2f} | {'exceeds the card' if p > c else 'FITS (wrong)'} |"
              for i, c, p in ooms]
    return "\n".join(lines)


def test_calibration_archs_match_their_published_sizes():
    for arch in _calibration_archs().values():
        dims = {k: getattr(arch, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads",
                                               "head_dim", "vocab", "tied_embeddings", "qkv_bias")}
        assert count_params(**dims) / 1e9 == pytest.approx(arch.params_b, rel=0.01), arch.id


def test_median_error_within_15_percent():
    fits, _ = calibration_table()
    print("\n" + format_table())
    assert len(fits) >= 25
    errors = [abs(e) for *_, e in fits]
    assert statistics.median(errors) <= 0.15
    # no single row may be wildly off either: that would mean a missing term, not noise
    assert max(errors) <= 0.40, max(fits, key=lambda r: abs(r[3]))


def test_no_configuration_that_ran_out_of_memory_is_predicted_to_fit():
    _, ooms = calibration_table()
    assert ooms
    for row_id, card, pred in ooms:
        assert pred > card, f"{row_id}: predicted {pred:.1f} GiB fits a {card:.0f} GiB card that ran out of memory"


def test_capacity_rows_do_not_overflow_their_card_by_much():
    """A context that really fitted must not be predicted far above the card (the planner would then
    refuse a configuration people run)."""
    fits, _ = calibration_table()
    by_id = {r["id"]: r for r in _rows()}
    for row_id, _meas, pred, _ in fits:
        if by_id[row_id]["kind"] == "capacity":
            assert pred <= float(by_id[row_id]["card_gib"]) * 1.15, (row_id, pred)


if __name__ == "__main__":
    print(format_table())
