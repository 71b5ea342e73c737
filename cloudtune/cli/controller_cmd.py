"""`cloudtune controller deploy|status|remove|tick`: a control loop that does not need this laptop."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from cloudtune.errors import UserError

app = typer.Typer(help="Run the job controller somewhere other than this machine (serverless, cron).",
                  no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="controller")


def config_path() -> Path:
    from cloudtune.home import home

    return home() / "controller.json"


def deployments() -> list[dict[str, Any]]:
    try:
        got = json.loads(config_path().read_text())
    except (OSError, ValueError):
        return []
    return got if isinstance(got, list) else []


def _save(rows: list[dict[str, Any]]) -> None:
    path = config_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, path)


def deployment_for(store_url: str) -> dict[str, Any] | None:
    return next((d for d in deployments() if d.get("store_url") == store_url), None)


TARGETS = ("modal", "aws-lambda")


def _check_target(on: str, store: str) -> None:
    if on not in TARGETS:
        raise UserError(f"controller --on {on!r} is not available; use --on modal or --on aws-lambda (or run "
                        f"`cloudtune controller tick --store URL` from cron)")
    if on == "aws-lambda":
        return  # controller_aws.check says what Lambda cannot reach
    if not store.startswith("s3://"):
        raise UserError(f"controller store {store!r} cannot be reached from Modal; use the s3:// store your jobs "
                        f"use (store.url in the job spec)")


@app.command("deploy")
def deploy_cmd(
    on: str = typer.Option("modal", "--on", help="Where the controller runs: modal or aws-lambda."),
    store: str = typer.Option(..., "--store", help="The s3:// store (store.url) whose jobs it controls."),
    endpoint: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint of that store."),
    secret_env_list: list[str] = typer.Option([], "--secret-env", help="Environment variables to put in the "
                                              "controller's Modal Secret / AWS secret, repeatable or comma-separated "
                                              "(default: the providers' keys that are set; on Modal also AWS's)."),
    role_arn: str = typer.Option(None, "--role-arn", help="aws-lambda: the IAM role the function runs as."),
    region: str = typer.Option(None, "--region", help="aws-lambda: the AWS region (default: AWS_DEFAULT_REGION)."),
    bundle: bool = typer.Option(False, "--bundle-deps", help="aws-lambda: pip-install the controller's dependencies "
                                "for Lambda's platform into its zip (downloads from PyPI)."),
    json_out: bool = typer.Option(False, "--json", help="Print the deployment as JSON."),
) -> None:
    """Deploy a scheduled controller (every minute, nothing runs between) that drives the jobs handed to it
    with `cloudtune run SPEC --controller modal|aws-lambda`: a Modal Function, or a Lambda on EventBridge."""
    from cloudtune.planner.filters import split_list
    from cloudtune.providers.modal import AUTH_HINT, _has_modal_credentials
    from cloudtune.run import controller_modal as M

    secret_env = ",".join(split_list(secret_env_list)) or None
    _check_target(on, store)
    if on == "aws-lambda":
        _deploy_aws(store, endpoint, secret_env, role_arn, region, bundle, json_out)
        return
    if not _has_modal_credentials():
        raise UserError(f"controller deploy --on modal: no Modal credentials; {AUTH_HINT}")
    names = tuple(v.strip() for v in secret_env.split(",") if v.strip()) if secret_env else M.DEFAULT_SECRET_VARS
    values = M.secret_values(names)
    missing = [n for n in names if n not in values]
    if secret_env and missing:
        raise UserError(f"--secret-env names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        f"not set in this environment; export {'it' if len(missing) == 1 else 'them'} or drop "
                        f"{'it' if len(missing) == 1 else 'them'} from the list")
    dep = M.Deployment(store_url=store.rstrip("/"), store_endpoint=endpoint)
    app_id = M.deploy(dep, M.SdkControllerClient(), values)
    rows = [d for d in deployments() if d.get("store_url") != dep.store_url]
    _save([*rows, {**dep.to_dict(), "app_id": app_id, "deployed_at": time.time(), "secret_vars": sorted(values)}])
    if json_out:
        typer.echo(json.dumps({**dep.to_dict(), "app_id": app_id, "secret_vars": sorted(values)}))
    else:
        typer.echo(f"deployed {dep.app_name} on Modal ({app_id}): ticks the jobs of {dep.store_url} every minute; "
                   f"secret {dep.secret_name} holds {', '.join(sorted(values)) or 'nothing'}")


def _secret_names(secret_env: str | None, default: tuple[str, ...]) -> dict[str, str]:
    from cloudtune.run.controller_modal import secret_values

    names = tuple(v.strip() for v in secret_env.split(",") if v.strip()) if secret_env else default
    values = secret_values(names)
    missing = [n for n in names if n not in values]
    if secret_env and missing:
        raise UserError(f"--secret-env names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        f"not set in this environment; export {'it' if len(missing) == 1 else 'them'} or drop "
                        f"{'it' if len(missing) == 1 else 'them'} from the list")
    return values


def _aws_session(region: str | None) -> Any:
    try:
        import boto3
    except ImportError:
        raise UserError("controller --on aws-lambda needs boto3; pip install 'cloudtune[aws]'") from None
    return boto3.Session(region_name=region) if region else boto3.Session()


def _deploy_aws(store: str, endpoint: str | None, secret_env: str | None, role_arn: str | None,
                region: str | None, bundle: bool, json_out: bool) -> None:
    import tempfile
    from pathlib import Path as _P

    from cloudtune.run import controller_aws as A

    dep = A.Deployment(store_url=store.rstrip("/"), role_arn=role_arn or "", store_endpoint=endpoint)
    session = _aws_session(region)
    A.check(dep, session)  # before pip or any AWS call
    values = _secret_names(secret_env, A.DEFAULT_SECRET_VARS)
    with tempfile.TemporaryDirectory(prefix="cloudtune-lambda-") as tmp:
        if bundle:
            A.bundle_deps(_P(tmp))
        code = A.build_zip(_P(tmp) if bundle else None)
    arns = A.deploy(dep, session, values, code)
    row = {**dep.to_dict(), "region": session.region_name, "app_id": arns["function_arn"], **arns,
           "secret_vars": sorted(values), "code_bytes": len(code), "bundled_deps": bundle}
    _save([*[d for d in deployments() if d.get("store_url") != dep.store_url], {**row, "deployed_at": time.time()}])
    if json_out:
        typer.echo(json.dumps(row))
    else:
        typer.echo(f"deployed Lambda {dep.function_name} ({len(code) / 2**20:.1f} MiB) on EventBridge {A.SCHEDULE} in "
                   f"{session.region_name}: ticks the jobs of {dep.store_url}; secret {dep.secret_name} holds "
                   f"{', '.join(sorted(values)) or 'nothing'}"
                   + ("" if bundle else "; its dependencies are not bundled (--bundle-deps)"))


@app.command("remove")
def remove_cmd(
    on: str = typer.Option("modal", "--on", help="Where the controller runs: modal or aws-lambda."),
    store: str = typer.Option(None, "--store", help="Only the deployment for this store."),
) -> None:
    """Stop the deployed controller. Jobs it held keep their machines' own guards; `cloudtune status JOB`
    on a laptop takes them back once the lease lapses."""
    from cloudtune.run import controller_modal as M

    rows = [d for d in deployments() if d.get("on") == on and (store is None or d.get("store_url") == store)]
    if not rows:
        raise UserError(f"no controller deployed on {on}{f' for {store}' if store else ''}; "
                        f"`cloudtune controller status` lists them")
    if on == "aws-lambda":
        from cloudtune.run import controller_aws as A

        for d in rows:
            gone = A.remove(A.Deployment.from_dict(d), _aws_session(d.get("region")))
            typer.echo(f"removed {d['function_name']} ({d['store_url']}): deleted {', '.join(gone) or 'nothing'}")
            _save([x for x in deployments() if x != d])
        return
    client = M.SdkControllerClient()
    for d in rows:
        client.stop(d["app_name"])
        typer.echo(f"stopped {d['app_name']} ({d['store_url']})")
    _save([d for d in deployments() if d not in rows])


@app.command("status")
def status_cmd(
    store: str = typer.Option(None, "--store", help="Show this store's handed-over jobs (default: every deployment's)."),
    endpoint: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint of that store."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The deployed controllers and, per store, the jobs handed to them with their lease holders."""
    from cloudtune.run.controller import registered
    from cloudtune.run.job_state import state_key
    from cloudtune.run.lease import Lease
    from cloudtune.store import open_store

    deps = deployments()
    stores = [(store, endpoint)] if store else [(d["store_url"], d.get("store_endpoint")) for d in deps]
    out: dict[str, Any] = {"deployments": [{**d, **_aws_resources(d)} for d in deps] if json_out else deps,
                           "jobs": []}
    now = time.time()
    for url, ep in stores:
        st = open_store(url, endpoint_url=ep)
        for job_id in registered(st):
            info, _ = Lease(st, job_id, "status").read()
            snap = st.read_json(state_key(job_id)) or {}
            out["jobs"].append({
                "store": url, "job_id": job_id, "state": (snap.get("job") or {}).get("state"),
                "holder": info.holder if info and info.live(now) else None,
                "lease_expires_in_s": round(info.expires_at - now, 1) if info and info.live(now) else None,
            })
    if json_out:
        typer.echo(json.dumps(out, indent=2))
        return
    if not deps:
        typer.echo("no controller deployed (`cloudtune controller deploy --on modal --store s3://...`)")
    for d in deps:
        typer.echo(f"{d['on']}: {d['app_name']} for {d['store_url']}{_aws_exists(d)}")
    for j in out["jobs"]:
        holder = f"held by {j['holder']} ({j['lease_expires_in_s']:.0f}s left)" if j["holder"] else "lease free"
        typer.echo(f"  {j['job_id']}  {j['state'] or '?'}  {holder}")


def _aws_resources(d: dict[str, Any]) -> dict[str, Any]:
    """For a Lambda deployment: {"resources": which of its resources exist now} (one call each)."""
    if d.get("on") != "aws-lambda":
        return {}
    from cloudtune.run import controller_aws as A

    try:
        return {"resources": A.status(A.Deployment.from_dict(d), _aws_session(d.get("region")))}
    except Exception as err:  # noqa: BLE001 - status reports; it does not fail on a cloud error
        return {"resources": None, "resources_error": f"{type(err).__name__}: {err}"}


def _aws_exists(d: dict[str, Any]) -> str:
    if d.get("on") != "aws-lambda":
        return ""
    got = _aws_resources(d)
    have = got["resources"]
    if have is None:
        return f" (could not ask AWS: {got['resources_error'].splitlines()[0][:120]})"
    missing = [k for k, v in have.items() if not v]
    return f" in {d.get('region')}: " + ("all 5 resources exist" if not missing else f"missing {', '.join(missing)}")


@app.command("tick")
def tick_cmd(
    store: str = typer.Option(..., "--store", help="The store whose handed-over jobs to drive."),
    endpoint: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint of that store."),
    seconds: float = typer.Option(50.0, "--seconds", help="Tick for about this long, then return."),
    poll: float = typer.Option(2.0, "--poll", help="Seconds between ticks."),
    until_done: bool = typer.Option(False, "--until-done", help="Keep going until every job has ended."),
    json_out: bool = typer.Option(False, "--json", help="Print what was done as JSON."),
) -> None:
    """What the deployed controller runs each minute; also for cron on any machine."""
    from cloudtune.run.controller import control, registered
    from cloudtune.run.lease import new_holder
    from cloudtune.store import open_store

    if seconds <= 0 or poll <= 0:
        raise UserError(f"--seconds and --poll must be > 0, got {seconds:g} and {poll:g}")
    st = open_store(store, endpoint_url=endpoint)
    holder = new_holder("controller")
    reports = control(st, holder=holder, seconds=seconds, poll_s=poll)
    while until_done and registered(st):
        reports = control(st, holder=holder, seconds=seconds, poll_s=poll)
        if all(r.action == "leased-elsewhere" for r in reports):
            time.sleep(poll)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in reports]))
    else:
        for r in reports:
            typer.echo(f"{r.job_id}: {r.action} {r.state or ''} {r.detail}".rstrip())


@app.command("hand-over")
def hand_over_cmd(
    job_id: str = typer.Argument(..., help="A running job of this machine."),
    to: str = typer.Option(..., "--to", help="modal or aws-lambda (a deployed controller) or cron (`controller tick`)."),
) -> None:
    """Give a running job to a controller elsewhere: this machine's watchdog hands over its lease and
    exits; the job keeps running."""
    from cloudtune.run import state as S
    from cloudtune.run.controller import check_handover, hand_over
    from cloudtune.run.orchestrator import store_for
    from cloudtune.run.watchdog import stop_watchdog

    db = S.StateDB()
    job = db.get_job(job_id)
    if job is None:
        raise UserError(f"job {job_id!r} not found; `cloudtune status` lists this machine's jobs")
    if job.is_terminal:
        raise UserError(f"job {job_id} is already {job.state}; nothing to hand over")
    check_handover(to, job.store_url)
    store = store_for(job.spec)
    from cloudtune.run.lease import Lease, holder_site

    info, _ = Lease(store, job_id, "hand-over").read()
    if info is not None and info.live(time.time()) and holder_site(info.holder)[0] != "watchdog":
        raise UserError(f"job {job_id} is already controlled by {info.holder} (lease for another "
                        f"{info.expires_at - time.time():.0f}s); `cloudtune controller status` shows who")
    hand_over(db, store, job_id, to)
    stopped = stop_watchdog(job_id)
    typer.echo(f"job {job_id} handed to the {to} controller" + ("; this machine's watchdog exited" if stopped else ""))
