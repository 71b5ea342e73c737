"""Controller requests (control.json) and the AWS spot notice, acted on by a real training run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from _trainer_util import heartbeat, tiny_spec, wait_for, write_spec

from cloudtune.trainer import contract
from cloudtune.trainer.checkpoint import CheckpointStore
from cloudtune.trainer.cli import main
from tests.fakes.imds import IMDSFake

pytestmark = pytest.mark.slow


def _in_background(fn) -> threading.Thread:
    errors: list[BaseException] = []

    def wrapped() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - surfaced by the test below
            errors.append(err)

    t = threading.Thread(target=wrapped, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def test_control_checkpoint_then_stop(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", "")
    monkeypatch.setenv("CLOUDTUNE_HEARTBEAT_S", "0.1")
    monkeypatch.setenv("CLOUDTUNE_CONTROL_POLL_S", "0.1")
    spec = tiny_spec(tmp_path, training={"max_steps": 400}, checkpoint={"every_steps": None, "every_minutes": None})
    store = tmp_path / "store"
    job = store / "ctl"
    seen: dict[str, int] = {}

    def controller() -> None:
        wait_for(lambda: (heartbeat(store, "ctl").get("step") or 0) >= 2, what="step 2")
        (job / "control.json").write_text(json.dumps({"action": "checkpoint"}))
        wait_for(lambda: (job / "LATEST.json").exists(), what="requested checkpoint")
        seen["first"] = json.loads((job / "LATEST.json").read_text())["step"]
        wait_for(lambda: (heartbeat(store, "ctl").get("step") or 0) >= seen["first"] + 2, what="training continues")
        (job / "control.json").write_text(json.dumps({"action": "stop", "reason": "budget"}))

    t = _in_background(controller)
    rc = main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "ctl"])
    t.join(timeout=5)
    assert not t.errors, t.errors
    assert rc == contract.EXIT_STOPPED
    hb = heartbeat(store, "ctl")
    assert hb["phase"] == "stopped" and hb["stop_reason"] == "control" and hb["stop_detail"] == "budget"
    from cloudtune.store import open_store

    steps = CheckpointStore(open_store(f"file://{store}"), "ctl").committed_steps()
    assert steps[0] == seen["first"] and len(steps) == 2 and steps[1] > steps[0]
    assert steps[1] < 400 and not (job / "DONE.json").exists()
    assert not (job / "control.json").exists()  # consumed


def test_spot_notice_triggers_emergency_checkpoint(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CLOUDTUNE_HEARTBEAT_S", "0.1")
    spec = tiny_spec(tmp_path, training={"max_steps": 400}, checkpoint={"every_steps": None, "every_minutes": None})
    store = tmp_path / "store"
    with IMDSFake() as imds:
        monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", imds.url)

        def aws() -> None:
            wait_for(lambda: (heartbeat(store, "spot").get("step") or 0) >= 2, what="step 2")
            imds.schedule_interruption("terminate", in_s=120)

        t = _in_background(aws)
        rc = main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "spot", "--attempt", "3"])
        t.join(timeout=5)
    assert not t.errors, t.errors
    assert rc == contract.EXIT_PREEMPTED
    hb = heartbeat(store, "spot")
    assert hb["phase"] == "preempted" and hb["stop_reason"] == "spot" and '"terminate"' in hb["stop_detail"]
    latest = json.loads((store / "spot" / "LATEST.json").read_text())
    manifest = json.loads((store / "spot" / "checkpoints" / f"{latest['step']:08d}" / "MANIFEST.json").read_text())
    assert manifest["reason"] == "spot" and manifest["attempt"] == 3 and 2 <= latest["step"] < 400
