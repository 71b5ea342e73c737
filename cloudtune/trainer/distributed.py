"""The trainer's view of a multi-process run: who am I, agree with the others, and who owns the store.

Why a module of its own: the recipe in train.py stays one readable path for 1 or N processes. Under
`python -m cloudtune.trainer.launch` (accelerate launch / torchrun) every process runs that same
recipe; this module holds the few places where N processes must differ or agree:

- rank 0 alone writes heartbeats, checkpoint manifests/LATEST, final/ and DONE.json (`is_main`);
- stop and checkpoint decisions are agreed at every optimizer-step boundary with one all-reduce
  (`agree`), so a SIGTERM, spot notice or control.json seen by one rank stops *all* ranks at the same
  step: nobody is left waiting in a collective for a peer that already left;
- a peer that vanished (SIGKILL, lost node) surfaces as a communication error on the survivors: that
  is `PeerLost` (exit 77, relaunch and resume), never FAILED.json, which would end the job for good;
- checkpoints record the world size and sharding, and `resume_batch` decides whether a checkpoint
  written by W processes can resume on W' (the global batch is kept, grad_accum absorbs the change)
  or is refused with one line.

torch is imported lazily: the CLI imports the trainer package for its contract.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError

log = logging.getLogger("cloudtune.trainer")

# Shardings whose checkpoints hold whole tensors (full adapter/weights + consolidated optimizer state):
# any world size can load them. FSDP/ZeRO shards are tied to the world size that wrote them.
TOPOLOGY_INDEPENDENT = ("none", "ddp")

# Agreed request codes (all-reduced with MAX): higher wins.
_NONE, _CKPT, _STOP_CONTROL, _STOP_SIGNAL, _STOP_SPOT = 0, 1, 2, 3, 4
_REASONS = {_STOP_CONTROL: "control", _STOP_SIGNAL: "signal", _STOP_SPOT: "spot"}
_CODES = {v: k for k, v in _REASONS.items()}


WORK_MARK = ".cloudtune-work"


def fresh_work_dir(work_dir: Path) -> None:
    """Empty `work_dir` for this attempt, deleting only what a trainer put there.

    Why not rmtree the folder: `--work-dir` may name a mount point (removing the folder itself fails
    with EBUSY) or a folder of the user's; one that holds files but no marker of ours is refused in
    one line (exit 2), never emptied."""
    from cloudtune.errors import UserError

    work_dir = Path(work_dir)
    if work_dir.exists():
        entries = list(work_dir.iterdir())
        if entries and not (work_dir / WORK_MARK).exists():
            raise UserError(f"--work-dir {work_dir} holds {len(entries)} entries and is not a cloudtune work dir "
                            f"(no {WORK_MARK}); give an empty or new folder")
        for p in entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / WORK_MARK).write_text("cloudtune trainer scratch: emptied when an attempt starts\n")


class PeerLost(RuntimeError):
    """Another rank (or node) disappeared mid-collective: relaunch and resume, do not fail the job."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


@dataclass
class Decision:
    """What all ranks agreed at a step boundary."""

    stop: bool = False
    reason: str = ""
    checkpoint: bool = False


class Dist:
    """This process's place in the run. World size 1 (no launcher) makes every method a no-op."""

    def __init__(self) -> None:
        self.rank = _env_int("RANK", 0)
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
        self.node_rank = _env_int("GROUP_RANK", 0)
        self.sharding = self._sharding()
        self._device: Any = None

    @staticmethod
    def _sharding() -> str:
        from cloudtune.trainer.contract import ENV_SHARDING

        if _env_int("WORLD_SIZE", 1) <= 1:
            return "none"
        return os.environ.get(ENV_SHARDING) or "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one writer of heartbeats, manifests, LATEST, final/ and DONE.json."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: one per machine (downloads the checkpoint, polls this machine's spot notice)."""
        return self.local_rank == 0

    # ---------------------------------------------------------------- setup

    def init(self) -> Dist:
        """Join the process group early (accelerate reuses it), so ranks can agree before the Trainer
        exists. A worker also asks the kernel to kill it when its launcher dies: a SIGKILLed launcher
        (no-notice preemption of a local node) must not leave workers running."""
        if not self.enabled:
            return self
        _die_with_parent()
        import datetime

        import torch
        import torch.distributed as tdist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self._device = torch.device("cuda", self.local_rank)
            backend = "nccl"
        else:
            self._device = torch.device("cpu")
            backend = "gloo"
        if not tdist.is_initialized():
            timeout = datetime.timedelta(seconds=_env_int("CLOUDTUNE_DIST_TIMEOUT_S", 1800))
            tdist.init_process_group(backend=backend, timeout=timeout)
        log.info("rank %d/%d (local %d, node %d), backend %s, sharding %s", self.rank, self.world_size,
                 self.local_rank, self.node_rank, backend, self.sharding)
        return self

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    # ---------------------------------------------------------------- agreement

    def agree(self, stop: bool, reason: str, checkpoint: bool) -> Decision:
        """One MAX all-reduce of this rank's request: every rank gets the same answer at the same step."""
        code = _CODES.get(reason, _STOP_SIGNAL) if stop else (_CKPT if checkpoint else _NONE)
        if self.enabled:
            import torch
            import torch.distributed as tdist

            t = torch.tensor([code], dtype=torch.int64, device=self._device or "cpu")
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            code = int(t.item())
        if code >= _STOP_CONTROL:
            return Decision(stop=True, reason=_REASONS[code], checkpoint=True)
        return Decision(checkpoint=code == _CKPT)

    def gather_files(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All ranks' lists on rank 0 (others get []): the files each node uploaded itself."""
        if not self.enabled:
            return entries
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size if self.is_main else []
        tdist.gather_object(entries, out if self.is_main else None, dst=0)
        return [e for part in out for e in (part or [])] if self.is_main else []

    # ---------------------------------------------------------------- checkpoints

    def restore(self, ckpts: Any, work_dir: Path) -> tuple[int, Path] | None:
        """A fresh work_dir and the newest verified checkpoint in it, the same step on every rank.

        Rank 0 picks the step (newest that verifies, with fallback); one process per machine downloads
        it into that machine's work_dir, which the machine's other ranks share (HF's output_dir)."""
        if self.is_local_main:
            fresh_work_dir(work_dir)
        restored = ckpts.restore(work_dir / "resume") if self.is_main else None
        if not self.enabled:
            return restored
        import torch.distributed as tdist

        box = [restored[0] if restored else None]
        tdist.broadcast_object_list(box, src=0)
        step = box[0]
        dest = work_dir / "resume" / f"checkpoint-{step}"
        if step is not None and self.is_local_main and not self.is_main:
            ckpts.download(step, dest)
        self.barrier()
        return (step, dest) if step is not None else None

    def checkpoint_meta(self, micro_batch: int, grad_accum: int) -> dict[str, Any]:
        """What a manifest records about the topology that wrote it."""
        return {
            "world_size": self.world_size,
            "nodes": max(1, self.world_size // max(1, self.local_world_size)),
            "sharding": self.sharding,
            "micro_batch": micro_batch,
            "grad_accum": grad_accum,
            "global_batch": micro_batch * grad_accum * self.world_size,
            "topology_independent": self.sharding in TOPOLOGY_INDEPENDENT,
        }

    def resume_batch(self, meta: dict[str, Any], step: int, micro_batch: int, grad_accum: int) -> int:
        """The grad_accum that resumes checkpoint `step` (written with `meta`) on this world size.

        Same shape: the checkpoint's own grad_accum (resumes exactly). Another world size: the same
        global batch (so step counts, the LR schedule and the data position keep their meaning) if the
        checkpoint is topology-independent and the batch divides; otherwise a one-line refusal."""
        old_world = int(meta.get("world_size") or 1)
        old_sharding = str(meta.get("sharding") or "none")
        old_mb = int(meta.get("micro_batch") or micro_batch)
        old_ga = int(meta.get("grad_accum") or grad_accum)
        global_batch = int(meta.get("global_batch") or old_mb * old_ga * old_world)
        if old_world == self.world_size and old_sharding == self.sharding:
            if old_mb != micro_batch:
                raise UserError(f"checkpoint {step} was written with training.micro_batch {old_mb}, the spec now says "
                                f"{micro_batch}; restore micro_batch {old_mb} to resume")
            return old_ga
        independent = meta.get("topology_independent", old_sharding in TOPOLOGY_INDEPENDENT)
        if not independent:
            raise UserError(
                f"checkpoint {step} was written by {old_world} processes with {old_sharding} shards, which only "
                f"load on that shape; this machine runs {self.world_size} ({self.sharding}): relaunch on "
                f"{old_world} GPUs, or start a new job")
        per_step = micro_batch * self.world_size
        if global_batch % per_step:
            raise UserError(
                f"checkpoint {step} trained with a global batch of {global_batch} samples ({old_world} processes x "
                f"micro_batch {old_mb} x grad_accum {old_ga}); {self.world_size} processes x micro_batch "
                f"{micro_batch} do not divide it: relaunch on a GPU count that divides {global_batch // micro_batch}")
        new_ga = global_batch // per_step
        if old_world != self.world_size:
            log.warning("resuming checkpoint %d of %d processes on %d: grad_accum %d -> %d keeps the global "
                        "batch at %d samples", step, old_world, self.world_size, old_ga, new_ga, global_batch)
        return new_ga

    # ---------------------------------------------------------------- failures

    def peer_lost(self, err: BaseException) -> bool:
        """True when `err` is a collective failing because another rank is gone (not our own bug)."""
        if not self.enabled:
            return False
        try:
            import torch.distributed as tdist

            if isinstance(err, getattr(tdist, "DistError", ())):
                return True
        except ImportError:
            pass
        text = f"{type(err).__name__}: {err}".lower()
        markers = ("connection closed by peer", "connection reset by peer", "gloo", "nccl", "broken pipe",
                   "socket timeout", "timed out", "process group", "rendezvous", "ncclremoteerror")
        return isinstance(err, RuntimeError | ConnectionError | TimeoutError) and any(m in text for m in markers)

    def close(self) -> None:
        if self.enabled:
            try:
                import torch.distributed as tdist

                if tdist.is_initialized():
                    tdist.destroy_process_group()
            except Exception:  # noqa: BLE001 - tearing down after the work is done or lost
                pass


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux: this worker dies when its launcher does."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
