"""`cloudtune pull JOB [DIR]`: bring a finished job's result (adapter, merged model) back from its store.

Why: the result of a cloud job lives in the job's store (`<store>/<job>/final/`); a user should not
need the AWS CLI and the store layout to get it. The copy lands in `DIR.partial` and is renamed to
DIR only when every file arrived, so an interrupted pull never leaves a half adapter that loads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("pull", help="Download a finished job's adapter (or merged model) from its store, "
                             "and print how to load it.")(pull_cmd)


def load_hint(where: str, files: list[str]) -> list[str]:
    """How to load what final/ holds: a PEFT adapter (+ merged/ with merge: true) or full weights."""
    names = {f.split("/", 1)[0] for f in files}
    tok = "tokenizer_config.json" in names
    if "adapter_config.json" in names:
        lines = ["load it with peft:", "  from peft import AutoPeftModelForCausalLM"]
        lines += ["  from transformers import AutoTokenizer"] if tok else []
        lines.append(f"  model = AutoPeftModelForCausalLM.from_pretrained({where!r})")
        if "merged" in names:
            lines.append(f"  # or the merged model: AutoModelForCausalLM.from_pretrained({where + '/merged'!r})")
    else:
        lines = ["load it with transformers:",
                 f"  from transformers import AutoModelForCausalLM{', AutoTokenizer' if tok else ''}",
                 f"  model = AutoModelForCausalLM.from_pretrained({where!r})"]
    if tok:
        lines.append(f"  tokenizer = AutoTokenizer.from_pretrained({where!r})")
    return lines


def _local_write_problem(err: Exception, where: Path, target: Path, n_files: int) -> str | None:
    """One line when `err` is this machine's disk refusing the download (full or read-only), else None."""
    import errno

    from cloudtune.trainer.disk import free_bytes, is_disk_full, size

    if is_disk_full(err, where):
        free = free_bytes(where)
        return (f"{where}: the disk is full ({size(free) if free is not None else 'unknown'} free; the result has "
                f"{n_files} file(s)); free some space or pass a DIR on another disk (nothing was left in {target})")
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and \
                str(e.filename or "").startswith(str(where)):
            return f"cannot write {target}: {e.strerror}; pass a DIR you can write (nothing was left there)"
    return None


def pull_cmd(
    job_id: str = typer.Argument(..., help="The job id (see `cloudtune status`)."),
    dest: Path = typer.Argument(None, help="Where to put it (default: ./<job-name>-<job-id>); must not exist "
                                "or be empty."),
    no_merged: bool = typer.Option(False, "--no-merged", help="Skip final/merged/ (the merged full model)."),
) -> None:
    """Fetch `<store>/<job>/final/` with a progress bar and print the snippet that loads it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cloudtune.cli.jobs_cmd import _db, _job_or_fail
    from cloudtune.errors import NotFound, UserError
    from cloudtune.run.orchestrator import store_for
    from cloudtune.store import layout

    db = _db(read_only_ok=True)  # pull only reads the db: it works on a full or read-only $CLOUDTUNE_HOME
    job = _job_or_fail(db, job_id)
    store = store_for(job.spec)
    raw = getattr(store, "inner", store)  # the store without its retry wrapper, which reads every OSError as the store's
    prefix = layout.final_prefix(job_id)
    keys = [k for k in store.list(prefix) if not k.endswith("/")]
    if no_merged:
        keys = [k for k in keys if not k[len(prefix):].startswith("merged/")]
    if not keys:
        raise NotFound(f"job {job_id} has no result in {job.store_url.rstrip('/')}/{prefix} (state {job.state}); "
                       f"it appears when the job is done: `cloudtune status {job_id}`")
    target = Path(dest) if dest is not None else Path.cwd() / f"{job.name}-{job_id}"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists and is not empty; pass another DIR or remove it")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rels = [k[len(prefix):] for k in keys]
    console = Console(stderr=True, highlight=False)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task(f"pull {job_id}", total=len(keys))
            done_bytes = 0
            for i, (key, rel) in enumerate(zip(keys, rels, strict=True)):
                out = partial / rel
                raw.download_file(key, out)  # unwrapped: a local disk error keeps its errno and file name
                done_bytes += out.stat().st_size
                progress.update(task, completed=i + 1, description=f"pull {job_id}: {rel}")
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(partial, target)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, UserError):
            problem = _local_write_problem(err, partial.parent, target, len(keys))
            if problem:
                raise UserError(problem) from None
        raise
    console.print(f"pulled {len(keys)} file(s), {done_bytes / 1e6:.1f} MB, to {target}", markup=False)
    for line in load_hint(str(target), rels):
        typer.echo(line)
