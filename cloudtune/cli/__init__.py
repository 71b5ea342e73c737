"""The `cloudtune` command. Thin: parse flags, call the library, render. No heavy imports here.

Each command group lives in its own module and registers itself on `app`; a module's heavy
imports happen inside its command functions, so `cloudtune --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from cloudtune import __version__
from cloudtune.errors import UserError

app = typer.Typer(
    name="cloudtune",
    help="Fine-tune an LLM on the cheapest rented GPU that fits, and leave nothing running.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cloudtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """cloudtune: plan, run, watch and account for LLM fine-tuning jobs on rented GPUs."""


# Latency-critical commands whose module registers only them: `cloudtune plan ...` then skips
# importing and building every other command (~10 ms of a ~0.3 s budget). `--help` and every other
# command still register all modules, so the help lists everything.
_SOLO = {"plan": "cloudtune.cli.plan_cmd"}


def _register(argv: list[str] | None = None) -> None:
    # Each module defines `register(app)`. Import order is the order of `--help`.
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in _SOLO:
        import importlib

        importlib.import_module(_SOLO[args[0]]).register(app)
        return
    from cloudtune.cli import commands

    for module in commands.MODULES:
        module.register(app)


def main() -> None:
    _register()
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        # A provider's typed error (auth, capacity, quota...) is the user's to act on: one line,
        # exit 3. Anything else is a bug and keeps its traceback.
        from cloudtune.providers.base import ProviderError

        if not isinstance(err, ProviderError):
            raise
        where = f"{err.provider}: " if err.provider else ""
        print(f"error: {where}{err}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
