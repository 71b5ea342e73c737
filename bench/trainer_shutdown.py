"""How long the trainer process takes to go away once its work is done, as whole processes.

Why: every attempt ends with the trainer exiting, the machine's entrypoint noticing and the
provider tearing the machine down; seconds spent after DONE.json is written are billed GPU time
and, in the test suite, multiplied across every end-to-end run. The work is a tiny job
(`tiny:reverse`, 4 steps, 2 checkpoints, held-out evaluation), so start-up and shutdown are most of
the process's life, which is what this measures.

Per run: `wall` (spawn to exit, as the caller's waitpid sees it), `tail` (the trainer's
`done: ...` log line, which follows DONE.json, to exit) and `cpu` (user+sys of the process tree).
Shapes: `single` (`python -m cloudtune.trainer`, what one GPU runs), `launch2` (`python -m
cloudtune.trainer.launch` with CLOUDTUNE_NPROC_PER_NODE=2: accelerate launch + 2 gloo workers,
what a multi-GPU machine runs), `entrypoint` (`python -m cloudtune.trainer.entrypoint`, PID 1 of the
image, running the launcher for one process). Runs are interleaved across shapes after one warm-up
each (bytecode, the tiny model's cache), so machine load affects all shapes alike.

    python bench/trainer_shutdown.py [--runs 5] [--shapes single,launch2,entrypoint] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "reverse.jsonl"

SHAPES: dict[str, tuple[list[str], dict[str, str]]] = {
    "single": (["-m", "cloudtune.trainer"], {}),
    "launch2": (["-m", "cloudtune.trainer.launch"], {"CLOUDTUNE_NPROC_PER_NODE": "2"}),
    "entrypoint": (["-m", "cloudtune.trainer.entrypoint", "--", sys.executable, "-m", "cloudtune.trainer.launch"],
                   {"CLOUDTUNE_SELF_TERMINATE": ""}),
}


def _spec(tmp: Path) -> dict:
    return {
        "name": "shutdown", "model": "tiny:reverse", "method": "lora",
        "lora": {"rank": 8, "alpha": 32, "dropout": 0.1},
        "data": {"train": str(DATA), "max_seq_len": 48},
        "training": {"max_steps": 4, "micro_batch": 8, "learning_rate": 0.02, "seed": 7,
                     "gradient_checkpointing": False, "logging_steps": 1},
        "checkpoint": {"every_steps": 2, "every_minutes": None, "keep": 2},
        "store": {"url": f"file://{tmp / 'store'}"},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(shape: str, home: Path) -> dict[str, float]:
    """One whole trainer process tree on a fresh job; raises if it does not end done."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{shape}-", dir=home))
    spec_path = tmp / "job.json"
    spec_path.write_text(json.dumps(_spec(tmp)))
    argv, extra = SHAPES[shape]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
        "CLOUDTUNE_HOME": str(home), "CLOUDTUNE_IMDS_ENDPOINT": "", "CLOUDTUNE_HEARTBEAT_S": "1",
        "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "CLOUDTUNE_MASTER_PORT": str(_free_port()), **extra}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv, "--spec", str(spec_path), "--job-id", "j", "--attempt", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
    done_at = None
    lines = []
    assert proc.stdout is not None
    # The pipe's end (EOF) can come after the exit if a grandchild held it; take waitpid's time.
    for line in proc.stdout:
        lines.append(line)
        if done_at is None and " cloudtune INFO done: " in line:
            done_at = time.perf_counter()
    proc.wait()
    end = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or done_at is None or not (tmp / "store" / "j" / "DONE.json").is_file():
        raise SystemExit(f"{shape}: exit {proc.returncode}, no done line or DONE.json:\n{''.join(lines[-20:])}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": end - start, "tail": end - done_at, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shapes", default="single,launch2,entrypoint")
    parser.add_argument("--label", default="", help="a word for the report's title (before/after)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    label = f"-{args.label}" if args.label else ""
    out = Path(args.out or f"bench/results/trainer_shutdown-{dt.date.today().isoformat()}{label}.md")
    load_start = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {s: [] for s in shapes}
    with tempfile.TemporaryDirectory(prefix="ct-shutdown-") as home_s:
        home = Path(home_s)
        for s in shapes:  # warm-up: bytecode, the tiny model's build
            run_once(s, home)
        for i in range(args.runs):
            for s in shapes:
                r = run_once(s, home)
                results[s].append(r)
                print(f"run {i + 1} {s}: wall {r['wall']:.2f}s tail {r['tail']:.2f}s cpu {r['cpu']:.2f}s", flush=True)
    load_end = os.getloadavg()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    rows = []
    for s in shapes:
        rs = results[s]
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "tail", "cpu")}
        tails = sorted(r["tail"] for r in rs)
        rows.append(f"| `{s}` | {med['wall']:.2f} | {med['tail']:.2f} | {tails[0]:.2f} | {tails[-1]:.2f} | "
                    f"{med['cpu']:.2f} |")
    text = "\n".join([
        f"# trainer shutdown{(' (' + args.label + ')') if args.label else ''} ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}; commit {git} (plus the working tree); load average (1/5/15 min) at "
        f"the start {' / '.join(f'{x:.2f}' for x in load_start)}, at the end "
        f"{' / '.join(f'{x:.2f}' for x in load_end)} (other work shares these cores).",
        f"Method: `python bench/trainer_shutdown.py --runs {args.runs} --shapes {','.join(shapes)}`: tiny:reverse, "
        "4 steps, 2 checkpoints, held-out evaluation; each run a fresh process tree, runs interleaved after one "
        "warm-up per shape. `tail` = the `done:` log line (after DONE.json) to the exit seen by waitpid.",
        "",
        "| shape | median wall s | median tail s | min tail s | max tail s | median CPU s |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
