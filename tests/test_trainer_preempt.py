"""Preemption and exact resume, with the trainer as a real subprocess and a real store on disk.

One scenario, interrupted every way the cloud interrupts us: SIGTERM (emergency checkpoint, exit
75), SIGKILL (no notice; a half-uploaded checkpoint left behind), a corrupted committed checkpoint
(fallback to the previous one); the final adapter must be byte-identical to an uninterrupted run.

The uninterrupted reference runs in this process, after the chain: the pytest process has the
training libraries imported already (or imports them once), which saves a trainer start (~10 s CPU).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
from _trainer_util import (
    TRAINER_ENV,
    heartbeat,
    interrupt_at,
    start_trainer,
    tiny_spec,
    wait_for,
    write_spec,
)

from cloudtune.store import open_store
from cloudtune.trainer import contract
from cloudtune.trainer.checkpoint import CheckpointStore
from cloudtune.trainer.cli import main

# A step takes ~50-80 ms and a signal lands 2-4 steps after the heartbeat shows the step we wait for;
# 30 steps leave attempt 3 (SIGTERMed 3 steps after its resume point, ~step 12) far from the end.
STEPS = 30

pytestmark = pytest.mark.slow


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_interrupted_run_ends_bitwise_identical(tmp_path: Path, monkeypatch):
    spec = tiny_spec(tmp_path, training={"max_steps": STEPS}, checkpoint={"every_steps": 3, "keep": 2})
    spec_path = write_spec(tmp_path, spec)
    store_dir = tmp_path / "store"
    log = tmp_path / "trainer.log"
    ckpts = CheckpointStore(open_store(f"file://{store_dir}"), "res")

    # 1. SIGTERM mid-run: emergency checkpoint at the step boundary, exit 75
    proc = start_trainer(spec_path, "res", 1, log)
    assert interrupt_at(proc, store_dir, "res", 4) == contract.EXIT_PREEMPTED, log.read_text()[-3000:]
    hb = heartbeat(store_dir, "res")
    latest = json.loads((store_dir / "res" / "LATEST.json").read_text())
    assert hb["phase"] == "preempted" and hb["last_checkpoint_step"] == latest["step"] >= 4
    manifest = ckpts.manifest(latest["step"])
    assert manifest["reason"] == "signal" and manifest["attempt"] == 1
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= {f["path"] for f in manifest["files"]}
    ckpts.download(latest["step"], tmp_path / "verify")  # sizes and sha256 match

    # 2. SIGKILL (no notice), then the leftovers of a checkpoint killed mid-upload
    proc = start_trainer(spec_path, "res", 2, log)
    first = latest["step"]
    wait_for(lambda: (heartbeat(store_dir, "res").get("last_checkpoint_step") or 0) > first, proc=proc,
             what="a checkpoint in attempt 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = ckpts.committed_steps()
    newest = committed[-1]
    half = store_dir / "res" / "checkpoints" / f"{newest + 1:08d}"
    half.mkdir()
    src = store_dir / "res" / "checkpoints" / f"{newest:08d}"
    shutil.copy(src / "adapter_model.safetensors", half / "adapter_model.safetensors")
    (half / "optimizer.pt").write_bytes((src / "optimizer.pt").read_bytes()[:100])  # truncated upload
    assert newest + 1 not in ckpts.committed_steps()

    # 3. resume: the half checkpoint is ignored; SIGTERM again
    proc = start_trainer(spec_path, "res", 3, log)
    wait_for(lambda: heartbeat(store_dir, "res").get("attempt") == 3, proc=proc, what="attempt 3 heartbeat")
    assert interrupt_at(proc, store_dir, "res", newest + 3) == contract.EXIT_PREEMPTED
    assert f"resuming from checkpoint {newest}" in log.read_text()
    assert not half.exists()  # pruned once a newer checkpoint was committed

    # 4. the newest committed checkpoint is corrupted in the store: fall back to the previous one
    committed = ckpts.committed_steps()
    assert len(committed) == 2  # keep: 2
    bad = store_dir / "res" / "checkpoints" / f"{committed[-1]:08d}" / "adapter_model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    proc = start_trainer(spec_path, "res", 4, log)
    assert proc.wait(timeout=180) == contract.EXIT_DONE, log.read_text()[-3000:]
    text = log.read_text()
    assert f"skipping checkpoint {committed[-1]}" in text and f"resuming from checkpoint {committed[0]}" in text

    # 5. the uninterrupted reference, in this process with the subprocesses' environment
    for name, value in TRAINER_ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["--spec", str(spec_path), "--job-id", "base"]) == contract.EXIT_DONE
    # The whole final adapter folder is byte-identical (summary.json, with wall times, aside):
    # weights, adapter_config.json (target_modules sorted), tokenizer files, model card.
    final = lambda job: {p.relative_to(store_dir / job / "final").as_posix(): _sha(p)  # noqa: E731
                         for p in sorted((store_dir / job / "final").rglob("*"))
                         if p.is_file() and p.name != "summary.json"}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(final("res"))
    assert final("res") == final("base")
    cfg = json.loads((store_dir / "res" / "final" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and len(cfg["target_modules"]) == 14
    summary = json.loads((store_dir / "res" / "final" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["attempt"] == 4
