"""The planner's ranking invariant (planner/plan.py rank_hygiene), checked independently of its code."""

from __future__ import annotations

from typing import Any

from cloudtune.planner.plan import FEWER_GPUS_WITHIN


def _get(o: Any, key: str) -> Any:
    return o[key] if isinstance(o, dict) else getattr(o, key)


def assert_ranked(options: list[Any], *, tol: float = 0.011) -> None:
    """Comfortable fits before tight ones; within a tier no option costs more than FEWER_GPUS_WITHIN above
    any later one (the cheapest wins, unless one with fewer GPUs is within that margin). `tol` absorbs the
    JSON's rounding to cents."""
    tiers = [bool(_get(o, "tight_fit")) for o in options]
    assert tiers == sorted(tiers), "a tight fit ranked before a comfortable one"
    for tier in (False, True):
        costs = [_get(o, "rank_cost_usd") for o in options if bool(_get(o, "tight_fit")) is tier]
        low = float("inf")
        floors = []
        for c in reversed(costs):
            low = min(low, c)
            floors.append(low)
        for i, (c, f) in enumerate(zip(costs, reversed(floors), strict=True)):
            assert c <= f * (1 + FEWER_GPUS_WITHIN) + tol, (i, c, f)
