"""The offers and GPU specs behind the planner: a dated snapshot shipped with the package, overlaid
by whatever `cloudtune catalog refresh` fetched live.

Why a bundled snapshot: planning must work offline and in milliseconds. A refresh writes one JSON
file per provider under `$CLOUDTUNE_HOME/cache/`; those rows *replace* the bundled rows of that
provider while the refresh is young (a live list is the truth about what is in stock now, a stale
row from the snapshot would be a ghost).

Price and availability are kept apart: a row's price says where it came from (`source`: live API or
bundled snapshot, as the adapter reported it) and how old it is (`as_of`), and stays until the next
refresh; the *absence* of a GPU from a live list (out of stock) is only believed for
AVAILABILITY_TTL_S. After that the bundled rows the live list lacked come back, so a momentary
out-of-stock never becomes the planner's permanent world. A failed launch on such an offer is a
CapacityError and the orchestrator moves on to the next option.

Stdlib only (csv, json): this module is imported by `cloudtune plan`, which must start fast.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.providers.base import Offer

CACHE_VERSION = 2
# How long "not in the live list" (out of stock) is believed; env CLOUDTUNE_AVAILABILITY_TTL_S.
AVAILABILITY_TTL_S = 3600.0
SOURCE_LIVE = "live API"
SOURCE_SNAPSHOT = "bundled snapshot"

# Billing granularity in seconds, from each provider's billing docs (../shared/providers.md).
# AWS bills per second with a 60 s minimum per instance start; Lambda bills per minute.
BILLING_GRANULARITY_S: dict[str, int] = {"aws": 1, "lambda": 60, "runpod": 1, "vast": 1, "modal": 1, "local": 1}
BILLING_MINIMUM_S: dict[str, int] = {"aws": 60, "lambda": 60}

# nvidia-smi's memory.total (MiB) for the cards in gpus.csv: what a process can see before the
# CUDA context. Vendor "GB" figures are really binary sizes of the memory chips, minus what the
# driver, ECC and the row-remapping reserve takes (HBM cards lose 0-2%, GDDR cards with ECC more).
# Cards not listed fall back to NOMINAL_FALLBACK x the nominal figure (conservative).
NVIDIA_SMI_TOTAL_MIB: dict[str, int] = {
    "H100-SXM": 81559,
    "H100-80GB": 81559,
    "H100-NVL": 95830,
    "H200": 143771,
    "GH200": 97871,
    "B200": 183359,
    "A100-80GB": 81920,
    "A100-40GB": 40960,
    "L40S": 46068,
    "L40": 46068,
    "L4": 23034,
    "A10": 23028,
    "A10G": 23028,
    "T4": 15360,
    "V100": 16160,
    "V100-32GB": 32510,
    "A6000": 49140,
    "A5000": 24564,
    "RTX6000-Ada": 49140,
    "RTX6000": 24576,
    "RTX4090": 24564,
    "RTX3090": 24576,
    "RTX5090": 32607,
    "RTXPRO6000": 97887,
}
NOMINAL_FALLBACK = 0.96


def usable_gib(gpu: str, nominal_gb: float) -> float:
    """Memory a training process can fill on one card, in GiB (what nvidia-smi reports as total)."""
    mib = NVIDIA_SMI_TOTAL_MIB.get(gpu)
    if mib is not None:
        return round(mib / 1024, 2)
    return round(nominal_gb * NOMINAL_FALLBACK, 2)


# Compute capability by architecture (bitsandbytes and bf16 kernels care about it).
_CC_BY_ARCH = {
    "Volta": 7.0,
    "Turing": 7.5,
    "Ampere": 8.0,
    "Ada Lovelace": 8.9,
    "Hopper": 9.0,
    "Blackwell": 10.0,
    "Blackwell Ultra": 10.3,
}
# Consumer/workstation Ampere and Blackwell differ from the datacenter part of the same family.
_CC_OVERRIDE = {"A10": 8.6, "A10G": 8.6, "A6000": 8.6, "A5000": 8.6, "RTX3090": 8.6, "RTX3060": 8.6,
                "RTX5090": 12.0, "RTX5070": 12.0, "RTXPRO6000": 12.0}


@dataclass(frozen=True)
class GpuSpec:
    """One row of gpus.csv, typed. TFLOPS are dense (no 2:4 sparsity); None where the source is blank."""

    name: str
    vram_gb: float
    arch: str
    bf16: bool
    fp8: bool
    bf16_tflops: float | None
    fp16_tflops: float | None
    mem_bandwidth_gbs: float | None
    nvlink_gbs: float | None  # None: PCIe only (or a 2-way bridge, which FSDP across 4-8 cards cannot use)
    nvlink_note: str
    tdp_w: float | None
    compute_capability: float | None
    vendor: str  # nvidia | amd

    @property
    def usable_gib(self) -> float:
        return usable_gib(self.name, self.vram_gb)

    @property
    def peak_tflops(self) -> float | None:
        """Dense tensor throughput the trainer can use: bf16 where supported, else fp16."""
        return self.bf16_tflops if self.bf16 and self.bf16_tflops else self.fp16_tflops

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16"

    @property
    def has_nvlink(self) -> bool:
        return self.nvlink_gbs is not None


def tidy_region(region: str) -> str:
    """Drop the empty parts of a "city, country, continent" location.

    Vast reports some hosts without a city, and SkyPilot's catalog copies that as ", CN, AS": a
    table cell that starts with a comma, and a `--region cn` prefix filter that never matches.
    """
    parts = [p.strip() for p in region.split(",")]
    return ", ".join(p for p in parts if p) or region.strip() or "unknown"


def _float(value: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _parse_nvlink(raw: str) -> tuple[float | None, str]:
    raw = (raw or "").strip()
    if not raw or raw == "none":
        return None, "none"
    number = _float(raw.split()[0])
    # A 2-way bridge links pairs only: not an all-to-all fabric for FSDP over a node.
    if "bridge" in raw:
        return None, raw
    return number, raw


def _data_path(name: str) -> Any:
    """A bundled data file. A plain path for installed and editable packages; importlib.resources
    (which pulls in tempfile, zipfile and threading, ~20 ms) only for a zipped install."""
    path = Path(__file__).parent / "data" / name
    if path.is_file():
        return path
    from importlib import resources

    return resources.files("cloudtune").joinpath("data", name)


@lru_cache(maxsize=1)
def gpu_specs() -> dict[str, GpuSpec]:
    """gpus.csv keyed by the normalised GPU name used in offers."""
    specs: dict[str, GpuSpec] = {}
    with _data_path("gpus.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            name = row["gpu"]
            nvlink, note = _parse_nvlink(row["nvlink"])
            arch = row["arch"]
            cc = _CC_OVERRIDE.get(name, _CC_BY_ARCH.get(arch.split(" (")[0]))
            specs[name] = GpuSpec(
                name=name,
                vram_gb=float(row["vram_gb"]),
                arch=arch,
                bf16=row["bf16_supported"].strip().lower() == "true",
                fp8=row["fp8_supported"].strip().lower() == "true",
                bf16_tflops=_float(row["bf16_dense_tflops"]),
                fp16_tflops=_float(row["fp16_dense_tflops"]),
                mem_bandwidth_gbs=_float(row["mem_bandwidth_gbs"]),
                nvlink_gbs=nvlink,
                nvlink_note=note,
                tdp_w=_float(row["tdp_w"]),
                compute_capability=cc,
                vendor="amd" if name.startswith("MI") else "nvidia",
            )
    return specs


def gpu_spec(name: str) -> GpuSpec | None:
    return gpu_specs().get(name)


def modal_all_in(price_hr: float | None, gpu_count: int) -> float | None:
    """A Modal GPU rate plus the CPU and memory our sandbox requests: the price Modal really bills."""
    from cloudtune.providers.modal_pricing import cpu_memory_usd_per_hour

    return None if price_hr is None else round(price_hr + cpu_memory_usd_per_hour(gpu_count), 4)


def price_includes(offer: Offer) -> str:
    """What an offer's price covers, for `catalog show` and the plan's notes."""
    if offer.provider == "modal":
        from cloudtune.providers.modal_pricing import surcharge_note

        return "GPU + CPU + memory: " + surcharge_note(offer.gpu_count)
    return "the whole instance or pod, per hour (disk, egress and storage extra)"


@lru_cache(maxsize=1)
def bundled_offers() -> tuple[Offer, ...]:
    """The snapshot in cloudtune/data/offers.csv (see ../shared/catalog/README.md for its sources).

    Modal rows in the CSV are the GPU rate alone; Modal also bills the CPU and memory a sandbox
    requests, so their price here is the all-in price (`modal_all_in`), comparable with a VM's.
    """
    from cloudtune.providers.modal_pricing import CPU_PER_GPU, MEMORY_GIB_PER_GPU

    offers: list[Offer] = []
    with _data_path("offers.csv").open(newline="") as f:
        # csv.reader + column indexes: DictReader's per-row dict costs ~40% of this loop (1,324 rows,
        # on every `cloudtune plan`).
        reader = csv.reader(f)
        col = {name: i for i, name in enumerate(next(reader))}
        i_provider, i_gpu, i_count, i_vcpus, i_ram = (col[k] for k in ("provider", "gpu", "gpu_count", "vcpus",
                                                                        "ram_gb"))
        i_price, i_spot, i_id, i_vram, i_region, i_as_of = (col[k] for k in (
            "price_hr", "spot_price_hr", "offer_id", "vram_gb_per_gpu", "region", "as_of"))
        for r in reader:
            provider = r[i_provider]
            gpu = r[i_gpu]
            count = int(r[i_count])
            vcpus = _float(r[i_vcpus])
            ram_gb = _float(r[i_ram])
            price, spot = _float(r[i_price]), _float(r[i_spot])
            if provider == "modal":
                price, spot = modal_all_in(price, count), modal_all_in(spot, count)
                vcpus, ram_gb = CPU_PER_GPU * count, float(MEMORY_GIB_PER_GPU * count)
            offers.append(
                Offer(
                    provider=provider,
                    offer_id=r[i_id],
                    gpu=gpu,
                    gpu_count=count,
                    vram_gib_per_gpu=usable_gib(gpu, float(r[i_vram])),
                    region=tidy_region(r[i_region]),
                    price_hr=price,
                    spot_price_hr=spot,
                    as_of=r[i_as_of] or "unknown",
                    billing_granularity_s=BILLING_GRANULARITY_S.get(provider, 1),
                    vcpus=int(vcpus) if vcpus is not None else None,
                    ram_gb=ram_gb,
                    fresh=False,
                    source=SOURCE_SNAPSHOT,
                )
            )
    return tuple(offers)


# Snapshot date of the bundled files (../shared/catalog/README.md: transcribed 2026-11-22; the
# SkyPilot rows date from about Sep-Nov 2026, their `as_of` is "unknown").
SNAPSHOT_DATE = "2026-11-22"


# ---------------------------------------------------------------- cache of live offers


def cache_file(provider: str, directory: Path | None = None) -> Path:
    from cloudtune.home import cache_dir

    return (directory or cache_dir()) / f"offers-{provider}.json"


def write_cache(provider: str, offers: list[Offer], *, fetched_at: datetime | None = None) -> Path:
    """Write a provider's refreshed offers atomically (temp file + rename): a reader never sees half a
    file. Each row keeps what the adapter said about its price: `fresh` (from a live API) and its
    `as_of`; a row the adapter took from the bundled snapshot (Modal, AWS on-demand) stays a snapshot
    row, it is not passed off as live."""
    fetched = (fetched_at or datetime.now(UTC)).isoformat(timespec="seconds")
    rows = []
    for offer in offers:
        row = asdict(offer)
        # adapters report the vendor's nominal size; plan against what the card really exposes
        if offer.gpu in NVIDIA_SMI_TOTAL_MIB:
            row["vram_gib_per_gpu"] = min(offer.vram_gib_per_gpu, usable_gib(offer.gpu, offer.vram_gib_per_gpu))
        row["fresh"] = bool(offer.fresh)
        if offer.fresh:  # a live price is as old as this fetch
            row["as_of"] = fetched
        row["source"] = offer.source or (SOURCE_LIVE if offer.fresh else SOURCE_SNAPSHOT)
        rows.append(row)
    path = cache_file(provider)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "provider": provider, "fetched_at": fetched,
                               "offers": rows}))
    tmp.replace(path)
    return path


_OFFER_FIELDS = set(Offer.__dataclass_fields__)


def read_cache(provider: str) -> tuple[str, list[Offer]] | None:
    """(fetched_at, offers) from the provider's cache file; None if absent (or written by an older
    cloudtune, whose rows were all marked live: ignored, so the snapshot shows until a refresh). A corrupt file is an error
    the user can fix (delete it or refresh), so it is reported rather than silently ignored."""
    path = cache_file(provider)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version", 1) < CACHE_VERSION:
            return None
        fetched = str(data["fetched_at"])
        offers = [Offer(**{k: v for k, v in row.items() if k in _OFFER_FIELDS}) for row in data["offers"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"offer cache {str(path)!r} is unreadable ({type(err).__name__}); delete it or run "
            f"`cloudtune catalog refresh --provider {provider}`"
        ) from None
    return fetched, offers


def availability_ttl_s() -> float:
    import os

    raw = os.environ.get("CLOUDTUNE_AVAILABILITY_TTL_S")
    try:
        return float(raw) if raw else AVAILABILITY_TTL_S
    except ValueError:
        raise UserError(f"CLOUDTUNE_AVAILABILITY_TTL_S={raw!r} is not a number of seconds; e.g. 3600") from None


def availability_expired(fetched_at: str, now: datetime | None = None) -> bool:
    """Whether a refresh is too old to believe what it did *not* list (out of stock)."""
    try:
        then = datetime.fromisoformat(fetched_at)
    except ValueError:
        return True
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return ((now or datetime.now(UTC)) - then).total_seconds() > availability_ttl_s()


def load_offers(providers: list[str] | tuple[str, ...] | None = None, *, now: datetime | None = None) -> list[Offer]:
    """Every offer the planner may choose from: bundled rows, with a provider's refreshed rows
    replacing its bundled rows while the refresh is younger than the availability TTL; after it,
    the refreshed rows (their prices, with their age) plus the bundled rows they lacked.
    `providers` filters (None: all)."""
    wanted = set(providers) if providers else None
    bundled = bundled_offers()
    names = sorted({o.provider for o in bundled})
    out: list[Offer] = []
    for name in names:
        if wanted is not None and name not in wanted:
            continue
        cached = read_cache(name)
        if cached is None:
            out.extend(o for o in bundled if o.provider == name)
            continue
        fetched, rows = cached
        out.extend(rows)
        if availability_expired(fetched, now):
            seen = {(o.offer_id, o.region) for o in rows}
            out.extend(o for o in bundled if o.provider == name and (o.offer_id, o.region) not in seen)
    return out


def offer_source(offer: Offer) -> str:
    """Where an offer's price came from: the adapter's words, else live API / bundled snapshot."""
    return offer.source or (SOURCE_LIVE if offer.fresh else SOURCE_SNAPSHOT)


def offer_age(offer: Offer, now: datetime | None = None) -> str:
    """A human age for an offer: '3 h' for fresh rows, 'snapshot 2026-11-22' for bundled ones."""
    if not offer.fresh:
        return f"snapshot {SNAPSHOT_DATE}" + ("" if offer.as_of == "unknown" else f" (as of {offer.as_of})")
    return _age_of(offer.as_of, now)


def _age_of(stamp: str, now: datetime | None = None) -> str:
    try:
        then = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
    if seconds < 90:
        return f"{int(seconds)} s ago"
    if seconds < 2 * 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def catalog_age(offers: list[Offer]) -> str:
    """One line describing where the offers come from, for the plan and catalog outputs."""
    parts = []
    for provider in sorted({o.provider for o in offers}):
        rows = [o for o in offers if o.provider == provider]
        live = [o for o in rows if o.fresh]
        if live:
            stamp = max(o.as_of for o in live)
            part = f"{provider}: {len(live)} live rows, fetched {_age_of(stamp)}"
            if len(live) < len(rows):
                part += f", {len(rows) - len(live)} snapshot rows"
            parts.append(part)
        else:
            dates = sorted({o.as_of for o in rows if o.as_of != "unknown"})
            when = f"as of {dates[-1]}" if dates else "about Sep-Nov 2026"
            parts.append(f"{provider}: snapshot ({when})")
    return "; ".join(parts)


def offer_to_dict(offer: Offer) -> dict[str, Any]:
    return asdict(offer)


# ---------------------------------------------------------------- refresh


@dataclass
class RefreshResult:
    provider: str
    status: str  # ok | skipped | failed
    message: str
    offers: int = 0
    seconds: float = 0.0


def refresh(providers: list[str]) -> list[RefreshResult]:
    """Fetch live offers from each provider's adapter and cache them. Never raises for one provider's
    failure of any kind: missing credentials are 'skipped', every other error (ours, or an adapter's
    own bug such as a TypeError) 'failed', each with one line, and the other providers go on."""
    from cloudtune.providers.base import AuthError, ProviderError
    from cloudtune.run.providers_config import make_provider  # same config as run, gc and dry-run

    results: list[RefreshResult] = []
    for name in providers:
        start = time.perf_counter()
        try:
            adapter = make_provider(name)
            offers = list(adapter.offers())
            if any(not isinstance(o, Offer) for o in offers):
                raise TypeError("the adapter returned something that is not an Offer")
        except AuthError as err:
            results.append(RefreshResult(name, "skipped", f"no usable credentials: {err}"))
            continue
        except (UserError, ProviderError) as err:
            results.append(RefreshResult(name, "failed", str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - one adapter's bug (TypeError on an API change...) must
            # not abort the refresh of the others; it is reported with its type, and the old rows stay
            results.append(RefreshResult(name, "failed", f"{type(err).__name__} in the {name} adapter: {err}; "
                                         "kept the previous rows (please report this)"))
            continue
        if not offers:
            results.append(RefreshResult(name, "failed", "the provider returned no offers; kept the previous rows"))
            continue
        path = write_cache(name, offers)
        results.append(RefreshResult(name, "ok", f"{len(offers)} offers -> {path}", len(offers),
                                     time.perf_counter() - start))
    return results
