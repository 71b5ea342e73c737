"""Experiment trackers: TensorBoard events into the store, tracker keys onto the machine.

Why: a rented machine is deleted when the job ends, and with it `runs/` under the trainer's output
folder; the store is where everything a job leaves behind lives. So rank 0 copies the TensorBoard
event files to `<job>/logs/tensorboard/attempt-<n>/` at every committed checkpoint (what the writer
has flushed by then; HF's writer flushes at least every 120 s) and once more at the end, when the
writer is closed. `tensorboard --logdir <store>/<job>/logs/tensorboard` then shows every attempt.

Tracker keys: `training.report_to` names trackers, `training.tracker_env` names extra environment
variables; their values are read from the submitting user's environment and travel as the launch's
*secret* env (providers keep those out of logs, state and `--dry-run`), never in the spec.
Import-light: the orchestrator imports `secret_env` on every launch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("cloudtune.trainer")

# The variables each tracker's client reads for credentials and routing (their documented names).
TRACKER_ENV: dict[str, tuple[str, ...]] = {
    "wandb": ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "WANDB_MODE"),
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_EXPERIMENT_NAME"),
    "tensorboard": (),
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def tensorboard_prefix(job_id: str, attempt: int) -> str:
    return f"{job_id}/logs/tensorboard/attempt-{attempt}/"


def env_names(report_to: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """The variable names a job's trackers need, in a stable order (no duplicates)."""
    names: list[str] = []
    for tracker in report_to:
        names.extend(TRACKER_ENV.get(tracker, ()))
    names.extend(extra)
    return list(dict.fromkeys(names))


def secret_env(report_to: Iterable[str], extra: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """name -> value for each tracker variable that is set here (unset ones are simply not sent)."""
    return {n: environ[n] for n in env_names(report_to, extra) if environ.get(n)}


def missing_keys(report_to: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """One line per tracker that would fail on the machine for want of a key (for pre-flight checks):
    wandb without WANDB_API_KEY dies at `wandb.init` on a machine with no terminal, after it was rented."""
    problems = []
    if "wandb" in report_to and not environ.get("WANDB_API_KEY") and environ.get("WANDB_MODE") not in (
            "offline", "disabled"):
        problems.append("training.report_to: wandb needs WANDB_API_KEY in the environment of `cloudtune run` (it "
                        "reaches the machine as a secret); export it, or set WANDB_MODE=offline")
    return problems


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def event_files(output_dir: str | Path) -> list[Path]:
    """TensorBoard event files HF's TensorBoardCallback wrote: $TENSORBOARD_LOGGING_DIR or <output>/runs/."""
    roots = [Path(output_dir) / "runs"]
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        roots.append(Path(os.environ["TENSORBOARD_LOGGING_DIR"]).expanduser())
    return sorted({p for r in roots if r.is_dir() for p in r.rglob("events.out.tfevents.*") if p.is_file()})


def upload_tensorboard(store: Any, job_id: str, attempt: int, output_dir: str | Path) -> int:
    """Copy this attempt's event files to the store (rank 0 only); returns how many were copied.

    A failed upload is logged, not raised: losing a tracker log must not fail a training job.
    """
    if not _is_rank0():
        return 0
    prefix = tensorboard_prefix(job_id, attempt)
    n = 0
    for path in event_files(output_dir):
        try:
            store.upload_file(path, prefix + path.name)
            n += 1
        except Exception as err:  # noqa: BLE001 - see docstring
            log.warning("tensorboard upload of %s failed: %s", path.name, err)
    return n
