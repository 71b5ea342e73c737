"""Spot prices too good to be true: flag them and rank them at a believable floor.

Why: the bundled snapshot (SkyPilot's AWS catalog, cloudtune/data/offers.csv) lists some spot prices at
~10% of on-demand (p3.16xlarge eu-central-1, p5en.48xlarge eu-south-2) while the median AWS GPU spot
price there is ~32% of on-demand. Such a row is a stale or thin market quote, not a price a job can
count on for hours; taken at face value it decides the ranking. A spot price below
SUSPECT_FRACTION x the provider's median spot/on-demand ratio is `suspect_spot`: shown as listed, but
ranked as if it cost that floor.

Stdlib only (imported by `cloudtune plan`). `catalog show` can call `suspect_offers` (task D wires it).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

# A spot price below this fraction of the provider's usual (median) spot/on-demand ratio is suspect.
SUSPECT_FRACTION = 0.5
# With fewer spot quotes than this for a provider, its usual ratio is USUAL_RATIO_FALLBACK: AWS's GPU
# spot prices in the snapshot have a median of 0.32 x on-demand (256 rows).
MIN_QUOTES = 5
USUAL_RATIO_FALLBACK = 0.32


def usual_ratios(offers: Iterable[Any]) -> dict[str, float]:
    """Provider -> median spot/on-demand price ratio over the offers that list both."""
    by: dict[str, list[float]] = defaultdict(list)
    for o in offers:
        if o.spot_price_hr and o.price_hr:
            by[o.provider].append(o.spot_price_hr / o.price_hr)
    return {p: statistics.median(r) if len(r) >= MIN_QUOTES else USUAL_RATIO_FALLBACK for p, r in by.items()}


def spot_floor(offer: Any, ratios: dict[str, float]) -> float | None:
    """The lowest spot price believable for this offer ($/h), or None without an on-demand price."""
    if not offer.price_hr:
        return None
    return offer.price_hr * ratios.get(offer.provider, USUAL_RATIO_FALLBACK) * SUSPECT_FRACTION


def is_suspect(offer: Any, ratios: dict[str, float]) -> bool:
    floor = spot_floor(offer, ratios)
    return bool(offer.spot_price_hr and floor is not None and offer.spot_price_hr < floor)


def suspect_offers(offers: list[Any]) -> list[tuple[Any, float]]:
    """(offer, floor $/h) for every offer whose spot price is suspect, for `catalog show` flagging."""
    ratios = usual_ratios(offers)
    out = []
    for o in offers:
        if is_suspect(o, ratios):
            out.append((o, spot_floor(o, ratios)))
    return out


def describe(offer: Any, ratios: dict[str, float]) -> str:
    ratio = offer.spot_price_hr / offer.price_hr
    usual = ratios.get(offer.provider, USUAL_RATIO_FALLBACK)
    return (f"suspect spot: ${offer.spot_price_hr:.2f}/h is {ratio:.0%} of on-demand, under half of "
            f"{offer.provider}'s usual {usual:.0%}; ranked at ${spot_floor(offer, ratios):.2f}/h")
