"""The machine's own disk: telling "the disk is full" from other errors, and cleaning old work dirs.

Why this exists (#16): a full work disk during a checkpoint save used to end the job FAILED (exit 1),
with a good checkpoint in the store. The save is HF's (torch.save / safetensors), and the kernel's
ENOSPC reaches us in several disguises: an OSError with errno 28, safetensors' "No space left on
device (os error 28)", or torch's zip writer's opaque "unexpected pos ..." / "file write failed"
RuntimeError with no errno at all. So "disk full" is decided by the error chain first and, for the
opaque ones, by the file system itself (statvfs: next to nothing left).

What the trainer does then (train.py, cli.py): remove the partial local checkpoint (it was never
uploaded: the commit reads only a finished folder), keep the committed one in the store as the
resume point, and exit EXIT_DISK_FULL (73) with one line that says how full the disk is, how big a
checkpoint is and which `resources.disk_gb` would hold it. The orchestrator relaunches (a new
machine has a fresh disk) but stops when two attempts in a row fill their disk at the same step.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("cloudtune.trainer")

GIB = 1024**3
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = re.compile(r"no space left on device|os error 28|disk quota exceeded|errno 28|enospc", re.I)
# torch's zip writer on a full disk: no errno, no "space" in the text; only the file system can say.
_OPAQUE_WRITE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed|iostream error", re.I)
# "next to nothing left": below this the failed write is the disk's fault, not the data's
NEARLY_FULL_BYTES = 64 * 1024**2
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)$")
_ATTEMPT_DIR = re.compile(r"attempt-(\d+)(?:-node\d+)?$")


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on `path`'s file system (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in out and len(out) < 16:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_disk_full(err: BaseException, path: Path | None = None) -> bool:
    """True when `err` is the disk being full: ENOSPC/EDQUOT in the chain, the kernel's words in a
    message, or an opaque write failure while `path`'s file system has next to nothing left."""
    chain = _chain(err)
    for e in chain:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(e)):
            return True
    if path is not None and any(_OPAQUE_WRITE.search(str(e)) for e in chain):
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def store_error_is_local(err: BaseException, work_dir: Path, store: Any) -> bool:
    """A store error (StoreUnavailable) that is really this machine's disk: a download (the restore of a
    checkpoint) onto a full work disk. The store's retry wrapper reads every OSError as the store's, and
    the exit 74 it leads to waits for the store, which is fine, and relaunches onto the same small disk
    with no restart spent: a loop. An s3:// store has no ENOSPC of its own; a file:// store on the same
    file system as the work dir (`local`) is the store's wait, where freeing space is the fix."""
    if not is_disk_full(err):
        return False
    free = free_bytes(work_dir)
    if free is None or free >= NEARLY_FULL_BYTES:
        return False
    root = getattr(store, "root", None)
    if root is None:
        return True
    here = Path(work_dir)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return os.stat(root).st_dev != os.stat(here).st_dev
    except OSError:
        return False


def size(n: float) -> str:
    """GiB as the fix is counted in; MiB below one GiB (a tiny model's checkpoint is not "0.00 GiB")."""
    if n < GIB:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.0f} GiB"


@dataclass(eq=False)
class DiskFull(RuntimeError):
    """The machine's disk filled up at `step` (a resumable stop: exit 73, see contract.py)."""

    step: int
    path: str
    free: int | None  # bytes free after the partial checkpoint was removed
    need: int | None  # bytes one checkpoint takes (the last committed one's, else measured)
    disk_gb: int | None  # the disk this machine was given (resources.disk_gb), None on `local`
    what: str = "a checkpoint"

    def fix_gb(self) -> int | None:
        """A disk_gb that holds what is on the disk now plus this checkpoint and the next one."""
        if self.disk_gb is None or self.need is None:
            return None
        short = max(0, self.need - (self.free or 0))
        return int(self.disk_gb + math.ceil((short + self.need) / GIB))

    def reason(self) -> str:
        free = f"{size(self.free)} free" if self.free is not None else "free space unknown"
        need = f"{self.what} needs ~{size(self.need)}" if self.need else f"{self.what} did not fit"
        head = f"the machine's disk is full at step {self.step} ({self.path}): {free}, {need}"
        fix = self.fix_gb()
        if fix is not None:
            return f"{head}; set resources.disk_gb >= {fix} (now {self.disk_gb})"
        return f"{head}; free some space on that disk"

    def __str__(self) -> str:
        return self.reason()

    def heartbeat(self) -> dict[str, Any]:
        return {"phase": "disk_full", "step": self.step, "disk_full": self.reason(), "disk_free_bytes": self.free,
                "checkpoint_bytes": self.need, "disk_fix_gb": self.fix_gb()}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def model_checkpoint_bytes(model: Any, optimizer: Any) -> int:
    """What one checkpoint of the live model takes: the saved weights (the trainable ones for an
    adapter, all of them for a full fine-tune) plus the optimizer's state tensors."""
    params = list(model.parameters()) if model is not None else []
    trainable = [p for p in params if p.requires_grad]
    adapter = bool(getattr(model, "peft_config", None))
    saved = sum(p.numel() * p.element_size() for p in (trainable if adapter else params))
    states = 0
    for st in (getattr(optimizer, "state", None) or {}).values():
        for v in st.values() if isinstance(st, dict) else ():
            if hasattr(v, "element_size") and hasattr(v, "numel"):
                states += v.numel() * v.element_size()
    if not states:  # before the first step AdamW has no states yet: two per trainable value
        states = 2 * sum(p.numel() * 4 for p in trainable)
    return saved + states


def remove_partial(output_dir: Path, committed: set[int]) -> list[int]:
    """Remove the local checkpoint folders that are not committed in the store (a save cut short by
    the full disk): they were never uploaded, and must never be taken for the newest."""
    removed = []
    for d in sorted(Path(output_dir).glob("checkpoint-*")) if Path(output_dir).is_dir() else []:
        m = _CHECKPOINT_DIR.search(d.name)
        if m and int(m.group(1)) not in committed:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(int(m.group(1)))
    return removed


# ------------------------------------------------------------------------ old attempts' work dirs


def _local_checkpoints(attempt_dir: Path) -> list[Path]:
    """The checkpoint folders an attempt left: HF's (hf/checkpoint-N) and restored ones (checkpoint-N)."""
    return [d for d in (*attempt_dir.glob("checkpoint-*"), *attempt_dir.glob("hf/checkpoint-*"))
            if d.is_dir() and _CHECKPOINT_DIR.search(d.name)]


def _verified(ckpts: Any, step: int, folder: Path, newest: int | None) -> bool:
    """True when the store holds this local checkpoint: its manifest lists these very files (size
    and sha256), or a newer committed checkpoint supersedes it."""
    from cloudtune.trainer.checkpoint import CheckpointError, sha256_file

    if newest is not None and step < newest:
        return True
    try:
        manifest = ckpts.checked_manifest(step)
    except CheckpointError:
        return False
    except Exception:  # noqa: BLE001 - the store cannot say: keep the folder
        return False
    entries = {e["path"]: e for e in manifest["files"]}
    local = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    for rel, p in local.items():
        if rel == "training_args.bin" and rel not in entries:
            continue
        e = entries.get(rel)
        if e is None or e["size"] != p.stat().st_size or e["sha256"] != sha256_file(p):
            return False
    return True


def clean_old_attempts(work_dir: Path, ckpts: Any, attempt: int) -> list[str]:
    """At an attempt's start: its predecessors' dirs beside it (the default layout
    `$CLOUDTUNE_HOME/work/<job>/attempt-<n>` only: a --work-dir elsewhere has no siblings of ours)."""
    m = _ATTEMPT_DIR.fullmatch(Path(work_dir).name)
    if not m:
        return []
    # each node cleans its own dirs only (`attempt-<n>` on node 0, `attempt-<n>-node<k>` on node k): nodes
    # that share one disk (the local provider, a shared /workspace) would otherwise delete under each other
    node = Path(work_dir).name[len(f"attempt-{m.group(1)}"):]
    return clean_attempt_dirs(Path(work_dir).parent, ckpts, before=attempt, node=node)


def clean_attempt_dirs(job_root: Path, ckpts: Any, *, before: int | None, done: bool = False,
                       remove_root: bool = False, node: str | None = None) -> list[str]:
    """Delete the work dirs under `job_root` (`attempt-<n>`, `attempt-<n>-node<k>`) of attempts before
    `before` (None: every attempt; the current attempt's dirs, on every node, always stay) whose every checkpoint is in the store (verified, or superseded by a newer committed one) and
    whose final/ was uploaded (`done`: DONE.json is in the store). Anything else stays, with a log
    line: it may be the only copy. Returns the names deleted."""
    root = Path(job_root)
    if not root.is_dir():
        return []
    try:
        committed = ckpts.committed_steps()
    except Exception as err:  # noqa: BLE001 - without the store's word nothing is provably uploaded
        log.warning("not cleaning old work dirs under %s: cannot list the store (%s)", root, err)
        return []
    newest = max(committed) if committed else None
    deleted = []
    for d in sorted(root.iterdir()):
        m = _ATTEMPT_DIR.fullmatch(d.name)
        if not d.is_dir() or not m or (before is not None and int(m.group(1)) >= before):
            continue
        if node is not None and d.name[len(f"attempt-{m.group(1)}"):] != node:
            continue  # another node's dir: that node cleans it
        try:
            unsafe = [c.name for c in _local_checkpoints(d)
                      if not _verified(ckpts, int(_CHECKPOINT_DIR.search(c.name).group(1)), c, newest)]
        except OSError as err:  # a file went away while we read it (the old attempt's last process exiting)
            log.warning("keeping old work dir %s for now: it changed while being checked (%s)", d, err)
            continue
        if (d / "final").is_dir() and not done:
            unsafe.append("final/ (no DONE.json in the store)")
        if unsafe:
            log.warning("keeping old work dir %s: %s not in the store", d, ", ".join(unsafe))
            continue
        size = dir_bytes(d)
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed old work dir %s (%.1f MB; everything in it is in the store)", d, size / 1e6)
        deleted.append(d.name)
    if remove_root and not any(root.iterdir()):
        root.rmdir()
    return deleted


def on_disk_full(err: BaseException, work_dir: Path, *, step: int, phase: str, trainer: Any, ckpts: Any) -> DiskFull:
    """The DiskFull for `err`: the partial checkpoint removed first (so `free` is what a retry on this
    disk would have), the size of one checkpoint from the last committed manifest, else measured."""
    committed: set[int] = set()
    need: int | None = None
    if ckpts is not None:
        try:
            committed = set(ckpts.committed_steps())
            if committed:
                need = int((ckpts.manifest(max(committed)) or {}).get("bytes") or 0) or None
        except Exception as e:  # noqa: BLE001 - the store cannot say; measure instead
            log.warning("cannot read the committed checkpoints (%s)", e)
    removed = remove_partial(Path(work_dir) / "hf", committed)
    if removed:
        log.warning("removed the partial local checkpoint(s) %s (never uploaded)", removed)
    what = {"saving": "the final model"}.get(phase, "a checkpoint")
    if phase == "loading" and need is None:  # nothing committed to restore: the download filled it
        what = "the model download"
    if need is None and trainer is not None and what != "the model download":
        try:
            need = model_checkpoint_bytes(getattr(trainer, "model", None), getattr(trainer, "optimizer", None))
        except Exception:  # noqa: BLE001 - an estimate only
            need = None
    return DiskFull(step=step, path=str(work_dir), free=free_bytes(Path(work_dir)), need=need,
                    disk_gb=disk_gb_env(), what=what)


def disk_gb_env() -> int | None:
    from cloudtune.trainer.contract import ENV_DISK_GB

    raw = os.environ.get(ENV_DISK_GB)
    try:
        return int(float(raw)) if raw else None
    except ValueError:
        return None
