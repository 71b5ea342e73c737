"""#15: the `plan` flags that reach the memory and time models (--attention, --sharding, --offload,
--full-precision, optimizer aliases), and suspect spot prices in the ranking."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cloudtune.catalog import load_offers
from cloudtune.cli import plan_cmd
from cloudtune.errors import UserError
from cloudtune.planner import spot
from cloudtune.planner.memory import estimate_memory
from cloudtune.planner.models import resolve_model
from cloudtune.planner.plan import make_plan
from cloudtune.planner.throughput import Workload
from cloudtune.planner.types import TrainConfig
from cloudtune.spec import OPTIMIZER_ALIASES, parse_spec
from tests._ranking_util import assert_ranked

L8 = resolve_model("8b", allow_network=False)


def _cfg(method="full", **kw) -> TrainConfig:
    args = dict(quant_bits=None, seq_len=2048, batch_size=1, grad_accum=1, lora_rank=16, lora_targets="all-linear",
                gradient_checkpointing=True, optimizer="adamw_torch", gpus=None)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return plan_cmd._config(method, *args.values(), **kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune", "plan", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=60)


def test_each_flag_reaches_the_memory_model():
    base = estimate_memory(L8, _cfg(), gpus=8)
    assert base.sharding == "fsdp" and base.full_precision == "bf16"
    zero2 = estimate_memory(L8, _cfg(sharding="zero2"), gpus=8)
    assert zero2.sharding == "zero2" and zero2.breakdown_gib["weights"] > 2 * base.breakdown_gib["weights"]
    assert zero2.breakdown_gib["optimizer"] == pytest.approx(base.breakdown_gib["optimizer"], rel=0.05)
    ddp = estimate_memory(L8, _cfg(method="lora", sharding="ddp"), gpus=8)
    assert ddp.sharding == "ddp"
    offload = estimate_memory(L8, _cfg(offload=True, sharding="fsdp"), gpus=8)
    assert offload.breakdown_gib["optimizer"] == 0 and offload.per_gpu_gib < base.per_gpu_gib * 0.7
    mixed = estimate_memory(L8, _cfg(full_precision="mixed"), gpus=8)
    assert mixed.full_precision == "mixed" and mixed.per_gpu_gib > 1.5 * base.per_gpu_gib
    eager = estimate_memory(L8, _cfg(method="lora", attention="eager", seq_len=4096))
    sdpa = estimate_memory(L8, _cfg(method="lora", seq_len=4096))
    assert eager.breakdown_gib["activations"] > sdpa.breakdown_gib["activations"]
    assert any("eager" in n for n in eager.notes)


def test_adamw_is_an_alias_in_the_cli_and_the_spec():
    assert _cfg(optimizer="adamw").optimizer == "adamw_torch"
    assert plan_cmd.OPTIMIZER_ALIASES == OPTIMIZER_ALIASES
    spec = parse_spec({"model": "tiny:reverse", "data": {"train": "x.jsonl"}, "training": {"optimizer": "adamw"}})
    assert spec.training.optimizer == "adamw_torch"
    assert TrainConfig.from_spec(spec).optimizer == "adamw_torch"
    assert TrainConfig.from_spec(spec).full_precision == "bf16"


@pytest.mark.parametrize(("kw", "text"), [
    (dict(attention="flash3"), "unknown --attention 'flash3'"),
    (dict(sharding="zero4"), "did you mean 'zero3'"),
    (dict(full_precision="fp32"), "unknown --full-precision 'fp32'"),
    (dict(offload=True, sharding="ddp"), "--offload needs --sharding fsdp"),
])
def test_bad_flag_values_name_the_flag_and_the_fix(kw, text):
    with pytest.raises(UserError, match=text.replace("(", r"\(").replace("'", "'")):
        _cfg(**kw)
    with pytest.raises(UserError, match="applies to --method full only"):
        _cfg(method="lora", full_precision="mixed")


def test_cli_flags_end_to_end_and_one_line_errors():
    proc = _cli("--model", "8b", "--method", "full", "--gpus", "8", "--sharding", "fsdp", "--optimizer", "adamw",
                "--full-precision", "mixed", "--attention", "eager", "--json", "--top", "1")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["optimizer"] == "adamw_torch"
    assert d["memory"]["sharding"] == "fsdp" and d["memory"]["full_precision"] == "mixed"
    assert any("eager attention" in n for n in d["memory"]["notes"])
    assert d["choice"]["gpu_count"] == 8
    bad = _cli("--model", "8b", "--sharding", "zero4")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--sharding" in bad.stderr


def test_suspect_spot_prices_are_flagged_and_ranked_at_a_floor():
    offers = load_offers(["aws"])
    ratios = spot.usual_ratios(offers)
    assert 0.25 < ratios["aws"] < 0.4  # the snapshot's median AWS GPU spot/on-demand ratio
    flagged = {(o.offer_id, o.region) for o, _ in spot.suspect_offers(offers)}
    assert ("p3.16xlarge", "eu-central-1") in flagged  # listed at 10% of on-demand
    assert all(o.spot_price_hr < floor for o, floor in spot.suspect_offers(offers))
    plan = make_plan(L8, TrainConfig(method="qlora", quant_bits=4), Workload(20_000, 1024), providers=["aws"],
                     spot=True)
    suspects = [o for o in plan.options if o.suspect_spot]
    assert suspects and all(o.rank_cost_usd > o.est_cost_usd for o in suspects)
    assert all(any("suspect spot" in n for n in o.notes) for o in suspects)
    assert_ranked(plan.options)  # at the floor; comfortable fits first, fewer GPUs within 3% (#14)
    # at face value a suspect row would rank ahead of where it is
    by_listed = sorted(plan.options, key=lambda o: o.est_cost_usd)
    assert by_listed != plan.options
