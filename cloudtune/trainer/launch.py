"""`python -m cloudtune.trainer.launch [trainer args]`: the entry command of every machine.

Why one entry command: the orchestrator (and SkyPilot, on each node of a cluster) runs the same
command whatever the shape; the shape comes from the environment (contract.py):
CLOUDTUNE_NPROC_PER_NODE, CLOUDTUNE_NNODES, CLOUDTUNE_NODE_RANK, CLOUDTUNE_MASTER_ADDR,
CLOUDTUNE_MASTER_PORT, CLOUDTUNE_SHARDING; on a SkyPilot node SKYPILOT_NUM_GPUS_PER_NODE,
SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK and SKYPILOT_NODE_IPS (first line = master) fill the gaps.

- World size 1: the trainer runs in this process (`python -m cloudtune.trainer`, unchanged).
- More: the real engine, `accelerate launch` (its launcher and FSDP plugin, on torch.distributed.run)
  starts `python -m cloudtune.trainer` once per GPU; on a machine without CUDA the workers use gloo.
  The launcher turns the workers' exit codes back into the trainer's contract (0, 1, 2, 75, 76, 77)
  and forwards SIGTERM to every worker (torchrun starts them in their own sessions, so a signal to
  this process group would not reach them), giving them the whole stop grace to checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from cloudtune.errors import UserError
from cloudtune.trainer import contract as C

log = logging.getLogger("cloudtune.trainer")

SHARDINGS = ("ddp", "fsdp")  # what this launcher configures; zero2/zero3 need DeepSpeed (not installed)


@dataclass(frozen=True)
class Shape:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = C.DEFAULT_MASTER_PORT
    sharding: str = "ddp"

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def _int(env: dict[str, str], names: tuple[str, ...], default: int, minimum: int) -> int:
    for name in names:
        raw = (env.get(name) or "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise UserError(f"${name} is {raw!r}, not a whole number; set it to e.g. {max(minimum, 1)}") from None
            if value < minimum:
                raise UserError(f"${name} is {value}; it must be >= {minimum}")
            return value
    return default


def shape_from_env(env: dict[str, str] | None = None) -> Shape:
    """The machine's shape: CLOUDTUNE_* first, then SkyPilot's variables, then one process."""
    env = dict(os.environ if env is None else env)
    nproc = _int(env, (C.ENV_NPROC_PER_NODE, C.SKYPILOT_NUM_GPUS_PER_NODE), 1, 1)
    nnodes = _int(env, (C.ENV_NNODES, C.SKYPILOT_NUM_NODES), 1, 1)
    node_rank = _int(env, (C.ENV_NODE_RANK, C.SKYPILOT_NODE_RANK), 0, 0)
    if node_rank >= nnodes:
        raise UserError(f"node rank {node_rank} is outside a job of {nnodes} node(s); node ranks run 0..{nnodes - 1}")
    ips = [ln.strip() for ln in (env.get(C.SKYPILOT_NODE_IPS) or "").splitlines() if ln.strip()]
    addr = (env.get(C.ENV_MASTER_ADDR) or "").strip() or (ips[0] if ips else "127.0.0.1")
    if nnodes > 1 and not (env.get(C.ENV_MASTER_ADDR) or ips):
        raise UserError(f"{nnodes} nodes need the master's address: set ${C.ENV_MASTER_ADDR} or ${C.SKYPILOT_NODE_IPS}")
    port = _int(env, (C.ENV_MASTER_PORT,), C.DEFAULT_MASTER_PORT, 1)
    sharding = (env.get(C.ENV_SHARDING) or "ddp").strip().lower()
    if sharding in ("none", "auto", ""):
        sharding = "ddp"
    if sharding not in SHARDINGS:
        raise UserError(f"${C.ENV_SHARDING} is {sharding!r}; this launcher runs {', '.join(SHARDINGS)} "
                        "(DeepSpeed ZeRO is not installed on the image)")
    return Shape(nproc, nnodes, node_rank, addr, port, sharding)


def accelerate_args(shape: Shape, trainer_args: list[str]) -> list[str]:
    """`accelerate launch` arguments that run `python -m cloudtune.trainer` on every process."""
    args = ["--num_processes", str(shape.world_size), "--num_machines", str(shape.nnodes),
            "--machine_rank", str(shape.node_rank), "--main_process_ip", shape.master_addr,
            "--main_process_port", str(shape.master_port),
            "--mixed_precision", "no",  # the trainer sets bf16/fp16 itself, from the spec and the GPU
            "--dynamo_backend", "no", "--max_restarts", "0", "--monitor_interval", "0.5"]
    if shape.sharding == "fsdp":
        # FSDP FULL_SHARD of each decoder layer; state dicts in SHARDED form (torch.distributed.checkpoint)
        # keep saves memory-flat; sync_module_states + cpu_ram_efficient_loading load one copy on rank 0.
        args += ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                 "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
                 "--fsdp_use_orig_params", "true", "--fsdp_sync_module_states", "true",
                 "--fsdp_cpu_ram_efficient_loading", "true"]
    else:
        args += ["--multi_gpu"]
    return [*args, "--module", "cloudtune.trainer", *trainer_args]


def exit_code(codes: dict[int, int]) -> int:
    """One exit code for the machine from every local rank's code (contract.py).

    All equal: that code (a signal death n as 128+n). Otherwise the root cause wins: bad input (2), an
    error (1), a rank killed by a signal other than SIGTERM (OOM killer, SIGKILL: 128+n, relaunch), a
    lost peer (77), preempted (75), stopped (76). SIGTERM deaths come last: torchrun's agent SIGTERMs
    the surviving workers when one fails, so they are the reaction, not the cause."""
    values = set(codes.values())
    if len(values) == 1:
        (only,) = values
        return 128 - only if only < 0 else only
    for c in (C.EXIT_BAD_INPUT, C.EXIT_FAILED):
        if c in values:
            return c
    for c in sorted(values):
        if c < 0 and c != -signal.SIGTERM:
            return 128 - c
    for c in (C.EXIT_DISK_FULL, C.EXIT_STORE_UNAVAILABLE, C.EXIT_PEER_LOST, C.EXIT_PREEMPTED, C.EXIT_STOPPED):
        if c in values:
            return c
    return 128 + signal.SIGTERM if -signal.SIGTERM in values else max(values)


def _forward_signals() -> dict[int, Any]:
    """SIGTERM/SIGINT to this launcher go to every worker (they live in their own sessions)."""

    def forward(signum: int, _frame: Any) -> None:
        import psutil

        name = signal.Signals(signum).name
        kids = psutil.Process().children(recursive=True)
        log.warning("%s: forwarding to %d worker process(es)", name, len(kids))
        for kid in kids:
            try:
                kid.send_signal(signum)
            except psutil.Error:
                pass

    return {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}


def run_distributed(shape: Shape, trainer_args: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # Our handler forwards the signal and lets the workers checkpoint; torch's own would raise in the
    # agent and kill the workers after 30 s. The grace covers the emergency checkpoint upload.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", os.environ.get(C.ENV_STOP_GRACE) or "90")
    os.environ[C.ENV_SHARDING] = shape.sharding
    if not _cuda():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // shape.nproc_per_node)))
    args = launch_command_parser().parse_args(accelerate_args(shape, trainer_args))
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # torchrun's --signals-to-handle (accelerate has no flag for it)
    log.info("launching %d process(es) on node %d/%d (%s, master %s:%d)", shape.nproc_per_node, shape.node_rank,
             shape.nnodes, shape.sharding, shape.master_addr, shape.master_port)
    previous = _forward_signals()
    try:
        launch_command(args)
        return C.EXIT_DONE
    except ChildFailedError as err:
        codes = {rank: 0 for rank in range(shape.nproc_per_node)}
        for rank, failure in err.failures.items():
            codes[rank % shape.nproc_per_node] = int(failure.exitcode)
        code = exit_code(codes)
        log.warning("workers exited with %s: machine exit code %d", dict(sorted(codes.items())), code)
        return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def exit_process(code: int) -> NoReturn:
    """Exit a trainer, launcher or entrypoint process without its 1.5-2 s of garbage collection.

    Why: once torch, transformers, TRL, PEFT and datasets are imported the heap holds ~560,000
    objects, and interpreter finalization runs full cyclic collections over all of them after the
    work is done (gc_collect_main under Py_FinalizeEx: ~1.6 s of one core after DONE.json on the tiny
    job, per process: each worker, then the launcher; bench/trainer_shutdown.py). That is billed GPU
    time between DONE.json and the machine going away. `gc.freeze()` moves every live object to the
    permanent generation, which those collections skip; everything else about exiting stays as it
    was: non-daemon threads are joined, atexit handlers run (logging flush, trackers), modules are
    torn down by reference count. Only cyclic garbage is left for the OS to reclaim with the process.
    """
    import gc

    gc.freeze()
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloudtune %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        shape = shape_from_env()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return C.EXIT_BAD_INPUT
    if shape.world_size == 1:
        from cloudtune.trainer.cli import main as trainer_main

        return trainer_main(argv)
    return run_distributed(shape, argv)


if __name__ == "__main__":
    exit_process(main())
