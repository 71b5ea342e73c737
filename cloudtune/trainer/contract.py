"""What the trainer and the controller (orchestrator, watchdog) agree on. Keep stable.

Exit codes of `python -m cloudtune.trainer`:
"""

from __future__ import annotations

EXIT_DONE = 0  # DONE.json written, final adapter in <store>/<job>/final/
EXIT_FAILED = 1  # unrecoverable error; FAILED.json written with the reason
EXIT_BAD_INPUT = 2  # the spec or the data is invalid; FAILED.json written; do not retry
EXIT_DISK_FULL = 73  # the machine's own disk filled up (a checkpoint save, the model download): the partial
#   checkpoint is removed, the committed one stays the resume point; relaunch on a fresh disk (EX_CANTCREAT)
EXIT_STORE_UNAVAILABLE = 74  # the store stayed unwritable past the retry budget (full, read-only, unreachable):
#   resumable; the controller relaunches once the store takes writes again (EX_IOERR)
EXIT_PREEMPTED = 75  # stopped on a signal/notice after an emergency checkpoint: relaunch to resume
EXIT_STOPPED = 76  # stopped on a controller request (control.json "stop") after a checkpoint
EXIT_PEER_LOST = 77  # multi-process: another rank/node vanished mid-collective; relaunch to resume

# Environment variables the trainer reads (the orchestrator sets them at launch).
ENV_SPEC = "CLOUDTUNE_SPEC"  # the JobSpec as JSON (or base64 JSON prefixed 'b64:')
ENV_SPEC_URL = "CLOUDTUNE_SPEC_URL"  # or: where to read spec.json from (a store URL)
ENV_JOB_ID = "CLOUDTUNE_JOB_ID"
ENV_ATTEMPT = "CLOUDTUNE_ATTEMPT"
ENV_STORE = "CLOUDTUNE_STORE"  # store root URL (overrides spec.store.url)
ENV_STORE_ENDPOINT = "CLOUDTUNE_STORE_ENDPOINT"  # S3-compatible endpoint URL
ENV_IMDS = "CLOUDTUNE_IMDS_ENDPOINT"  # AWS instance metadata endpoint (tests point it at a fake)
ENV_DISK_GB = "CLOUDTUNE_DISK_GB"  # the disk the machine was given (resources.disk_gb); unset on `local`

HEARTBEAT_INTERVAL_S = 30.0

# heartbeat.json fields (all optional except job_id, attempt, time, phase):
# job_id, attempt, time (unix s), phase (loading|training|checkpointing|saving|done|failed|
# preempted|stopped), step, total_steps, epoch, loss, learning_rate, eval_loss, tokens_per_s,
# peak_mem_bytes, peak_mem_kind (cuda_reserved|rss), eta_s, last_checkpoint_step,
# last_step_time (unix s of the last optimizer step), stop_reason (signal|spot|control), stop_detail
#
# control.json (written by the controller, deleted by the trainer once acted on):
# {"action": "checkpoint"} -> checkpoint and continue; {"action": "stop", "reason": str} -> checkpoint,
# exit EXIT_STOPPED. Polled every CLOUDTUNE_CONTROL_POLL_S (default 10 s).
#
# Entrypoint (images/trainer, cloudtune/trainer/entrypoint.py):
ENV_MAX_LIFETIME = "CLOUDTUNE_MAX_LIFETIME_S"  # hard cap on the trainer's lifetime (SIGTERM, then SIGKILL)
ENV_STOP_GRACE = "CLOUDTUNE_STOP_GRACE_S"  # seconds between that SIGTERM and SIGKILL (default 90)
ENV_SELF_TERMINATE = "CLOUDTUNE_SELF_TERMINATE"  # shell command run after the trainer exits (never logged)
# On-machine guards (cloudtune/trainer/guards.py), read by the entrypoint; they hold with no controller:
ENV_STALL_TIMEOUT_S = "CLOUDTUNE_STALL_TIMEOUT_S"  # no training progress for this long: stop the machine
ENV_LOAD_ALLOWANCE_S = "CLOUDTUNE_LOAD_ALLOWANCE_S"  # extra time before the first training heartbeat
ENV_PRICE_HR = "CLOUDTUNE_PRICE_HR"  # this machine's price, $/h (for the budget guard)
ENV_BUDGET_USD = "CLOUDTUNE_BUDGET_USD"  # what this attempt may still spend, $
ENV_BUDGET_GRACE_S = "CLOUDTUNE_BUDGET_GRACE_S"  # the budget guard waits this long for a controller (60 s)
ENV_GUARD_POLL_S = "CLOUDTUNE_GUARD_POLL_S"  # how often the guards read the heartbeat (default 30 s)

# Distributed shape (cloudtune/trainer/launch.py, the machine's entry command): set by the orchestrator
# (orchestrator.build_request) or, on a SkyPilot cluster, mapped from SKYPILOT_* below. Unset = 1 process.
ENV_NPROC_PER_NODE = "CLOUDTUNE_NPROC_PER_NODE"  # processes (GPUs) on this machine
ENV_NNODES = "CLOUDTUNE_NNODES"  # machines in the job
ENV_NODE_RANK = "CLOUDTUNE_NODE_RANK"  # this machine's index, 0 = the master
ENV_MASTER_ADDR = "CLOUDTUNE_MASTER_ADDR"  # the master's address (rendezvous)
ENV_MASTER_PORT = "CLOUDTUNE_MASTER_PORT"  # the master's rendezvous port (default 29500)
ENV_SHARDING = "CLOUDTUNE_SHARDING"  # ddp | fsdp (accelerate launch config); default: the spec's
DEFAULT_MASTER_PORT = 29500
# SkyPilot's per-node environment (https://docs.skypilot.co/en/latest/running-jobs/environment-variables.html)
SKYPILOT_NODE_RANK = "SKYPILOT_NODE_RANK"
SKYPILOT_NODE_IPS = "SKYPILOT_NODE_IPS"  # newline-separated, first line = the head node (master)
SKYPILOT_NUM_NODES = "SKYPILOT_NUM_NODES"
SKYPILOT_NUM_GPUS_PER_NODE = "SKYPILOT_NUM_GPUS_PER_NODE"
# The command every machine runs (the launcher runs the trainer directly when the world size is 1).
LAUNCH_COMMAND = ("python", "-m", "cloudtune.trainer.launch")
