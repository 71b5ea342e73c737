"""The limits a machine carries to enforce on itself (cloudtune/trainer/guards.py reads them).

Why computed per attempt: a fixed 72 h cap meant a hung trainer of a one-hour job billed for 14x
its `limits.max_hours` once the controller was gone. The cap now follows the job: what is left of
`limits.max_hours` since the job was created, what is left of `limits.max_cost_usd` at this
attempt's price, or (with neither) a generous multiple of the estimate, plus a margin for the
emergency checkpoint and teardown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cloudtune.trainer import contract as C

DEFAULT_LIFETIME_S = 72 * 3600.0  # no limit, no estimate: the old backstop
MARGIN_S = 900.0  # checkpoint + upload + teardown after a limit is reached
MIN_LIFETIME_S = 1800.0  # never below this: loading a large model alone can take minutes
ESTIMATE_FACTOR = 3.0  # with only an estimate: 3x it, at least 6 h
ESTIMATE_FLOOR_S = 6 * 3600.0


@dataclass(frozen=True)
class MachineLimits:
    lifetime_s: float
    env: dict[str, str]
    why: str  # which limit decided the lifetime, for --dry-run and events


def machine_limits(
    *,
    max_hours: float | None,
    max_cost_usd: float | None,
    heartbeat_timeout_s: float | None,
    job_created_at: float,
    est_hours: float | None,
    price_hr: float | None,
    spent_usd: float = 0.0,
    now: float | None = None,
) -> MachineLimits:
    now = time.time() if now is None else now
    caps: list[tuple[float, str]] = []
    env: dict[str, str] = {}
    if max_hours is not None:
        left = max_hours * 3600.0 - (now - job_created_at)
        caps.append((left, f"limits.max_hours={max_hours:g}"))
    if max_cost_usd is not None and price_hr:
        left_usd = max(0.0, max_cost_usd - spent_usd)
        caps.append((left_usd / price_hr * 3600.0, f"limits.max_cost_usd={max_cost_usd:g} at ${price_hr:.4g}/h"))
        env[C.ENV_PRICE_HR] = f"{price_hr:.6g}"
        env[C.ENV_BUDGET_USD] = f"{left_usd:.6g}"
    if caps:
        left, why = min(caps)
        lifetime = max(MIN_LIFETIME_S, left + MARGIN_S)
    elif est_hours:
        lifetime, why = max(ESTIMATE_FLOOR_S, est_hours * ESTIMATE_FACTOR * 3600.0), "3x the estimate"
    else:
        lifetime, why = DEFAULT_LIFETIME_S, "no limit or estimate"
    if heartbeat_timeout_s:
        env[C.ENV_STALL_TIMEOUT_S] = f"{heartbeat_timeout_s:g}"
    env[C.ENV_MAX_LIFETIME] = str(int(lifetime))
    return MachineLimits(lifetime_s=lifetime, env=env, why=why)
