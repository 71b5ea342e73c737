"""`cloudtune run`'s plan: the options `cloudtune plan` ranks (tests/test_plan_run_agree.py), a workload and time\nestimate that match what the trainer really runs, and a budget check before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudtune.errors import UserError
from cloudtune.planner import throughput
from cloudtune.planner.plan import plan_for_spec, workload_for_spec
from cloudtune.run.orchestrator import check_budget, plan_job
from cloudtune.spec import parse_spec


def _spec(model: str, method: str, **resources) -> object:
    return parse_spec({
        "model": model, "method": method, "data": {"train": "s3://bucket/data.jsonl", "max_seq_len": 2048},
        "store": {"url": "s3://bucket/store"}, "resources": {"provider": "aws", **resources},
    })


def test_run_launches_what_plan_ranks_one_gpu_when_one_fits():
    draft = plan_job(_spec("70b", "qlora"), ["aws"])
    plan = plan_for_spec(_spec("70b", "qlora"))
    assert [(o.offer.offer_id, o.total_gpus, o.spot) for o in draft.options] == \
        [(o.offer.offer_id, o.gpu_count, o.spot) for o in plan.options]


def test_a_job_that_needs_several_gpus_runs_on_several():
    """Was refused while the trainer trained on one GPU; now the plan's multi-GPU choice is launched (#11)."""
    draft = plan_job(_spec("70b", "full"), ["aws"])
    assert draft.choice.total_gpus > 1
    assert draft.choice.launcher in ("accelerate-fsdp", "skypilot+accelerate-fsdp")


def test_forcing_several_gpus_plans_that_many():
    draft = plan_job(_spec("8b", "lora", gpus=4), ["aws"])
    assert draft.options and all(o.total_gpus == 4 and o.nodes == 1 for o in draft.options)


# ---------------------------------------------------------------- the workload and the time it takes

REVERSE = Path(__file__).resolve().parents[1] / "examples" / "data" / "reverse.jsonl"  # 300 records


def _local(max_steps: int | None, **over) -> object:
    raw = {"model": "tiny:reverse", "method": "lora", "data": {"train": str(REVERSE), "max_seq_len": 64},
           "training": {"micro_batch": 16, **({"max_steps": max_steps} if max_steps else {})}}
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_spec(raw)


def test_max_steps_trains_max_steps_batches_even_past_one_pass_of_the_data():
    # 300 records at 16 a step is under 19 steps a pass; the Trainer cycles the data up to max_steps.
    assert workload_for_spec(_local(400)).samples == 400 * 16
    assert workload_for_spec(_local(5)).samples == 5 * 16  # stops inside the first pass
    accum = workload_for_spec(_local(10, training={"micro_batch": 4, "grad_accum": 3, "max_steps": 10}))
    assert accum.samples == 10 * 4 * 3 and accum.epochs == 1.0
    without = workload_for_spec(_local(None, training={"micro_batch": 16, "epochs": 2}))
    assert without.samples == 300 and without.epochs == 2.0


def test_cloud_estimate_grows_with_max_steps_past_one_pass():
    # data on S3: the default workload is 10,000 samples, one pass is 10,000 / 4 = 2,500 steps
    def hours(max_steps: int) -> float:
        spec = parse_spec({"model": "8b", "method": "qlora", "data": {"train": "s3://my-bucket/d.jsonl", "max_seq_len": 1024},
                           "store": {"url": "s3://my-bucket/store"}, "resources": {"provider": "aws"},
                           "training": {"micro_batch": 4, "max_steps": max_steps}})
        return plan_job(spec, ["aws"]).choice.est_hours

    one_pass, two, four = hours(2_500), hours(5_000), hours(10_000)
    assert two > one_pass * 1.5 and four > two * 1.5  # it was flat past one pass before
    fixed = (throughput.BOOT_S["aws"] + throughput.TRAINER_STARTUP_S) / 3600
    assert one_pass > fixed  # start-up (boot, download, trainer start) is in every option's hours


def test_local_estimate_is_start_up_plus_steps():
    plan = plan_for_spec(_local(400))
    t = throughput.estimate_local_time(plan.model, plan.config, plan.workload, os.cpu_count() or 1)
    assert t.micro_steps == 400 and t.optimizer_steps == 400
    seconds = plan.choice.est_hours * 3600
    assert seconds == pytest.approx(t.total_hours * 3600)
    floor = throughput.TRAINER_STARTUP_S + 400 * throughput.LOCAL_MICRO_STEP_OVERHEAD_S
    assert floor <= seconds < floor + 5  # the tiny model's FLOPs are a few ms a step on any CPU
    longer = plan_for_spec(_local(800)).choice.est_hours * 3600
    assert longer - seconds == pytest.approx(seconds - throughput.TRAINER_STARTUP_S, rel=0.01)
    assert "14 s start-up" in plan.choice.notes[0] and "400 steps" in plan.choice.notes[0]


def test_check_budget_refuses_an_estimate_over_the_limits_before_anything_starts():
    # $3,600/h is $1/s: the quickstart's estimate (start-up + 400 steps) costs more than $15
    spec = _local(400, local={"price_hr": 3600.0}, limits={"max_cost_usd": 15})
    draft = plan_job(spec, ["local"])
    assert draft.choice.est_cost_usd > 15
    with pytest.raises(UserError) as err:
        check_budget(draft)
    msg = str(err.value)
    assert msg.startswith(f"estimated cost ${draft.choice.est_cost_usd:.2f} on local/local exceeds "
                          "limits.max_cost_usd $15.00") and "training.max_steps" in msg and "\n" not in msg
    check_budget(plan_job(_local(400, local={"price_hr": 3600.0},
                                 limits={"max_cost_usd": draft.choice.est_cost_usd + 1}), ["local"]))

    slow = plan_job(_local(200_000, limits={"max_hours": 1}), ["local"])
    with pytest.raises(UserError, match=r"^estimated time \d\.\d\d h exceeds limits.max_hours 1;"):
        check_budget(slow)
