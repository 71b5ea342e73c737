"""`cloudtune plan`: what fits, where, for how much. Flags in, ranked options out (table or --json).

Only typer is imported at module level: `cloudtune --help` must not pay for the planner, and the
planner itself imports no torch/boto3/httpx.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from cloudtune.errors import UserError

METHODS = ("full", "lora", "qlora")
# The optimizers the trainer accepts: cloudtune.spec.OPTIMIZERS, repeated here so `plan` does not build
# the pydantic spec models at startup (tests/test_plan_cli.py keeps the two equal).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adafactor", "sgd")
OPTIMIZER_ALIASES = {"adamw": "adamw_torch"}  # = cloudtune.spec.OPTIMIZER_ALIASES (tests keep them equal)
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
SHARDINGS = ("ddp", "fsdp", "zero2", "zero3")
FULL_PRECISIONS = ("bf16", "mixed")


def register(app: typer.Typer) -> None:
    app.command("plan", help="Estimate memory, time and cost of a fine-tuning job and rank the offers that fit.")(plan)


def plan(
    spec_path: str | None = typer.Argument(None, metavar="[SPEC]", help="a job spec (YAML/JSON): plan exactly what "
                                           "`cloudtune run SPEC` would run; the flags below are for spec-less plans"),
    spec_opt: str | None = typer.Option(None, "--spec", help="the same as the SPEC argument"),
    model: str | None = typer.Option(None, "--model", "-m", help="size (8b, 70b, 8x7b), model id, config.json path "
                                     "or hub id (without SPEC)"),
    method: str = typer.Option("lora", "--method", help="full, lora or qlora"),
    quant_bits: int | None = typer.Option(None, "--quant-bits", help="qlora base precision: 4 (NF4) or 8"),
    seq_len: int = typer.Option(2048, "--seq-len", help="tokens per sequence (max_seq_len)"),
    batch_size: int = typer.Option(1, "--batch-size", help="micro batch per GPU"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="gradient accumulation steps"),
    lora_rank: int = typer.Option(16, "--lora-rank", help="LoRA rank r"),
    lora_targets: str = typer.Option("all-linear", "--lora-targets",
                                     help="all-linear, attention, or a comma list such as q_proj,v_proj"),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="recompute activations in the backward pass"),
    optimizer: str = typer.Option("adamw_torch", "--optimizer",
                                  help="adamw_torch (alias adamw), adamw_8bit, paged_adamw_8bit, sgd, ..."),
    attention: str = typer.Option("sdpa", "--attention", help="sdpa, eager or flash_attention_2"),
    sharding: str | None = typer.Option(None, "--sharding",
                                        help="multi-GPU: ddp, fsdp, zero2 or zero3 (default: fsdp on several GPUs)"),
    offload: bool = typer.Option(False, "--offload/--no-offload",
                                 help="FSDP/ZeRO CPU offload of optimizer states, gradients (and parameter shards)"),
    full_precision: str = typer.Option("bf16", "--full-precision",
                                       help="full fine-tunes: bf16 (pure bf16 weights) or mixed (fp32 master weights)"),
    gpus: int | None = typer.Option(None, "--gpus", help="force N GPUs (data parallel, sharded); 16/32 = multi-node"),
    samples: int | None = typer.Option(None, "--samples", help="training samples (default: from --dataset, else 10000)"),
    avg_tokens: float | None = typer.Option(None, "--avg-tokens", help="average tokens per sample"),
    epochs: float = typer.Option(1.0, "--epochs", help="passes over the data"),
    dataset: str | None = typer.Option(None, "--dataset", help=".jsonl/.json/.parquet file to count samples and tokens"),
    spot: bool | None = typer.Option(None, "--spot/--on-demand", help="only spot, or only on-demand (default: both)"),
    provider: list[str] = typer.Option([], "--provider", "-p", help="only these providers (repeatable or comma-separated)"),
    exclude: list[str] = typer.Option([], "--exclude", help="leave out these providers (repeatable or comma-separated)"),
    gpu: list[str] = typer.Option([], "--gpu", "-g", help="only these GPUs or families: h100 = H100-SXM/PCIe/NVL "
                                                         "(repeatable or comma-separated; case-insensitive)"),
    region: list[str] = typer.Option([], "--region", help="only these regions, by prefix: us, us-east, eu-west-1 "
                                                         "(repeatable or comma-separated)"),
    min_vram: float | None = typer.Option(None, "--min-vram", help="only GPUs with at least this many GiB each"),
    all_regions: bool = typer.Option(False, "--all-regions",
                                     help="one table row per region (default: regions folded into one row)"),
    max_price_hr: float | None = typer.Option(None, "--max-price-hr", help="skip options above this $/hour"),
    top: int = typer.Option(10, "--top", help="show the N best options (0 = all)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (the plan contract) instead of tables"),
) -> None:
    if spec_path or spec_opt:
        if model:
            raise UserError("give either a job spec or --model, not both (the spec names its model)")
        ignored = [flag for flag, v in (("--exclude", exclude), ("--gpu", gpu), ("--region", region),
                                        ("--min-vram", min_vram)) if v]
        if ignored:  # a SPEC plans what `run SPEC` runs: a filter here would show a plan run never makes
            raise UserError(f"{', '.join(ignored)} applies to plans without a SPEC; with a SPEC, set resources.gpu / "
                            f"resources.region / resources.provider in it (or -p), then `cloudtune plan SPEC`")
        _plan_spec(spec_path or spec_opt, provider, spot, max_price_hr, top, as_json, all_regions)
        return
    if not model:
        raise UserError("nothing to plan: pass a job spec (`cloudtune plan examples/quickstart.yaml`) or --model, "
                        "e.g. `cloudtune plan -m 8b --method qlora`")
    from cloudtune.planner.plan import make_plan

    cfg = _config(method, quant_bits, seq_len, batch_size, grad_accum, lora_rank, lora_targets,
                  gradient_checkpointing, optimizer, gpus, attention=attention, sharding=sharding,
                  offload=offload, full_precision=full_precision)
    if top < 0:
        raise UserError(f"--top must be >= 0 (0 = all), got {top}")
    if max_price_hr is not None and max_price_hr <= 0:
        raise UserError(f"--max-price-hr must be > 0, got {max_price_hr:g}")
    workload = _workload(seq_len, samples, avg_tokens, epochs, dataset)
    from cloudtune.planner.filters import split_list
    from cloudtune.planner.models import resolve_model
    from cloudtune.providers import check_provider_name

    provider, exclude = split_list(provider), split_list(exclude)
    for name in provider + exclude:
        check_provider_name(name)
    if min_vram is not None and min_vram <= 0:
        raise UserError(f"--min-vram must be > 0 GiB, got {min_vram:g}")
    if provider and set(provider) <= set(exclude):
        raise UserError(f"--exclude {','.join(exclude)} leaves none of --provider {','.join(provider)}; drop one")
    arch = resolve_model(model)
    result = make_plan(arch, cfg, workload, providers=provider or None, spot=spot,
                       max_price_hr=max_price_hr, gpus=gpus, gpu_types=split_list(gpu) or None,
                       region=split_list(region) or None, min_vram_gib=min_vram, exclude=exclude or None)
    _show(result, top, as_json, all_regions)


def _show(result, top: int, as_json: bool, all_regions: bool) -> None:
    """JSON (exit 2 after it when nothing fits) or the table; shared by `plan` and `plan SPEC`."""
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(top=top), indent=2) + "\n")
        if not result.options:
            print(f"error: {result.nothing_fits}", file=sys.stderr)
            raise typer.Exit(2)
        return
    result.raise_if_empty()
    _render(result, top, all_regions=all_regions)


def _plan_spec(path: str, provider: list[str], spot: bool | None, max_price_hr: float | None, top: int,
               as_json: bool, all_regions: bool) -> None:
    """`cloudtune plan SPEC`: the plan `cloudtune run SPEC` executes (same planner call, same providers)."""
    from cloudtune.planner.filters import split_list
    from cloudtune.planner.plan import plan_for_spec
    from cloudtune.spec import load_spec

    spec = load_spec(path)
    result = plan_for_spec(spec, providers=split_list(provider) or None, spot=spot, max_price_hr=max_price_hr)
    _show(result, top, as_json, all_regions)
    print(f"next: `cloudtune check {path}` (credentials, store, token), then `cloudtune run {path}`", file=sys.stderr)


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        import difflib

        near = difflib.get_close_matches(value, allowed, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"unknown {flag} {value!r}; {hint}choose one of {', '.join(allowed)}")
    return value


def _config(method, quant_bits, seq_len, batch_size, grad_accum, lora_rank, lora_targets,
            gradient_checkpointing, optimizer, gpus, *, attention="sdpa", sharding=None, offload=False,
            full_precision="bf16"):
    from cloudtune.planner.types import TrainConfig

    _choice("--attention", attention, ATTENTIONS)
    if sharding is not None:
        _choice("--sharding", sharding, SHARDINGS)
    _choice("--full-precision", full_precision, FULL_PRECISIONS)
    if offload and sharding == "ddp":
        raise UserError("--offload needs --sharding fsdp, zero2 or zero3 (DDP keeps every state on the GPU)")
    if full_precision != "bf16" and method != "full":
        raise UserError(f"--full-precision {full_precision} applies to --method full only (got --method {method})")
    optimizer = OPTIMIZER_ALIASES.get(optimizer, optimizer)

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use full, lora or qlora")
    if method == "qlora":
        bits = 4 if quant_bits is None else quant_bits
        if bits not in (4, 8):
            raise UserError(f"--method qlora needs --quant-bits 4 or 8, got {bits}; use --method lora for a 16-bit base")
    else:
        if quant_bits not in (None, 16):
            raise UserError(f"--quant-bits {quant_bits} needs --method qlora (got --method {method})")
        bits = 16
    for flag, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--grad-accum", grad_accum)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if method != "full" and lora_rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {lora_rank}; typical values are 8, 16 or 64")
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if optimizer not in OPTIMIZERS:
        import difflib

        near = difflib.get_close_matches(optimizer, OPTIMIZERS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"unknown --optimizer {optimizer!r}; {hint}choose one of {', '.join(OPTIMIZERS)} "
                        "(adamw = adamw_torch)")
    targets: str | tuple[str, ...] = lora_targets
    if lora_targets not in ("all-linear", "attention"):
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        if not targets:
            raise UserError("--lora-targets is empty; use all-linear, attention or a list such as q_proj,v_proj")
    return TrainConfig(
        method=method, quant_bits=bits, seq_len=seq_len, micro_batch=batch_size, grad_accum=grad_accum,
        lora_rank=lora_rank, lora_targets=targets, gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer, gpus=gpus, attention=attention, sharding=sharding, offload=offload,
        full_precision=full_precision,
    )


def _workload(seq_len: int, samples: int | None, avg_tokens: float | None, epochs: float, dataset: str | None):
    from cloudtune.planner.throughput import DEFAULT_SAMPLES, Workload

    if samples is not None and samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if avg_tokens is not None and avg_tokens <= 0:
        raise UserError(f"--avg-tokens must be > 0, got {avg_tokens:g}")
    if epochs <= 0:
        raise UserError(f"--epochs must be > 0, got {epochs:g}")
    if dataset:
        from cloudtune.planner.dataset_stats import dataset_stats

        stats = dataset_stats(dataset)
        source = f"dataset {dataset}: {stats.records} records, ~{stats.avg_tokens:.0f} tokens each ({stats.method})"
        if samples is not None or avg_tokens is not None:
            source += "; overridden by flags"
        return Workload(samples or stats.records, avg_tokens or stats.avg_tokens, epochs, source)
    if samples is None and avg_tokens is None:
        return Workload(DEFAULT_SAMPLES, max(1.0, seq_len / 2), epochs,
                        "default: 10000 samples of seq-len/2 tokens (pass --samples/--avg-tokens or --dataset)")
    return Workload(samples or DEFAULT_SAMPLES, avg_tokens or max(1.0, seq_len / 2), epochs, "flags")


# ---------------------------------------------------------------- rendering


def _fmt_hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _render(result: Any, top: int, *, all_regions: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from cloudtune.planner.plan import fold_regions

    # a pipe or a file gets whole rows (ids, providers, GPUs, regions never cut to 80 columns)
    console = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 200)
    console.width = console.width  # detect the terminal once, not on every measure (~100 ioctl calls)
    arch, cfg, mem = result.model, result.config, result.memory
    bits = f" {cfg.quant_bits}-bit" if cfg.method == "qlora" else ""
    console.print(
        f"[bold]{arch.id}[/] ({arch.params_b:g} B params, {arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab})"
        f"  {cfg.method}{bits}, seq {cfg.seq_len}, micro-batch {cfg.micro_batch}, grad-accum {cfg.grad_accum}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optimizer}, {cfg.attention}"
        + (f", full_precision {mem.full_precision}" if mem is not None and mem.full_precision else "")
        + (f", sharding {cfg.sharding}" if cfg.sharding else "") + (", CPU offload" if cfg.offload else "")
    )
    if mem is not None:
        # The heading is its own line: as a table title it would wrap to the narrow table's width.
        console.print(f"[italic]Memory per GPU: {mem.per_gpu_gib:.1f} GiB on {mem.gpus} "
                      f"GPU{'s' if mem.gpus > 1 else ''}{f' ({mem.sharding})' if mem.gpus > 1 else ''}[/]")
        t = Table()
        t.add_column("component")
        t.add_column("GiB", justify="right")
        for key, value in mem.breakdown_gib.items():
            t.add_row(key, f"{value:.2f}")
        t.add_row("[bold]total[/]", f"[bold]{mem.per_gpu_gib:.2f}[/]")
        console.print(t)
        if mem.fit_gib:
            console.print(f"  [dim]fit test: {mem.fit_gib:.1f} GiB with the allocator cache given back "
                          "(what must fit the card)[/]")
        for note in mem.notes:
            console.print(f"  [dim]{note}[/]")

    rows = result.options if all_regions else fold_regions(result.options)
    shown = rows if top == 0 else rows[:top]
    folded = "" if all_regions else "; regions folded, --all-regions expands"
    t = Table(title=f"Options ({len(shown)} of {len(rows)}, cheapest job first{folded})", title_justify="left")
    for col, just in (("#", "right"), ("provider", "left"), ("GPU x count", "left"), ("spot", "center"),
                      ("$/h", "right"), ("est. hours", "right"), ("est. cost", "right"), ("headroom", "right"),
                      ("region", "left")):
        keep = col in ("provider", "GPU x count", "region")
        t.add_column(col, justify=just, no_wrap=keep or col != "region", overflow="fold")
    for i, o in enumerate(shown, start=1):
        where = o.region if all_regions or not o.also_regions else f"{o.region} +{len(o.also_regions)} more"
        head = "-" if o.headroom_gib is None else (  # None: the local machine, no fit check
            f"{o.headroom_gib:.1f} GiB" + (" [yellow]tight[/]" if o.tight_fit else ""))
        t.add_row(str(i), o.provider, o.label(), ("suspect" if o.suspect_spot else "yes") if o.spot else "-",
                  f"{o.price_hr:.2f}", _fmt_hours(o.est_hours), f"${o.est_cost_usd:,.2f}", head, where)
    console.print(t)
    if any(o.tight_fit for o in shown):
        console.print("  [dim]tight: under 5% of the card (or 1 GiB) to spare; ranked after comfortable fits[/]")
    choice = result.choice
    extra = f"; {'; '.join(choice.notes)}" if choice.notes else ""
    console.print(f"[bold green]choice:[/] {choice.provider} {choice.offer.offer_id} ({choice.label()}) in {choice.region}"
                  f"{' spot' if choice.spot else ''}, ${choice.price_hr:.2f}/h, ~{_fmt_hours(choice.est_hours)}, "
                  f"~${choice.est_cost_usd:,.2f}{extra}")
    by_reason: dict[str, list[str]] = {}
    for s in result.skipped:
        by_reason.setdefault(s.reason, []).append(f"{s.gpu} {s.offers}")
    for reason, gpus in by_reason.items():
        console.print(f"  [dim]skipped ({', '.join(gpus)} offers): {reason}[/]")
    blocked: dict[str, list[str]] = {}
    for o in result.unlaunchable:
        blocked.setdefault(o.not_launchable, []).append(f"{o.provider} {o.label()}")
    for reason, labels in blocked.items():
        shown_labels = ", ".join(dict.fromkeys(labels[:4])) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        console.print(f"  [dim]not launchable, so not ranked ({shown_labels}): {reason}[/]")

    a = result.assumptions
    tm = a["time_model"]
    w = a["workload"]
    console.print("[bold]Assumptions[/]")
    console.print(f"  workload: {w['samples']} samples x {w['avg_tokens']:g} tokens x {w['epochs']:g} epochs = "
                  f"{w['tokens']:,} tokens ({w['source']})")
    if choice.time is not None and choice.time.ok:
        ct = choice.time
        console.print(f"  speed on the choice: ~{ct.tokens_per_sec:,.0f} tokens/s at {ct.hfu:.0%} of peak "
                      f"{choice.offer.gpu} {'bf16' if _bf16(choice.gpu) else 'fp16'} (HFU), "
                      f"{ct.flops_per_token / 1e9:,.0f} GFLOP/token")
    console.print(f"  FLOPs: {tm['flops_per_token']}")
    console.print(f"  HFU by GPU class: {', '.join(f'{k} {v:.0%}' for k, v in tm['hfu_by_gpu_class'].items())}")
    console.print(f"  fit: {a['fit']}; ranking: {a['ranking']}; {a['spot']}")
    console.print(f"  spot: {tm['spot_lost_work']}; interruptions/h {tm['spot_interruptions_per_hour']}")
    console.print(f"  billing: {a['billing']}")
    console.print(f"  prices: {a['prices']}")
    console.print(f"[dim]catalog: {result.catalog_age}. `cloudtune catalog refresh` fetches live prices.[/]")


def _bf16(gpu: str) -> bool:
    from cloudtune.catalog import gpu_spec

    spec = gpu_spec(gpu)
    return bool(spec and spec.bf16)
