"""`cloudtune plan` end to end, in a real process: the JSON contract, the table, every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cloudtune.catalog import load_offers
from cloudtune.planner.plan import SAFETY_FRACTION
from tests._ranking_util import assert_ranked


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cloudtune", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture(scope="module")
def qlora70() -> dict:
    proc = _cli("--model", "70b", "--method", "qlora", "--json", "--top", "0")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_contract_keys_and_types(qlora70):
    d = qlora70
    assert set(d["model"]) >= {"id", "params_b", "layers", "hidden", "vocab"}
    assert d["model"]["id"] == "meta-llama/Llama-3.1-70B" and d["model"]["layers"] == 80
    assert (d["method"], d["quant_bits"], d["seq_len"], d["micro_batch"]) == ("qlora", 4, 2048, 1)
    assert d["gradient_checkpointing"] is True and d["optimizer"] == "adamw_torch"
    mem = d["memory"]
    assert isinstance(mem["per_gpu_gib"], float) and isinstance(mem["gpus"], int)
    assert set(mem["breakdown_gib"]) == {"weights", "trainable", "gradients", "optimizer", "activations",
                                         "logits", "overhead"}
    assert sum(mem["breakdown_gib"].values()) == pytest.approx(mem["per_gpu_gib"], abs=0.05)
    assert isinstance(d["assumptions"], dict) and d["assumptions"]["workload"]["tokens"] > 0
    types = {"provider": str, "gpu": str, "gpu_count": int, "vram_gib_per_gpu": float, "spot": bool,
             "region": str, "price_hr": float, "est_hours": float, "est_cost_usd": float, "headroom_gib": float}
    for option in d["options"]:
        for key, typ in types.items():
            assert isinstance(option[key], typ), (key, option[key])
    assert d["choice"] == d["options"][0]


def test_top_zero_lists_every_fitting_offer_sorted_and_the_choice_is_real(qlora70):
    opts = qlora70["options"]
    assert len(opts) == qlora70["options_total"] > 100
    costs = [o["rank_cost_usd"] for o in opts]  # the listed cost, or a suspect spot price's floor
    assert_ranked(opts)  # by cost; comfortable fits first, fewer GPUs within 3% (#14)
    choice = qlora70["choice"]
    assert choice["rank_cost_usd"] <= min(costs) * 1.03 + 0.01
    # the choice is a real catalog row with enough memory for the predicted peak
    rows = [o for o in load_offers() if (o.provider, o.offer_id, o.region) ==
            (choice["provider"], choice["offer_id"], choice["region"])]
    assert len(rows) == 1
    row = rows[0]
    assert (choice["price_hr"] == (row.spot_price_hr if choice["spot"] else row.price_hr))
    assert choice["fit_gib"] <= row.vram_gib_per_gpu * SAFETY_FRACTION and choice["fit_gib"] <= choice["per_gpu_gib"]
    assert choice["headroom_gib"] == pytest.approx(row.vram_gib_per_gpu - choice["fit_gib"], abs=0.02)


def test_table_output_has_options_breakdown_assumptions_and_age():
    proc = _cli("--model", "70b", "--method", "qlora", "--top", "5")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("Memory per GPU", "weights", "activations", "Options (5 of", "choice:", "Assumptions",
                 "workload:", "HFU by GPU class", "catalog: aws: snapshot", "est. cost", "headroom"):
        assert text in out, text


def test_flags_reach_the_plan(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "x" * 400}) + "\n" for _ in range(50)))
    proc = _cli("--model", "8b", "--method", "lora", "--seq-len", "4096", "--batch-size", "2", "--grad-accum", "4",
                "--lora-rank", "64", "--lora-targets", "q_proj,v_proj", "--no-gradient-checkpointing",
                "--optimizer", "adamw_8bit", "--dataset", str(data), "--epochs", "3", "--provider", "modal",
                "--provider", "runpod", "--on-demand", "--max-price-hr", "10", "--json", "--top", "0")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert (d["seq_len"], d["micro_batch"], d["grad_accum"], d["gradient_checkpointing"], d["optimizer"]) == (
        4096, 2, 4, False, "adamw_8bit")
    w = d["assumptions"]["workload"]
    assert w["samples"] == 50 and w["epochs"] == 3 and w["avg_tokens"] == pytest.approx(108)
    assert {o["provider"] for o in d["options"]} <= {"modal", "runpod"} and d["options"]
    assert all(not o["spot"] and o["price_hr"] <= 10 for o in d["options"])
    forced = json.loads(_cli("--model", "8b", "--gpus", "2", "--json", "--top", "0").stdout)
    assert {o["gpu_count"] for o in forced["options"]} == {2} and forced["memory"]["gpus"] == 2


BAD = [
    (("--model", "no-such-model-xyz"), "unknown model"),
    (("--model", "8b", "--method", "qlora", "--quant-bits", "16"), "--quant-bits 4 or 8"),
    (("--model", "8b", "--quant-bits", "4"), "needs --method qlora"),
    (("--model", "8b", "--lora-rank", "0"), "--lora-rank must be >= 1"),
    (("--model", "8b", "--seq-len", "0"), "--seq-len must be >= 1"),
    (("--model", "8b", "--provider", "awz"), "unknown provider 'awz'"),
    (("--model", "8b", "--optimizer", "adam"), "unknown --optimizer"),
    (("--model", "8b", "--dataset", "/no/such/file.jsonl"), "not found"),
    (("--model", "70b", "--method", "full", "--max-price-hr", "1"), "nothing fits under --max-price-hr 1"),
    (("--model", "405b", "--method", "full", "--gpus", "8"), "nothing fits: needs"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_unreadable_config_json(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    proc = _cli("--model", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "config.json" in proc.stderr


def test_nothing_fits_json_still_prints_the_contract():
    proc = _cli("--model", "70b", "--method", "full", "--max-price-hr", "1", "--json")
    assert proc.returncode == 2
    d = json.loads(proc.stdout)
    assert d["options"] == [] and d["choice"] is None and d["nothing_fits"].startswith("nothing fits")
    assert proc.stderr.startswith("error: nothing fits")


def test_optimizer_list_matches_the_spec():
    from cloudtune.cli.plan_cmd import OPTIMIZERS
    from cloudtune.spec import OPTIMIZERS as SPEC_OPTIMIZERS

    assert tuple(OPTIMIZERS) == tuple(SPEC_OPTIMIZERS)


def test_plan_imports_no_heavy_libraries():
    code = ("import sys; from cloudtune.cli import main; sys.argv=['cloudtune','plan','--model','8b','--json'];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('torch','boto3','httpx','transformers','botocore') if m in sys.modules];"
            "print('HEAVY', heavy, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stderr, proc.stderr
