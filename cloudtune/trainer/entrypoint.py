"""The container entrypoint: run the trainer, cap its lifetime, then make the machine go away.

Why a separate supervisor process: the trainer can hang (a stuck NCCL call, a deadlocked data
loader) or be killed by the OOM killer, and a rented GPU that outlives its job keeps billing. So
PID 1 of the image is this small loop, which
  1. starts `python -m cloudtune.trainer` (or the given command) as a child,
  2. forwards SIGTERM/SIGINT to it (preemption notice → the trainer's emergency checkpoint),
  3. enforces $CLOUDTUNE_MAX_LIFETIME_S and the on-machine guards (cloudtune/trainer/guards.py: no
     training progress for $CLOUDTUNE_STALL_TIMEOUT_S, this attempt's budget spent at its own price):
     SIGTERM (the trainer checkpoints), then SIGKILL after $CLOUDTUNE_STOP_GRACE_S,
  4. whatever happened, runs $CLOUDTUNE_SELF_TERMINATE (filled in by the provider adapter, e.g.
     `shutdown -h now` on AWS or a `curl -X DELETE` of the pod on RunPod) unless it is empty,
  5. exits with the trainer's exit code (EXIT_PREEMPTED when the cap stopped it).

The hook's text may hold an API token, so it is never printed; only its exit status is.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloudtune.trainer.contract import (
    ENV_MAX_LIFETIME,
    ENV_SELF_TERMINATE,
    ENV_STOP_GRACE,
    EXIT_FAILED,
    EXIT_PREEMPTED,
)

if TYPE_CHECKING:
    from cloudtune.trainer.guards import Guards

log = logging.getLogger("cloudtune.entrypoint")

ENV_HOOK_TIMEOUT = "CLOUDTUNE_SELF_TERMINATE_TIMEOUT_S"
DEFAULT_COMMAND = [sys.executable, "-m", "cloudtune.trainer"]


@dataclass
class Outcome:
    exit_code: int
    lifetime_exceeded: bool = False
    guard: str | None = None  # the on-machine guard that stopped the trainer (stall, budget)
    killed: bool = False
    hook_exit: int | None = None
    signals_forwarded: list[str] = field(default_factory=list)


def _float_env(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        log.error("%s=%r is not a number of seconds; ignoring it", name, raw)
        return None
    return value if value > 0 else None


def run_hook(command: str | None, timeout_s: float = 120.0) -> int | None:
    """Run the self-terminate hook through the shell. Returns its exit status (None: no hook)."""
    if not command or not command.strip():
        return None
    log.warning("running the self-terminate hook")
    try:
        proc = subprocess.run(["/bin/sh", "-c", command], timeout=timeout_s,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log.error("self-terminate hook did not finish within %.0fs", timeout_s)
        return 124
    log.warning("self-terminate hook exited with %d", proc.returncode)
    return proc.returncode


def supervise(
    command: list[str],
    *,
    max_lifetime_s: float | None = None,
    stop_grace_s: float = 90.0,
    self_terminate: str | None = None,
    hook_timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    guards: Guards | None = None,
) -> Outcome:
    """Run command under the lifetime cap and guards, forward signals, then run the hook (module doc)."""
    started = time.monotonic()
    out = Outcome(exit_code=EXIT_FAILED)
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        out.signals_forwarded.append(name)
        if child is None:
            pending.append(signum)  # arrived while the child was being started: deliver it then
        elif child.poll() is None:
            child.send_signal(signum)

    # Handlers first: a preemption notice that lands while the child starts must reach it, not kill us.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as err:
        for s, h in previous.items():
            signal.signal(s, h)
        log.error("cannot start %s: %s", command[0], err)
        out.hook_exit = run_hook(self_terminate, hook_timeout_s)
        return out
    for signum in pending:
        child.send_signal(signum)

    try:
        deadline = started + max_lifetime_s if max_lifetime_s else None
        kill_at: float | None = None
        while child.poll() is None:
            now = time.monotonic()
            stopping = out.lifetime_exceeded or out.guard is not None
            if deadline is not None and now >= deadline and not stopping:
                log.error("maximum lifetime of %.0fs reached: stopping the trainer", max_lifetime_s)
                out.lifetime_exceeded = True
                child.send_signal(signal.SIGTERM)
                kill_at = now + stop_grace_s
            elif guards is not None and not stopping and (verdict := guards.check()) is not None:
                log.error("guard %s: %s: stopping the trainer", verdict.reason, verdict.detail)
                out.guard = verdict.reason
                guards.record(verdict)
                child.send_signal(signal.SIGTERM)
                kill_at = now + stop_grace_s
            if kill_at is not None and now >= kill_at:
                log.error("trainer did not stop within %.0fs: killing it", stop_grace_s)
                child.kill()
                out.killed = True
                kill_at = None
            try:
                child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        code = child.returncode
        # A trainer stopped by the cap checkpoints and exits 75 itself; one we had to kill gets 75 too
        # (its last committed checkpoint is good). Other deaths by signal follow the shell's 128+N.
        stopped_by_us = out.lifetime_exceeded or out.guard is not None
        out.exit_code = code if code >= 0 else EXIT_PREEMPTED if stopped_by_us else 128 - code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        out.hook_exit = run_hook(self_terminate, hook_timeout_s)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m cloudtune.trainer.entrypoint [-- command ...]` (default command: the trainer)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloudtune-entrypoint %(message)s", stream=sys.stderr)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    command = args or DEFAULT_COMMAND
    from cloudtune.trainer.guards import Guards

    outcome = supervise(
        command,
        max_lifetime_s=_float_env(ENV_MAX_LIFETIME),
        stop_grace_s=_float_env(ENV_STOP_GRACE) or 90.0,
        self_terminate=os.environ.get(ENV_SELF_TERMINATE),
        hook_timeout_s=_float_env(ENV_HOOK_TIMEOUT) or 120.0,
        guards=Guards.from_env(),
    )
    return outcome.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
