"""`cloudtune models`: the architectures the planner knows, and what a `--model` value resolves to."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(models)


def models(
    model: str = typer.Argument(None, help="resolve this --model value (size, id, config.json path, hub id) instead "
                                           "of listing the registry"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (a list, or one object with a MODEL argument)"),
) -> None:
    """List the bundled model architectures and the size shorthands, or show what MODEL resolves to."""
    from cloudtune.planner.models import SHORTHANDS, known_models, resolve_model

    archs = [resolve_model(model)] if model else known_models()
    if as_json:
        rows = [asdict(a) for a in archs]
        if not model:
            for row in rows:
                row["shorthands"] = sorted(k for k, v in SHORTHANDS.items() if v == row["id"])
        typer.echo(json.dumps(rows[0] if model else rows, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    by_id: dict[str, list[str]] = {}
    for short, target in SHORTHANDS.items():
        by_id.setdefault(target, []).append(short)
    table = Table(title=None if model else "Known model architectures (cloudtune plan --model ID or SIZE)")
    table.add_column("id", no_wrap=True)
    for col in ("params (B)", "layers", "hidden", "heads/kv", "vocab", "context"):
        table.add_column(col, justify="right", no_wrap=True)
    for a in archs:
        params = f"{a.params_b:,.2f}" + (f" MoE {a.num_experts}x top-{a.experts_per_token}" if a.num_experts > 1 else "")
        shorts = ", ".join(by_id.get(a.id, []))
        label = f"{a.id} [dim]({shorts})[/dim]" if shorts else a.id
        table.add_row(label, params, str(a.layers), str(a.hidden), f"{a.heads}/{a.kv_heads}", f"{a.vocab:,}",
                      f"{a.max_pos:,}")
    # a pipe or a file gets the whole table, not one cut to 80 columns
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if model:
        Console(width=None if sys.stdout.isatty() else 160).print(f"source: {a.source}")
