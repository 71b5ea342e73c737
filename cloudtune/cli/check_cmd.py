"""`cloudtune check [SPEC]`: is this machine ready to run SPEC (or to use these providers)?

Why a command of its own: `run` performs the same checks (cloudtune/preflight.py) before writing
anything, but a new user wants to know, before a first cloud job, everything that is missing at once:
extras, credentials, the bucket, a Hugging Face token, provider settings, image vs CPU architecture.
Exit 0 when ready, 2 with one line per problem otherwise.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("check", help="Pre-flight: extras, credentials, store, HF token, provider settings, image "
                              "architecture; every problem at once (exit 2).")(check_cmd)


def check_cmd(
    spec_path: Path = typer.Argument(None, help="Job spec to check; without it, the providers' setup only."),
    provider: list[str] = typer.Option([], "--provider", "-p", help="Provider(s), repeatable or comma-separated "
                                       "(-p runpod -p vast, -p runpod,vast); overrides resources.provider "
                                       "(without SPEC: default all cloud providers)."),
) -> None:
    """Report every problem that would stop the job before a machine is rented."""
    from cloudtune.errors import UserError
    from cloudtune.planner.filters import split_list
    from cloudtune.preflight import PreflightFailed, check_credentials, check_extras, check_provider_settings
    from cloudtune.providers import CLOUD_PROVIDERS, check_provider_name

    wanted = split_list(provider)
    if spec_path is None:
        names = [check_provider_name(p) for p in wanted] if wanted else list(CLOUD_PROVIDERS)
        rows = []
        for p in names:
            probs = check_extras([p], "") + check_credentials([p]) + check_provider_settings([p])
            rows.append((p, probs))
        for p, probs in rows:
            typer.echo(f"{p}: {'ready' if not probs else 'not ready'}")
            for line in probs:
                typer.echo(f"  - {line}")
        if wanted and any(probs for _, probs in rows):
            raise typer.Exit(2)
        return

    from cloudtune.preflight import preflight
    from cloudtune.run.orchestrator import plan_job, provider_names
    from cloudtune.spec import load_spec
    from cloudtune.trainer.data import validate_data

    spec = load_spec(spec_path)
    names = provider_names(spec, ",".join(wanted) or None)
    problems: list[str] = []
    options = []
    try:  # the head of the data (a ranged GET on S3), before the plan so it sizes the workload
        typer.echo(f"data: {validate_data(spec).line()}", err=True)
    except UserError as err:
        problems.append(f"data: {str(err).splitlines()[0]}")
    try:
        options = plan_job(spec, names).options
    except UserError as err:
        problems.append(f"plan: {str(err).splitlines()[0]}")
    problems = preflight(spec, names, options) + problems
    if problems:
        raise PreflightFailed(problems)
    typer.echo(f"ready: {spec_path} on {', '.join(names)} ({len(options)} option(s) planned); "
               f"launch with `cloudtune run {spec_path}`")
