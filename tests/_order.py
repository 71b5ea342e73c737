"""Slowest test modules first, from a recorded durations file, so two xdist workers finish together.

Why: `-n 2 --dist worksteal` hands each worker one half of the collection in order and lets an idle
worker steal from the *end* of the other's queue. In alphabetical order a two-minute module near
the end (a trainer run through a provider fake) starts last and runs alone while the other core
idles. Here the slow modules are spread over the workers' initial chunks, each chunk starting with
its slowest, so both workers begin on heavy work and what gets stolen at the end is short.

Modules stay whole and in their own order: a module-scoped fixture (one expensive run that several
tests read) is set up once per worker that runs the module, and interleaving modules would tear it
down and build it again. A module missing from the file (new today) is placed as if it took
`UNKNOWN_S`, ahead of the many fast ones.

Refresh the file after adding slow tests: `python -m pytest -q -n 2 --dist worksteal
--record-durations` writes tests/durations.json (seconds per module: setup + call + teardown,
summed over its tests, on the machine that ran it). The order only moves tests; it never skips one.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
UNKNOWN_S = 20.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true", default=False,
                     help=f"write seconds per test module to {DURATIONS.name} (the order of the next runs)")


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _recorded() -> dict[str, float]:
    try:
        data = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}
    modules = data.get("modules") if isinstance(data, dict) else None
    return {k: float(v) for k, v in modules.items()} if isinstance(modules, dict) else {}


HEAVY_S = 15.0  # modules at least this slow are spread over the workers; the rest fill the counts


def _plan(groups: dict[str, int], seconds: dict[str, float], workers: int) -> list[str]:
    """Module order for `workers` worksteal workers, which take the collection in consecutive chunks
    (the first len//workers items, then a share of the rest, ...): the heavy modules are spread over
    the chunks by longest-first greedy balancing, each chunk starts with its slowest, and the light
    modules fill each chunk up to its item count, so every worker begins on heavy work and what an
    idle worker steals from the end of another's queue is light."""
    order = sorted(groups, key=lambda m: -seconds[m])  # sorted() is stable: ties keep collection order
    if workers <= 1:
        return order
    total = sum(groups.values())
    targets, left = [], total
    for i in range(workers):  # the scheduler's own split of the initial collection
        targets.append(left // (workers - i))
        left -= targets[-1]
    bins: list[list[str]] = [[] for _ in range(workers)]
    busy = [0.0] * workers
    light = []
    for m in order:
        if seconds[m] >= HEAVY_S:
            i = min(range(workers), key=lambda b: busy[b])
            bins[i].append(m)
            busy[i] += seconds[m]
        else:
            light.append(m)
    for m in light:
        short = [b for b in range(workers) if sum(groups[x] for x in bins[b]) < targets[b]]
        bins[short[0] if short else workers - 1].append(m)
    return [m for b in bins for m in b]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Reorder whole modules by recorded seconds (`_plan`). Deterministic, so every xdist worker
    collects the same order, as xdist requires; each worker knows the worker count from xdist's env."""
    recorded = _recorded()
    if not recorded:
        return
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        groups.setdefault(_module(item.nodeid), []).append(item)
    seconds = {m: recorded.get(m, UNKNOWN_S) for m in groups}
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    order = _plan({m: len(v) for m, v in groups.items()}, seconds, workers)
    items[:] = [item for m in order for item in groups[m]]


class _Recorder:
    """Sums report durations per module on the controller (xdist forwards the workers' reports)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[_module(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        modules = {m: round(s, 1) for m, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        DURATIONS.write_text(json.dumps({
            "about": "seconds per test module (setup+call+teardown), written by pytest --record-durations; "
                     "tests/_order.py runs the slowest modules first",
            "modules": modules}, indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--record-durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(), "cloudtune-durations-recorder")
