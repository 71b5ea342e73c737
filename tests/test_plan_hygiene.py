"""Plan ranking hygiene and filters (#14): tight fits, fewer GPUs within 3%, regions folded, GPU families,
region prefixes, --min-vram, --exclude, comma lists, width-aware tables, grouped `catalog show`.

Bundled catalog or synthetic offers only; in-process CLI (typer's runner: stdout is not a TTY)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import typer
from cloudtune.providers.base import Offer
from typer.testing import CliRunner

from cloudtune.catalog import gpu_specs, load_offers
from cloudtune.cli import catalog_cmd, plan_cmd
from cloudtune.errors import UserError
from cloudtune.planner.filters import gpu_matches, region_matches, split_list
from cloudtune.planner.memory import estimate_memory
from cloudtune.planner.models import resolve_model
from cloudtune.planner.plan import FEWER_GPUS_WITHIN, SAFETY_FRACTION, fold_regions, make_plan
from cloudtune.planner.throughput import Workload
from cloudtune.planner.types import TrainConfig
from tests._ranking_util import assert_ranked

L8 = resolve_model("8b", allow_network=False)
QLORA = TrainConfig(method="qlora", quant_bits=4, seq_len=2048)
WORK = Workload(5_000, 512)
GPU_NAMES = sorted({o.gpu for o in load_offers()} | set(gpu_specs()))


APP = typer.Typer(pretty_exceptions_enable=False)
plan_cmd.register(APP)
catalog_cmd.register(APP)


@dataclass
class _Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _cli(*args: str) -> _Run:
    """The command in-process, with cloudtune.cli.main's handling of UserError (one line, exit 2)."""
    r = CliRunner().invoke(APP, list(args))
    if isinstance(r.exception, UserError):
        return _Run(r.exception.exit_code, r.stdout, f"error: {r.exception}\n")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return _Run(r.exit_code, r.stdout, r.stderr)


def _plan_json(*args: str) -> dict:
    r = _cli("plan", *args, "--json", "--top", "0")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ---------------------------------------------------------------- names


def test_gpu_family_matching_is_case_tolerant_and_never_crosses_families():
    h100 = {g for g in GPU_NAMES if gpu_matches(g, "h100")}
    assert h100 == {g for g in GPU_NAMES if g.upper().startswith("H100")} and "H100-SXM" in h100
    assert not any(gpu_matches("V100", w) or gpu_matches("V100-32GB", w) for w in ("h100", "H100", "h100-sxm"))
    assert gpu_matches("A10", "a10") and gpu_matches("A10G", "a10") and not gpu_matches("A100-80GB", "a10")
    assert {g for g in GPU_NAMES if gpu_matches(g, "A100")} == {"A100-40GB", "A100-80GB"}
    assert gpu_matches("RTX4090", "4090") and gpu_matches("RTX4090", "rtx 4090") and not gpu_matches("RTX4090", "409")
    assert gpu_matches("H100-SXM", "H100 SXM") and not gpu_matches("H100-NVL", "h100-sxm")


def test_region_prefix_and_lists():
    assert region_matches("us-east-1", "us") and region_matches("us-east-1", "US-EAST")
    assert region_matches("US", "us") and region_matches("Oregon, US, NA", "us")
    assert not region_matches("us-east-10", "us-east-1") and not region_matches("eu-west-1", "us")
    assert not region_matches("australia-southeast1", "us")
    assert split_list(["aws,lambda", " modal ", "aws"]) == ["aws", "lambda", "modal"]


# ---------------------------------------------------------------- ranking


def _offer(oid: str, vram: float, price: float, count: int = 1, region: str = "r1", gpu: str = "L40S") -> Offer:
    return Offer("runpod", oid, gpu, count, vram, region, price_hr=price)


def test_tight_fit_is_labelled_and_ranks_after_a_dearer_comfortable_fit():
    need = estimate_memory(L8, QLORA, gpus=1).fit_gib
    tight_vram = (need + 0.4) / SAFETY_FRACTION  # 0.4 GiB to spare: the fragile pick
    comfy_vram = (need + 12.0) / SAFETY_FRACTION
    offers = [_offer("tight", tight_vram, 0.50), _offer("comfy", comfy_vram, 0.80)]
    plan = make_plan(L8, QLORA, WORK, offers=offers, spot=False)
    by = {o.offer.offer_id: o for o in plan.options}
    assert by["tight"].tight_fit and not by["comfy"].tight_fit
    assert by["tight"].headroom_gib == pytest.approx(tight_vram - need, abs=0.01)  # left of the card
    assert any(n.startswith("tight fit") for n in by["tight"].notes)
    assert by["tight"].est_cost_usd < by["comfy"].est_cost_usd  # cheaper, yet not the choice
    assert plan.choice.offer.offer_id == "comfy"
    assert [o.offer.offer_id for o in plan.options] == ["comfy", "tight"]
    assert plan.to_dict()["options"][1]["tight_fit"] is True
    # only tight fits: still offered (labelled), not refused
    alone = make_plan(L8, QLORA, WORK, offers=[offers[0]], spot=False)
    assert alone.choice.tight_fit
    # the fit test is the card itself: 0.3 GiB left of it is a tight fit (inside the comfort margin), not a refusal
    edge = make_plan(L8, QLORA, WORK, offers=[_offer("edge", need + 0.3, 0.40)], spot=False)
    assert edge.choice.tight_fit and edge.choice.headroom_gib == pytest.approx(0.3, abs=0.01)
    assert any("inside the 8% margin" in n for n in edge.choice.notes)
    short = make_plan(L8, QLORA, WORK, offers=[_offer("short", need - 0.3, 0.40)], spot=False)
    assert not short.options and "nothing fits" in short.nothing_fits


def _pair_costs(p1: float, p2: float) -> tuple[float, float, list[str]]:
    offers = [_offer("one", 48.0, p1, 1), _offer("two", 48.0, p2, 2)]
    plan = make_plan(L8, QLORA, WORK, offers=offers, spot=False)
    by = {o.offer.offer_id: o.est_cost_usd for o in plan.options}
    return by["one"], by["two"], [o.offer.offer_id for o in plan.options]


def test_fewer_gpus_win_within_three_percent_and_lose_beyond():
    c1, c2, _ = _pair_costs(1.0, 2.0)
    # the cost is linear in the price: price the pair so 2 GPUs are 2% / 8% cheaper than 1
    for saving, expect in ((0.02, ["one", "two"]), (0.08, ["two", "one"])):
        p2 = 2.0 * (1 - saving) * c1 / c2
        a, b, order = _pair_costs(1.0, p2)
        assert b == pytest.approx(a * (1 - saving), rel=1e-3)
        assert order == expect, (saving, a, b)
    assert FEWER_GPUS_WITHIN == 0.03


def test_bundled_plans_keep_the_ranking_invariant():
    for model, cfg in (("70b", QLORA), ("8b", TrainConfig(method="lora", seq_len=2048))):
        plan = make_plan(resolve_model(model), cfg, WORK)
        assert plan.options and plan.choice is plan.options[0]
        assert_ranked(plan.options)


def test_regions_fold_into_one_row_but_the_plan_keeps_every_region_for_failover():
    offers = [_offer("a", 48.0, 1.0, region=r) for r in ("us-east-1", "us-west-2", "eu-west-1")]
    offers.append(_offer("b", 48.0, 1.1, count=2, region="us-east-1"))
    plan = make_plan(L8, QLORA, WORK, offers=offers, spot=False)
    assert len(plan.options) == 4  # run fails over through all of them
    rows = fold_regions(plan.options)
    # the 2-GPU offer ($0.55/GPU-h over P2P PCIe) may rank first; the 1-GPU row folds its three regions
    one = next(r for r in rows if r.gpu_count == 1)
    assert sorted(one.also_regions + [one.region]) == ["eu-west-1", "us-east-1", "us-west-2"]
    assert len(rows) == 2 and {r.gpu_count for r in rows} == {1, 2}


def test_plan_table_folds_regions_and_expands_with_all_regions():
    folded = _cli("plan", "-m", "8b", "--method", "qlora", "-p", "aws", "--top", "0")
    full = _cli("plan", "-m", "8b", "--method", "qlora", "-p", "aws", "--top", "0", "--all-regions")
    assert folded.exit_code == 0 and full.exit_code == 0, folded.output + full.output

    def rows(out: str) -> list[list[str]]:
        return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()
                if line.startswith("│") and line.split("│")[1].strip().isdigit()]

    f, a = rows(folded.stdout), rows(full.stdout)
    keys = [(r[1], r[2], r[3]) for r in f]  # provider, GPU x count, spot
    assert len(keys) == len(set(keys)) and len(a) > len(f)
    assert any("more" in r[8] for r in f)
    d = _plan_json("-m", "8b", "--method", "qlora", "-p", "aws", "--all-regions")
    assert [r[7].endswith("tight") for r in a] == [o["tight_fit"] for o in d["options"]]
    assert all(r[8] == o["region"] for r, o in zip(a, d["options"], strict=True))


# ---------------------------------------------------------------- filters


def test_gpu_region_min_vram_exclude_and_comma_lists():
    d = _plan_json("-m", "8b", "--method", "qlora", "-g", "h100")
    assert d["options"] and {o["gpu"] for o in d["options"]} <= {g for g in GPU_NAMES if g.startswith("H100")}
    d = _plan_json("-m", "8b", "--method", "qlora", "-g", "H100,a100", "-g", "l40s")
    gpus = {o["gpu"] for o in d["options"]}
    assert gpus and all(g.startswith(("H100", "A100", "L40S")) for g in gpus) and "L40S" in gpus
    d = _plan_json("-m", "8b", "--method", "qlora", "--region", "us")
    assert d["options"] and all(region_matches(o["region"], "us") for o in d["options"])
    d = _plan_json("-m", "8b", "--method", "qlora", "--min-vram", "80")
    assert d["options"] and min(o["vram_gib_per_gpu"] for o in d["options"]) >= 80
    d = _plan_json("-m", "8b", "--method", "qlora", "--exclude", "vast,aws")
    assert d["options"] and not {o["provider"] for o in d["options"]} & {"vast", "aws"}
    d = _plan_json("-m", "8b", "--method", "qlora", "-p", "aws,lambda", "-p", "modal")
    assert {o["provider"] for o in d["options"]} == {"aws", "lambda", "modal"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("-g", "x100"), "--gpu 'x100'"),
        (("--exclude", "lamda"), "lambda"),
        (("-p", "aws,lamda"), "lambda"),
        (("--min-vram", "0"), "--min-vram"),
        (("-p", "aws", "--exclude", "aws"), "--exclude"),
    ],
)
def test_bad_filters_are_one_line_exit_2(args, needle):
    r = _cli("plan", "-m", "8b", *args)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert needle in err and "\n" not in err and "Traceback" not in r.output


def test_piped_table_never_truncates_ids_providers_gpus_regions():
    r = _cli("plan", "-m", "8b", "--method", "qlora", "-p", "vast", "--all-regions", "--top", "20")
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    d = _plan_json("-m", "8b", "--method", "qlora", "-p", "vast")
    for o in d["options"][:20]:
        assert o["region"] in r.stdout and o["gpu"] in r.stdout
    assert d["choice"]["offer_id"] in r.stdout


# ---------------------------------------------------------------- catalog show


def test_catalog_show_groups_by_gpu_and_all_lists_every_offer():
    offers = load_offers()
    r = _cli("catalog", "show")
    assert r.exit_code == 0, r.output
    body = [line for line in r.stdout.splitlines() if line.startswith("│")]
    assert len(body) == len({o.gpu for o in offers})
    assert f"{len(offers)} offers" in r.stdout
    h100 = [line for line in body if line.split("│")[1].strip() == "H100-SXM"][0]
    cells = [c.strip() for c in h100.split("│")[1:-1]]
    count = sum(o.gpu == "H100-SXM" for o in offers)
    cheapest = min(o.price_hr / o.gpu_count for o in offers if o.gpu == "H100-SXM" and o.price_hr is not None)
    assert cells[2] == str(count) and cells[3].startswith(f"{cheapest:.2f}")
    r = _cli("catalog", "show", "-g", "h100", "--all")
    rows = [line for line in r.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == sum(o.gpu.startswith("H100") for o in offers) and "V100" not in r.stdout
    grouped = _cli("catalog", "show", "-g", "h100", "-p", "aws,lambda")
    names = {line.split("│")[1].strip() for line in grouped.stdout.splitlines() if line.startswith("│")}
    assert names and all(n.startswith("H100") for n in names)
