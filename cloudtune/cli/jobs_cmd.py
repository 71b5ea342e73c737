"""`cloudtune run | status | logs | stop | cost | gc`: start, watch, steer and account for jobs.

The CLI never drives a job: `run` validates, plans, writes the job and starts its detached
watchdog, then renders progress from the state db. So Ctrl-C, `--detach` or a killed terminal
only stop the rendering; the watchdog keeps the lifecycle (docs/operations.md).

Exit codes: 0 done (or detached / launched); 1 the job failed; 2 bad input; 3 a provider error; 4 the job was
stopped (by `stop`, a budget or a deadline); 130 interrupted and detached.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from cloudtune.errors import NotFound, UserError

EXIT_FAILED = 1
EXIT_STOPPED = 4
EXIT_DETACHED = 130


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _db(read_only_ok: bool = False):
    """The state db; `read_only_ok` for the commands that only read it (status, logs, cost), so they still
    work on a full or read-only $CLOUDTUNE_HOME."""
    from cloudtune.run.state import StateDB

    return StateDB(read_only_ok=read_only_ok)


def _job_or_fail(db, job_id: str):
    job = db.get_job(job_id)
    if job is None:
        from difflib import get_close_matches

        ids = [j.id for j in db.list_jobs(limit=200)]
        near = get_close_matches(job_id, ids, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise NotFound(f"no job with id {job_id!r}; {hint}list jobs with `cloudtune status`")
    return job


def _exit_code(state: str) -> int:
    from cloudtune.run import state as S

    return {S.DONE: 0, S.FAILED: EXIT_FAILED, S.STOPPED: EXIT_STOPPED}.get(state, 0)


def _status_row(db, job) -> dict:
    from cloudtune.run.cost import iso

    attempts = [a for a in db.attempts(job.id) if a["state"] != "launch_failed"]
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "provider": job.provider,
        "attempts": len(attempts),
        "step": job.step,
        "total_steps": job.total_steps,
        "loss": job.loss,
        "tokens_per_s": job.tokens_per_s,
        "eta_s": job.eta_s,
        "store": f"{job.store_url.rstrip('/')}/{job.id}",
        "reason": job.reason,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "ended_at": iso(job.ended_at),
    }


def _show_plan(console, draft) -> None:
    c = draft.choice
    o = c.offer
    est_h = f"{c.est_hours * 60:.1f} min" if c.est_hours is not None else "unknown"
    est_c = f"${c.est_cost_usd:.4f}" if c.est_cost_usd is not None else "unknown"
    console.print(
        f"plan: {o.provider}/{o.offer_id} {o.gpu_count}x {o.gpu}{f' x {c.nodes} nodes' if c.nodes > 1 else ''}"
        f"{' spot' if c.spot else ''} "
        f"at ${c.price_hr:.4f}/h; estimate {est_h}, {est_c}"
        + (f" ({len(draft.options) - 1} fallback option(s))" if len(draft.options) > 1 else ""),
        markup=False,
    )


def _confirm(console, draft, yes: bool) -> None:
    """Ask before spending money. Free jobs need no confirmation; without a TTY, paid jobs need --yes."""
    free = draft.choice.price_hr == 0 and all(o.price_hr == 0 for o in draft.options)
    if yes or free:
        return
    if not sys.stdin.isatty():
        raise UserError("this job rents paid machines and stdin is not a terminal; pass --yes to launch it")
    for line in _options_lines(draft) + _launch_lines(draft):  # what `sky launch` shows before it asks
        console.print(line, markup=False, soft_wrap=True)
    if not typer.confirm("launch?", default=False):
        raise UserError("not launched (answered no)", exit_code=1)


def _dry_run(console, draft, json_out: bool, data=None) -> None:
    from cloudtune.run.orchestrator import build_request, remote_providers, stage_inputs
    from cloudtune.run.providers_config import make_provider
    from cloudtune.run.state import Job

    spec = draft.spec
    store_url = (spec.store.url or __import__("cloudtune.home", fromlist=["x"]).default_store_url())
    fake = Job({"id": "<job-id>", "store_url": store_url, "store_endpoint": spec.store.endpoint_url,
                "est_hours": draft.choice.est_hours, "created_at": __import__("time").time()})
    req = build_request(fake, spec, draft.choice, 1, dry_run=True)
    staged = stage_inputs(spec, store_url, "<job-id>") if remote_providers(draft) else None
    if not json_out:  # a person reads this: the plan table, then what would be launched (--json: everything)
        from cloudtune.cli.plan_cmd import _render

        if draft.plan is not None and all(o.headroom_gib is not None for o in draft.plan.options):
            _render(draft.plan, 5)  # (a local CPU plan has no per-GPU memory table: the summary says it all)
        for line in _launch_lines(draft, req, store_url, staged):
            console.print(line, markup=False, soft_wrap=True)
        console.print("dry run: nothing was written or launched; --json prints the full launch request")
        return
    described = make_provider(draft.choice.offer.provider).describe_launch(req)
    out = {"plan": [o.to_dict() for o in draft.options], "launch": described,
           "data": data.to_dict() if data is not None else None,
           "staged": [{"local": str(p), "url": f"{store_url.rstrip('/')}/{k}"} for p, k in staged.uploads]
           if staged else []}
    print(json.dumps(out, indent=2, default=str))


def _money(v: float | None) -> str:
    return f"${v:,.2f}" if v is not None else "unknown"


def _hours(h: float | None) -> str:
    return "unknown" if h is None else (f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h")


def _options_lines(draft, top: int = 3) -> list[str]:
    """The first options of the plan, one line each: the choice and its failover order."""
    lines = [f"options ({len(draft.options)}, cheapest job first; the first is launched, the rest are fallbacks):"]
    for i, o in enumerate(draft.options[:top], start=1):
        head = f"{o.headroom_gib:.1f} GiB spare" if o.headroom_gib is not None else "headroom n/a"
        lines.append(f"  {i}. {o.offer.provider} {o.total_gpus}x {o.offer.gpu}"
                     f"{f' ({o.nodes} nodes)' if o.nodes > 1 else ''}{' spot' if o.spot else ''} "
                     f"${o.price_hr:.2f}/h, ~{_hours(o.est_hours)}, ~{_money(o.est_cost_usd)}, {head}")
    if len(draft.options) > top:
        lines.append(f"  ... and {len(draft.options) - top} more")
    return lines


def _launch_lines(draft, req=None, store_url: str | None = None, staged=None) -> list[str]:
    """The launch summary: machine, price, estimate, headroom, image, store, and env/secrets by NAME only."""
    from cloudtune.home import default_store_url
    from cloudtune.run.bootstrap import needs_bootstrap, wheel_name

    c, spec = draft.choice, draft.spec
    store_url = store_url or spec.store.url or default_store_url()
    head = "unknown" if c.headroom_gib is None else f"{c.headroom_gib:.1f} GiB per GPU"
    if c.offer.gpu_count and c.offer.vram_gib_per_gpu and c.headroom_gib is not None:
        head += f" of {c.offer.vram_gib_per_gpu:g} GiB"
    image = spec.resources.image
    boot = (f"{image} + bootstrap (pip install {wheel_name()} and pinned training deps staged in "
            f"{store_url.rstrip('/')}/<job>/bootstrap/)" if needs_bootstrap(image, c.offer.provider)
            else ("runs in place (local)" if c.offer.provider == "local" else f"{image} (no bootstrap)"))
    lines = [
        f"launch: {c.offer.provider} {c.offer.offer_id} in {c.offer.region or 'any region'}",
        f"  machine: {c.total_gpus}x {c.offer.gpu}{f', {c.nodes} nodes' if c.nodes > 1 else ''}, "
        f"{'spot' if c.spot else 'on-demand'}, ${c.price_hr:.4f}/h",
        f"  estimate: ~{_hours(c.est_hours)}, ~{_money(c.est_cost_usd)}"
        + (f" (cap: max_cost_usd ${spec.limits.max_cost_usd:g})" if spec.limits.max_cost_usd else ""),
        f"  memory headroom: {head}",
        f"  image: {boot}",
        f"  store: {store_url}",
    ]
    if staged is not None and staged.uploads:
        lines.append(f"  uploads: {len(staged.uploads)} local input file(s) to {store_url.rstrip('/')}/<job>/inputs/")
    if req is not None:
        lines.append(f"  env: {', '.join(sorted(req.env)) or 'none'}")
        lines.append(f"  secrets (values never shown): {', '.join(sorted(req.secret_env)) or 'none'}")
    return lines


def _print_learning(console, job) -> None:
    """Loss and held-out generations from final/summary.json: did the adapter learn anything?"""
    from cloudtune.run.orchestrator import store_for
    from cloudtune.run.progress import learning_lines
    from cloudtune.store import layout

    try:
        summary = store_for(job.spec).read_json(layout.summary_key(job.id)) or {}
    except Exception:  # noqa: BLE001 - the summary is a nicety; the job is done either way
        return
    for line in learning_lines(summary):
        console.print(line, markup=False, highlight=False)


def run_cmd(
    spec_path: Path = typer.Argument(..., help="Job spec (YAML or JSON), e.g. examples/quickstart.yaml."),
    provider: list[str] = typer.Option([], "--provider", "-p", help="Provider(s), repeatable or comma-separated "
                                       "(-p runpod -p vast, -p runpod,vast); overrides resources.provider."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Launch without asking (needed for paid jobs without a TTY)."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once the job is launched; the watchdog runs it."),
    json_out: bool = typer.Option(False, "--json", help='Print {"job_id", "state"} as the last line (humans read stderr).'),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the launch request (secrets redacted); launch nothing."),
    controller: str = typer.Option(None, "--controller", help="Hand the job to a controller elsewhere and return: "
                                   "modal (`cloudtune controller deploy`) or cron (`cloudtune controller tick`)."),
) -> None:
    """Validate, plan, launch and follow a job until it is done; the machine is always torn down."""
    from cloudtune.planner.filters import split_list
    from cloudtune.run import state as S
    from cloudtune.run.orchestrator import check_budget, check_remote, create_job, plan_job, provider_names
    from cloudtune.run.progress import follow
    from cloudtune.run.watchdog import start_watchdog
    from cloudtune.spec import load_spec
    from cloudtune.trainer.data import validate_data

    console = _console(stderr=json_out)
    spec = load_spec(spec_path)
    names = provider_names(spec, ",".join(split_list(provider)) or None)
    if controller:
        from cloudtune.home import default_store_url
        from cloudtune.run.controller import check_handover

        check_handover(controller, spec.store.url or default_store_url())
    from cloudtune.errors import UserError
    from cloudtune.preflight import PreflightFailed, bootable, preflight, print_checks

    data, data_problem, data_error = None, None, None
    try:
        data = validate_data(spec)  # the head only: a ranged GET on S3 (trainer/data_head.py)
    except PreflightFailed:
        raise
    except UserError as err:  # e.g. no S3 credentials for the data: reported with every other problem below
        data_problem, data_error = f"data: {str(err).splitlines()[0]}", err
    if data is not None:
        console.print(f"data: {data.line()}", markup=False, highlight=False, soft_wrap=True)
        for note in data.notes:  # rows cut at max_seq_len, family adjustments, how much was checked
            console.print(f"data: {note}", markup=False, highlight=False, soft_wrap=True)
    draft = plan_job(spec, names)
    draft.options = bootable(spec.resources.image, draft.options) or draft.options  # no ARM host for an amd64 image
    # every problem at once, before any job row or upload (exit 2); a dry run works without
    # credentials and does not probe the store (`cloudtune check` does)
    problems = preflight(spec, names, draft.options, probe_store=not dry_run)
    if data_error is not None and not problems:
        raise data_error  # the only problem: its own one line
    problems += [data_problem] if data_problem else []
    if problems and not dry_run:
        raise PreflightFailed(problems)
    check_budget(draft)
    check_remote(draft)
    if dry_run:
        print_checks(_console(stderr=True), problems)
        _dry_run(console, draft, json_out, data)
        if data_problem:  # the plan and the launch are shown, but a dry run that could not read the data is no pass
            raise typer.Exit(2)
        return
    _show_plan(console, draft)
    _confirm(console, draft, yes)

    db = S.StateDB()
    job_id = create_job(db, draft)
    if controller:
        from cloudtune.run.controller import hand_over
        from cloudtune.run.orchestrator import store_for

        try:
            hand_over(db, store_for(spec), job_id, controller)
        except Exception:
            start_watchdog(job_id)  # never a job without an owner: this machine keeps it
            raise
        console.print(f"job {job_id} handed to the {controller} controller; `cloudtune controller status` to see "
                      f"who holds it", markup=False)
        if json_out:
            print(json.dumps({"job_id": job_id, "state": db.get_job(job_id).state, "controller": controller}),
                  flush=True)
        raise typer.Exit(0)
    wd = start_watchdog(job_id)
    console.print(f"job {job_id} created; store {db.get_job(job_id).store_url}/{job_id}", markup=False)

    def finish(state: str, code: int) -> None:
        if json_out:
            print(json.dumps({"job_id": job_id, "state": state}), flush=True)
        raise typer.Exit(code)

    if detach:
        console.print(f"detached: follow with `cloudtune status {job_id}` / `cloudtune logs {job_id} --follow`")
        finish(db.get_job(job_id).state, 0)

    while True:
        try:
            job = follow(db, job_id, console, on_tick=lambda: wd.poll())
            break
        except KeyboardInterrupt:
            choice = "d"
            if sys.stdin.isatty():
                try:
                    choice = typer.prompt("\n[s]top the job or [d]etach (it keeps running)?", default="d")
                except (KeyboardInterrupt, EOFError, typer.Abort):
                    choice = "d"
            if choice.strip().lower().startswith("s"):
                db.request_stop(job_id, "Ctrl-C in `cloudtune run`")
                console.print(f"stopping job {job_id}; waiting for the watchdog to checkpoint and tear down")
                continue
            console.print(f"detached from job {job_id}; it keeps running. `cloudtune status {job_id}` to check.")
            finish(db.get_job(job_id).state, EXIT_DETACHED)

    from cloudtune.run.cost import job_report, render

    rep = job_report(db, job)
    render({"jobs": [rep], "total_usd": rep["cost_usd"]}, console)
    if job.state == S.DONE:
        console.print(f"adapter: {job.store_url.rstrip('/')}/{job_id}/final/; "
                      f"download it with `cloudtune pull {job_id} [DIR]`", markup=False)
        _print_learning(console, job)
    elif job.reason:
        console.print(f"job {job.state}: {job.reason}", markup=False)
    finish(job.state, _exit_code(job.state))


def status_cmd(
    job_id: str = typer.Argument(None, help="A job id; all jobs when omitted."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of jobs."),
    limit: int = typer.Option(50, "--limit", "-n", help="Show at most this many jobs (newest first)."),
    events: bool = typer.Option(False, "--events", "-e", help="With JOB: also print the job's event history."),
    no_restart: bool = typer.Option(False, "--no-restart", help="Only report unattended jobs; start no watchdog."),
) -> None:
    """Jobs, their state and who attends them; restarts the watchdog of an unattended job (unless the
    job's lease is held elsewhere, or --no-restart)."""
    import sqlite3

    from cloudtune.run.cost import iso, job_cost_usd
    from cloudtune.run.watchdog import attendance, restart, restart_blocker

    db = _db(read_only_ok=True)
    jobs = [_job_or_fail(db, job_id)] if job_id else db.list_jobs(limit=limit)
    console = _console(stderr=json_out)
    attended = {}
    for j in jobs:
        a = attendance(db, j)
        if a.kind is None and a.unattended_since is not None:  # nobody attends an unfinished job
            blocker = None if no_restart else restart_blocker(db, j)
            if no_restart:
                did = "not restarted (--no-restart)"
            elif blocker:
                did = blocker
            else:
                try:
                    did = f"restarted its watchdog (pid {restart(db, j, 'status').pid})"
                except (OSError, sqlite3.Error, UserError) as err:  # a full or read-only home: say so, exit 0
                    did = f"could not restart its watchdog ({type(err).__name__}: {err})"
            a.action = f"{did}; {a.action}" if a.action else did  # (a.action: the store could not be read)
            if json_out:  # the table shows it; with --json a person still reads what status did, on stderr
                console.print(f"job {j.id} was unattended: {did}", markup=False, highlight=False)
        attended[j.id] = a
    jobs = [db.get_job(j.id) for j in jobs]
    rows = []
    for j in jobs:
        r = _status_row(db, j)
        a = attended[j.id]
        r.update(a.to_dict())
        r["cost_usd"] = round(job_cost_usd(db, j.id), 6)
        # an unattended job's open ledger row is priced to now: an estimate since its last attended moment
        r["cost_estimated_since"] = iso(a.unattended_since)
        rows.append(r)
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    if not rows:
        console.print("no jobs yet; start one with `cloudtune run examples/quickstart.yaml`")
        return
    t = Table()
    for col in ("id", "name", "state", "provider", "attempts", "step", "loss", "cost", "attended by", "created",
                "reason"):
        # ids, states and providers are never cut (#14): the name, attendance and the reason wrap instead
        t.add_column(col, no_wrap=col not in ("name", "reason", "attended by", "created"), overflow="fold")
    for r in rows:
        step = f"{r['step'] if r['step'] is not None else '-'}/{r['total_steps'] or '?'}"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        cost = f"${r['cost_usd']:.4f}" + ("*" if r["cost_estimated_since"] else "")
        who = r["attended_by"] or ("UNATTENDED" if r["unattended_since"] else "-")
        t.add_row(r["id"], r["name"], r["state"], r["provider"], str(r["attempts"]), step, loss, cost, who,
                  r["created_at"] or "", (r["reason"] or "")[:60])
    console.print(t)
    for r in rows:  # the whole story of each unattended job, one line each, below the table
        if r["unattended_since"]:
            console.print(f"job {r['id']}: UNATTENDED since {r['unattended_since']} (no watchdog beat or "
                          f"controller lease since); {r['attendance_action']}; * its cost is an estimate since "
                          f"then", markup=False, soft_wrap=True)
    if job_id:
        console.print(f"store: {rows[0]['store']}", markup=False)
        if events:
            for ev in db.events(job_id):
                t0 = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["time"]))
                console.print(f"{t0} {ev['kind']}: {ev['message']}", markup=False)


def logs_cmd(
    job_id: str = typer.Argument(..., help="The job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new output until the job ends."),
    attempt: int = typer.Option(None, "--attempt", "-a", help="Only this attempt."),
) -> None:
    """The trainer's output of each attempt (shipped to the job's store)."""
    from cloudtune.run.orchestrator import store_for
    from cloudtune.store import layout

    db = _db(read_only_ok=True)
    job = _job_or_fail(db, job_id)
    store = store_for(job.spec)
    printed: dict[int, int] = {}

    rows = {a["n"]: a for a in db.attempts(job_id)}

    def attempts() -> list[int]:
        rows.update({a["n"]: a for a in db.attempts(job_id)})
        ns = [n for n, a in rows.items() if a["state"] != "launch_failed"]
        return [n for n in sorted(ns) if attempt is None or n == attempt]

    def console(n: int) -> bytes | None:
        """The machine's own console, where its provider keeps one (local): the store's copy may be behind
        when the store could not take writes, and the reason is then in the part it lacks."""
        a = rows.get(n) or {}
        if not a.get("machine_id") or a.get("provider") != "local":
            return None
        from cloudtune.run.providers_config import make_provider

        try:
            return make_provider("local").console_log(a["machine_id"])
        except Exception:  # noqa: BLE001 - only a better copy; the store's stands
            return None

    def dump() -> None:
        for n in attempts():
            try:
                data = store.get_bytes(layout.log_key(job_id, n))
            except KeyError:
                data = None
            except Exception as err:  # noqa: BLE001 - an unreadable store: the console may still tell
                data = None
                sys.stderr.write(f"warning: could not read the log of attempt {n} from the store: {err}\n")
            local = console(n)
            if local is not None and (data is None or len(local) > len(data)):
                data = local
            if data is None:
                continue
            start = printed.get(n)
            if start is None:
                sys.stdout.write(f"==> attempt {n} <==\n")
                start = 0
            if len(data) > start:
                sys.stdout.write(data[start:].decode(errors="replace"))
            printed[n] = len(data)
        sys.stdout.flush()

    dump()
    if not printed and not follow:
        raise NotFound(f"job {job_id} has no logs yet (state {job.state}); try `cloudtune logs {job_id} --follow`")
    while follow:
        time.sleep(1.0)
        dump()
        job = db.get_job(job_id)
        if job.is_terminal:
            time.sleep(1.0)
            dump()
            break


def stop_cmd(
    job_id: str = typer.Argument(..., help="The job id."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the machine is gone."),
    json_out: bool = typer.Option(False, "--json", help='Print {"job_id", "state"} as the last line.'),
) -> None:
    """Ask the trainer to checkpoint and stop, then terminate the machine (via the watchdog)."""
    from cloudtune.run import state as S
    from cloudtune.run.progress import follow
    from cloudtune.run.watchdog import ensure_watchdog

    db = _db()
    job = _job_or_fail(db, job_id)
    if job.is_terminal:
        raise UserError(f"job {job_id} is already {job.state}; nothing to stop", exit_code=1)
    db.request_stop(job_id, "cloudtune stop")
    ensure_watchdog(db, job_id, "stop")
    console = _console(stderr=json_out)
    console.print(f"stop requested for job {job_id}")
    if wait:
        job = follow(db, job_id, console)
    else:
        job = db.get_job(job_id)
    if json_out:
        print(json.dumps({"job_id": job_id, "state": job.state}))
    if wait and job.state not in (S.STOPPED, S.DONE):
        raise typer.Exit(_exit_code(job.state))


def cost_cmd(
    job_id: str = typer.Argument(None, help="A job id; all jobs when omitted."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    csv_out: bool = typer.Option(False, "--csv", help="Print one CSV row per attempt."),
) -> None:
    """What each job and attempt cost, at the price recorded at launch; spot savings; estimate vs actual."""
    from cloudtune.run.cost import render, report, to_csv

    if json_out and csv_out:
        raise UserError("choose one of --json and --csv")
    db = _db(read_only_ok=True)
    jobs = [_job_or_fail(db, job_id)] if job_id else db.list_jobs()
    rep = report(db, jobs)
    if json_out:
        print(json.dumps(rep, indent=2))
    elif csv_out:
        sys.stdout.write(to_csv(rep))
    else:
        render(rep, _console())


def gc_cmd(
    yes: bool = typer.Option(False, "--yes", "-y", help="Terminate the orphans (otherwise only list them)."),
    provider: list[str] = typer.Option([], "--provider", "-p", help="Only these provider(s), repeatable or "
                                       "comma-separated (-p runpod -p vast, -p runpod,vast)."),
    json_out: bool = typer.Option(False, "--json", help="Print the scan as JSON."),
    foreign: bool = typer.Option(False, "--foreign", help="Also end machines of jobs this state db does not know "
                                 "(another installation's, or a lost db): list first, then --foreign --yes."),
) -> None:
    """List machines carrying cloudtune names/tags whose job is proven dead; terminate them with --yes.

    A machine of a job id this state db does not know is only listed ("foreign"), unless --foreign.
    Also lists (and with --yes deletes) machine secrets left in the cloud (AWS SSM parameters)."""
    from cloudtune.planner.filters import split_list
    from cloudtune.providers import check_provider_name
    from cloudtune.run.gc import delete_orphan_secrets, scan, terminate_orphans

    only = [check_provider_name(p) for p in split_list(provider)] or None
    db = _db()
    result = scan(db, only)
    console = _console(stderr=json_out)
    done: dict[str, bool] = {}
    doomed = result.orphans + (result.foreign if foreign else [])
    if yes and doomed:
        for o, gone in terminate_orphans(doomed):
            done[o.machine.machine_id] = gone
    # (secret, deleted: None when not asked to, error when the delete failed)
    secret_rows = ([(s, err is None, err) for s, err in delete_orphan_secrets(result.orphan_secrets)] if yes
                   else [(s, None, None) for s in result.orphan_secrets])
    if json_out:
        print(json.dumps({
            "orphans": [{"provider": o.machine.provider, "machine_id": o.machine.machine_id, "name": o.machine.name,
                         "state": o.machine.state.value, "job_id": o.machine.job_id, "why": o.why,
                         "terminated": done.get(o.machine.machine_id)} for o in result.orphans],
            "foreign": [{"provider": o.machine.provider, "machine_id": o.machine.machine_id, "name": o.machine.name,
                         "state": o.machine.state.value, "job_id": o.machine.job_id, "why": o.why,
                         "terminated": done.get(o.machine.machine_id)} for o in result.foreign],
            "owned": [{"provider": m.provider, "machine_id": m.machine_id, "job_id": m.job_id} for m in result.owned],
            "skipped": result.skipped,
            "orphan_secrets": [{"provider": s.provider, "region": s.region, "name": s.name, "why": s.why,
                                "deleted": deleted, "error": error} for s, deleted, error in secret_rows],
        }, indent=2))
    else:
        for name, why in result.skipped.items():
            console.print(f"skipped {name}: {why}", markup=False)
        if not result.orphans:
            console.print(f"no orphaned machines ({len(result.owned)} owned by live jobs)")
        for o in result.orphans:
            m = o.machine
            tail = {True: "terminated", False: "STILL RUNNING after terminate"}.get(done.get(m.machine_id), "orphan")
            console.print(f"{m.provider} {m.machine_id} ({m.name}, {m.state.value}): {o.why} -> {tail}", markup=False)
        for o in result.foreign:
            m = o.machine
            tail = {True: "terminated", False: "STILL RUNNING after terminate"}.get(
                done.get(m.machine_id), "left alone" if not foreign else "foreign")
            console.print(f"{m.provider} {m.machine_id} ({m.name}, {m.state.value}): {o.why} -> {tail}", markup=False)
        for s, deleted, error in secret_rows:
            tail = {None: "orphan", True: "deleted"}.get(deleted, f"NOT deleted: {error}")
            console.print(f"{s.provider} secret {s.name} in {s.region}: {s.why} -> {tail}", markup=False)
        if (result.orphans or result.orphan_secrets or (foreign and result.foreign)) and not yes:
            console.print(f"run `cloudtune gc{' --foreign' if foreign else ''} --yes` to terminate (and delete) them")
    failed = yes and (not all(done.values()) or any(deleted is False for _, deleted, _ in secret_rows))
    _exit_past_hung_calls(1 if failed else 0)


def _exit_past_hung_calls(code: int) -> None:
    """End the process even when a provider call that missed its deadline is still pending.

    gc leaves a hung provider's listing behind in a daemon thread (run/gc.py _bounded); at a normal
    exit the SDKs' own shutdown then fails that call (Modal's event loop raises ClientClosed) and
    prints its traceback after our report. The abandoned call was a read; everything gc decided is
    written, so such a process ends at once."""
    import logging
    import os
    import threading

    if any(t.daemon and t.is_alive() for t in threading.enumerate() if t is not threading.current_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
    app.command("stop")(stop_cmd)
    app.command("cost")(cost_cmd)
    app.command("gc")(gc_cmd)
