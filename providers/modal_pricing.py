"""What a Modal sandbox of this adapter costs beyond its GPUs. Stdlib only: the catalog and the planner
import it, and `cloudtune plan` must start fast.

Why a surcharge: Modal bills the GPU per second and, separately, the CPU cores and memory a
sandbox requests (billed at max(request, usage); modal.com/docs/guide/sandbox-resources). The
bundled catalog rows are the GPU rate alone, so a Modal price that compares with a VM's hourly
price is GPU + this.

Sandboxes are not Functions: modal.com/pricing lists "Sandboxes & Notebooks" CPU and memory at
their own rates, about 3x the Function rates ($0.0000131/core/s, $0.00000222/GiB/s); a third-party
reading of the same page (beam.cloud/blog/modal-pricing-explained, verified 2026-06-27) says the
same "Sandbox CPU rate 3x the standard Function rate". GPUs cost the same in both.

A pinned region costs more: modal.com/docs/guide/region-selection ("Pricing") applies a multiplier
to the whole usage (GPU + CPU + memory) of anything with a region set: 1.25x for any region in the
US, EU or AP, 2.5x elsewhere; a list spanning both gets the smaller one.
"""

from __future__ import annotations

# Requested per GPU by providers/modal_app.py; Modal bills max(request, usage) for both.
CPU_PER_GPU = 4.0
MEMORY_GIB_PER_GPU = 32
# modal.com/pricing, "Sandboxes & Notebooks": $/physical core/s and $/GiB/s.
SANDBOX_CPU_CORE_S_USD = 0.00003942
SANDBOX_MEMORY_GIB_S_USD = 0.00000672
# modal.com/pricing, Functions (kept to show the difference; not what a sandbox pays).
FUNCTION_CPU_CORE_S_USD = 0.0000131
FUNCTION_MEMORY_GIB_S_USD = 0.00000222
# modal.com/docs/guide/region-selection
REGION_MULTIPLIER_US_EU_AP = 1.25
REGION_MULTIPLIER_OTHER = 2.5
_US_EU_AP = ("us", "eu", "ap")


def cpu_memory_usd_per_hour(gpu_count: int) -> float:
    """What the CPU and memory this adapter's sandbox requests add to the GPU price, per hour."""
    per_s = gpu_count * (CPU_PER_GPU * SANDBOX_CPU_CORE_S_USD + MEMORY_GIB_PER_GPU * SANDBOX_MEMORY_GIB_S_USD)
    return per_s * 3600.0


def region_multiplier(region: str | list[str] | tuple[str, ...] | None) -> float:
    """Modal's price multiplier for a pinned region (1.0 when none is pinned: Modal places it)."""
    if region is None:
        return 1.0
    regions = [region] if isinstance(region, str) else list(region)
    regions = [r.strip().lower() for r in regions if r and r.strip() and r.strip().lower() != "auto"]
    if not regions:
        return 1.0
    return min(REGION_MULTIPLIER_US_EU_AP if r.split("-")[0] in _US_EU_AP else REGION_MULTIPLIER_OTHER
               for r in regions)


def surcharge_note(gpu_count: int = 1) -> str:
    """One line for plan assumptions and `catalog show`: what a Modal price includes."""
    return (f"Modal prices include the CPU and memory the sandbox requests ({CPU_PER_GPU:g} cores + "
            f"{MEMORY_GIB_PER_GPU} GiB per GPU at Modal's sandbox rates, +${cpu_memory_usd_per_hour(gpu_count):.4f}/h "
            f"per GPU); a pinned region multiplies the whole price (x{REGION_MULTIPLIER_US_EU_AP:g} US/EU/AP, "
            f"x{REGION_MULTIPLIER_OTHER:g} elsewhere)")
