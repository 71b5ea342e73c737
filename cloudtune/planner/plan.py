"""Rank every catalog offer that can hold the job by the estimated cost of the whole job.

Why whole-job cost and not $/hour: a card twice the price that finishes three times sooner is the
cheaper choice, and a spot discount is worth less when interruptions make the job longer. So for
every offer row (and separately for its spot and on-demand price) we estimate the memory per GPU,
check it fits with a safety margin, estimate the hours (cloudtune.planner.throughput), round them
to the provider's billing unit and multiply by the price. Ties go to the faster option.

`plan_for_spec` is the entry point of `cloudtune run`; `make_plan` is the flag-level one of
`cloudtune plan`. Both return a `Plan` whose `to_dict()` is the `plan --json` contract.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cloudtune.catalog import GpuSpec, catalog_age, gpu_specs, load_offers
from cloudtune.errors import NothingFits, UserError
from cloudtune.planner import throughput
from cloudtune.planner.throughput import TimeEstimate, Workload, billed_hours, estimate_time
from cloudtune.planner.types import MemoryEstimate, ModelArch, TrainConfig
from cloudtune.providers.base import Offer
from cloudtune.providers.modal_pricing import cpu_memory_usd_per_hour as modal_cpu_memory
from cloudtune.providers.modal_pricing import surcharge_note as modal_surcharge_note
from cloudtune.run.bootstrap import PUBLIC_BASES

# Comfortable fits stay under this fraction of what the card exposes: the estimate's own error (median
# |error| ~7% on the calibration rows), allocator spikes and NCCL buffers that grow with the job need the
# rest (vram_notes section 5: "don't plan past ~92% of the card"). It is not the fit test: an offer whose
# pressed footprint fits the card but not this fraction is offered as a tight fit, ranked after every
# comfortable one (jobs that really trained at the card's limit are offered it: docs/planner-memory.md).
SAFETY_FRACTION = 0.92
NODE_COUNTS = (2, 4, 8, 16)  # multi-node sizes tried (x 8 GPUs) when no single node holds the job
# Providers whose 8-GPU nodes are tried as multi-node clusters. Which of them can really be launched
# is `launch_route`'s answer (SkyPilot runs clusters on AWS and Lambda, not on RunPod or Vast): the
# others stay in the plan as not launchable, with the reason, so the table can say why.
MULTI_NODE_PROVIDERS = ("aws", "lambda", "runpod")
# How the trainer's launcher (cloudtune/trainer/launch.py) shards a job across GPUs; zero2/zero3 need
# DeepSpeed, which the trainer image does not install. tests/test_plan_run_agree.py keeps these equal.
TRAINER_SHARDINGS = ("none", "ddp", "fsdp")
# Ranking hygiene (#14): a fit with under 5% of the card (or under 1 GiB) to spare below the comfort
# fraction, or above it, is "tight": one allocator spike or a longer-than-average batch away from an
# OOM, so comfortable fits rank first.
# Among options within 3% of the same cost, fewer GPUs win (fewer things to fail, less NCCL, same bill).
TIGHT_FIT_FRACTION = 0.05
TIGHT_FIT_GIB = 1.0
FEWER_GPUS_WITHIN = 0.03
LAUNCHERS = {"none": "single", "ddp": "ddp", "fsdp": "accelerate-fsdp", "zero2": "accelerate-deepspeed",
             "zero3": "accelerate-deepspeed"}


@dataclass
class PlanOption:
    """One way to run the job: an offer row, spot or on-demand, with its estimate."""

    offer: Offer
    spot: bool
    price_hr: float  # for the whole option (all nodes)
    gpu_count: int  # GPUs in total (nodes x offer.gpu_count)
    nodes: int = 1
    est_hours: float | None = None
    est_cost_usd: float | None = None
    headroom_gib: float | None = None  # usable - fit_gib per GPU: what is left of the card at the pressed peak
    memory: MemoryEstimate | None = None
    time: TimeEstimate | None = None
    notes: list[str] = field(default_factory=list)
    # spot price far below the provider's usual discount (planner/spot.py): ranked at rank_price_hr
    suspect_spot: bool = False
    rank_cost_usd: float | None = None
    # how it launches (launch_route): the processes on each machine, the adapter that rents the
    # machines, and why it cannot be launched ("" when it can)
    launcher: str = "single"
    launch_via: str = ""
    not_launchable: str = ""
    tight_fit: bool = False  # fit_gib above the comfort line (is_tight)
    also_regions: list[str] = field(default_factory=list)  # folded rows: the same option's other regions

    @property
    def provider(self) -> str:
        return self.offer.provider

    @property
    def gpu(self) -> str:
        return self.offer.gpu

    @property
    def region(self) -> str:
        return self.offer.region

    def label(self) -> str:
        count = f"{self.gpu} x{self.gpu_count}"
        return count + (f" ({self.nodes} nodes)" if self.nodes > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.offer.provider,
            "gpu": self.offer.gpu,
            "gpu_count": self.gpu_count,
            "vram_gib_per_gpu": self.offer.vram_gib_per_gpu,
            "spot": self.spot,
            "region": self.offer.region,
            "price_hr": round(self.price_hr, 4),
            "est_hours": None if self.est_hours is None else round(self.est_hours, 3),
            "est_cost_usd": None if self.est_cost_usd is None else round(self.est_cost_usd, 2),
            "headroom_gib": None if self.headroom_gib is None else round(self.headroom_gib, 2),
            "offer_id": self.offer.offer_id,
            "nodes": self.nodes,
            "per_gpu_gib": None if self.memory is None else round(self.memory.per_gpu_gib, 2),
            "fit_gib": None if self.memory is None else round(self.memory.fit_gib, 2),
            "sharding": None if self.memory is None else self.memory.sharding,
            "tokens_per_sec": None if self.time is None or not self.time.ok else round(self.time.tokens_per_sec, 1),
            "fresh": self.offer.fresh,
            "as_of": self.offer.as_of,
            "suspect_spot": self.suspect_spot,
            "rank_cost_usd": None if self.rank_cost_usd is None else round(self.rank_cost_usd, 2),
            "notes": list(self.notes),
            "launcher": self.launcher,
            "launch_via": self.launch_via or self.offer.provider,
            "tight_fit": self.tight_fit,
            **({"not_launchable": self.not_launchable} if self.not_launchable else {}),
        }


@dataclass
class Skipped:
    """Offers left out for a reason other than memory (a GPU that cannot run the method well)."""

    gpu: str
    reason: str
    offers: int

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "reason": self.reason, "offers": self.offers}


@dataclass
class Plan:
    model: ModelArch
    config: TrainConfig
    workload: Workload
    memory: MemoryEstimate | None  # the choice's estimate; the smallest GPU count's when nothing fits
    options: list[PlanOption]
    skipped: list[Skipped] = field(default_factory=list)
    unlaunchable: list[PlanOption] = field(default_factory=list)  # fit, but cannot be launched: never a choice
    assumptions: dict[str, Any] = field(default_factory=dict)
    catalog_age: str = ""
    nothing_fits: str = ""  # why options is empty: one line, naming what to do

    @property
    def choice(self) -> PlanOption | None:
        return self.options[0] if self.options else None

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        options = self.options if not top else self.options[:top]
        mem = self.memory
        return {
            "model": {
                "id": self.model.id,
                "params_b": self.model.params_b,
                "layers": self.model.layers,
                "hidden": self.model.hidden,
                "vocab": self.model.vocab,
            },
            "method": self.config.method,
            "quant_bits": self.config.quant_bits,
            "seq_len": self.config.seq_len,
            "micro_batch": self.config.micro_batch,
            "grad_accum": self.config.grad_accum,
            "gradient_checkpointing": self.config.gradient_checkpointing,
            "optimizer": self.config.optimizer,
            "memory": None if mem is None else {
                "per_gpu_gib": round(mem.per_gpu_gib, 2),
                "gpus": mem.gpus,
                "breakdown_gib": {k: round(v, 3) for k, v in mem.breakdown_gib.items()},
                "sharding": mem.sharding,
                "fit_gib": round(mem.fit_gib, 2),
                "full_precision": mem.full_precision or None,
                "notes": list(mem.notes),
            },
            "assumptions": self.assumptions,
            "options": [o.to_dict() for o in options],
            "choice": self.choice.to_dict() if self.choice else None,
            "options_total": len(self.options),
            "skipped": [s.to_dict() for s in self.skipped],
            "not_launchable": [o.to_dict() for o in self.unlaunchable[: top or None]],
            "catalog": self.catalog_age,
            "nothing_fits": self.nothing_fits or None,
        }

    def raise_if_empty(self) -> None:
        if not self.options:
            raise NothingFits(self.nothing_fits or "nothing fits")


# ---------------------------------------------------------------- method / GPU compatibility


def incompatibility(gpu: GpuSpec, cfg: TrainConfig) -> str | None:
    """Why this GPU cannot run the method well, or None. QLoRA computes in bf16 through
    bitsandbytes (CUDA only); GPUs without bf16 would fall back to fp16 with overflow risk."""
    if cfg.method == "qlora":
        if gpu.vendor != "nvidia":
            return "bitsandbytes 4/8-bit needs CUDA; the trainer image has no ROCm build"
        if not gpu.bf16:
            return "no bf16 (Turing/Volta): QLoRA's bf16 compute would fall back to fp16; use Ampere or newer"
    if gpu.peak_tflops is None:
        return "no dense TFLOPS figure in gpus.csv, so time and cost cannot be estimated"
    return None


# ---------------------------------------------------------------- ranking


def _estimate_memory(arch: ModelArch, cfg: TrainConfig, n: int) -> MemoryEstimate:
    from cloudtune.planner.memory import estimate_memory

    return estimate_memory(arch, cfg, gpus=n)


def _fits(mem: MemoryEstimate, usable_gib: float) -> bool:
    from cloudtune.planner.memory import fits

    return fits(mem, usable_gib)


def config_for_gpu(cfg: TrainConfig, spec: GpuSpec) -> TrainConfig:
    """What the trainer will really run on this GPU: full_precision bf16 needs bf16 compute, so a GPU
    without it (T4, V100) trains fp32 master weights (trainer/train.py full_weight_dtype)."""
    if cfg.method == "full" and cfg.full_precision == "bf16" and not spec.bf16:
        from dataclasses import replace

        return replace(cfg, full_precision="mixed")
    return cfg


def make_plan(
    arch: ModelArch,
    cfg: TrainConfig,
    workload: Workload,
    *,
    providers: list[str] | tuple[str, ...] | None = None,
    spot: bool | None = None,
    max_price_hr: float | None = None,
    gpus: int | None = None,
    gpu_types: list[str] | None = None,
    region: str | list[str] | None = None,
    checkpoint_minutes: float | None = None,
    offers: list[Offer] | None = None,
    min_vram_gib: float | None = None,
    exclude: list[str] | None = None,
    bootstrap: bool = True,
) -> Plan:
    """Every fitting (offer, spot/on-demand) option, cheapest estimated job first.

    `bootstrap`: cloud machines start a public image and install cloudtune first (run/bootstrap.py).

    `gpus` forces the total GPU count (data parallel, sharded); None tries each offer's own count,
    and multi-node (2 or 4 nodes of 8) only when no single node holds the job."""
    from cloudtune.providers import CLOUD_PROVIDERS, check_provider_name

    for name in providers or ():
        check_provider_name(name)
    if providers and "skypilot" in providers:
        raise UserError("skypilot is how multi-node options launch, not a catalog of offers; name the clouds "
                        "instead (--provider aws,lambda): their multi-node options launch through SkyPilot")
    if providers and "local" in providers:
        raise UserError("the local provider has no catalog offers to rank; plan local jobs with plan_for_spec "
                        "or pass cloud providers only")
    gpus = gpus if gpus is not None else cfg.gpus
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    pool = [o for o in (offers if offers is not None else load_offers(providers)) if o.provider in CLOUD_PROVIDERS]
    if providers:
        pool = [o for o in pool if o.provider in providers]
    from cloudtune.planner.filters import filter_gpus, region_matches, split_list

    if exclude:
        pool = [o for o in pool if o.provider not in set(split_list(exclude))]
    if gpu_types:  # family-tolerant: h100 -> H100-SXM, H100-NVL, ... (never V100)
        names = filter_gpus({o.gpu for o in pool}, split_list(gpu_types), set(gpu_specs()) | {o.gpu for o in pool})
        pool = [o for o in pool if o.gpu in names]
    if region:
        regions = split_list(region)
        pool = [o for o in pool if any(region_matches(o.region, r) for r in regions)]
    if min_vram_gib is not None:
        pool = [o for o in pool if o.vram_gib_per_gpu >= min_vram_gib]

    specs = gpu_specs()
    memo: dict[tuple[int, str], MemoryEstimate] = {}

    def mem_for(n: int, spec: GpuSpec | None = None) -> MemoryEstimate:
        c = config_for_gpu(cfg, spec) if spec is not None else cfg
        key = (n, c.full_precision)
        if key not in memo:
            memo[key] = _estimate_memory(arch, c, n)
        return memo[key]

    skipped: Counter[tuple[str, str]] = Counter()
    candidates: list[tuple[Offer, GpuSpec, int, int]] = []  # offer, spec, total gpus, nodes
    for offer in pool:
        spec = specs.get(offer.gpu)
        if spec is None:
            skipped[(offer.gpu, "GPU not in gpus.csv")] += 1
            continue
        why = incompatibility(spec, cfg)
        if why:
            skipped[(offer.gpu, why)] += 1
            continue
        if gpus is None or offer.gpu_count == gpus:
            candidates.append((offer, spec, offer.gpu_count, 1))
        elif gpus > offer.gpu_count and offer.gpu_count == 8 and gpus % 8 == 0 \
                and offer.provider in MULTI_NODE_PROVIDERS:
            candidates.append((offer, spec, gpus, gpus // 8))

    fitting: list[tuple[Offer, GpuSpec, int, int, MemoryEstimate]] = []
    for offer, spec, n, nodes in candidates:
        mem = mem_for(n, spec)
        if _fits(mem, offer.vram_gib_per_gpu):
            fitting.append((offer, spec, n, nodes, mem))
    if not fitting and gpus is None:
        # past one node: 2 or 4 nodes of 8 GPUs, where the provider can launch a cluster
        for nodes in NODE_COUNTS:
            for offer, spec, n, _ in candidates:
                if n != 8 or offer.provider not in MULTI_NODE_PROVIDERS:
                    continue
                mem = mem_for(8 * nodes, spec)
                if _fits(mem, offer.vram_gib_per_gpu):
                    fitting.append((offer, spec, 8 * nodes, nodes, mem))
            if fitting:
                break

    from cloudtune.planner import spot as spot_prices

    ratios = spot_prices.usual_ratios(pool)
    times: dict[tuple[str, int, int, str, bool, str], TimeEstimate] = {}
    options: list[PlanOption] = []
    above_price: list[PlanOption] = []
    for offer, spec, n, nodes, mem in fitting:
        modes = []
        if spot is not True and offer.price_hr is not None:
            modes.append((False, offer.price_hr))
        if spot is not False and offer.spot_price_hr is not None:
            modes.append((True, offer.spot_price_hr))
        for is_spot, price in modes:
            key = (offer.gpu, n, nodes, offer.provider, is_spot, offer.offer_id if n > 1 else "")
            if key not in times:
                times[key] = estimate_time(
                    arch, config_for_gpu(cfg, spec), workload, spec, gpus=n, nodes=nodes, sharding=mem.sharding,
                    trainable_params=mem.trainable_params, provider=offer.provider, spot=is_spot,
                    offer_id=offer.offer_id,  # the fabric between its GPUs (planner/interconnect.py)
                    checkpoint_minutes=checkpoint_minutes, bootstrap=bootstrap,
                )
            t = times[key]
            hours = billed_hours(t.total_hours, offer.provider, offer.billing_granularity_s)
            total_price = price * nodes
            notes = []
            if nodes > 1:
                notes.append(f"multi-node: {nodes} nodes x {offer.gpu_count} GPUs (launched through SkyPilot)")
            if not spec.bf16:
                notes.append("no bf16: trains in fp16 mixed precision")
            if is_spot and t.expected_restarts:
                notes.append(f"spot: ~{t.expected_restarts:.1f} expected interruptions included")
            if offer.provider == "modal":
                notes.append(f"price includes Modal CPU + memory (+${modal_cpu_memory(n):.2f}/h)")
            suspect = is_spot and spot_prices.is_suspect(offer, ratios)
            rank_price = total_price
            if suspect:
                rank_price = (spot_prices.spot_floor(offer, ratios) or price) * nodes
                notes.append(spot_prices.describe(offer, ratios))
            option = PlanOption(
                offer=offer, spot=is_spot, price_hr=total_price, gpu_count=n, nodes=nodes,
                est_hours=t.total_hours, est_cost_usd=hours * total_price,
                headroom_gib=offer.vram_gib_per_gpu - (mem.fit_gib or mem.per_gpu_gib),
                memory=mem, time=t, notes=notes, suspect_spot=suspect, rank_cost_usd=hours * rank_price,
            )
            if max_price_hr is not None and total_price > max_price_hr:
                above_price.append(option)
            else:
                options.append(option)
    options.sort(key=lambda o: (o.rank_cost_usd, o.est_hours, o.price_hr, o.provider, o.region, o.offer.offer_id))
    options = rank_hygiene(options)
    for o in options:
        o.launcher, o.launch_via, o.not_launchable = launch_route(o)
    unlaunchable = [o for o in options if o.not_launchable]
    options = [o for o in options if not o.not_launchable]

    smallest = min((n for _, _, n, _ in candidates), default=gpus or 1)
    memory = options[0].memory if options else mem_for(smallest)
    plan = Plan(
        model=arch,
        config=cfg,
        workload=workload,
        memory=memory,
        options=options,
        skipped=[Skipped(g, r, c) for (g, r), c in sorted(skipped.items())],
        assumptions=_assumptions(cfg, workload, spot, max_price_hr),
        catalog_age=catalog_age(pool) if pool else "no offers",
        unlaunchable=unlaunchable,
    )
    if not options and unlaunchable:
        reasons = "; ".join(dict.fromkeys(f"{o.label()} on {o.provider}: {o.not_launchable}" for o in unlaunchable[:3]))
        plan.nothing_fits = (f"{len(unlaunchable)} option(s) fit but none can be launched ({reasons}); "
                             f"try --provider aws or lambda for multi-node, or {_suggest(cfg, gpus)}")
    elif not options:
        plan.nothing_fits = _why_nothing(plan, pool, candidates, fitting, above_price, gpus, max_price_hr, mem_for)
    return plan


def comfort_line_gib(usable_gib: float) -> float:
    """The pressed footprint above which a fit is tight: SAFETY_FRACTION of the card, less
    TIGHT_FIT_FRACTION of it (or TIGHT_FIT_GIB, the larger)."""
    return usable_gib * SAFETY_FRACTION - max(TIGHT_FIT_GIB, TIGHT_FIT_FRACTION * usable_gib)


def is_tight(o: PlanOption) -> bool:
    """The pressed footprint above the comfort line (per GPU)."""
    if o.headroom_gib is None:
        return False
    usable = o.offer.vram_gib_per_gpu
    return usable - o.headroom_gib > comfort_line_gib(usable)


def rank_hygiene(options: list[PlanOption]) -> list[PlanOption]:
    """Reorder options sorted by rank cost: comfortable fits before tight ones, and within each, the
    option with the fewest GPUs among those within FEWER_GPUS_WITHIN of the cheapest remaining one.
    Every option is kept (run fails over through all of them); only the order changes."""
    for o in options:
        o.tight_fit = is_tight(o)
        if o.tight_fit and not any(n.startswith("tight fit") for n in o.notes):
            usable = o.offer.vram_gib_per_gpu
            inside = usable - o.headroom_gib > usable * SAFETY_FRACTION
            o.notes.append(f"tight fit: {o.headroom_gib:.1f} GiB of the card left per GPU at the peak"
                           + (f", inside the {1 - SAFETY_FRACTION:.0%} margin the estimate's error needs: it runs only "
                              "because the allocator gives its cache back near the card" if inside else "")
                           + "; an allocator spike or a long batch may OOM")
    out: list[PlanOption] = []
    for tier in ([o for o in options if not o.tight_fit], [o for o in options if o.tight_fit]):
        rest = list(tier)
        while rest:
            ceiling = (rest[0].rank_cost_usd or 0.0) * (1 + FEWER_GPUS_WITHIN)
            end = 1
            while end < len(rest) and (rest[end].rank_cost_usd or 0.0) <= ceiling:
                end += 1
            best = min(range(end), key=lambda i: (rest[i].gpu_count, i))
            out.append(rest.pop(best))
    return out


def fold_regions(options: list[PlanOption]) -> list[PlanOption]:
    """One row per provider x GPU x count x nodes x spot: the best-ranked region stands for the rest,
    which are listed in its `also_regions` (the table's view; `plan.options` keeps every region)."""
    rows: dict[tuple[str, str, int, int, bool], PlanOption] = {}
    for o in options:
        key = (o.provider, o.gpu, o.gpu_count, o.nodes, o.spot)
        head = rows.get(key)
        if head is None:
            o.also_regions = []
            rows[key] = o
        elif o.region != head.region and o.region not in head.also_regions:
            head.also_regions.append(o.region)
    return list(rows.values())


def launch_route(o: PlanOption) -> tuple[str, str, str]:
    """(launcher, adapter, why not) for an option: what `cloudtune run` would start for it.

    One machine, one GPU: the trainer itself. One machine, several GPUs: the trainer's launcher
    (`python -m cloudtune.trainer.launch`, accelerate) on the offer's own provider; every adapter
    rents multi-GPU offers. Several machines: a SkyPilot cluster (providers/skypilot.py), on the
    clouds where SkyPilot runs multi-node. Anything else is kept out of the ranking, with the reason."""
    from cloudtune.providers.skypilot import PROVIDER as SKYPILOT
    from cloudtune.providers.skypilot import launch_problem

    sharding = (o.memory.sharding if o.memory is not None else None) or ("none" if o.gpu_count <= 1 else "fsdp")
    launcher = LAUNCHERS.get(sharding, sharding)
    why = ""
    if o.gpu_count > 1 and sharding not in TRAINER_SHARDINGS:
        why = f"{sharding} needs DeepSpeed, which the trainer image does not have; use --sharding fsdp"
    if o.nodes > 1:
        problem = launch_problem(o.offer, o.nodes, o.spot)
        return f"skypilot+{launcher}", SKYPILOT, why or (problem or "")
    return launcher, o.offer.provider, why


def _assumptions(cfg: TrainConfig, workload: Workload, spot: bool | None, max_price: float | None) -> dict[str, Any]:
    return {
        "workload": workload.to_dict(cfg.seq_len),
        "fit": f"pressed per-GPU footprint (allocated + {_min_slack():.0%} allocator slack + CUDA context: torch "
        f"gives its cache back before an OOM) <= the card's usable memory (nvidia-smi total); above "
        f"{SAFETY_FRACTION:.0%} of it less {TIGHT_FIT_FRACTION:.0%} (or {TIGHT_FIT_GIB:g} GiB) the fit is tight",
        "ranking": "estimated job cost (billed hours x price), then hours; a spot price under half the "
        "provider's usual spot discount (suspect_spot) is ranked at that floor; comfortable fits before tight "
        f"ones (footprint above {SAFETY_FRACTION:.0%} of the card less {TIGHT_FIT_FRACTION:.0%} or {TIGHT_FIT_GIB:g} GiB); "
        "fewer GPUs first "
        f"among options within {FEWER_GPUS_WITHIN:.0%} of the same cost",
        "spot": {None: "spot and on-demand both considered", True: "spot only", False: "on-demand only"}[spot],
        "max_price_hr": max_price,
        "billing": "per second (AWS: 60 s minimum; Lambda: per minute); hours include boot, model download, "
        "training, the idle tail before teardown and, for spot, expected interruptions",
        "prices": "$/h of the whole offer as listed (disk, egress and storage extra); " + modal_surcharge_note(),
        "time_model": throughput.assumptions(),
    }


def _min_slack() -> float:
    from cloudtune.planner.memory import ALLOCATOR_MIN_FRACTION

    return ALLOCATOR_MIN_FRACTION


def _suggest(cfg: TrainConfig, gpus: int | None) -> str:
    tips = []
    if cfg.method == "full":
        tips.append("--method lora or --method qlora")
    elif cfg.method == "lora":
        tips.append("--method qlora")
    if cfg.micro_batch > 1:
        tips.append("--batch-size 1")
    if not cfg.gradient_checkpointing:
        tips.append("--gradient-checkpointing")
    if not gpus or gpus < 8:
        tips.append("--gpus 8")
    elif gpus < 128:
        tips.append(f"--gpus {gpus * 2} (multi-node)")
    if cfg.seq_len > 2048:
        tips.append("a shorter --seq-len")
    return " or ".join(tips) if tips else "a smaller model"


def _why_nothing(plan, pool, candidates, fitting, above_price, gpus, max_price_hr, mem_for) -> str:
    cfg = plan.config
    if not pool:
        return "no offers in the catalog for these filters; check --provider, or run `cloudtune catalog show`"
    if not candidates:
        if plan.skipped and gpus is None:
            reasons = "; ".join(f"{s.gpu}: {s.reason}" for s in plan.skipped[:3])
            return f"no usable GPU among the offers ({reasons}); try another --provider"
        counts = sorted({o.gpu_count for o in pool})
        return (f"no offer with {gpus} GPUs for these providers (the catalog has nodes of "
                f"{', '.join(map(str, counts))} GPUs); pass one of those to --gpus, or 16/32 for multi-node")
    if not fitting:
        largest = max(o.vram_gib_per_gpu for o, *_ in candidates)
        n = gpus or 1
        need = mem_for(n).fit_gib or mem_for(n).per_gpu_gib
        extra = ""
        hint_gpus = gpus
        if gpus is None and 8 in {c[2] for c in candidates}:
            on8 = mem_for(8).fit_gib or mem_for(8).per_gpu_gib
            extra = f" ({on8:.0f} GiB on 8)"
            if on8 > largest:
                hint_gpus = 8 * NODE_COUNTS[-1]  # even the largest cluster tried is not enough
        return (f"nothing fits: needs {need:.0f} GiB per GPU on {n} GPU{'s' if n > 1 else ''}{extra}, the largest "
                f"card holds {largest:.0f} GiB; try {_suggest(cfg, hint_gpus)}")
    if above_price:
        cheapest = min(above_price, key=lambda o: o.price_hr)
        return (f"nothing fits under --max-price-hr {max_price_hr:g}: the cheapest fitting option is "
                f"{cheapest.label()} on {cheapest.provider} at ${cheapest.price_hr:.2f}/h; raise --max-price-hr"
                + {"full": " or try --method lora or --method qlora", "lora": " or try --method qlora"}.get(cfg.method, ""))
    return "nothing fits: no fitting offer has a price for the requested tier; drop --spot/--on-demand"


# ---------------------------------------------------------------- from a JobSpec (cloudtune run)


def workload_for_spec(spec: Any) -> Workload:
    """Samples and tokens from the head of the spec's training data (planner/dataset_stats.from_head:
    a local file's first bytes; for s3:// the head validate_data already read in `run`/`check`, the
    planner itself never calls S3), else defaults (a hub dataset; s3:// data in `plan SPEC`).

    With training.max_steps the Trainer runs exactly max_steps optimizer steps, cycling through the
    data as often as needed (or stopping inside the first pass), so the workload is max_steps x the
    samples of one step, not one pass of the file."""
    from pathlib import Path

    from cloudtune.planner.dataset_stats import from_head

    epochs = float(spec.training.epochs)
    train = spec.data.train
    stats, why = None, ""
    if train and (train.startswith(("s3://", "file://")) or Path(train).expanduser().exists()):
        stats = from_head(train)  # s3://: only the head `run`/`check` already read (no request here)
        if stats is None:
            why = f"; {train} is sized by `cloudtune run SPEC --dry-run` or `cloudtune check SPEC`, which read its head"
    if stats is not None:
        workload = Workload(stats.records, stats.avg_tokens, epochs,
                            f"dataset {train}: {stats.records_text()} ({stats.method})")
    else:
        base = throughput.default_workload(spec.data.max_seq_len)
        workload = Workload(base.samples, base.avg_tokens, epochs, base.source + why)
    if spec.training.max_steps:
        per_step = spec.training.micro_batch * spec.training.grad_accum * (spec.resources.gpus or 1)
        samples = spec.training.max_steps * per_step
        workload = Workload(samples, workload.avg_tokens, 1.0,
                            f"{workload.source}, training.max_steps {spec.training.max_steps} x {per_step} samples/step")
    return workload


def _spec_providers(spec: Any, providers: list[str] | None) -> list[str]:
    if providers:
        return list(providers)
    p = spec.resources.provider
    if p is None:
        return ["local"]
    return [p] if isinstance(p, str) else list(p)


def plan_for_spec(
    spec: Any,
    *,
    providers: list[str] | None = None,
    spot: bool | None = None,
    max_price_hr: float | None = None,
    offers: list[Offer] | None = None,
) -> Plan:
    """The plan `cloudtune run` executes. Arguments override the spec's `resources`; the default
    provider is `local` (one option: this machine, no fit check, a rough CPU time estimate)."""
    from cloudtune.planner.models import resolve_model
    from cloudtune.providers import check_provider_name

    names = _spec_providers(spec, providers)
    for name in names:
        check_provider_name(name)
    cfg = TrainConfig.from_spec(spec)
    workload = workload_for_spec(spec)
    arch = resolve_model(spec.model)
    if "local" in names:
        if len(names) > 1:
            raise UserError(f"provider 'local' cannot be combined with cloud providers ({', '.join(names)}); "
                            "pick local or the clouds")
        return _local_plan(arch, cfg, workload, spec)
    res = spec.resources
    return make_plan(
        arch, cfg, workload,
        providers=names,
        spot=res.spot if spot is None else spot,
        max_price_hr=res.max_price_hr if max_price_hr is None else max_price_hr,
        gpus=res.gpus,
        gpu_types=[res.gpu] if res.gpu else None,
        region=res.region,
        checkpoint_minutes=spec.checkpoint.every_minutes,
        bootstrap=str(res.image).startswith(PUBLIC_BASES),
        offers=offers,
    )


def _local_plan(arch: ModelArch, cfg: TrainConfig, workload: Workload, spec: Any) -> Plan:
    """One option: this machine. Nothing to fit against (it runs on whatever is here)."""
    price = float(spec.local.price_hr)
    cores = os.cpu_count() or 1
    t = throughput.estimate_local_time(arch, cfg, workload, cores)
    hours = t.total_hours
    offer = Offer(provider="local", offer_id="local", gpu="local", gpu_count=0, vram_gib_per_gpu=0.0,
                  region="local", price_hr=price, as_of="now", fresh=True)
    try:
        memory = _estimate_memory(arch, cfg, 1)
    except Exception:  # noqa: BLE001 - an estimate is informative only here; a local run needs none
        memory = None
    option = PlanOption(
        offer=offer, spot=False, price_hr=price, gpu_count=0, est_hours=hours, est_cost_usd=hours * price,
        headroom_gib=None, memory=memory,
        notes=[f"local machine: rough CPU estimate ({throughput.TRAINER_STARTUP_S:g} s start-up + {t.micro_steps} steps x "
               f"{throughput.LOCAL_MICRO_STEP_OVERHEAD_S * 1000:g} ms + FLOPs at {cores} cores x "
               f"{throughput.LOCAL_CPU_GFLOPS_PER_CORE:g} GFLOP/s), no fit check"],
    )
    assumptions = _assumptions(cfg, workload, False, None)
    assumptions["local"] = option.notes[0]
    return Plan(model=arch, config=cfg, workload=workload, memory=memory, options=[option],
                assumptions=assumptions, catalog_age="local machine")
