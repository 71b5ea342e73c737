"""What a Modal sandbox of this adapter costs beyond its GPUs. Stdlib only: the catalog and the planner
import it, and `cloudtune plan` must start fast.

Why a surcharge: Modal bills the GPU per second and, separately, the CPU cores and memory a
sandbox requests (billed at max(request, usage); modal.com/pricing). The bundled catalog rows are
the GPU rate alone, so a Modal price that compares with a VM's hourly price is GPU + this.
"""

from __future__ import annotations

# Requested per GPU by providers/modal_app.py; Modal bills max(request, usage) for both.
CPU_PER_GPU = 4.0
MEMORY_GIB_PER_GPU = 32
# modal.com/pricing: $/core/s and $/GiB/s (as transcribed with the GPU rates, 2026-07-01).
CPU_CORE_S_USD = 0.0000131
MEMORY_GIB_S_USD = 0.00000222


def cpu_memory_usd_per_hour(gpu_count: int) -> float:
    """What the CPU and memory this adapter requests add to the GPU price, per hour."""
    per_s = gpu_count * (CPU_PER_GPU * CPU_CORE_S_USD + MEMORY_GIB_PER_GPU * MEMORY_GIB_S_USD)
    return per_s * 3600.0


def surcharge_note(gpu_count: int = 1) -> str:
    """One line for plan assumptions and `catalog show`: what a Modal price includes."""
    return (f"Modal prices include the CPU and memory the sandbox requests ({CPU_PER_GPU:g} vCPU + "
            f"{MEMORY_GIB_PER_GPU} GiB per GPU, +${cpu_memory_usd_per_hour(gpu_count):.4f}/h per GPU), "
            f"billed by Modal on top of the GPU rate")
