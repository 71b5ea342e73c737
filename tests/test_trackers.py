"""Trackers: TensorBoard events reach the store from a local-provider job; tracker keys travel as secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._run_util import cli, cli_env, quickstart_spec

SECRET = "wandb-secret-value-0123456789abcdef"
OTHER = "my-other-tracker-secret-42"


def _spec(tmp: Path, **over) -> Path:
    return quickstart_spec(tmp, "tb", name="tb", training={"max_steps": 8, "logging_steps": 1,
                                                            "report_to": ["tensorboard"],
                                                            "tracker_env": ["MY_TRACKER_KEY"]},
                           checkpoint={"every_steps": 4}, **over)


@pytest.mark.slow
def test_tensorboard_events_uploaded_and_keys_never_printed(tmp_path: Path, _isolated_home: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = cli_env(_isolated_home, WANDB_API_KEY=SECRET, MY_TRACKER_KEY=OTHER)
    spec = _spec(tmp_path)
    dry = cli(env, "run", str(spec), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert SECRET not in dry.stdout + dry.stderr and OTHER not in dry.stdout + dry.stderr
    # report_to has no wandb here: only the key the user named travels, redacted in the dry run
    assert "MY_TRACKER_KEY" in dry.stdout and "WANDB_API_KEY" not in dry.stdout

    r = cli(env, "run", str(spec), "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    store = tmp_path / "store"
    jobs = [p.name for p in store.iterdir() if (p / "DONE.json").is_file()]
    assert len(jobs) == 1
    tb = store / jobs[0] / "logs" / "tensorboard" / "attempt-1"
    events = sorted(tb.glob("events.out.tfevents.*"))
    assert len(events) == 1, list(tb.iterdir()) if tb.exists() else "no logs/tensorboard"
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))  # every logged step, uploaded after the writer closed
    summary = json.loads((store / jobs[0] / "final" / "summary.json").read_text())
    assert loss[-1].value == pytest.approx(summary["final_loss"], rel=1e-5)
    # neither value was written anywhere cloudtune keeps things: state, logs, store
    for root in (_isolated_home, store):
        for p in root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert SECRET.encode() not in data and OTHER.encode() not in data, p
    assert SECRET not in r.stdout + r.stderr


def test_tracker_env_names_and_values():
    from cloudtune.spec import parse_spec
    from cloudtune.trainer import trackers

    environ = {"WANDB_API_KEY": SECRET, "WANDB_PROJECT": "p", "MY_TRACKER_KEY": OTHER}
    assert trackers.secret_env(["wandb"], [], environ) == {"WANDB_API_KEY": SECRET, "WANDB_PROJECT": "p"}
    assert trackers.secret_env(["tensorboard"], ["MY_TRACKER_KEY", "UNSET_ONE"], environ) == {"MY_TRACKER_KEY": OTHER}
    assert trackers.missing_keys(["wandb"], {}) and not trackers.missing_keys(["wandb"], environ)
    assert not trackers.missing_keys(["wandb"], {"WANDB_MODE": "offline"}) and not trackers.missing_keys(
        ["tensorboard"], {})
    from cloudtune.errors import SpecError

    with pytest.raises(SpecError, match="tracker_env 'WANDB_API_KEY=abc' is not an environment variable name"):
        parse_spec({"model": "tiny:reverse", "data": {"train": "x.jsonl"},
                    "training": {"tracker_env": ["WANDB_API_KEY=abc"]}})
