"""The planner against published measurements: the rows, the stacks that ran them, and the comparison.

Why a module (not test code): the calibration test (tests/test_calibration.py) and the accuracy
benchmark (bench/planner_accuracy.py) must read the same rows the same way; a second copy would
drift. The rows live in tests/data/ (vram_calibration.csv, vram_calibration_archs.csv,
throughput_measured.csv), each with its source; docs/planner-memory.md lists the published rows
left out and why.

Each memory row names the stack that ran it. A stack differs from our trainer only in library code
paths (loss path, adapter dtypes, k-bit upcast, full fine-tune weight dtype, LoRA dropout), never in
a per-row factor. Each row also names the counter it was measured with (torch allocated, torch
reserved, nvidia-smi) and the estimate is read in that counter.

`split` says how a row may be used: `tune` rows set the global constants (memory.py, throughput.py);
`holdout` rows were not looked at while choosing them and report the honest error.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from cloudtune.planner.memory import TRAINER_STACK, Stack, estimate_peak, with_stack
from cloudtune.planner.types import ModelArch, TrainConfig

GIB = float(1 << 30)
# The planner's comfort fraction (plan.py SAFETY_FRACTION), repeated so this module does not import
# plan.py (catalog, providers): an offer whose pressed footprint is above it is offered as a tight fit.
SAFETY_FRACTION = 0.92

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
    # finetune.py's lora_dropout 0.05. Its full fine-tune loads the model without a dtype (fp32
    # master weights) under the Trainer's bf16 autocast: "mixed".
    "qwen1": with_stack(TRAINER_STACK, name="qwen1", logits="bf16", kbit_upcast=False,
                        lora_adapter_bytes=4, qlora_adapter_bytes=4, lora_dropout=True, full_weight_bytes=4),
    # artidoro/qlora qlora.py (the QLoRA paper's code, 2023): prepare_model_for_kbit_training, then
    # get_accelerate_model casts the LoRA layers to bf16, the norms to fp32 and embed_tokens/lm_head back
    # to bf16 (--bf16); paged_adamw_32bit; the Guanaco scripts set lora_dropout 0.05.
    "qlora_paper": with_stack(TRAINER_STACK, name="qlora_paper", logits="fp32", kbit_upcast=True,
                              kbit_recast_bf16=True, lora_adapter_bytes=2, qlora_adapter_bytes=2,
                              lora_dropout=True, full_weight_bytes=2),
    # torchtune (2024-09 and later recipes): everything bf16 (weights, adapters, AdamW states), chunked
    # cross-entropy (CEWithChunkedOutputLoss: 8 chunks upcast one at a time, ~TRL's chunked path),
    # torchao NF4 on the LoRA linears only, embeddings/output in bf16, lora_dropout 0.0.
    "torchtune": with_stack(TRAINER_STACK, name="torchtune", logits="chunked", kbit_upcast=False,
                            lora_adapter_bytes=2, qlora_adapter_bytes=2, lora_dropout=False, full_weight_bytes=2,
                            head_grad_fp32=False),
}


@dataclass
class MemoryResult:
    id: str
    source: str  # the id prefix: QW, LF, AAI, LIG, US, TT, ...
    method: str
    kind: str  # measured | capacity | oom
    split: str  # tune | holdout
    stack: str
    measured: float | None
    predicted: float  # in the row's counter and unit
    card_gib: float | None
    fit_gib: float  # the planner's pressed footprint (nvidia-smi GiB)
    offered: bool | None  # the planner's fit test on the row's card (None: no card known)
    tight: bool | None = None  # offered above the comfort fraction: ranked after comfortable fits

    @property
    def error(self) -> float | None:
        return None if self.measured is None else (self.predicted - self.measured) / self.measured


def load_archs(data: Path) -> dict[str, ModelArch]:
    archs = {}
    with (data / "vram_calibration_archs.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            archs[r["model_id"]] = ModelArch(
                id=r["model_id"], params_b=float(r["params_b"]), layers=int(r["layers"]), hidden=int(r["hidden"]),
                intermediate=int(r["intermediate"]), heads=int(r["heads"]), kv_heads=int(r["kv_heads"]),
                head_dim=int(r["head_dim"]), vocab=int(r["vocab"]), tied_embeddings=r["tied_embeddings"] == "true",
                qkv_bias=r["qkv_bias"] == "true", source="calibration",
            )
    return archs


def load_rows(data: Path) -> list[dict[str, str]]:
    with (data / "vram_calibration.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def row_config(row: dict[str, str]) -> TrainConfig:
    spread = row.get("length_spread") or ""
    return TrainConfig(
        method=row["method"],  # type: ignore[arg-type]
        quant_bits=int(row["quant_bits"]),
        seq_len=int(row["seq_len"]),
        micro_batch=int(row["micro_batch"]),
        lora_rank=int(row["lora_rank"] or 16),
        lora_targets=row["lora_targets"] or "all-linear",
        gradient_checkpointing=row["grad_ckpt"] == "true",
        optimizer=row["optimizer"],
        attention=row["attention"],
        offload=row.get("offload") == "true",
        length_spread=float(spread) if spread else 0.0,
    )


def evaluate_memory(data: Path) -> list[MemoryResult]:
    """Every memory row, predicted in its own counter, with the planner's fit test on its card."""
    from cloudtune.planner.models import resolve_model

    archs = load_archs(data)
    out = []
    for row in load_rows(data):
        arch = archs.get(row["model"]) or resolve_model(row["model"], allow_network=False)
        peak = estimate_peak(arch, row_config(row), int(row["gpus"]), row["sharding"], stack=STACKS[row["stack"]])
        gib = {"allocated": peak.allocated_gib, "reserved": peak.reserved_gib, "smi": peak.smi_gib}[row["metric"]]
        pred = gib if row["unit"] == "GiB" else gib * GIB / 1e9
        card = float(row["card_gib"]) if row.get("card_gib") else None
        out.append(MemoryResult(
            id=row["id"], source=row["id"].split("-")[0], method=row["method"], kind=row["kind"],
            split=row.get("split") or "tune", stack=row["stack"],
            measured=float(row["measured"]) if row["measured"] else None, predicted=pred, card_gib=card,
            fit_gib=peak.fit_gib, offered=None if card is None else peak.fit_gib <= card,
            tight=None if card is None else card * SAFETY_FRACTION < peak.fit_gib <= card,
        ))
    return out


def median_abs(values: list[float]) -> float:
    return statistics.median(abs(v) for v in values) if values else float("nan")


# ---------------------------------------------------------------- throughput


@dataclass
class ThroughputResult:
    id: str
    source: str
    method: str
    gpu: str
    gpus: int
    nodes: int
    tokens_per_micro_step: int
    ratio: float  # predicted / measured tokens/s
    split: str = "tune"  # tune | holdout
    group: str = "single-gpu"  # single-gpu | multi-gpu-nvlink | multi-gpu-pcie | multi-node
    interconnect: str = ""  # the row's published fabric, as planner/interconnect.py reads it


def evaluate_throughput(data: Path) -> list[ThroughputResult]:
    from cloudtune.catalog import gpu_specs
    from cloudtune.planner import throughput as tp

    specs = gpu_specs()
    out = []
    with (data / "throughput_measured.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            arch = ModelArch(id=r["model"], params_b=float(r["params_b"]), layers=int(r["layers"]),
                             hidden=int(r["hidden"]), intermediate=int(r["intermediate"]), heads=int(r["heads"]),
                             kv_heads=int(r["kv_heads"]), head_dim=int(r["head_dim"]), vocab=int(r["vocab"]),
                             tied_embeddings=r["tied"] == "true")
            seq, gpus = int(r["seq_len"]), int(r["gpus"])
            cfg = TrainConfig(method=r["method"], quant_bits=int(r["quant_bits"]), seq_len=seq,  # type: ignore[arg-type]
                              micro_batch=int(r["micro_batch"]), grad_accum=int(r["grad_accum"]),
                              gradient_checkpointing=True)
            est = tp.estimate_time(arch, cfg, tp.Workload(4096 * gpus, seq), specs[r["gpu"]], gpus=gpus,
                                   nodes=int(r["nodes"]), sharding=r["sharding"],
                                   interconnect=r.get("interconnect") or None)
            link = (r.get("interconnect") or "").lower()
            group = ("single-gpu" if gpus == 1 else "multi-node" if int(r["nodes"]) > 1
                     else "multi-gpu-nvlink" if link.startswith(("nvswitch", "nvlink")) else "multi-gpu-pcie")
            out.append(ThroughputResult(
                id=r["id"], source=r["id"].split("-")[0], method=r["method"], gpu=r["gpu"], gpus=gpus,
                nodes=int(r["nodes"]), tokens_per_micro_step=seq * int(r["micro_batch"]),
                ratio=est.tokens_per_sec / float(r["tokens_per_sec_total"]),
                split=r.get("split") or "tune", group=group, interconnect=r.get("interconnect") or "",
            ))
    return out
