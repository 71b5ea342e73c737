"""`cloudtune catalog show|refresh`: the offers behind the planner, and how old they are."""

from __future__ import annotations

import json
import sys

import typer

from cloudtune.errors import UserError

catalog_app = typer.Typer(help="The GPU offers the planner ranks: show them, or refresh them from the providers.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(catalog_app, name="catalog")


@catalog_app.command("show")
def show(
    provider: list[str] = typer.Option([], "--provider", "-p", help="only these providers (repeatable or comma-separated)"),
    gpu: list[str] = typer.Option([], "--gpu", "-g", help="only these GPUs or families: h100 = H100-SXM/PCIe/NVL "
                                                         "(repeatable or comma-separated; case-insensitive)"),
    all_rows: bool = typer.Option(False, "--all", help="every offer row (default: one row per GPU)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of every matching offer"),
) -> None:
    """One row per GPU (offers, cheapest on-demand and spot per GPU-hour, providers); --all lists every
    offer with where its price came from (live API, bundled snapshot) and its age."""
    from dataclasses import asdict

    from cloudtune.catalog import catalog_age, gpu_specs, load_offers, offer_age, offer_source, price_includes
    from cloudtune.planner.filters import filter_gpus, split_list
    from cloudtune.providers import check_provider_name

    provider, gpu = split_list(provider), split_list(gpu)
    for name in provider:
        check_provider_name(name)
    offers = load_offers(provider or None)
    if gpu:  # family-tolerant (h100 -> H100-SXM, H100-NVL; never V100); unknown names are bad input
        names = filter_gpus({o.gpu for o in offers}, gpu, set(gpu_specs()) | {o.gpu for o in offers})
        offers = [o for o in offers if o.gpu in names]
    offers.sort(key=lambda o: (o.provider, o.gpu, o.gpu_count, o.price_hr if o.price_hr is not None else 1e9, o.region))
    if as_json:
        sys.stdout.write(json.dumps([{**asdict(o), "source": offer_source(o), "age": offer_age(o),
                                      "price_includes": price_includes(o)}
                                     for o in offers], indent=1) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    # a pipe or a file gets whole rows (offer ids and regions are never cut to 80 columns)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if not all_rows:
        _show_grouped(console, offers)
        return
    t = Table(title=f"{len(offers)} offers", title_justify="left")
    for col, just in (("provider", "left"), ("offer", "left"), ("GPU x count", "left"), ("GiB/GPU", "right"),
                      ("region", "left"), ("$/h", "right"), ("spot $/h", "right"), ("price from", "left"),
                      ("age", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for o in offers:
        t.add_row(o.provider, o.offer_id, f"{o.gpu} x{o.gpu_count}", f"{o.vram_gib_per_gpu:.1f}", o.region,
                  "-" if o.price_hr is None else f"{o.price_hr:.2f}",
                  "-" if o.spot_price_hr is None else f"{o.spot_price_hr:.2f}", offer_source(o), offer_age(o))
    console.print(t)
    console.print(f"[dim]{catalog_age(offers) if offers else 'no offers match'}[/]")
    if any(o.provider == "modal" for o in offers):
        from cloudtune.providers.modal_pricing import surcharge_note

        console.print(f"[dim]{surcharge_note()}; other prices: the whole instance or pod per hour[/]")


def _show_grouped(console, offers) -> None:
    """One row per GPU: how many offers, the cheapest on-demand and spot price per GPU-hour (and where),
    and which providers list it. Sorted by the cheapest price per GPU-hour."""
    from rich.table import Table

    from cloudtune.catalog import catalog_age

    groups: dict[str, list] = {}
    for o in offers:
        groups.setdefault(o.gpu, []).append(o)

    def cheapest(rows, attr):
        priced = [(getattr(o, attr) / max(1, o.gpu_count), o) for o in rows if getattr(o, attr) is not None]
        return min(priced, key=lambda p: p[0]) if priced else None

    table_rows = []
    for name, rows in groups.items():
        od, sp = cheapest(rows, "price_hr"), cheapest(rows, "spot_price_hr")
        key = min(p[0] for p in (od, sp) if p) if (od or sp) else float("inf")
        table_rows.append((key, name, rows, od, sp))
    table_rows.sort(key=lambda r: (r[0], r[1]))
    t = Table(title=f"{len(groups)} GPUs, {len(offers)} offers (--all: every offer)", title_justify="left")
    for col, just in (("GPU", "left"), ("GiB", "right"), ("offers", "right"), ("on-demand $/GPU-h", "right"),
                      ("spot $/GPU-h", "right"), ("providers", "left")):
        t.add_column(col, justify=just, no_wrap=col in ("GPU", "GiB", "offers"), overflow="fold")

    def fmt(p):
        return "-" if p is None else f"{p[0]:.2f} ({p[1].provider})"

    for _, name, rows, od, sp in table_rows:
        vram = sorted({round(o.vram_gib_per_gpu) for o in rows})
        t.add_row(name, "/".join(map(str, vram)), str(len(rows)), fmt(od), fmt(sp),
                  ", ".join(sorted({o.provider for o in rows})))
    console.print(t)
    console.print(f"[dim]{catalog_age(offers) if offers else 'no offers match'}[/]")


@catalog_app.command("refresh")
def refresh(
    provider: list[str] = typer.Option([], "--provider", "-p", help="providers to refresh, repeatable or "
                                       "comma-separated (default: all clouds)"),
    as_json: bool = typer.Option(False, "--json", help="print the per-provider results as JSON"),
) -> None:
    """Fetch live offers from each provider's API (needs its credentials) into $CLOUDTUNE_HOME/cache.

    A provider without credentials is skipped; one that fails keeps its previous rows. Exit 1 only
    when no requested provider could be refreshed."""
    from dataclasses import asdict

    from cloudtune.catalog import refresh as do_refresh
    from cloudtune.planner.filters import split_list
    from cloudtune.providers import CLOUD_PROVIDERS, check_provider_name

    names = split_list(provider) or list(CLOUD_PROVIDERS)
    for name in names:
        check_provider_name(name)
        if name == "local":
            raise UserError("the local provider has no offers to refresh; pass a cloud provider")
    results = do_refresh(names)
    if as_json:
        sys.stdout.write(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    else:
        for r in results:
            typer.echo(f"{r.provider}: {r.status}: {r.message}")
    if not any(r.status == "ok" for r in results):
        raise typer.Exit(1)
