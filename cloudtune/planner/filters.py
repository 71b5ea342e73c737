"""Offer filters a person types: GPU families, region prefixes, comma lists.

Why tolerant matching: people type `-g h100` meaning "any H100" (SXM, PCIe, NVL, 80GB), `-g 4090`
meaning RTX4090, `--region us` meaning any US region. Matching is on normalized names (lowercase,
letters and digits only) by prefix, with the rule that a match may not end inside a number: `h100`
never matches V100 (different first letter) and `a10` never matches A100 (the next character is a
digit). Standard library only: `cloudtune plan` stays fast.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cloudtune.errors import UserError

_VENDOR_WORDS = ("nvidia", "geforce", "tesla", "rtx", "amd", "instinct")


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """Repeatable and comma-separated at once: ["aws,lambda", "modal"] -> ["aws", "lambda", "modal"]."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _boundaries(name: str) -> set[int]:
    """Offsets in the normalized name where the original had a separator (H100-80GB: after "h100")."""
    out, n = set(), 0
    for ch in name.lower():
        if ch.isalnum():
            n += 1
        else:
            out.add(n)
    return out


def _prefix_match(name: str, want: str, cuts: set[int], skip: int = 0) -> bool:
    if not want or not name.startswith(want):
        return False
    rest = name[len(want):]
    at_cut = (len(want) + skip) in cuts
    return not rest or at_cut or not (rest[0].isdigit() and want[-1].isdigit())


def gpu_matches(gpu: str, wanted: str) -> bool:
    """True when `wanted` names this GPU or its family (h100 -> H100-SXM/H100-NVL/H100-80GB, 4090 -> RTX4090)."""
    name, want, cuts = _norm(gpu), _norm(wanted), _boundaries(gpu)
    if _prefix_match(name, want, cuts):
        return True
    for word in _VENDOR_WORDS:  # "4090" or "geforce rtx 4090" against RTX4090
        if name.startswith(word) and _prefix_match(name[len(word):], want, cuts, len(word)):
            return True
        if want.startswith(word) and _prefix_match(name, want[len(word):], cuts):
            return True
    return False


def region_matches(region: str, wanted: str) -> bool:
    """Case-insensitive exact or prefix match: `us-east` -> us-east-1, `us` -> us-west-2 and "US";
    a comma-listed region such as "Oregon, US, NA" also matches by any of its parts (`US`, `Oregon`)."""
    r, w = region.strip().lower(), wanted.strip().lower()
    if not w:
        return False
    if r == w or r.startswith(w + "-") or (r.startswith(w) and w.endswith("-")):
        return True
    parts = [p.strip() for p in r.split(",") if p.strip()]
    return len(parts) > 1 and any(p == w for p in parts)


def filter_gpus(names: Iterable[str], wanted: list[str], known: Iterable[str], *, flag: str = "--gpu") -> set[str]:
    """The GPU names of `names` matching any of `wanted`. A wanted name matching no known GPU at all
    is bad input: UserError naming the nearest known GPUs."""
    known = sorted(set(known))
    for w in wanted:
        if not any(gpu_matches(k, w) for k in known):
            import difflib

            lowered = {k.lower(): k for k in known}
            near = difflib.get_close_matches(w.lower(), list(lowered), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(lowered[n] for n in near)}? " if near else ""
            raise UserError(f"unknown {flag} {w!r}; {hint}known GPUs: {', '.join(known)}")
    return {n for n in names if any(gpu_matches(n, w) for w in wanted)}
