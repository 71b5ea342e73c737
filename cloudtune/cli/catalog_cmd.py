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
    provider: list[str] = typer.Option([], "--provider", "-p", help="only these providers (repeatable)"),
    gpu: list[str] = typer.Option([], "--gpu", "-g", help="only these GPUs, e.g. H100-SXM (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of offers"),
) -> None:
    """List the offers with where each price came from (live API, bundled snapshot) and its age."""
    from dataclasses import asdict

    from cloudtune.catalog import catalog_age, gpu_specs, load_offers, offer_age, offer_source, price_includes
    from cloudtune.providers import check_provider_name

    for name in provider:
        check_provider_name(name)
    known = {g.lower(): g for g in gpu_specs()}
    for g in gpu:
        if g.lower() not in known:
            import difflib

            near = difflib.get_close_matches(g.lower(), list(known), n=1)
            hint = f"did you mean {known[near[0]]!r}? " if near else ""
            raise UserError(f"unknown --gpu {g!r}; {hint}known GPUs: {', '.join(sorted(known.values()))}")
    offers = load_offers(provider or None)
    if gpu:
        wanted = {g.lower() for g in gpu}
        offers = [o for o in offers if o.gpu.lower() in wanted]
    offers.sort(key=lambda o: (o.provider, o.gpu, o.gpu_count, o.price_hr if o.price_hr is not None else 1e9, o.region))
    if as_json:
        sys.stdout.write(json.dumps([{**asdict(o), "source": offer_source(o), "age": offer_age(o),
                                      "price_includes": price_includes(o)}
                                     for o in offers], indent=1) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(offers)} offers", title_justify="left")
    for col, just in (("provider", "left"), ("offer", "left"), ("GPU x count", "left"), ("GiB/GPU", "right"),
                      ("region", "left"), ("$/h", "right"), ("spot $/h", "right"), ("price from", "left"),
                      ("age", "left")):
        t.add_column(col, justify=just)
    for o in offers:
        t.add_row(o.provider, o.offer_id, f"{o.gpu} x{o.gpu_count}", f"{o.vram_gib_per_gpu:.1f}", o.region,
                  "-" if o.price_hr is None else f"{o.price_hr:.2f}",
                  "-" if o.spot_price_hr is None else f"{o.spot_price_hr:.2f}", offer_source(o), offer_age(o))
    console = Console(highlight=False)
    console.print(t)
    console.print(f"[dim]{catalog_age(offers) if offers else 'no offers match'}[/]")
    if any(o.provider == "modal" for o in offers):
        from cloudtune.providers.modal_pricing import surcharge_note

        console.print(f"[dim]{surcharge_note()}; other prices: the whole instance or pod per hour[/]")


@catalog_app.command("refresh")
def refresh(
    provider: list[str] = typer.Option([], "--provider", "-p", help="providers to refresh (default: all clouds)"),
    as_json: bool = typer.Option(False, "--json", help="print the per-provider results as JSON"),
) -> None:
    """Fetch live offers from each provider's API (needs its credentials) into $CLOUDTUNE_HOME/cache.

    A provider without credentials is skipped; one that fails keeps its previous rows. Exit 1 only
    when no requested provider could be refreshed."""
    from dataclasses import asdict

    from cloudtune.catalog import refresh as do_refresh
    from cloudtune.providers import CLOUD_PROVIDERS, check_provider_name

    names = list(provider) or list(CLOUD_PROVIDERS)
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
