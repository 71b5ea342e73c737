"""The suite's module order (tests/_order.py): heavy modules spread over the worksteal workers' chunks."""

from __future__ import annotations

from tests._order import HEAVY_S, _plan


def _chunks(order: list[str], counts: dict[str, int], workers: int) -> list[list[str]]:
    """Which modules each worker starts with, split as xdist's worksteal splits the collection."""
    items = [m for m in order for _ in range(counts[m])]
    out, left, pos = [], len(items), 0
    for i in range(workers):
        n = left // (workers - i)
        out.append(list(dict.fromkeys(items[pos:pos + n])))
        pos, left = pos + n, left - n
    return out


def test_heavy_modules_start_both_workers_and_every_module_stays_whole():
    counts = {"a_fast": 60, "b_heavy": 3, "c_fast": 40, "d_heavy": 1, "e_mid": 2, "z_heavy": 1, "y_fast": 90}
    seconds = {"a_fast": 5, "b_heavy": 200, "c_fast": 8, "d_heavy": 150, "e_mid": 20, "z_heavy": 90, "y_fast": 3}
    order = _plan(counts, seconds, workers=2)
    assert sorted(order) == sorted(counts)  # nothing dropped, nothing twice: modules stay whole
    first, second = _chunks(order, counts, 2)
    # alphabetically z_heavy would start last; here each worker begins on a heavy module (the second
    # after the few items of the light module that straddles the split, if any)
    assert first[0] == "b_heavy" and second[:2] == ["a_fast", "d_heavy"]
    heavy = lambda chunk: sum(seconds[m] for m in chunk if seconds[m] >= HEAVY_S)  # noqa: E731
    assert abs(heavy(first) - heavy(second)) <= 90  # longest-first greedy: 200+20 vs 150+90
    # the light modules end the chunks, so what an idle worker steals from a queue's end is light
    assert seconds[first[-1]] < HEAVY_S and seconds[second[-1]] < HEAVY_S


def test_one_worker_is_slowest_first():
    assert _plan({"a": 1, "b": 1, "c": 1}, {"a": 1.0, "b": 30.0, "c": 2.0}, workers=1) == ["b", "c", "a"]
