"""How many processes on how many machines an option launches, and the launcher env that says so.

Why here and not in the providers: every provider runs the same entry command
(`python -m cloudtune.trainer.launch`, contract.LAUNCH_COMMAND) and the same env names; only the
shape differs. A cloud option's shape is its offer (GPUs per machine) times its nodes; the local
provider's is the spec's `resources.gpus` / `resources.nodes` (CPU processes over gloo). Bad shapes are
refused here, before anything is rented, with one line (`check_shape`, called by plan_job).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from cloudtune.errors import UserError
from cloudtune.trainer import contract as C

LAUNCHABLE_SHARDINGS = ("none", "ddp", "fsdp")
PLAN_SAFETY = 0.92  # planner/plan.py SAFETY_FRACTION: DDP only where the replicated job fits with this


def option_shape(spec: Any, option: Any) -> tuple[int, int]:
    """(processes per node, nodes) of this option."""
    offer = option.offer
    if offer.provider == "local":
        nodes = spec.resources.nodes
        return max(1, (spec.resources.gpus or 1) // nodes), nodes
    nodes = int(getattr(option, "nodes", 1) or 1)
    total = int(getattr(option, "gpu_count", 0) or offer.gpu_count * nodes or 1)
    return max(1, total // nodes), nodes


def sharding_for(spec: Any, option: Any, world: int) -> str:
    """ddp or fsdp: the spec's choice, else DDP where the whole job fits each GPU (faster: no
    all-gather per layer), else FSDP FULL_SHARD (FSDP-QLoRA for 4-bit). The local provider runs on
    CPU processes, where accelerate's FSDP plugin refuses to start: DDP."""
    chosen = spec.resources.sharding
    if world <= 1:
        return "none"
    if chosen in ("ddp", "fsdp"):
        return chosen
    if option.offer.provider == "local":
        return "ddp"
    if getattr(option, "sharding", None) in ("ddp", "fsdp"):  # what the plan priced: plan and run agree
        return str(option.sharding)
    try:
        from cloudtune.planner.memory import estimate_memory
        from cloudtune.planner.models import resolve_model
        from cloudtune.planner.types import TrainConfig

        est = estimate_memory(resolve_model(spec.model), TrainConfig.from_spec(spec), gpus=world, sharding="ddp")
        if est.per_gpu_gib <= option.offer.vram_gib_per_gpu * PLAN_SAFETY:
            return "ddp"
    except Exception:  # noqa: BLE001 - no estimate (unknown model): shard, the choice that always fits better
        pass
    return "fsdp"


def launch_env(spec: Any, option: Any) -> dict[str, str]:
    """The launcher's shape env for a multi-process option; {} for one process (unchanged machines).
    Node rank and master address are per machine: the local provider and SkyPilot (SKYPILOT_*) set them."""
    nproc, nodes = option_shape(spec, option)
    if nproc * nodes <= 1:
        return {}
    return {C.ENV_NPROC_PER_NODE: str(nproc), C.ENV_NNODES: str(nodes),
            C.ENV_SHARDING: sharding_for(spec, option, nproc * nodes)}


def local_capacity() -> tuple[int, str]:
    """(processes, what) the local provider can run: its CUDA GPUs, else its CPU cores (gloo)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        import subprocess

        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=5).stdout
            count = sum(1 for ln in out.splitlines() if ln.startswith("GPU "))
            if count:
                return count, "GPUs"
        except (OSError, subprocess.SubprocessError):
            pass
    return os.cpu_count() or 1, "CPU cores"


def check_shape(spec: Any, providers: list[str]) -> None:
    """Refuse, in one line, a shape the launcher or the provider cannot run."""
    res = spec.resources
    if res.sharding in ("zero2", "zero3"):
        raise UserError(f"resources.sharding {res.sharding}: cloudtune launches ddp or fsdp (DeepSpeed is not in the "
                        f"trainer image); use fsdp, the FSDP equivalent of ZeRO-{res.sharding[-1]}")
    if "local" not in providers:
        return
    gpus = res.gpus or 1
    have, what = local_capacity()
    if gpus > have:
        raise UserError(f"resources.gpus {gpus}: the local provider runs one process per {what[:-1]} and this machine "
                        f"has {have}; use resources.gpus {have} or less")
    if res.sharding == "fsdp" and gpus > 1 and what != "GPUs":
        raise UserError("resources.sharding fsdp needs CUDA GPUs (accelerate's FSDP plugin refuses CPU processes); "
                        "use sharding ddp on this machine")
