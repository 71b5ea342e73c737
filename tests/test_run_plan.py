"""`cloudtune run` launches only options the trainer can use: one GPU on one node."""

from __future__ import annotations

import pytest

from cloudtune.errors import NothingFits
from cloudtune.run.orchestrator import plan_job
from cloudtune.spec import parse_spec


def _spec(model: str, method: str, **resources) -> object:
    return parse_spec({
        "model": model, "method": method, "data": {"train": "s3://bucket/data.jsonl", "max_seq_len": 2048},
        "store": {"url": "s3://bucket/store"}, "resources": {"provider": "aws", **resources},
    })


def test_run_plans_only_single_gpu_options():
    draft = plan_job(_spec("70b", "qlora"), ["aws"])
    assert draft.options, "a 70B QLoRA fits one 80 GB card"
    assert all(o.offer.gpu_count == 1 for o in draft.options)


def test_a_job_that_needs_several_gpus_is_refused_before_anything_is_spent():
    with pytest.raises(NothingFits) as err:
        plan_job(_spec("70b", "full"), ["aws"])
    msg = str(err.value)
    assert "trainer trains on one GPU" in msg and "cloudtune plan" in msg and "\n" not in msg


def test_forcing_several_gpus_is_refused():
    with pytest.raises(NothingFits, match="resources.gpus is 4"):
        plan_job(_spec("8b", "lora", gpus=4), ["aws"])
