"""Whole-process latency of `cloudtune plan`, cold, against `cloudtune --help` in the same run.

Why whole processes: what a user waits for is interpreter start + imports + planning + rendering,
and imports dominate. Each run is a fresh `python -m cloudtune ...` (no warm interpreter); the
filesystem cache is warm after the first run, as it is for a user who runs the tool twice.
The baseline (`--help`) is measured interleaved with the others, so machine load affects all
commands alike and the ratio stays meaningful on a busy machine.

    python bench/plan_latency.py [--runs 7] [--out bench/results/plan_latency-<date>.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: dict[str, list[str] | None] = {
    "python -c pass (interpreter + site floor)": None,
    "cloudtune --help (baseline)": ["--help"],
    "cloudtune plan --model 70b --method qlora": ["plan", "--model", "70b", "--method", "qlora"],
    "cloudtune plan --model 70b --method qlora --json": ["plan", "--model", "70b", "--method", "qlora", "--json"],
    "cloudtune plan --model 8b --method lora --top 0 --json": ["plan", "--model", "8b", "--method", "lora",
                                                               "--top", "0", "--json"],
}


def _run(args: list[str] | None, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one fresh process. CPU time is what the process itself
    costs; wall time also holds waiting for the cores when other work shares the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    argv = [sys.executable, "-c", "pass"] if args is None else [sys.executable, "-m", "cloudtune", *args]
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(argv[1:])}` failed ({proc.returncode}): {proc.stderr.decode()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default=f"bench/results/plan_latency-{dt.date.today().isoformat()}.md")
    args = parser.parse_args()
    # A user's installed package has its bytecode cached (pip compiles on install; an editable install
    # writes it on the first run). With PYTHONDONTWRITEBYTECODE set, as on some CI images, every run
    # would recompile our sources (~40 ms) and measure the build environment rather than the tool.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"COLUMNS": "120"}
    load_start = os.getloadavg()
    for argv in COMMANDS.values():  # one untimed run each: .pyc files written, page cache warm
        _run(argv, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpus: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            wall, cpu = _run(argv, env)
            times[name].append(wall)
            cpus[name].append(cpu)
    base = statistics.median(times["cloudtune --help (baseline)"])
    base_cpu = statistics.median(cpus["cloudtune --help (baseline)"])
    load = os.getloadavg()
    lines = [
        f"# cloudtune plan latency ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average (1/5/15 min) at the start {load_start[0]:.2f} / "
        f"{load_start[1]:.2f} / {load_start[2]:.2f}, at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(other work shares these cores).",
        f"Method: `python bench/plan_latency.py --runs {args.runs}`: each command is a fresh process, {args.runs} "
        "runs interleaved after one warm-up run each (which caches bytecode, as an installed package has it); "
        "wall time from spawn to exit.",
        "",
        "| command | median wall s | min wall s | max wall s | wall x baseline | median CPU s | CPU x baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in times.items():
        med = statistics.median(values)
        cpu = statistics.median(cpus[name])
        lines.append(f"| `{name}` | {med:.3f} | {min(values):.3f} | {max(values):.3f} | {med / base:.2f} | "
                     f"{cpu:.3f} | {cpu / base_cpu:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
