"""How close the planner is to published measurements: memory error by method and source, every
published out-of-memory flagged, every published "it trained on card X" offered, and the throughput
ratio (predicted / measured tokens/s) distribution.

Why a benchmark next to the tests: the tests hold the planner to thresholds; this prints the whole
picture (per row, per method, per source, tune vs held-out rows) so a change to a constant shows what
it moves. The rows and their sources are tests/data/vram_calibration.csv and throughput_measured.csv
(read through cloudtune/planner/calibration.py, the same code the tests use).

    python bench/planner_accuracy.py            # tables (markdown)
    python bench/planner_accuracy.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudtune.planner.calibration import evaluate_memory, evaluate_throughput, median_abs  # noqa: E402

DATA = ROOT / "tests" / "data"


def _quantiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return {"n": len(v), "min": v[0], "p25": q[0], "median": statistics.median(v), "p75": q[2], "max": v[-1]}


def summary() -> dict:
    mem = evaluate_memory(DATA)
    measured = [r for r in mem if r.error is not None]
    by_method, by_source, by_split = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in measured:
        by_method[r.method].append(r.error)
        by_source[r.source].append(r.error)
        by_split[r.split].append(r.error)
    held_by_method = defaultdict(list)
    for r in measured:
        if r.split == "holdout":
            held_by_method[r.method].append(r.error)
    ooms = [r for r in mem if r.kind == "oom"]
    fits = [r for r in mem if r.kind != "oom" and r.card_gib is not None]
    tp = evaluate_throughput(DATA)
    single = [t.ratio for t in tp if t.gpus == 1]
    multi = [t.ratio for t in tp if t.gpus > 1 and t.nodes == 1]
    small = [t.ratio for t in tp if t.gpus == 1 and t.tokens_per_micro_step <= 512]
    return {
        "memory_rows": len(measured),
        "median_abs_error": median_abs([r.error for r in measured]),
        "by_method": {k: {"n": len(v), "median_abs_error": median_abs(v)} for k, v in sorted(by_method.items())},
        "holdout_by_method": {k: {"n": len(v), "median_abs_error": median_abs(v)}
                              for k, v in sorted(held_by_method.items())},
        "by_source": {k: {"n": len(v), "median_abs_error": median_abs(v)} for k, v in sorted(by_source.items())},
        "by_split": {k: {"n": len(v), "median_abs_error": median_abs(v)} for k, v in sorted(by_split.items())},
        "rows": [{"id": r.id, "method": r.method, "split": r.split, "stack": r.stack, "measured": r.measured,
                  "predicted": round(r.predicted, 2), "error": None if r.error is None else round(r.error, 3),
                  "card_gib": r.card_gib, "fit_gib": round(r.fit_gib, 2), "offered": r.offered, "tight": r.tight,
                  "kind": r.kind}
                 for r in mem],
        "oom_rows": len(ooms), "oom_flagged": sum(1 for r in ooms if r.offered is False),
        "fits_rows": len(fits), "fits_offered": sum(1 for r in fits if r.offered),
        "fits_tight": sorted(r.id for r in fits if r.tight),
        "fit_gap": {"fullest_fit": max((r.fit_gib / r.card_gib for r in fits), default=None),
                    "least_oom": min((r.fit_gib / r.card_gib for r in ooms), default=None)},
        "throughput": {
            "single_gpu": _quantiles(single), "multi_gpu_one_node": _quantiles(multi),
            "single_gpu_small_steps_le_512_tokens": _quantiles(small),
            "multi_node": [{"id": t.id, "ratio": round(t.ratio, 3)} for t in tp if t.nodes > 1],
            # #15: by fabric, all rows and held-out rows (those not used to choose the constants)
            "groups": {g: {split: _quantiles([t.ratio for t in tp if t.group == g and split in ("all", t.split)])
                           for split in ("all", "tune", "holdout")}
                       for g in ("single-gpu", "multi-gpu-nvlink", "multi-gpu-pcie", "multi-node")},
            "rows": [{"id": t.id, "gpu": t.gpu, "gpus": t.gpus, "nodes": t.nodes, "method": t.method,
                      "group": t.group, "split": t.split, "interconnect": t.interconnect,
                      "tokens_per_micro_step": t.tokens_per_micro_step, "ratio": round(t.ratio, 3)} for t in tp],
        },
    }


def markdown(s: dict) -> str:
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    out = [f"## Memory: {s['memory_rows']} measured rows, median |error| {pct(s['median_abs_error'])}", "",
           "| group | rows | median abs error |", "|---|---:|---:|"]
    for title, key in (("method", "by_method"), ("held-out method", "holdout_by_method"), ("source", "by_source"),
                       ("split", "by_split")):
        for k, v in s[key].items():
            out.append(f"| {title} {k} | {v['n']} | {pct(v['median_abs_error'])} |")
    gap = s["fit_gap"]
    out += ["", f"OOM rows flagged (not offered): {s['oom_flagged']} of {s['oom_rows']}; "
            f"fits rows offered: {s['fits_offered']} of {s['fits_rows']} (tight: {', '.join(s['fits_tight']) or 'none'})",
            "", f"fit test = pressed footprint <= the card; fullest published fit {gap['fullest_fit']:.3f} of its card, "
            f"least-over published OOM {gap['least_oom']:.3f}", "",
            "| row | split | stack | kind | measured | predicted | error | card | fit test | offered |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in s["rows"]:
        err = "" if r["error"] is None else f"{r['error']:+.1%}"
        meas = "" if r["measured"] is None else f"{r['measured']:g}"
        card = "" if r["card_gib"] is None else f"{r['card_gib']:g}"
        off = {None: "", True: "yes", False: "no"}[r["offered"]] + (" (tight)" if r["tight"] else "")
        out.append(f"| {r['id']} | {r['split']} | {r['stack']} | {r['kind']} | {meas} | {r['predicted']:.2f} | {err} "
                   f"| {card} | {r['fit_gib']:.1f} | {off} |")
    t = s["throughput"]
    out += ["", "## Throughput: predicted / measured tokens/s", "", "| rows | n | min | p25 | median | p75 | max |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for k in ("single_gpu", "multi_gpu_one_node", "single_gpu_small_steps_le_512_tokens"):
        q = t[k]
        if q:
            out.append(f"| {k} | {q['n']} | {q['min']:.2f} | {q['p25']:.2f} | {q['median']:.2f} | {q['p75']:.2f} "
                       f"| {q['max']:.2f} |")
    out.append("| multi-node | " + ", ".join(f"{m['id']} {m['ratio']:.2f}" for m in t["multi_node"]) + " | | | | | |")
    out += ["", "### By fabric (held-out rows were not used to choose the constants)", "",
            "| group | rows | n | min | p25 | median | p75 | max |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for g, splits in t["groups"].items():
        for split, q in splits.items():
            if q:
                out.append(f"| {g} | {split} | {q['n']} | {q['min']:.2f} | {q['p25']:.2f} | {q['median']:.2f} "
                           f"| {q['p75']:.2f} | {q['max']:.2f} |")
    out += ["", "| row | split | GPU | GPUs | nodes | fabric | method | tokens/micro-step | ratio |",
            "|---|---|---|---:|---:|---|---|---:|---:|"]
    out += [f"| {r['id']} | {r['split']} | {r['gpu']} | {r['gpus']} | {r['nodes']} | {r['interconnect'] or '-'} "
            f"| {r['method']} | {r['tokens_per_micro_step']} | {r['ratio']:.2f} |" for r in t["rows"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    s = summary()
    print(json.dumps(s, indent=2) if args.json else markdown(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
