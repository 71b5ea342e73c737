"""Every key of a job's store, in one place. Old jobs must stay readable: change with care.

<store>/<job_id>/spec.json
<store>/<job_id>/inputs/<role>/<file>                  local inputs staged for a cloud machine (role: train,
                                                       validation, base_adapter); the shipped spec names these URLs
<store>/<job_id>/checkpoints/<step:08d>/...            files of one checkpoint
<store>/<job_id>/checkpoints/<step:08d>/MANIFEST.json  written LAST: files, sizes, sha256
<store>/<job_id>/LATEST.json                           pointer to the newest committed checkpoint
<store>/<job_id>/heartbeat.json                        progress, written every <= 30 s
<store>/<job_id>/control.json                          requests from the controller (checkpoint, stop)
<store>/<job_id>/final/                                adapter (+ merged weights), tokenizer, summary.json
<store>/<job_id>/logs/attempt-<n>.log                  trainer output of one attempt (when shipped)
<store>/<job_id>/DONE.json | FAILED.json               terminal markers
"""

from __future__ import annotations


def job_prefix(job_id: str) -> str:
    return f"{job_id}/"


def spec_key(job_id: str) -> str:
    return f"{job_id}/spec.json"


def inputs_prefix(job_id: str, role: str) -> str:
    """Where `cloudtune run` stages a local input (data.train, data.validation, dpo.base_adapter)."""
    return f"{job_id}/inputs/{role}/"


def input_key(job_id: str, role: str, name: str) -> str:
    return f"{inputs_prefix(job_id, role)}{name}"


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"{job_id}/checkpoints/{step:08d}/"


def manifest_key(job_id: str, step: int) -> str:
    return f"{checkpoint_prefix(job_id, step)}MANIFEST.json"


def latest_key(job_id: str) -> str:
    return f"{job_id}/LATEST.json"


def heartbeat_key(job_id: str) -> str:
    return f"{job_id}/heartbeat.json"


def control_key(job_id: str) -> str:
    return f"{job_id}/control.json"


def final_prefix(job_id: str) -> str:
    return f"{job_id}/final/"


def summary_key(job_id: str) -> str:
    return f"{job_id}/final/summary.json"


def log_key(job_id: str, attempt: int) -> str:
    return f"{job_id}/logs/attempt-{attempt}.log"


def done_key(job_id: str) -> str:
    return f"{job_id}/DONE.json"


def failed_key(job_id: str) -> str:
    return f"{job_id}/FAILED.json"
