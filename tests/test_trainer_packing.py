"""data.packing: sequences really are packed up to max_seq_len, a packed SFT run trains, evaluates,
finishes and resumes bitwise; packing is refused where it has no meaning (DPO).

The dataset checks look at the dataset TRL's SFTTrainer trains on, built by our build_trainer from
the same spec, records and tokenizer as a real attempt; the run itself goes through cli.main.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
from _trainer_util import ROOT, TRAINER_ENV, final_files, sigterm_at, tiny_spec, write_spec

from cloudtune.errors import DataError
from cloudtune.spec import JobSpec
from cloudtune.trainer import contract
from cloudtune.trainer.cli import main

pytestmark = pytest.mark.slow

SEQ = 128  # a reverse record is ~30-45 tokens with the chat template: 3-4 fit in a packed row
BATCH = 8


def _spec(tmp: Path, packing: bool, **over) -> dict:
    base = dict(data={"packing": packing, "max_seq_len": SEQ, "val_split": 0.1},
                training={"max_steps": None, "epochs": 1, "micro_batch": BATCH, "learning_rate": 0.01,
                          "eval_steps": 10},
                checkpoint={"every_steps": None})
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_spec(tmp, **base)


def _train_dataset(tmp: Path, spec: dict):
    """The tokenized (and, with packing, packed) training dataset of an SFTTrainer built as run() builds it."""
    from transformers import AutoTokenizer, TrainerCallback

    from cloudtune.store import open_store
    from cloudtune.trainer.data import load_for_training, to_trl_rows
    from cloudtune.trainer.train import Attempt, build_trainer, load_model, resolve_model, wrap_peft

    js = JobSpec.model_validate(spec)
    path = resolve_model(js.model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = wrap_peft(js, load_model(js, path, "fp32"), None)
    train, val, fmt = load_for_training(js)
    att = Attempt(spec=js, job_id="inspect", attempt=1, store=open_store(js.store.url),
                  work_dir=tmp / f"inspect-{js.data.packing}")
    rows = lambda recs: to_trl_rows(recs, fmt, chat=True)  # noqa: E731
    trainer = build_trainer(att, model, tok, rows(train), rows(val), "fp32", TrainerCallback())
    return trainer.train_dataset, len(train)


def test_packing_fills_rows_to_max_seq_len(tmp_path: Path):
    plain, n_records = _train_dataset(tmp_path, _spec(tmp_path, False))
    packed, _ = _train_dataset(tmp_path, _spec(tmp_path, True))
    assert n_records == 270 and len(plain) == n_records  # one row per record without packing
    tokens = sum(len(r) for r in plain["input_ids"])
    assert max(len(r) for r in plain["input_ids"]) < SEQ // 2  # short records: room to pack
    lengths = [len(r) for r in packed["input_ids"]]
    # wrapped packing: full rows of max_seq_len tokens, a shorter remainder last, no token lost
    assert lengths[:-1] == [SEQ] * (len(lengths) - 1) and 0 < lengths[-1] <= SEQ
    assert sum(lengths) == tokens and len(packed) == math.ceil(tokens / SEQ)
    assert len(packed) < len(plain) / 3
    # the same tokens and the same completion-only loss mask (prompt tokens -100), just regrouped
    flat = lambda col: Counter(x for r in col for x in r)  # noqa: E731
    assert flat(packed["input_ids"]) == flat(plain["input_ids"])
    assert flat(packed["labels"]) == flat(plain["labels"])
    masked = flat(packed["labels"])[-100]
    assert 0 < masked < tokens  # chat template and prompt masked (most of a record), the answer learned


def test_packed_run_trains_evaluates_and_resumes_bitwise(tmp_path: Path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="cloudtune.trainer")
    for name, value in {**TRAINER_ENV, "CLOUDTUNE_HEARTBEAT_S": "0.05"}.items():
        monkeypatch.setenv(name, value)
    store = tmp_path / "store"
    spec = _spec(tmp_path, True, training={"epochs": 3}, checkpoint={"every_steps": 10, "keep": 2})
    spec_path = write_spec(tmp_path, spec)
    packed, _ = _train_dataset(tmp_path, spec)
    steps = 3 * math.ceil(len(packed) / BATCH)  # 3 epochs of packed rows, not of records
    assert math.ceil(len(packed) / BATCH) < math.ceil(270 / BATCH) / 3  # steps per epoch, unpacked: 34

    # preempted mid-run (SIGTERM -> emergency checkpoint, exit 75), then resumed to the end
    killer = sigterm_at(store, "res", 4)
    rc = main(["--spec", str(spec_path), "--job-id", "res", "--attempt", "1"])
    killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert rc == contract.EXIT_PREEMPTED
    stopped = json.loads((store / "res" / "LATEST.json").read_text())["step"]
    assert 4 <= stopped < steps
    caplog.clear()
    assert main(["--spec", str(spec_path), "--job-id", "res", "--attempt", "2"]) == contract.EXIT_DONE
    assert f"resuming from checkpoint {stopped}" in caplog.text

    summary = json.loads((store / "res" / "final" / "summary.json").read_text())
    assert summary["steps"] == steps and summary["epochs"] == 3
    assert summary["first_loss"] - summary["final_loss"] > 3.0, summary  # ~10.9 -> ~1: it learns
    assert summary["eval_loss"] is not None and summary["eval_loss"] < summary["first_loss"] / 2
    assert summary["generation_eval"]["source"] == "validation"
    assert (store / "res" / "DONE.json").is_file()

    # the uninterrupted reference
    assert main(["--spec", str(spec_path), "--job-id", "base"]) == contract.EXIT_DONE
    res = final_files(store / "res")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(res)
    assert res == final_files(store / "base")


def test_packing_is_refused_for_dpo(tmp_path: Path, capsys):
    from cloudtune.trainer.data import validate_data

    spec = tiny_spec(tmp_path, stage="dpo",
                     data={"train": str(ROOT / "examples/data/reverse_preference.jsonl"), "packing": True})
    with pytest.raises(DataError, match="data.packing applies to stage sft only"):
        validate_data(JobSpec.model_validate(spec))
    # the trainer refuses before loading a model: bad input, one line, FAILED.json
    rc = main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "dpo-pack"])
    assert rc == contract.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.packing applies to stage sft only")
    failed = json.loads((tmp_path / "store" / "dpo-pack" / "FAILED.json").read_text())
    assert "data.packing" in failed["reason"]
