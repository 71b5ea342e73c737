"""How long a job takes on a given offer, and why: the time half of "cost of the whole job".

The model (docs/planner.md has the derivation and the calibration table):

    tokens       = samples x min(avg_tokens, seq_len) x epochs
    FLOPs/token  = m x P_matmul + a x 2 x L x s x h_attn
                   m = 6 (full) or 4 (LoRA/QLoRA: frozen weights get no weight-gradient),
                   +2 with gradient checkpointing (one more forward); a = 3, or 4 with recompute;
                   MoE counts the active experts only
    t_micro      = compute + exposed communication + dequantization (QLoRA) + fixed per-step overhead
                   exposed = comm - overlap x min(comm, compute); comm and overlap by fabric
                   (NVLink/NVSwitch, PCIe with/without P2P, between nodes: planner/interconnect.py)
    compute      = T x FLOPs/token / (peak dense bf16 (fp16 without bf16) x HFU(gpu class, method))
    t_job        = micro-steps x t_micro + optimizer steps x t_opt   (per GPU; data parallel)
    hours        = (startup + t_job) / (1 - spot hazard x (lost work + restart))   [spot only]

HFU (hardware FLOPs utilisation: executed FLOPs, recompute and attention included, over peak) is
calibrated on the Hugging Face-stack rows of vram_measured.csv (AAI, QW, LF, HF-01); a test keeps
the model within a stated factor of each of them. Stdlib only: imported by `cloudtune plan`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from cloudtune.catalog import GpuSpec
from cloudtune.planner.types import ModelArch, TrainConfig

# ---------------------------------------------------------------- assumptions (all documented)

# HFU of our HF transformers + PEFT + TRL trainer, by GPU family. Hopper and Blackwell sit lower:
# untuned HF stacks leave them memory/launch bound (AAI-28: 4xH100 70B QLoRA at ~33% of peak).
HFU_BY_CLASS: dict[str, float] = {
    "ampere": 0.50,  # A100 (AAI-26/27 ~52-55%, QW LoRA ~48-56%), A10, A6000, A5000
    "ada": 0.45,  # L4/L40/L40S/RTX 6000 Ada (datacenter and workstation clocks, power-capped)
    # RTX 3090/4090/5090: AAI-10/14/17 DDP rows run at 65-75% of the listed peak. That peak is the
    # half-rate FP32-accumulate figure, which bf16 GEMMs reach almost fully; the A10G is a GA102 with
    # the same half rate (gpus.csv), so it belongs here and not with the full-rate A10.
    "geforce": 0.65,
    "hopper": 0.35,  # H100/H200/GH200 (AAI-28 ~33%)
    "blackwell": 0.30,  # B200/B300/RTX PRO 6000: no HF-stack measurements; assume below Hopper
    "older": 0.35,  # Turing/Volta, fp16 tensor cores
    "amd": 0.25,  # MI300X under ROCm builds of the same stack; no measurements
}
# Datacenter cards whose tensor cores run bf16 with FP32 accumulate at the GeForce half rate, so their
# gpus.csv peak means what a GeForce peak means (see the A10G row's derivation).
HALF_RATE_DATACENTER = frozenset({"A10G"})
# Small micro-steps run below the class's HFU: kernels too small to fill the GPU, launch-bound LoRA
# matmuls. Efficiency = T / (T + SMALL_STEP_TOKENS[class]) for T tokens per micro-step. GeForce-rate
# cards (3090/4090/A10G): Answer.AI's 2x3090 QLoRA at 512 and 2048 tokens per step (AAI-01/02) come out
# 1.9x and 1.4x optimistic without it, and #15 reports the A10G at ~20-30% effective utilisation on
# 150-500-token steps (0.65 x 300 / (300 + 512) = 24%). A100 rows need none: QW-01 (256 tokens) is
# matched by the fixed per-micro-step overhead below. Ada (L4/L40S/RTX 6000 Ada: the 4090's SM design)
# is assumed to behave like GeForce (no row); Hopper/Blackwell/AMD: no data, none assumed.
SMALL_STEP_TOKENS: dict[str, float] = {"geforce": 512.0, "ada": 512.0}
# Per-method correction of HFU. The QW full-FT rows (QW-19..21) show no penalty beyond the optimizer
# step modelled below, so all are 1.0; kept as a knob.
METHOD_FACTOR: dict[str, float] = {"full": 1.0, "lora": 1.0, "qlora": 1.0}
# Eager attention materializes the scores: LLaMA-Factory's 7B LoRA at <=1024 tokens ran 2,392 tokens/s
# with eager/SDPA against 2,954 with FlashAttention-2 (LF-12/13): 0.81. sdpa and flash_attention_2 are 1.
EAGER_ATTENTION_FACTOR = 0.81
# CPU offload (FSDP/ZeRO): parameters, gradients and optimizer states cross PCIe every step, and the
# optimizer step runs on the CPU; rows TT-06 (70B full, 8x A100, offload) imply ~1/3 of the GPU rate.
OFFLOAD_PCIE_GBS = 12.0
CPU_ADAM_S_PER_PARAM = 2.0e-9

# Fixed per micro-step cost of the HF Trainer (Python, kernel launches, LoRA's many small matmuls):
# QW-01..05 (Qwen-7B LoRA, 8 micro-steps per step) fit t = 0.63 s + tokens x 2.8e-4 s.
MICRO_STEP_OVERHEAD_S = 0.08
# Optimizer step cost per trainable parameter held by this GPU (unfused AdamW, fp32 states,
# gradient clipping): QW-19..21 (Qwen-1.8B full) fit ~1.2 s per step for 1.84 B params.
OPT_STEP_S_PER_PARAM = 6.5e-10

# QLoRA (bitsandbytes NF4): every pass dequantizes each 4-bit weight to bf16 and reads it again:
# ~0.5 B read + 2 B written + 2 B read per quantized param, in the forward, the recompute and the
# backward (vram_notes section 6: t = k x W_quant_bytes / BW, k ~ 3). Memory-bound at ~70% of peak BW.
DEQUANT_BYTES_PER_PARAM_PASS = 4.5
DEQUANT_BW_EFFICIENCY = 0.7

# Interconnect (NVLink/NVSwitch, PCIe with or without P2P, between nodes) and how much of the traffic
# hides under compute: planner/interconnect.py, calibrated on the multi-GPU rows of throughput_measured.csv.
MULTI_GPU_SYNC_EFFICIENCY = 0.95  # stragglers, barriers: AAI-26 -> AAI-27 (4 -> 8 A100) kept 94%

# Boot (machine + image, until our command starts), in seconds. Billing covers it.
BOOT_S: dict[str, float] = {"modal": 30, "runpod": 90, "vast": 180, "lambda": 240, "aws": 240, "local": 0}
DOWNLOAD_GBS = 0.5  # weights from the hub / S3 into the machine
# The trainer process's own fixed cost, on every provider and again on every restart: importing
# torch/transformers/peft/trl, building the model and trainer, tokenizing, and at the end the final
# save and held-out generation. Neither BOOT_S (machine) nor the download (bytes) covers it. Measured
# with the quickstart on a 2-core CPU (docs/planner.md, "Start-up", "The local estimate"): 10-16 s
# from launch to the first step plus 1-2.5 s after the last; used for clouds too (faster CPUs, but
# larger weights to move into GPU memory).
TRAINER_STARTUP_S = 14.0
# A public PyTorch image installs the staged cloudtune wheel and its pinned training dependencies at
# start (cloudtune/run/bootstrap.py; docs/trainer.md "Booting on a public image"). The first machine on a
# set of pins installs from the index (cold) and publishes a wheelhouse to the store; a relaunch installs
# from it (warm; cloudtune/run/wheelhouse.py). Cold is an estimate for a cloud machine, not measured on
# one; warm is cold x the warm/cold ratio that bench/wheelhouse_install.py measured on the real pins
# (bench/results/wheelhouse_install-2026-12-02.md), plus the wheelhouse's download from the store.
BOOTSTRAP_COLD_S = 75.0
BOOTSTRAP_WARM_RATIO = 0.48  # 0.35 and 0.48 in two runs; the larger
WHEELHOUSE_GB = 0.23
BOOTSTRAP_WARM_S = BOOTSTRAP_COLD_S * BOOTSTRAP_WARM_RATIO + WHEELHOUSE_GB / DOWNLOAD_GBS
BOOTSTRAP_S = BOOTSTRAP_COLD_S  # the first attempt's figure (older name)
# The local provider (CPU): FLOPs at a rough per-core rate, plus a fixed cost per micro-step
# (Python, autograd, optimizer, logging) measured on the quickstart's tiny model, where it dominates.
LOCAL_CPU_GFLOPS_PER_CORE = 20.0
LOCAL_MICRO_STEP_OVERHEAD_S = 0.033
# After DONE a VM bills until it is terminated (watchdog poll + terminate); Modal stops at exit.
IDLE_TAIL_S: dict[str, float] = {"modal": 0, "runpod": 60, "vast": 60, "lambda": 60, "aws": 60, "local": 0}

# Spot: expected interruptions per hour of running. Conservative for GPU pools, where AWS's Spot
# Advisor lists most GPU instance types in its highest interruption bucket.
SPOT_HAZARD_PER_H: dict[str, float] = {"aws": 0.10, "vast": 0.10, "runpod": 0.10, "modal": 0.05, "lambda": 0.0}
DEFAULT_CHECKPOINT_MINUTES = 10.0


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """How much data the job trains on. `source` says whether it came from flags, a file or defaults."""

    samples: int
    avg_tokens: float
    epochs: float = 1.0
    source: str = "flags"

    def tokens_per_sample(self, seq_len: int) -> float:
        return min(self.avg_tokens, float(seq_len))

    def total_tokens(self, seq_len: int) -> float:
        return self.samples * self.tokens_per_sample(seq_len) * self.epochs

    def to_dict(self, seq_len: int) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "avg_tokens": round(self.avg_tokens, 1),
            "epochs": self.epochs,
            "tokens": int(self.total_tokens(seq_len)),
            "source": self.source,
        }


DEFAULT_SAMPLES = 10_000


def default_workload(seq_len: int) -> Workload:
    """What we assume when the user names no data: 10k samples of half the sequence length."""
    return Workload(DEFAULT_SAMPLES, max(1.0, seq_len / 2), 1.0,
                    "default (pass --samples/--avg-tokens/--epochs or --dataset)")


# ---------------------------------------------------------------- FLOPs


def gpu_class(gpu: GpuSpec) -> str:
    arch = gpu.arch.lower()
    if gpu.vendor == "amd":
        return "amd"
    if re.fullmatch(r"RTX\d{4}", gpu.name) and gpu.name != "RTX6000":
        return "geforce"  # RTX3090/4090/5090/4070..., not the RTX6000 / RTX5880-Ada workstation cards
    if gpu.name in HALF_RATE_DATACENTER:
        return "geforce"
    for name in ("hopper", "blackwell", "ada", "ampere"):
        if name in arch:
            return name
    return "older"


def matmul_params(arch: ModelArch) -> float:
    """Parameters that take part in matmuls per token: active experts only for MoE, and without the
    input embedding (a lookup); the lm_head counts (tied or not)."""
    total = arch.params_b * 1e9
    if arch.num_experts > 1:
        inactive = arch.num_experts - max(1, arch.experts_per_token)
        total -= inactive * arch.layers * 3 * arch.hidden * arch.intermediate
    if not arch.tied_embeddings:
        total -= arch.vocab * arch.hidden
    return max(total, 0.0)


def flops_per_token(arch: ModelArch, method: str, gradient_checkpointing: bool, seq_len: float) -> float:
    """Executed FLOPs per trained token (forward, backward and recompute), attention included."""
    base = 6.0 if method == "full" else 4.0
    attn_mult = 3.0
    if gradient_checkpointing:
        base += 2.0
        attn_mult += 1.0
    h_attn = arch.heads * arch.head_dim
    # causal attention: QK^T and AV are 2 x 2 x s x h_attn multiply-adds per token, halved by the mask
    attention_fwd = 2.0 * arch.layers * seq_len * h_attn
    return base * matmul_params(arch) + attn_mult * attention_fwd


# ---------------------------------------------------------------- the estimate


@dataclass
class TimeEstimate:
    """One offer's time for the job, with the numbers behind it (shown by `plan --json`)."""

    ok: bool
    reason: str = ""
    tokens: float = 0.0
    flops_per_token: float = 0.0
    tokens_per_sec: float = 0.0  # whole job, all GPUs
    hfu: float = 0.0
    scaling_efficiency: float = 1.0
    dequant_s_per_step: float = 0.0
    comm_s_per_step: float = 0.0
    comm_exposed_s_per_step: float = 0.0  # what of comm_s_per_step does not hide under compute
    link: dict[str, Any] = field(default_factory=dict)  # the fabric (planner/interconnect.py Link)
    micro_steps: int = 0
    optimizer_steps: int = 0
    train_hours: float = 0.0
    startup_hours: float = 0.0
    idle_tail_hours: float = 0.0
    preemption_hours: float = 0.0
    expected_restarts: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total_hours(self) -> float:
        return self.startup_hours + self.train_hours + self.preemption_hours + self.idle_tail_hours

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_sec": round(self.tokens_per_sec, 1),
            "hfu": round(self.hfu, 3),
            "scaling_efficiency": round(self.scaling_efficiency, 3),
            "train_hours": round(self.train_hours, 3),
            "startup_hours": round(self.startup_hours, 3),
            "idle_tail_hours": round(self.idle_tail_hours, 3),
            "preemption_hours": round(self.preemption_hours, 3),
            "expected_restarts": round(self.expected_restarts, 2),
            "dequant_s_per_step": round(self.dequant_s_per_step, 4),
            "comm_s_per_step": round(self.comm_s_per_step, 4),
            "comm_exposed_s_per_step": round(self.comm_exposed_s_per_step, 4),
            **({"interconnect": self.link} if self.link else {}),
        }


def _weight_bytes(arch: ModelArch, cfg: TrainConfig) -> float:
    """Bytes FSDP all-gathers per pass: bf16 weights, or for FSDP-QLoRA the packed 4-bit quant_storage
    of the quantized linears (+ one fp32 absmax per 64-weight block) and the bf16 embeddings/lm_head."""
    total = arch.params_b * 1e9
    if cfg.method != "qlora":
        return total * 2
    unquantized = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
    return (total - unquantized) * (cfg.quant_bits / 8 + 4 / 64) + unquantized * 2


def estimate_time(
    arch: ModelArch,
    cfg: TrainConfig,
    workload: Workload,
    gpu: GpuSpec,
    *,
    gpus: int = 1,
    nodes: int = 1,
    sharding: str = "none",
    trainable_params: int = 0,
    provider: str = "",
    offer_id: str = "",
    interconnect: str | None = None,
    spot: bool = False,
    checkpoint_minutes: float | None = None,
    bootstrap: bool = False,
) -> TimeEstimate:
    """Time for the whole job on `gpus` GPUs of kind `gpu` (all nodes together).

    `offer_id` and `provider` say the fabric between the GPUs (planner/interconnect.py);
    `interconnect` overrides it with a description ("pcie4 x8 no-p2p", "nvswitch; 400 Gb/s")."""
    peak = gpu.peak_tflops
    if not peak:
        return TimeEstimate(False, f"{gpu.name}: no dense {gpu.precision} TFLOPS figure in gpus.csv, time unknown")
    est = TimeEstimate(True)
    seq = workload.tokens_per_sample(cfg.seq_len)
    est.tokens = workload.total_tokens(cfg.seq_len)
    est.flops_per_token = flops_per_token(arch, cfg.method, cfg.gradient_checkpointing, seq)
    est.hfu = HFU_BY_CLASS[gpu_class(gpu)] * METHOD_FACTOR.get(cfg.method, 1.0)
    est.scaling_efficiency = MULTI_GPU_SYNC_EFFICIENCY if gpus > 1 else 1.0

    tokens_per_micro = cfg.micro_batch * seq
    half = SMALL_STEP_TOKENS.get(gpu_class(gpu), 0.0)
    est.hfu *= tokens_per_micro / (tokens_per_micro + half)
    if (cfg.attention or "sdpa") == "eager":
        est.hfu *= EAGER_ATTENTION_FACTOR
    compute_s = tokens_per_micro * est.flops_per_token / (peak * 1e12 * est.hfu)

    # communication per micro-step: FSDP/ZeRO-3 all-gathers the weights for the forward and again for
    # the backward (the recompute runs inside the backward's gather) and reduce-scatters the bf16
    # gradients of what trains; DDP all-reduces (= reduce-scatter + all-gather) the trainable gradients
    # once per optimizer step (grad accumulation uses no_sync). Part of it hides under compute.
    comm_s = 0.0
    if gpus > 1:
        from cloudtune.planner import interconnect as ic

        link = ic.resolve(gpu, provider=provider, offer_id=offer_id, nodes=nodes, override=interconnect)
        est.link = link.to_dict()
        trainable = trainable_params or (arch.params_b * 1e9 if cfg.method == "full" else 0)
        if sharding in ("fsdp", "zero3"):
            moved = 2 * _weight_bytes(arch, cfg) + 2 * trainable
        else:
            moved = 2 * 2 * trainable / max(1, cfg.grad_accum)
        comm_s = ic.collective_s(moved, gpus, nodes, link)
        est.comm_exposed_s_per_step = ic.exposed_s(comm_s, compute_s, link)
    est.comm_s_per_step = comm_s

    dequant_s = 0.0
    if cfg.method == "qlora" and gpu.mem_bandwidth_gbs:
        passes = 3 if cfg.gradient_checkpointing else 2
        quant_params = arch.params_b * 1e9 - arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
        # FSDP gathers the shards before use, so every GPU dequantizes the whole model
        dequant_s = passes * quant_params * DEQUANT_BYTES_PER_PARAM_PASS / (gpu.mem_bandwidth_gbs * 1e9 * DEQUANT_BW_EFFICIENCY)
    est.dequant_s_per_step = dequant_s

    offload_s = 0.0
    if cfg.offload:
        shard = arch.params_b * 1e9 / (gpus if sharding in ("fsdp", "zero3") else 1)
        # parameters in (forward, backward) and gradients out, bf16, per micro-step over PCIe
        moved = 3 * 2 * shard if sharding in ("fsdp", "zero3") else 2 * (trainable_params or shard)
        offload_s = moved / (OFFLOAD_PCIE_GBS * 1e9)
    micro_s = compute_s + est.comm_exposed_s_per_step + dequant_s + offload_s + MICRO_STEP_OVERHEAD_S
    micro_s /= est.scaling_efficiency
    sequences = workload.samples * workload.epochs
    est.micro_steps = max(1, math.ceil(sequences / (cfg.micro_batch * gpus)))
    est.optimizer_steps = max(1, math.ceil(est.micro_steps / max(1, cfg.grad_accum)))
    trainable_here = trainable_params or (arch.params_b * 1e9 if cfg.method == "full" else 0)
    if sharding in ("fsdp", "zero3"):
        trainable_here /= gpus
    opt_s = trainable_here * (CPU_ADAM_S_PER_PARAM if cfg.offload else OPT_STEP_S_PER_PARAM)
    train_s = est.micro_steps * micro_s + est.optimizer_steps * opt_s
    est.train_hours = train_s / 3600
    est.tokens_per_sec = est.tokens / train_s if train_s > 0 else 0.0

    startup_s = BOOT_S.get(provider, 180) + arch.params_b * 2 / DOWNLOAD_GBS + TRAINER_STARTUP_S
    restart_s = startup_s
    if bootstrap and provider != "local":
        # pip install of the staged wheel + pins on a public image (run/bootstrap.py): from the index the
        # first time, from the store's wheelhouse on a relaunch (run/wheelhouse.py)
        startup_s += BOOTSTRAP_COLD_S
        restart_s += BOOTSTRAP_WARM_S
    est.startup_hours = startup_s / 3600
    est.idle_tail_hours = IDLE_TAIL_S.get(provider, 60) / 3600

    if spot:
        hazard = SPOT_HAZARD_PER_H.get(provider, 0.1)
        minutes = checkpoint_minutes if checkpoint_minutes is not None else DEFAULT_CHECKPOINT_MINUTES
        lost_h = minutes / 60 / 2 + restart_s / 3600  # half an interval of work on average + a restart
        run_h = est.startup_hours + est.train_hours
        loss = min(0.9, hazard * lost_h)
        est.preemption_hours = run_h / (1 - loss) - run_h
        est.expected_restarts = hazard * (run_h + est.preemption_hours)
    return est


def estimate_local_time(arch: ModelArch, cfg: TrainConfig, workload: Workload, cores: int) -> TimeEstimate:
    """Time on this machine's CPU. Small models (the quickstart) are bound by the per-step cost of the
    Python training loop, not by FLOPs, so a FLOP rate alone would predict a fraction of the wall time."""
    est = TimeEstimate(True)
    seq = workload.tokens_per_sample(cfg.seq_len)
    est.tokens = workload.total_tokens(cfg.seq_len)
    est.flops_per_token = flops_per_token(arch, cfg.method, cfg.gradient_checkpointing, seq)
    est.micro_steps = max(1, math.ceil(workload.samples * workload.epochs / max(1, cfg.micro_batch)))
    est.optimizer_steps = max(1, math.ceil(est.micro_steps / max(1, cfg.grad_accum)))
    compute_s = est.tokens * est.flops_per_token / (max(1, cores) * LOCAL_CPU_GFLOPS_PER_CORE * 1e9)
    train_s = compute_s + est.micro_steps * LOCAL_MICRO_STEP_OVERHEAD_S
    est.train_hours = train_s / 3600
    est.tokens_per_sec = est.tokens / train_s if train_s > 0 else 0.0
    est.startup_hours = (BOOT_S["local"] + TRAINER_STARTUP_S) / 3600
    est.idle_tail_hours = IDLE_TAIL_S["local"] / 3600
    return est


def billed_hours(hours: float, provider: str, granularity_s: int) -> float:
    """Hours the provider charges for `hours` of use: rounded up to its billing unit and minimum."""
    from cloudtune.catalog import BILLING_MINIMUM_S

    seconds = hours * 3600
    gran = max(1, granularity_s)
    seconds = math.ceil(seconds / gran) * gran
    seconds = max(seconds, BILLING_MINIMUM_S.get(provider, 0))
    return seconds / 3600


def _interconnect_assumptions() -> dict[str, Any]:
    from cloudtune.planner import interconnect as ic

    return {"nvlink_fraction_of_datasheet": ic.NVLINK_EFFICIENCY, "pcie_x16_gbs": dict(ic.PCIE_X16_GBS),
            "no_p2p_factor": ic.NO_P2P_FACTOR, "overlap": dict(ic.OVERLAP),
            "marketplace_lanes": ic.MARKETPLACE_LANES, "nic_efficiency": ic.NIC_EFFICIENCY,
            "default_node_gbps": ic.DEFAULT_NODE_GBPS}


def assumptions() -> dict[str, Any]:
    """The constants of the time model, as shown by `plan` (and `--json` "assumptions")."""
    return {
        "flops_per_token": "full 6P (8P with gradient checkpointing), LoRA/QLoRA 4P (6P); MoE: active params; "
        "+ causal attention 3x (4x with recompute) 2*L*s*h_attn",
        "hfu_by_gpu_class": dict(HFU_BY_CLASS),
        "method_factor": dict(METHOD_FACTOR),
        "small_step_tokens": dict(SMALL_STEP_TOKENS),
        "eager_attention_factor": EAGER_ATTENTION_FACTOR,
        "offload": f"{OFFLOAD_PCIE_GBS:g} GB/s PCIe per GPU, CPU AdamW {CPU_ADAM_S_PER_PARAM:g} s/param",
        "micro_step_overhead_s": MICRO_STEP_OVERHEAD_S,
        "optimizer_step_s_per_param": OPT_STEP_S_PER_PARAM,
        "qlora_dequant": f"{DEQUANT_BYTES_PER_PARAM_PASS} B/param per pass, 3 passes with recompute, "
        f"at {DEQUANT_BW_EFFICIENCY:.0%} of memory bandwidth",
        "interconnect": _interconnect_assumptions(),
        "multi_gpu_sync_efficiency": MULTI_GPU_SYNC_EFFICIENCY,
        "boot_s": dict(BOOT_S),
        "download_gbs": DOWNLOAD_GBS,
        "trainer_startup_s": TRAINER_STARTUP_S,
        "bootstrap_s": BOOTSTRAP_COLD_S,  # public image only: pip install of the staged wheel + pins, first attempt
        "bootstrap_warm_s": round(BOOTSTRAP_WARM_S, 1),  # a relaunch: from the store's wheelhouse
        "idle_tail_s": dict(IDLE_TAIL_S),
        "spot_interruptions_per_hour": dict(SPOT_HAZARD_PER_H),
        "spot_lost_work": "half a checkpoint interval + a restart (boot + download + trainer start-up, warm "
        "bootstrap) per interruption",
    }
