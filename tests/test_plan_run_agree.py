"""Plan and run agree (#11 item 4): what `cloudtune plan` chooses for a job is what `cloudtune run`
launches (provider, GPU, count, nodes), with the bundled catalog and no network; options that
cannot be launched are never ranked, and the plan says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudtune.providers import CLOUD_PROVIDERS
from cloudtune.providers.skypilot import MULTI_NODE_CLOUDS

from cloudtune.planner.models import resolve_model
from cloudtune.planner.plan import (
    LAUNCHERS,
    TRAINER_SHARDINGS,
    launch_route,
    make_plan,
    plan_for_spec,
    workload_for_spec,
)
from cloudtune.planner.types import TrainConfig
from cloudtune.run.orchestrator import Option, plan_job
from cloudtune.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
CLOUDS = list(CLOUD_PROVIDERS)
JOBS = [("70b", "qlora"), ("70b", "lora"), ("8b", "full"), ("405b", "qlora"), ("405b", "full")]


def _raw(model: str, method: str, **resources) -> dict:
    return {"model": model, "method": method, "data": {"train": "s3://bucket/data.jsonl", "max_seq_len": 2048},
            "store": {"url": "s3://bucket/store"}, "resources": {"provider": CLOUDS, **resources}}


def _key(provider: str, offer_id: str, gpu: str, gpus: int, nodes: int, spot: bool) -> tuple:
    return provider, offer_id, gpu, gpus, nodes, spot


def _plan_key(o) -> tuple:
    return _key(o.offer.provider, o.offer.offer_id, o.gpu, o.gpu_count, o.nodes, o.spot)


def _run_key(o: Option) -> tuple:
    offer = o.offer
    provider, offer_id = offer.provider, offer.offer_id
    if provider == "skypilot":  # launched through SkyPilot: the cloud and its offer are in the id
        provider, _, offer_id = offer_id.partition(":")
    return _key(provider, offer_id, offer.gpu, o.total_gpus, o.nodes, o.spot)


@pytest.mark.parametrize("model,method", JOBS)
def test_plans_choice_is_runs_first_option(model, method):
    spec = parse_spec(_raw(model, method))
    plan = make_plan(resolve_model(spec.model), TrainConfig.from_spec(spec), workload_for_spec(spec),
                     providers=CLOUDS, checkpoint_minutes=spec.checkpoint.every_minutes)
    draft = plan_job(spec, CLOUDS)
    assert plan.choice is not None
    assert _run_key(draft.choice) == _plan_key(plan.choice)
    # the whole failover order is the plan's ranking, nothing dropped or reordered
    assert [_run_key(o) for o in draft.options] == [_plan_key(o) for o in plan.options]
    assert draft.choice.launcher == plan.choice.launcher
    if plan.choice.nodes > 1:
        assert draft.provider == "skypilot" and plan.choice.launch_via == "skypilot"
    else:
        assert draft.provider == plan.choice.provider
    # the price run records is the whole option's
    assert draft.choice.price_hr == pytest.approx(plan.choice.price_hr)


def test_the_common_jobs_need_several_gpus_and_run_launches_them():
    """The issue's four jobs: before, run silently picked a single GPU for all but one."""
    shapes = {}
    for model, method in JOBS:
        c = plan_job(parse_spec(_raw(model, method)), CLOUDS).choice
        shapes[(model, method)] = (c.total_gpus, c.nodes, c.launcher)
    assert shapes[("70b", "lora")][0] > 1 and shapes[("8b", "full")][0] > 1
    assert shapes[("405b", "full")][1] > 1 and shapes[("405b", "full")][2] == "skypilot+accelerate-fsdp"
    for gpus, nodes, launcher in shapes.values():
        assert launcher == ("single" if gpus == 1 else "accelerate-fsdp" if nodes == 1 else "skypilot+accelerate-fsdp")


def test_multi_node_options_on_clouds_skypilot_cannot_cluster_are_not_ranked_and_say_why():
    spec = parse_spec(_raw("405b", "full", provider=["runpod", "aws"]))
    plan = plan_for_spec(spec)
    assert plan.options and all(o.provider in MULTI_NODE_CLOUDS for o in plan.options if o.nodes > 1)
    blocked = [o for o in plan.unlaunchable if o.provider == "runpod"]
    assert blocked and all("SkyPilot cannot launch a" in o.not_launchable and "runpod" in o.not_launchable
                           for o in blocked)
    d = plan.to_dict()
    assert all(o["launch_via"] == "skypilot" and o["nodes"] > 1 for o in d["options"] if o["nodes"] > 1)
    assert d["not_launchable"] and all(o["not_launchable"] for o in d["not_launchable"])
    assert all("not_launchable" not in o for o in d["options"])
    # only RunPod: everything that fits is unlaunchable, so nothing is chosen, and the reason is one line
    only = plan_for_spec(parse_spec(_raw("405b", "full", provider="runpod")))
    assert only.choice is None and "none can be launched" in only.nothing_fits and "\n" not in only.nothing_fits
    from cloudtune.errors import NothingFits

    with pytest.raises(NothingFits, match="none can be launched"):
        plan_job(parse_spec(_raw("405b", "full", provider="runpod")), ["runpod"])


def test_deepspeed_shardings_are_not_launchable():
    """The trainer's launcher runs ddp and fsdp; a zero3 plan must not become a run that cannot start."""
    spec = parse_spec(_raw("70b", "lora"))
    cfg = TrainConfig.from_spec(spec)
    import dataclasses

    plan = make_plan(resolve_model("70b"), dataclasses.replace(cfg, sharding="zero3"), workload_for_spec(spec),
                     providers=["aws"])
    assert not [o for o in plan.options if o.gpu_count > 1]
    assert any("DeepSpeed" in o.not_launchable for o in plan.unlaunchable)
    assert LAUNCHERS["zero3"] == "accelerate-deepspeed" and "zero3" not in TRAINER_SHARDINGS


def test_planner_shardings_match_the_trainers_launcher():
    launch = pytest.importorskip("cloudtune.trainer.launch")
    assert set(TRAINER_SHARDINGS) - {"none"} == set(launch.SHARDINGS)


def test_option_round_trips_through_the_job_row_and_old_rows_still_load():
    draft = plan_job(parse_spec(_raw("405b", "full", provider="aws")), ["aws"])
    o = draft.choice
    back = Option.from_dict(json.loads(json.dumps(o.to_dict())))
    assert back == o and back.nodes > 1 and back.offer.provider == "skypilot"
    old = {"offer": {**o.to_dict()["offer"]}, "spot": False, "price_hr": 1.0, "est_hours": 1, "est_cost_usd": 1}
    assert Option.from_dict(old).nodes == 1 and Option.from_dict(old).launcher == "single"
    assert launch_route(make_plan(resolve_model("8b"), TrainConfig(method="qlora", quant_bits=4),
                                  workload_for_spec(parse_spec(_raw("8b", "qlora"))), providers=["aws"]).choice)[0] \
        == "single"


def test_run_dry_run_shows_the_plans_choice_and_the_skypilot_task_without_secrets(tmp_path):
    """The CLI path: `run --dry-run --json` for a multi-node job against `plan --json` of the same job."""
    pytest.importorskip("sky")
    secret = "aws-secret-value-for-dry-run-77"
    spec_path = tmp_path / "405b.yaml"
    raw = _raw("405b", "full", provider="aws")
    raw["data"]["train"] = str(ROOT / "examples" / "data" / "reverse.jsonl")  # staged, not read remotely
    spec_path.write_text(yaml.safe_dump(raw))
    env = {"CLOUDTUNE_HOME": str(tmp_path / "home"), "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIAX",
           "HF_TOKEN": "hf_" + secret, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "cloudtune", "run", str(spec_path), "--dry-run", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert secret not in run.stdout + run.stderr
    out = json.loads(run.stdout)
    first = out["plan"][0]
    plan = plan_for_spec(parse_spec(raw)).choice
    assert first["offer"]["provider"] == "skypilot" and first["offer"]["offer_id"] == f"aws:{plan.offer.offer_id}"
    assert (first["nodes"], first["gpu_count"], first["spot"]) == (plan.nodes, plan.gpu_count, plan.spot)
    launch = out["launch"][0]
    assert launch["call"] == "sky.launch" and launch["validated_by_sdk"] is True
    task = yaml.safe_load(launch["task_yaml"])
    assert task["num_nodes"] == plan.nodes
    assert task["resources"]["accelerators"] == {"H100": 8} if plan.gpu == "H100-SXM" else True
    assert task["resources"]["use_spot"] is plan.spot
    # the default image is a public PyTorch one: the machine fetches the staged boot script and wheel by
    # presigned URLs (secrets); the boot script ends in the launcher
    assert task["secrets"] == {"AWS_ACCESS_KEY_ID": "<redacted>", "AWS_SECRET_ACCESS_KEY": "<redacted>",
                               "HF_TOKEN": "<redacted>", "CLOUDTUNE_BOOTSTRAP_WHEEL_URL": "<redacted>",
                               "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL": "<redacted>"}
    assert "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL" in task["run"]
    assert launch["cluster_name"] == "cloudtune-<job-id>-1" or launch["cluster_name"].startswith("cloudtune-")
