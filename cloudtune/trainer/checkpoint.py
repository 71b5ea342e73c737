"""Checkpoints in the store, committed atomically with a manifest written last.

Protocol (the store layout in cloudtune/store/layout.py):
1. upload every file of the local checkpoint folder to checkpoints/<step:08d>/...
2. write checkpoints/<step>/MANIFEST.json (relative path, size, sha256 of every file): the commit;
3. write LATEST.json pointing at it;
4. only then delete committed checkpoints beyond the newest `keep`, and stale uncommitted folders.

A folder without MANIFEST.json is not a checkpoint (a SIGKILL mid-upload leaves exactly that).
Restore tries the newest manifest first (LATEST, or a newer manifest whose LATEST write was lost),
verifies sizes and sha256 of what it downloaded, and falls back to the previous committed
checkpoint when verification fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cloudtune.store import layout
from cloudtune.store.base import Store, StoreNotFound

log = logging.getLogger("cloudtune.trainer")
MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint failed verification (size or sha256 mismatch, missing file, damaged or unsafe manifest)."""


def safe_relpath(path: Any, what: str) -> str:
    """`path` if it is a relative '/'-separated path with no '..', '.', empty or backslash parts."""
    if not isinstance(path, str) or not path:
        raise CheckpointError(f"{what}: a file entry has no path")
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in parts) \
            or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        raise CheckpointError(f"{what}: unsafe path {path[:80]!r} in MANIFEST.json (absolute or leaves the checkpoint)")
    return path


def confined(root: Path, rel: Any, what: str) -> Path:
    """root/rel, refusing any rel that is unsafe or resolves (through a symlink too) outside root."""
    target = (root / safe_relpath(rel, what)).resolve()
    if root not in target.parents:
        raise CheckpointError(f"{what}: path {str(rel)[:80]!r} resolves outside {root}")
    return target


class CheckpointStore:
    """Commit, list, verify and restore the checkpoints of one job."""

    def __init__(self, store: Store, job_id: str, keep: int = 2, upload_workers: int = 4) -> None:
        self.store = store
        self.job_id = job_id
        self.keep = max(1, keep)
        self.upload_workers = upload_workers

    # ------------------------------------------------------------------ commit

    def commit(self, local_dir: Path, step: int, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload local_dir as checkpoint `step`, then manifest, then LATEST, then prune. Returns the manifest."""
        local_dir = Path(local_dir)
        prefix = layout.checkpoint_prefix(self.job_id, step)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        # A re-commit of the same step (an attempt died mid-upload) must never look committed early.
        self.store.delete(layout.manifest_key(self.job_id, step))
        entries = []
        started = time.time()

        def upload(p: Path) -> dict[str, Any]:
            rel = p.relative_to(local_dir).as_posix()
            self.store.upload_file(p, prefix + rel)
            return {"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)}

        with ThreadPoolExecutor(max_workers=self.upload_workers) as pool:
            entries = list(pool.map(upload, files))
        manifest = {
            "version": MANIFEST_VERSION,
            "job_id": self.job_id,
            "step": step,
            "time": time.time(),
            "files": entries,
            "bytes": sum(e["size"] for e in entries),
            "upload_s": round(time.time() - started, 3),
            **(meta or {}),
        }
        self.store.put_json(layout.manifest_key(self.job_id, step), manifest)
        self.store.put_json(
            layout.latest_key(self.job_id),
            {"step": step, "manifest": layout.manifest_key(self.job_id, step), "time": manifest["time"]},
        )
        self.prune(newest=step)
        return manifest

    # ------------------------------------------------------------------ inspect

    def _steps_with(self, only_committed: bool) -> list[int]:
        base = f"{self.job_id}/checkpoints/"
        steps: set[int] = set()
        for key in self.store.list(base):
            parts = key[len(base):].split("/")
            if len(parts) < 2 or not parts[0].isdigit():
                continue
            if only_committed and parts[1:] != [MANIFEST]:
                continue
            steps.add(int(parts[0]))
        return sorted(steps)

    def committed_steps(self) -> list[int]:
        """Steps that have a manifest, oldest first."""
        return self._steps_with(only_committed=True)

    def latest_step(self) -> int | None:
        latest = self.store.read_json(layout.latest_key(self.job_id))
        return int(latest["step"]) if latest and "step" in latest else None

    def manifest(self, step: int) -> dict[str, Any] | None:
        return self.store.read_json(layout.manifest_key(self.job_id, step))

    def checked_manifest(self, step: int) -> dict[str, Any]:
        """The manifest of `step`, or CheckpointError saying what is wrong with it.

        Whoever can write the store could plant a manifest: every entry must be a relative path that
        stays inside the checkpoint (no absolute path, no '..', no backslash), with an integer size
        and a sha256, or the checkpoint is treated as if it did not exist.
        """
        key = layout.manifest_key(self.job_id, step)
        try:
            raw = self.store.get_bytes(key)
        except StoreNotFound:
            raise CheckpointError(f"checkpoint {step} has no manifest") from None
        try:
            manifest = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"checkpoint {step}: MANIFEST.json is not JSON ({len(raw)} bytes: {err})") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"checkpoint {step}: MANIFEST.json is a {type(manifest).__name__}, not an object")
        files = manifest.get("files")
        if not isinstance(files, list) or not files:
            raise CheckpointError(f"checkpoint {step}: MANIFEST.json has no list of files")
        seen: set[str] = set()
        for entry in files:
            if not isinstance(entry, dict):
                raise CheckpointError(f"checkpoint {step}: a MANIFEST.json entry is not an object")
            safe_relpath(entry.get("path"), f"checkpoint {step}")
            if not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool) or entry["size"] < 0:
                raise CheckpointError(f"checkpoint {step}: {entry['path']} has no valid size in MANIFEST.json")
            sha = entry.get("sha256")
            if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise CheckpointError(f"checkpoint {step}: {entry['path']} has no valid sha256 in MANIFEST.json")
            if entry["path"] in seen:
                raise CheckpointError(f"checkpoint {step}: {entry['path']} is listed twice in MANIFEST.json")
            seen.add(entry["path"])
        return manifest

    # ------------------------------------------------------------------ prune

    def prune(self, newest: int) -> None:
        """Keep the newest `keep` committed checkpoints up to `newest`; drop everything else.

        Anything above `newest` belongs to an abandoned timeline (this run resumed from an older
        checkpoint because a newer one failed verification) and is dropped too.
        """
        committed = [s for s in self.committed_steps() if s <= newest]
        doomed = set(committed[:-self.keep])
        doomed |= {s for s in self._steps_with(only_committed=False) if s != newest and s not in committed[-self.keep:]}
        for step in sorted(doomed):
            # Manifest first: from this moment the folder is not a checkpoint, whatever remains.
            self.store.delete(layout.manifest_key(self.job_id, step))
            self.store.delete_prefix(layout.checkpoint_prefix(self.job_id, step))

    # ------------------------------------------------------------------ restore

    def candidates(self) -> list[int]:
        """Steps to try on restore, best first: newest manifest first, LATEST's target included."""
        steps = set(self.committed_steps())
        return sorted(steps, reverse=True)

    def download(self, step: int, dest: Path) -> Path:
        """Download checkpoint `step` into dest and verify it against its manifest."""
        manifest = self.checked_manifest(step)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        root = dest.resolve()
        prefix = layout.checkpoint_prefix(self.job_id, step)
        for entry in manifest["files"]:
            target = confined(root, entry["path"], f"checkpoint {step}")
            try:
                self.store.download_file(prefix + entry["path"], target)
            except StoreNotFound:
                raise CheckpointError(f"checkpoint {step}: file {entry['path']} is missing") from None
            size = target.stat().st_size
            if size != entry["size"]:
                raise CheckpointError(f"checkpoint {step}: {entry['path']} has {size} bytes, manifest says {entry['size']}")
            if sha256_file(target) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {step}: {entry['path']} sha256 does not match the manifest")
        return dest

    def restore(self, work_dir: Path) -> tuple[int, Path] | None:
        """Download the newest checkpoint that verifies, as work_dir/checkpoint-<step>. None: start fresh."""
        for step in self.candidates():
            dest = Path(work_dir) / f"checkpoint-{step}"
            try:
                self.download(step, dest)
                return step, dest
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: %s; trying the previous one", step, err)
                shutil.rmtree(dest, ignore_errors=True)
        return None
