"""`JOB|DIR` -> a local model folder, what kind it is, and the base model an adapter needs.

Why a module: merge, GGUF export and push all accept the same thing (a job id or a folder) and must
agree on where the base model comes from. An adapter's `adapter_config.json` names its base by the
path it had *on the training machine* (for `tiny:` models a cache folder there), so for a job the base
is the job's own `spec.model`, and for a downloaded `final/` folder it is `summary.json`'s `model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cloudtune.errors import NotFound, UserError

Kind = Literal["adapter", "full"]


@dataclass
class Source:
    """A model folder on this machine: an adapter (needs `base`) or whole weights."""

    dir: Path
    kind: Kind
    base: str | None  # model ref for an adapter: tiny:<task>, a folder, or a hub id
    name: str  # for default output names
    job_id: str | None = None
    merged_dir: Path | None = None  # final/merged/ when the job already merged (spec.merge: true)


def _kind(folder: Path) -> Kind | None:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "full"
    return None


def from_dir(folder: Path, base: str | None = None) -> Source:
    kind = _kind(folder)
    if kind is None:
        raise UserError(f"{folder} holds neither adapter_config.json nor config.json; point at a job's final/ "
                        "folder or a saved model")
    if kind == "adapter" and base is None:
        summary = folder / "summary.json"
        if summary.is_file():
            base = json.loads(summary.read_text()).get("model")
        if base is None:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"adapter {folder} does not name its base model; pass --base MODEL")
    merged = folder / "merged"
    return Source(dir=folder, kind=kind, base=base, name=folder.resolve().name,
                  merged_dir=merged if _kind(merged) == "full" else None)


def _job_store(job_id: str):
    """The store that holds a job: its state row's spec, else the default store (trainer-only runs)."""
    from cloudtune.run.state import StateDB

    job = StateDB().get_job(job_id)
    if job is not None:
        from cloudtune.run.orchestrator import store_for

        return store_for(job.spec), job.spec.model, job.state
    from cloudtune.home import default_store_url
    from cloudtune.store import open_store

    return open_store(default_store_url()), None, None


def from_job(job_id: str, work: Path, base: str | None = None) -> Source:
    """Download a finished job's final/ into `work` (once) and describe it."""
    from cloudtune.store import layout

    store, model, state = _job_store(job_id)
    prefix = layout.final_prefix(job_id)
    keys = store.list(prefix)
    names = {k[len(prefix):] for k in keys}
    if "summary.json" not in names:  # written last by the trainer: without it final/ is incomplete
        if state is None and not keys:
            raise NotFound(f"no job or folder {job_id!r}; pass a job id from `cloudtune status` or a model folder")
        raise UserError(f"job {job_id} has no finished model yet (state {state or 'unknown'}); wait for it to "
                        f"finish (`cloudtune status {job_id}`)")
    dest = work / job_id / "final"
    summary = store.get_bytes(prefix + "summary.json")
    if not ((dest / "summary.json").is_file() and (dest / "summary.json").read_bytes() == summary):
        # final/ is immutable once summary.json exists; a copy with the same summary is that copy.
        # Download into a fresh folder and rename, so an interrupted download is never reused.
        import shutil
        import tempfile

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".final-"))
        try:
            for key in sorted(keys, key=lambda k: k.endswith("/summary.json")):
                store.download_file(key, tmp / key[len(prefix):])
            shutil.rmtree(dest, ignore_errors=True)
            try:
                tmp.rename(dest)
            except OSError:  # a concurrent export of the same job renamed its (identical) copy first
                if not ((dest / "summary.json").is_file() and (dest / "summary.json").read_bytes() == summary):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    src = from_dir(dest, base or model)
    src.job_id, src.name = job_id, job_id
    return src


def resolve(ref: str, work: Path, base: str | None = None) -> Source:
    """A folder when `ref` is one, else a job id."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return from_dir(p, base)
    if "/" in ref or ref.startswith("."):
        raise NotFound(f"folder {ref!r} does not exist; pass a job id or a model folder")
    return from_job(ref, work, base)
