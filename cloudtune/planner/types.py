"""The planner's data types, shared by the model registry, the memory estimator, the time/cost
model and the ranking. Plain dataclasses: the planner must import in milliseconds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Method = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only transformer, as far as memory and FLOPs care."""

    id: str
    params_b: float  # total parameters in billions, all experts counted for MoE
    layers: int
    hidden: int
    intermediate: int  # per expert for MoE
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_pos: int = 4096
    num_experts: int = 1  # MoE: experts per layer (memory counts all)
    experts_per_token: int = 1  # MoE: active experts (FLOPs count these)
    qkv_bias: bool = False
    source: str = ""  # registry, shorthand, config.json path, or hub


@dataclass(frozen=True)
class TrainConfig:
    """What the estimator needs from a job: the planner flags, or a JobSpec through `from_spec`."""

    method: Method = "lora"
    quant_bits: int = 16  # 4 or 8 for qlora, 16 otherwise
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    lora_rank: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    gradient_checkpointing: bool = True
    optimizer: str = "adamw_torch"
    attention: str = "sdpa"
    gpus: int | None = None  # None: let the planner choose 1, 2, 4, 8 ...
    # full fine-tune weights: "bf16" (pure bf16, the trainer's default where the GPU has bf16) or
    # "mixed" (fp32 master weights under bf16 autocast); see cloudtune/trainer/train.py full_weight_dtype
    full_precision: str = "bf16"
    sharding: str | None = None  # None: the trainer's default (none on 1 GPU, fsdp on several)
    offload: bool = False  # FSDP/ZeRO CPU offload of parameters, gradients and optimizer states
    packing: bool = False  # data.packing: every row is seq_len tokens, no padding spread
    # How much micro-batch shapes vary (0: packed or fixed-length rows; 1: lengths spread over the whole
    # range up to seq_len). None: 0 with packing, else memory.DEFAULT_LENGTH_SPREAD.
    length_spread: float | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> TrainConfig:
        targets = spec.lora.targets
        res = spec.resources
        return cls(
            method=spec.method,
            quant_bits=spec.quant_bits or 16,
            seq_len=spec.data.max_seq_len,
            micro_batch=spec.training.micro_batch,
            grad_accum=spec.training.grad_accum,
            lora_rank=spec.lora.rank,
            lora_targets=targets if isinstance(targets, str) else tuple(targets),
            gradient_checkpointing=spec.training.gradient_checkpointing,
            optimizer=spec.training.optimizer,
            attention=spec.training.attention,
            gpus=res.gpus,
            full_precision=getattr(spec.training, "full_precision", "bf16"),
            # resources.sharding/offload belong to the multi-GPU launcher's spec (task #11); read when present
            sharding=getattr(res, "sharding", None),
            offload=bool(getattr(res, "offload", False)),
            packing=bool(spec.data.packing),
        )


BREAKDOWN_KEYS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits", "overhead")


@dataclass
class MemoryEstimate:
    """Predicted peak device memory on each GPU, as nvidia-smi would show it (GiB, 2^30 bytes):
    torch's peak reserved memory plus the CUDA context. `breakdown_gib` sums to `per_gpu_gib`."""

    per_gpu_gib: float
    gpus: int
    breakdown_gib: dict[str, float]
    trainable_params: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. "QLoRA base is not sharded by ZeRO-3"
    sharding: str = "none"  # none | ddp | fsdp | zero2 | zero3
    full_precision: str = ""  # full fine-tunes: "bf16" or "mixed", as sized; "" for LoRA/QLoRA
    # allocated x (1 + a minimal allocator slack) + CUDA context: what must fit the card, because torch
    # empties its cache and retries before raising OOM (planner/memory.py `fits`)
    fit_gib: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
