"""A DPO stage (continuing an SFT adapter) preempted mid-run and resumed ends bitwise identical.

In process, like test_trainer_preempt.py's reference run: a thread sends this process SIGTERM once
the heartbeat shows a few steps, the trainer's own handler turns it into an emergency checkpoint
and exit 75, the next attempt resumes from the store, and its final folder must match an
uninterrupted DPO run of the same spec file for file (summary.json, with wall times, aside).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from _trainer_util import ROOT, TRAINER_ENV, final_files, heartbeat, sigterm_at, tiny_spec, write_spec

from cloudtune.trainer import contract
from cloudtune.trainer.cli import main

pytestmark = pytest.mark.slow

STEPS = 20  # ~60 ms a step; the signal lands a few steps after step 3, far from the end


def test_dpo_preempted_and_resumed_ends_bitwise_identical(tmp_path: Path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="cloudtune.trainer")
    for name, value in {**TRAINER_ENV, "CLOUDTUNE_HEARTBEAT_S": "0.05"}.items():
        monkeypatch.setenv(name, value)
    store = tmp_path / "store"
    sft = tiny_spec(tmp_path, training={"max_steps": 8}, checkpoint={"every_steps": None})
    assert main(["--spec", str(write_spec(tmp_path, sft, "sft.json")), "--job-id", "sft"]) == contract.EXIT_DONE

    spec = tiny_spec(
        tmp_path, stage="dpo",
        data={"train": str(ROOT / "examples/data/reverse_preference.jsonl"), "max_seq_len": 64},
        dpo={"beta": 0.1, "base_adapter": "sft"},
        training={"max_steps": STEPS, "learning_rate": 0.003, "micro_batch": 4},
        checkpoint={"every_steps": 5, "keep": 2},
    )
    spec_path = write_spec(tmp_path, spec, "dpo.json")

    # 1. SIGTERM mid-run: an emergency checkpoint off the every_steps grid, exit 75
    killer = sigterm_at(store, "res", 3)
    rc = main(["--spec", str(spec_path), "--job-id", "res", "--attempt", "1"])
    killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert rc == contract.EXIT_PREEMPTED
    latest = json.loads((store / "res" / "LATEST.json").read_text())
    stopped = latest["step"]
    assert 3 <= stopped < STEPS
    manifest = json.loads((store / "res" / "checkpoints" / f"{stopped:08d}" / "MANIFEST.json").read_text())
    assert manifest["reason"] == "signal"
    hb = heartbeat(store, "res")
    assert hb["phase"] == "preempted" and hb["last_checkpoint_step"] == stopped
    assert not (store / "res" / "final").exists()

    # 2. the next attempt resumes from that checkpoint and finishes
    caplog.clear()
    assert main(["--spec", str(spec_path), "--job-id", "res", "--attempt", "2"]) == contract.EXIT_DONE
    assert f"resuming from checkpoint {stopped}" in caplog.text
    summary = json.loads((store / "res" / "final" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["attempt"] == 2 and summary["stage"] == "dpo"

    # 3. the uninterrupted reference: same spec, one attempt
    assert main(["--spec", str(spec_path), "--job-id", "base"]) == contract.EXIT_DONE
    base = json.loads((store / "base" / "final" / "summary.json").read_text())
    assert base["first_loss"] == pytest.approx(0.6931, abs=0.01)  # policy == reference (the SFT adapter)
    assert summary["final_loss"] == base["final_loss"]

    res, ref = final_files(store / "res"), final_files(store / "base")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(res)
    # final/ holds the trained adapter only, not TRL's frozen reference copy (ref/, in hash-seed order)
    assert not any(name.startswith("ref/") for name in res), sorted(res)
    assert res == ref
    # and the adapter moved away from the SFT adapter it started from
    sft_adapter = store / "sft" / "final" / "adapter_model.safetensors"
    assert hashlib.sha256(sft_adapter.read_bytes()).hexdigest() != res["adapter_model.safetensors"]
