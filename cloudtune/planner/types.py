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

    @classmethod
    def from_spec(cls, spec: Any) -> TrainConfig:
        targets = spec.lora.targets
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
            gpus=spec.resources.gpus,
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
    sharding: str = "none"  # none | ddp | fsdp | zero3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
