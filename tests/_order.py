"""Slowest test modules first, from a recorded durations file, so two xdist workers finish together.

Why: `-n 2 --dist worksteal` hands each worker one half of the collection in order and lets an idle
worker steal from the *end* of the other's queue. In alphabetical order a two-minute module near
the end (a trainer run through a provider fake) starts last and runs alone while the other core
idles. Sorted by recorded time, the slow modules start first on one worker while the other clears
the many fast tests, and what gets stolen at the end is short.

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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Reorder whole modules by recorded seconds, slowest first (stable: ties keep collection order).
    Deterministic, so every xdist worker collects the same order, as xdist requires."""
    recorded = _recorded()
    if not recorded:
        return
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        groups.setdefault(_module(item.nodeid), []).append(item)
    order = sorted(groups, key=lambda m: -recorded.get(m, UNKNOWN_S))  # sorted() is stable
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
