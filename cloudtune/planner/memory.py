"""Peak GPU memory of a fine-tuning job, per GPU, with its breakdown.

Why arithmetic and not a trial run: the planner must size a job for every GPU of the catalog before
renting one, offline and in microseconds. Every term below is a tensor that really exists in OUR
trainer's stack (transformers + PEFT + TRL + bitsandbytes, see `TRAINER_STACK`), sized from the
model's shape; docs/planner-memory.md gives each formula with its source and the calibration
against published measurements (tests/test_calibration.py).

Only the standard library is imported: `estimate_memory` is called many times per `cloudtune plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cloudtune.errors import UserError
from cloudtune.planner.models import count_params
from cloudtune.planner.types import BREAKDOWN_KEYS, MemoryEstimate, ModelArch, TrainConfig

GIB = float(1 << 30)

# ---- global constants (the only tuned numbers; docs/planner-memory.md says where each comes from) ----
# HF's unfused loss path (transformers Llama-style forward: `logits.float()`, shift, cross-entropy) holds
# four fp32 tensors of T x V elements when backward starts: the upcast logits, the shifted copy, the
# log-softmax saved by cross-entropy and the gradient flowing back into it.
LOGITS_BYTES_FP32_PATH = 16.0
# The same four tensors when cross-entropy runs on bf16 logits (no upcast, e.g. Qwen-1's remote code).
LOGITS_BYTES_BF16_PATH = 8.0
# torch's caching allocator: peak reserved exceeds peak allocated (blocks freed by churning tensors stay
# cached and split; vram_notes.md: x1.10-1.25, Answer.AI 7B LoRA 8.3 -> 10.2 GiB). The slack is a
# function of the data's shapes (docs/planner-memory.md, "Allocator slack"):
# - every job: ALLOCATOR_FRACTION of what is allocated (same-shaped steps reuse their blocks);
# - unpacked, variable-length data: each micro-batch pads to a different length, so the activation and
#   logits blocks of earlier, differently sized steps stay cached next to the current ones; the extra is
#   ALLOCATOR_SPREAD_FRACTION x length_spread x the dynamic (activations + logits) part.
# - near a full card the allocator frees its cache and retries before it raises OOM, so what must fit
#   is only allocated x (1 + ALLOCATOR_MIN_FRACTION) (+ context): `fit_gib`, the planner's fit test.
ALLOCATOR_FRACTION = 0.10
ALLOCATOR_SPREAD_FRACTION = 0.60
ALLOCATOR_MIN_FRACTION = 0.03
# length_spread when the data is not known: unpacked chat/instruction data, lengths spread widely
DEFAULT_LENGTH_SPREAD = 0.5
# CUDA context + cuBLAS/cuDNN handles and workspaces: outside torch's counters, inside nvidia-smi's.
CUDA_CONTEXT_GIB = 0.8
# NCCL communicator buffers per process, multi-GPU only (outside torch's counters).
NCCL_GIB = 0.4
# TRL's fused LM head projects this many tokens x vocabulary columns at a time (trl/kernels/chunked_logprob.py).
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768

# bitsandbytes storage per quantized weight.
NF4_BYTES = 0.5 + 4 / 64  # 4 bits + one fp32 absmax per 64-value block (QLoRA paper, sec. 3)
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # double quant: 8-bit absmax + one fp32 per 256 blocks
INT8_BYTES = 1.0  # LLM.int8: int8 weights (+ one fp32 scale per output row, added per matrix below)


@dataclass(frozen=True)
class Stack:
    """How a training stack lays out its tensors. Differences between stacks are code paths, not fudge:
    each field names the library behaviour it models."""

    name: str
    # "chunked": TRL's fused LM head (never materializes T x V); "fp32": HF logits.float() + cross-entropy;
    # "bf16": cross-entropy on bf16 logits.
    logits: str = "chunked"
    # PEFT prepare_model_for_kbit_training casts every non-quantized param (embeddings, lm_head, norms) to fp32.
    kbit_upcast: bool = False
    # ... and the script then casts embeddings and lm_head back to bf16 (norms stay fp32): artidoro/qlora
    # qlora.py's get_accelerate_model and TRL <= 0.12 SFTTrainer's peft_module_casting_to_bf16 (given a
    # peft_config and bf16=True). The fp32 copies still exist at load time (the load-time peak below).
    kbit_recast_bf16: bool = False
    lora_adapter_bytes: int = 4  # PEFT autocast_adapter_dtype=True keeps LoRA A/B in fp32
    qlora_adapter_bytes: int = 2  # TRL's SFTTrainer casts adapters of a quantized model to bf16
    # full fine-tune weight bytes: 2 = pure bf16 (AdamW states follow the param dtype), 4 = fp32 master
    # weights under autocast; None = follow TrainConfig.full_precision (what our trainer does)
    full_weight_bytes: int | None = 2
    double_quant: bool = True  # bnb_4bit_use_double_quant
    lora_dropout: bool = True  # dropout > 0 saves a mask and a copy of each adapted layer's input
    # TRL's chunked LM head accumulates the lm_head weight gradient in fp32 across its chunks (a
    # T-independent V x h x 4 B buffer); torchtune's chunked loss lets autograd accumulate in bf16.
    head_grad_fp32: bool = True


# What cloudtune's trainer runs (cloudtune/trainer/train.py on transformers 5, PEFT 0.21, TRL 1.x):
# - QLoRA: NF4 + double quant with bf16 quant_storage, then peft.prepare_model_for_kbit_training
#   (embeddings, lm_head and norms to fp32); SFTTrainer casts the adapters of a quantized model to bf16.
# - LoRA: bf16 base; PEFT's autocast_adapter_dtype keeps the adapters in fp32.
# - full: training.full_precision "bf16" (default) loads bf16 weights, "mixed" fp32 master weights
#   under bf16 autocast (train.py full_weight_dtype).
# - TRL's SFTTrainer computes the loss with its fused, chunked LM head (no T x V logits).
# - lora_dropout 0.05 by default (spec.lora.dropout).
TRAINER_STACK = Stack(
    name="cloudtune trainer (transformers 5 + PEFT + TRL SFTTrainer + bitsandbytes)",
    logits="chunked",
    kbit_upcast=True,
    lora_adapter_bytes=4,
    qlora_adapter_bytes=2,
    full_weight_bytes=None,
    double_quant=True,
    lora_dropout=True,
)

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v", "o")
# Module names users pass (HF, torchtune, Qwen-1, GPT-2/Falcon/BLOOM/Phi-3 styles) -> the canonical
# linears they adapt. A tuple of several names is one fused linear (one LoRA pair over their outputs);
# a list is several separate linears that share the name (PEFT matches by suffix).
_ALIASES: dict[str, tuple[str, ...] | list[str]] = {
    **{n: (n,) for n in LINEARS},
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "query": ("q",), "key": ("k",), "value": ("v",), "out_proj": ("o",), "dense": ("o",),
    "wq": ("q",), "wk": ("k",), "wv": ("v",), "wo": ("o",),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "w1": ("gate",), "w3": ("up",), "w2": ("up",),  # Mixtral experts / Qwen-1 MLP: all hidden<->intermediate
    "c_attn": ("q", "k", "v"), "qkv_proj": ("q", "k", "v"), "query_key_value": ("q", "k", "v"), "wqkv": ("q", "k", "v"),
    "gate_up_proj": ("gate", "up"),
    "c_proj": ["o", "down"], "c_fc": ("up",), "fc1": ("up",), "fc2": ("down",),
    "dense_h_to_4h": ("up",), "dense_4h_to_h": ("down",),
    "lm_head": ("lm_head",), "output": ("lm_head",),
}


@dataclass
class PeakMemory:
    """The estimate in the three counters published measurements use (GiB, per GPU)."""

    allocated_gib: float  # torch.cuda.max_memory_allocated
    reserved_gib: float  # torch.cuda.max_memory_reserved
    smi_gib: float  # nvidia-smi: reserved + CUDA context (+ NCCL)
    breakdown_gib: dict[str, float]
    trainable_params: int
    sharding: str
    notes: list[str] = field(default_factory=list)
    fit_gib: float = 0.0  # allocated x (1 + ALLOCATOR_MIN_FRACTION) + context: what must fit the card
    full_precision: str = ""


def estimate_memory(
    arch: ModelArch,
    cfg: TrainConfig,
    gpus: int = 1,
    sharding: str | None = None,
    *,
    stack: Stack = TRAINER_STACK,
) -> MemoryEstimate:
    """Predicted peak memory per GPU (nvidia-smi view: torch's peak reserved + CUDA context), with
    a breakdown (GiB) that sums to it. `sharding` None picks our trainer's default: none on one
    GPU, FSDP FULL_SHARD on several."""
    peak = estimate_peak(arch, cfg, gpus, sharding, stack=stack)
    return MemoryEstimate(
        per_gpu_gib=round(sum(peak.breakdown_gib.values()), 3),
        gpus=gpus,
        breakdown_gib=peak.breakdown_gib,
        trainable_params=peak.trainable_params,
        notes=peak.notes,
        sharding=peak.sharding,
        full_precision=peak.full_precision,
        fit_gib=round(peak.fit_gib, 3),
    )


def fits(est: MemoryEstimate, usable_gib: float) -> bool:
    """The planner's fit test: the pressed footprint (`fit_gib`: what is allocated, a minimal allocator
    slack, the CUDA context and NCCL) within the card's usable memory (nvidia-smi total). Not a flat
    fraction of the card: near a full card torch empties its cache and retries before it raises OOM, so
    the unpressed peak may exceed the card and the job still runs; the context is already counted. How
    close to the card an offer is (the estimate's own error, a spike) is the ranking's business
    (plan.py: tight fits rank last), not a refusal (docs/planner-memory.md, "Fit test")."""
    return (est.fit_gib or est.per_gpu_gib) <= usable_gib


def peak_on_card(est: MemoryEstimate, usable_gib: float) -> float:
    """What nvidia-smi should read at the peak on a card of `usable_gib`: the unpressed peak where it fits,
    else the card itself (the allocator's cache is the part that shrinks as the card fills: it gives blocks
    back and retries rather than fail), never below the pressed footprint."""
    fit = est.fit_gib or est.per_gpu_gib
    return max(fit, min(est.per_gpu_gib, usable_gib))


def full_weight_bytes(cfg: TrainConfig, stack: Stack = None) -> int:  # type: ignore[assignment]
    """2 (pure bf16) or 4 (fp32 master weights) for a full fine-tune under `stack`."""
    stack = stack or TRAINER_STACK
    if stack.full_weight_bytes is not None:
        return stack.full_weight_bytes
    return 2 if (cfg.full_precision or "bf16") == "bf16" else 4


def _validate(cfg: TrainConfig, gpus: int, sharding: str | None) -> None:
    if cfg.method not in ("full", "lora", "qlora"):
        raise UserError(f"unknown method {cfg.method!r}; use full, lora or qlora")
    if cfg.method == "qlora" and cfg.quant_bits not in (4, 8):
        raise UserError(f"qlora needs --quant-bits 4 or 8, got {cfg.quant_bits}; use --method lora for 16-bit")
    if cfg.method != "qlora" and cfg.quant_bits not in (16, None):
        raise UserError(f"--quant-bits {cfg.quant_bits} needs --method qlora")
    if cfg.method != "full" and cfg.lora_rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {cfg.lora_rank}; typical values are 8, 16 or 64")
    if cfg.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {cfg.seq_len}; typical values are 512-8192")
    if cfg.micro_batch < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.micro_batch}")
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if sharding not in (None,) + SHARDINGS:
        raise UserError(f"unknown sharding {sharding!r}; use ddp, fsdp, zero2 or zero3")
    if sharding == "none" and gpus > 1:
        raise UserError(f"sharding 'none' means one GPU, got --gpus {gpus}; use ddp, fsdp, zero2 or zero3")
    if cfg.full_precision not in ("bf16", "mixed"):
        raise UserError(f"unknown full precision {cfg.full_precision!r}; use bf16 or mixed")
    if cfg.offload and sharding in ("none", "ddp") and gpus > 1:
        raise UserError(f"--offload needs --sharding fsdp, zero2 or zero3, got {sharding}")
    if cfg.length_spread is not None and not 0 <= cfg.length_spread <= 1:
        raise UserError(f"length spread must be within 0-1, got {cfg.length_spread:g}")


SHARDINGS = ("none", "ddp", "fsdp", "zero2", "zero3")


def _linear_shapes(arch: ModelArch) -> dict[str, tuple[int, int, int]]:
    """Canonical linear -> (d_in, d_out, copies per layer). MoE: one copy per expert."""
    h, q, kv, i = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    e = max(1, arch.num_experts)
    return {"q": (h, q, 1), "k": (h, kv, 1), "v": (h, kv, 1), "o": (q, h, 1),
            "gate": (h, i, e), "up": (h, i, e), "down": (i, h, e)}


def lora_groups(targets: str | tuple[str, ...] | list[str]) -> list[tuple[str, ...]]:
    """The LoRA-adapted linears for a target spec, each a tuple of canonical linears (fused if > 1).
    Raises UserError for a name we cannot map."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return [(n,) for n in LINEARS]
        if targets == "attention":
            return [(n,) for n in ATTENTION]
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    groups: list[tuple[str, ...]] = []
    for raw in targets:
        name = raw.strip().rsplit(".", 1)[-1].lower()
        alias = _ALIASES.get(name)
        if alias is None:
            raise UserError(
                f"unknown LoRA target module {raw!r}; use all-linear, attention, or names such as "
                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (also c_attn, qkv_proj, gate_up_proj, lm_head)"
            )
        new = [(a,) for a in alias] if isinstance(alias, list) else [alias]
        for g in new:
            if g not in groups:
                groups.append(g)
    if not groups:
        raise UserError("LoRA targets are empty; use all-linear, attention or q_proj,v_proj")
    return groups


def lora_params(arch: ModelArch, rank: int, targets: str | tuple[str, ...] | list[str]) -> int:
    """r x (d_in + d_out) per adapted linear (Hu et al. 2021), every layer and expert."""
    shapes = _linear_shapes(arch)
    total = 0
    for group in lora_groups(targets):
        if group == ("lm_head",):
            total += rank * (arch.hidden + arch.vocab)
            continue
        d_in = shapes[group[0]][0]
        d_out = sum(shapes[n][1] for n in group)
        total += arch.layers * shapes[group[0]][2] * rank * (d_in + d_out)
    return total


def _adapted_input_width(arch: ModelArch, groups: list[tuple[str, ...]]) -> int:
    """Sum of d_in over adapted linears of one layer (as many tokens' worth as pass each expert)."""
    shapes = _linear_shapes(arch)
    k = max(1, arch.experts_per_token) if arch.num_experts > 1 else 1
    width = 0
    for g in groups:
        if g == ("lm_head",):
            continue
        width += shapes[g[0]][0] * (k if g[0] in ("gate", "up", "down") else 1)
    return width


def default_sharding(cfg: TrainConfig, gpus: int) -> str:
    """One GPU: none. Several: FSDP FULL_SHARD for every method (QLoRA too: the 4-bit base is stored
    in bf16 quant_storage so FSDP can shard it, as FSDP-QLoRA does)."""
    return "none" if gpus <= 1 else "fsdp"


def estimate_peak(
    arch: ModelArch,
    cfg: TrainConfig,
    gpus: int = 1,
    sharding: str | None = None,
    *,
    stack: Stack = TRAINER_STACK,
) -> PeakMemory:
    """The full estimate, with the allocated/reserved/nvidia-smi views the calibration compares."""
    sharding = sharding or cfg.sharding
    _validate(cfg, gpus, sharding)
    mode = sharding or default_sharding(cfg, gpus)
    if gpus <= 1 and mode in ("ddp", "fsdp", "zero2", "zero3"):
        mode = "none" if not cfg.offload else mode  # one GPU: nothing to shard; offload still applies
    notes: list[str] = []
    n = gpus if mode in ("fsdp", "zero3") else 1
    n_states = gpus if mode in ("fsdp", "zero2", "zero3") else 1  # ZeRO-2 shards grads + optimizer only
    fwb = full_weight_bytes(cfg, stack)

    h, L, V = arch.hidden, arch.layers, arch.vocab
    a = arch.heads * arch.head_dim
    kv = arch.kv_heads * arch.head_dim
    i_ff = arch.intermediate
    shapes = _linear_shapes(arch)
    dims = dict(layers=L, hidden=h, intermediate=i_ff, heads=arch.heads, kv_heads=arch.kv_heads,
                head_dim=arch.head_dim, vocab=V, tied_embeddings=arch.tied_embeddings)
    p_total = count_params(**dims, num_experts=max(1, arch.num_experts), qkv_bias=arch.qkv_bias)
    p_linear = L * sum(di * do * c for di, do, c in shapes.values())
    p_embed = V * h * (1 if arch.tied_embeddings else 2)
    p_other = p_total - p_linear  # embeddings, lm_head, norms, biases: never quantized by bitsandbytes
    layer_params = p_linear // L + (p_total - p_linear - p_embed) // max(L, 1)

    # ---- weights (the frozen or trained base) ----
    if cfg.method == "qlora":
        # MoE: transformers keeps the routed experts as fused parameter tensors, not nn.Linear, and
        # bitsandbytes quantizes nn.Linear only, so the experts stay bf16 (measured on a tiny Qwen3-MoE:
        # 33% of block weights quantized; issue #13). Budget them at 2 B/param, not 4-bit.
        p_experts = (L * sum(di * do * c for k, (di, do, c) in shapes.items() if k in ("gate", "up", "down"))
                     if arch.num_experts > 1 else 0)
        if p_experts:
            notes.append(f"MoE QLoRA: {p_experts / 1e9:.2f}B routed-expert weights are fused tensors that "
                         f"bitsandbytes does not quantize: budgeted in bf16")
        p_linear -= p_experts
        if cfg.quant_bits == 4:
            qbytes = NF4_DQ_BYTES if stack.double_quant else NF4_BYTES
            notes.append(f"QLoRA 4-bit: nn.Linear layers in NF4 ({qbytes:.3f} B/param"
                         f"{' with double quant' if stack.double_quant else ''}); embeddings, lm_head and norms "
                         f"stay {_kbit_dtypes(stack)}")
            q_weight = p_linear * qbytes
        else:
            q_weight = p_linear * INT8_BYTES + L * sum(4 * do * c for _, do, c in shapes.values())
            notes.append("QLoRA 8-bit: nn.Linear layers in LLM.int8 (1 B/param + fp32 row scales)")
        # embeddings + lm_head and the rest (norms, biases): fp32 after k-bit prep, unless recast to bf16
        embed_bytes = 4 if stack.kbit_upcast and not stack.kbit_recast_bf16 else 2
        rest_bytes = 4 if stack.kbit_upcast else 2
        weights = q_weight + p_embed * embed_bytes + (p_other - p_embed) * rest_bytes + p_experts * 2
        # at load time the embeddings and lm_head are fp32 after k-bit prep (the recast comes later)
        recast_extra = p_embed * 2.0 if stack.kbit_upcast and stack.kbit_recast_bf16 else 0.0
        layer_weight = (q_weight + p_experts * 2) / L
        layer_unpacked = 2 * (p_linear + p_experts) / L
        root_unit = p_other * 2  # FSDP's mixed precision gathers the non-quantized params in bf16
    else:
        recast_extra = 0.0
        wbytes = fwb if cfg.method == "full" else 2
        weights = p_total * wbytes
        # FSDP's mixed precision gathers parameters in bf16 whatever their sharded dtype
        layer_weight = layer_params * 2
        layer_unpacked = layer_weight
        root_unit = p_embed * 2

    # ---- trainable parameters, gradients, optimizer ----
    if cfg.method == "full":
        n_train = p_total
        pbytes = fwb
        trainable = 0.0  # the trained weights are the `weights` term
        matrices = [(di, do, c * L) for di, do, c in shapes.values()]
        matrices += [(V, h, 1 if arch.tied_embeddings else 2)]
    else:
        groups = lora_groups(cfg.lora_targets)
        n_train = lora_params(arch, cfg.lora_rank, cfg.lora_targets)
        pbytes = stack.qlora_adapter_bytes if cfg.method == "qlora" else stack.lora_adapter_bytes
        trainable = n_train * pbytes
        r = cfg.lora_rank
        matrices = []
        for g in groups:
            if g == ("lm_head",):
                matrices += [(h, r, 1), (r, V, 1)]
                continue
            di, c = shapes[g[0]][0], shapes[g[0]][2] * L
            matrices += [(di, r, c), (r, sum(shapes[x][1] for x in g), c)]
    gradients = n_train * pbytes
    optimizer, step_temp = _optimizer_bytes(cfg.optimizer, n_train, pbytes, matrices, notes)
    precision_label = ""
    if cfg.method == "full":
        precision_label = "bf16" if fwb == 2 else "mixed"
        if fwb == 2:
            notes.append("full_precision bf16: pure bf16 weights and gradients; torch AdamW keeps its states in the "
                         "parameter dtype (bf16), 8-bit optimizers in 8 bits; no fp32 master copy (~8 B/param with "
                         "AdamW, ~6 with adamw_8bit)")

    # ---- activations (per GPU micro-batch) ----
    T = cfg.seq_len * cfg.micro_batch
    k_exp = max(1, arch.experts_per_token) if arch.num_experts > 1 else 1
    # bytes saved per token per layer (bf16 compute): fp32 RMSNorm inputs (2 x 4h) and bf16 outputs
    # (2 x 2h), q/k/v after RoPE, attention output (SDPA/flash keep it and o_proj keeps a copy), the
    # gated MLP's gate, up, act(gate) and product (4 x 2I per routed expert).
    per_layer = 12 * h + 6 * a + 4 * kv + 8 * i_ff * k_exp
    if cfg.method != "full":
        # PEFT's LoRA branch: dropout > 0 saves a bool mask and the dropped copy of each adapted layer's
        # input (3 B per input element); without dropout an fp32 adapter still saves a bf16 cast (2 B)
        adapter_bytes = stack.qlora_adapter_bytes if cfg.method == "qlora" else stack.lora_adapter_bytes
        per_in = 3 if stack.lora_dropout else (2 if adapter_bytes == 4 else 0)
        per_layer += per_in * _adapted_input_width(arch, lora_groups(cfg.lora_targets))
    attention = (cfg.attention or "sdpa").lower()
    if attention == "eager":
        # softmax output in fp32 (saved) + its bf16 copy for the value matmul: 6 B x heads x s^2 per sequence
        per_layer += 6 * arch.heads * cfg.seq_len
        notes.append("eager attention stores heads x seq^2 scores per layer; sdpa/flash avoid it")
    # backward of one layer: its saved tensors plus the gradients in flight (bf16 grads of the MLP's
    # gate/up/product and of the layer's input and output)
    working = per_layer + 6 * i_ff * k_exp + 4 * h
    if cfg.gradient_checkpointing:
        saved = 2 * h * L  # one bf16 layer input kept per layer; each layer is recomputed in backward
    else:
        saved = per_layer * L
    saved += 2 * h + 6 * h  # embedding output, final norm (fp32 input + bf16 output)

    # ---- logits and cross-entropy ----
    if stack.logits == "chunked":
        logits = (min(T, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE) * 2  # bf16 projection tile
                  + T * h * (2 + 4) + T * 8 * 4)  # hidden copy, fp32 grad of hidden, per-token fp32 stats
        if cfg.method == "full" and fwb != 4 and stack.head_grad_fp32:
            logits += V * h * 4  # fp32 gradient of the lm_head weight (with fp32 weights it *is* the .grad)
        if cfg.method == "qlora" and stack.kbit_upcast and not stack.kbit_recast_bf16:
            # prepare_model_for_kbit_training leaves lm_head in fp32: the projection tile is fp32 too
            logits += min(T, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE) * 2
    else:
        per_elem = LOGITS_BYTES_FP32_PATH if stack.logits == "fp32" else LOGITS_BYTES_BF16_PATH
        logits = T * V * per_elem

    # ---- multi-GPU ----
    gathered = 0.0
    weight_share = 1.0  # the fraction of the base each GPU holds
    if mode == "zero2" and n_states > 1:
        trainable /= n_states
        gradients /= n_states
        optimizer /= n_states
        step_temp /= n_states
        if cfg.method == "full":
            gathered += 2 * layer_params * pbytes  # gradient buckets before reduce-scatter
        notes.append(f"ZeRO-2 over {n_states} GPUs: every GPU holds the whole model; gradients and optimizer "
                     f"states divided by {n_states}")
    if n > 1:
        shard_base = True
        if mode == "zero3" and cfg.method == "qlora":
            shard_base = False
            notes.append("ZeRO-3 does not shard the frozen bitsandbytes base: each GPU holds the full quantized "
                         "model; only adapters, gradients and optimizer states are partitioned")
        if mode == "fsdp" and cfg.method == "qlora":
            notes.append("FSDP-QLoRA: the 4-bit base is stored in bf16 quant_storage so FSDP shards it like any "
                         "other parameter")
        if shard_base:
            weights /= n
            weight_share = 1.0 / n
            # the root unit (embeddings, lm_head) and two decoder layers (current + prefetch) are gathered
            gathered = root_unit * (n - 1) / n + 2 * (layer_weight if cfg.method == "qlora" else layer_unpacked)
        else:
            gathered = 0.0
        trainable /= n
        gradients /= n
        optimizer /= n
        step_temp /= n
        if cfg.method == "full":
            gathered += 2 * layer_params * pbytes  # unsharded gradients of a layer before reduce-scatter
        notes.append(f"{mode.upper()} over {n} GPUs: parameters, gradients and optimizer states divided by {n}, "
                     "plus gathered layers")
    elif gpus > 1 and mode == "ddp":
        gradients *= 2  # DDP's gradient buckets hold a second copy (gradient_as_bucket_view=False)
        notes.append(f"DDP over {gpus} GPUs: every GPU holds a full copy of the model and its states")
    if cfg.offload:
        # FSDP/ZeRO CPU offload: the optimizer step runs on the CPU, where gradients and states live; with
        # FSDP/ZeRO-3 the parameter shards live there too and only gathered layers are on the GPU.
        if mode in ("fsdp", "zero3"):
            weights = 0.0 if cfg.method != "qlora" or mode == "fsdp" else weights
        optimizer, step_temp = 0.0, 0.0
        trainable = 0.0 if mode in ("fsdp", "zero3") else trainable
        gradients = 2 * layer_params * pbytes if cfg.method == "full" else 0.0  # a layer's grads in flight
        notes.append("CPU offload: optimizer states and gradients (and with FSDP/ZeRO-3 the parameter shards) in "
                     "host RAM; the GPU holds gathered layers and activations. Plan host RAM for them")
    weights += gathered
    if cfg.method == "full" and fwb == 4 and n == 1 and not cfg.offload:
        # autocast caches a bf16 copy of every fp32 weight it casts during forward (FSDP's mixed precision
        # gathers bf16 layers instead, counted above)
        weights += 2 * p_total
        notes.append("full_precision mixed: fp32 master weights: 4 B weights + 2 B autocast bf16 copies + 4 B "
                     "gradients + 8 B AdamW states per parameter (about 18 B/param)")
    elif cfg.method == "full" and fwb == 4:
        notes.append("full_precision mixed: fp32 master weights, gradients and AdamW states (16 B/param before "
                     "sharding)")

    # QLoRA dequantizes one weight matrix to bf16 at a time (forward and backward)
    dequant = 0.0
    if cfg.method == "qlora":
        dequant = 2 * max(di * do for di, do, _ in shapes.values())

    # The activation peak: all saved tensors, plus the larger of the loss (at the end of forward, before
    # any layer is recomputed) and one layer's backward (after the logits are freed).
    # `activations` holds the saved tensors and whatever part of the layer backward exceeds the loss peak.
    activations = T * saved + max(0.0, T * working - logits)
    dynamic = activations + logits
    # optimizer.step(): activations are gone, AdamW's foreach temporaries exist. The peak is the larger.
    optimizer += max(0.0, step_temp - dynamic)

    allocated = weights + trainable + gradients + optimizer + dynamic + dequant
    spread = length_spread(cfg)
    reserved = allocated * (1 + ALLOCATOR_FRACTION) + dynamic * ALLOCATOR_SPREAD_FRACTION * spread
    load_allocated = 0.0
    # Load time (QLoRA): bitsandbytes quantizes each bf16 weight as it reaches the GPU (one linear in bf16
    # next to the already-quantized ones), then prepare_model_for_kbit_training casts each non-quantized
    # tensor to fp32 while its bf16 original still exists. The blocks stay cached, so the reserved peak
    # is at least this.
    if cfg.method == "qlora":
        biggest_linear = max(di * do for di, do, _ in shapes.values())
        biggest_other = V * h
        load = (weights + recast_extra * weight_share
                + 2 * biggest_linear + (2 * biggest_other if stack.kbit_upcast else 0.0))
        load_allocated = load
        if load * (1 + ALLOCATOR_FRACTION) > reserved:
            notes.append("QLoRA load-time peak (quantize-at-load, fp32 upcast) exceeds the training peak")
            reserved = load * (1 + ALLOCATOR_FRACTION)
    # Paged optimizers keep their states in CUDA unified memory: under pressure they move to host RAM,
    # so they do not count against the card in the fit test (vram_notes section 2; QLoRA paper).
    paged = (cfg.optimizer or "").startswith("paged_")
    # what must fit: the training peak (paged states evictable) or the load-time peak, whichever is larger
    pressed = max(allocated - (optimizer if paged else 0.0), load_allocated)
    outside = CUDA_CONTEXT_GIB * GIB + (NCCL_GIB * GIB if gpus > 1 else 0.0)
    overhead = reserved - allocated + dequant + outside
    breakdown = dict(zip(BREAKDOWN_KEYS, (weights, trainable, gradients, optimizer, activations, logits, overhead),
                         strict=True))
    breakdown = {k: round(v / GIB, 3) for k, v in breakdown.items()}
    return PeakMemory(
        allocated_gib=allocated / GIB,
        reserved_gib=reserved / GIB,
        smi_gib=(reserved + outside) / GIB,
        breakdown_gib=breakdown,
        trainable_params=int(n_train),
        sharding=mode,
        notes=notes,
        fit_gib=(pressed * (1 + ALLOCATOR_MIN_FRACTION) + outside) / GIB,
        full_precision=precision_label,
    )


def _kbit_dtypes(stack: Stack) -> str:
    if not stack.kbit_upcast:
        return "bf16"
    if stack.kbit_recast_bf16:
        return "fp32 at load (prepare_model_for_kbit_training), then embeddings and lm_head back to bf16, norms fp32"
    return "fp32 (prepare_model_for_kbit_training)"


def length_spread(cfg: TrainConfig) -> float:
    """0 for packed rows, the config's value when known, else the default for unpacked data."""
    if cfg.length_spread is not None:
        return cfg.length_spread
    return 0.0 if cfg.packing else DEFAULT_LENGTH_SPREAD


def _optimizer_bytes(name: str, n_train: int, pbytes: int, matrices: list[tuple[int, int, int]],
                     notes: list[str]) -> tuple[float, float]:
    """(persistent state bytes, extra bytes during step()) for the optimizers the trainer accepts."""
    name = (name or "adamw_torch").lower()
    if name in ("adamw_torch", "adamw", "adamw_hf"):
        # torch AdamW (foreach): exp_avg, exp_avg_sq in the param dtype; step() allocates sqrt(exp_avg_sq)
        return 2.0 * pbytes * n_train, 1.0 * pbytes * n_train
    if name == "adamw_torch_fused":
        return 2.0 * pbytes * n_train, 0.0
    if name == "paged_adamw_32bit":
        notes.append("paged optimizer: its fp32 states can be evicted to CPU RAM under memory pressure")
        return 8.0 * n_train, 0.0
    if name in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit"):
        if name.startswith("paged"):
            notes.append("paged optimizer: its 8-bit states can be evicted to CPU RAM under memory pressure")
        return 2.0 * n_train, 0.0
    if name == "adafactor":
        # factored second moment: one row and one column vector (fp32) per matrix, no first moment
        return float(sum(4 * (r + c) * k for r, c, k in matrices)), 0.0
    if name == "sgd":
        return 0.0, 0.0  # transformers' "sgd": torch SGD without momentum
    raise UserError(f"unknown optimizer {name!r}; use adamw_torch, adamw_torch_fused, adamw_8bit, "
                    "paged_adamw_8bit, paged_adamw_32bit, adafactor or sgd")


def with_stack(stack: Stack, **changes: object) -> Stack:
    """A copy of a stack with some behaviours changed (used by the calibration's per-source stacks)."""
    return replace(stack, **changes)  # type: ignore[arg-type]
