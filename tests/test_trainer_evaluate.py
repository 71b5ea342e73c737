"""Held-out evaluation cases, the canonical adapter config and the end-of-run learning report.

The generation itself runs for real in test_trainer_methods.py (LoRA: validation records; full:
fresh tiny strings; DPO: prompt -> chosen); these check the parts around it without a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from cloudtune import tiny
from cloudtune.run.progress import learning_lines
from cloudtune.trainer.data import Record
from cloudtune.trainer.evaluate import EXAMPLES, heldout_cases
from cloudtune.trainer.train import canonical_adapter_config


def _records(task: str, n: int, seed: int = 0) -> list[Record]:
    return [Record(r, f"x:{i}") for i, r in enumerate(tiny.make_records(task, n, seed))]


def test_tiny_heldout_cases_are_fresh_distinct_and_deterministic():
    train = _records("reverse", 300)
    cases, source = heldout_cases("tiny:reverse", train, [], "alpaca", chat=True)
    assert source == "tiny:reverse held-out" and len(cases) == EXAMPLES
    inputs = [c["input"] for c in cases]
    assert len(set(inputs)) == len(inputs)
    assert not set(inputs) & {r.data["input"] for r in train}  # never a prompt the model trained on
    assert all(c["expected"] == c["input"][::-1] for c in cases)
    assert cases[0]["messages"] == [{"role": "user", "content": f"Reverse the string.\n\n{inputs[0]}"}]
    assert heldout_cases("tiny:reverse", train, [], "alpaca", chat=True)[0] == cases
    add, _ = heldout_cases("tiny:add", _records("add", 50), [], "alpaca", chat=False, n=4)
    assert [int(c["expected"]) for c in add] == [sum(map(int, c["input"].split("+"))) for c in add]
    assert add[0]["text"].startswith("### Instruction:\nAdd the two numbers.")


def test_validation_records_come_first_and_other_models_need_them():
    val = [Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "v:1"),
           Record({"messages": [{"role": "user", "content": "no answer"}]}, "v:2")]
    cases, source = heldout_cases("meta-llama/Llama-3.1-8B", [], val, "messages", chat=True)
    assert source == "validation" and [(c["input"], c["expected"]) for c in cases] == [("hi", "yo")]
    assert heldout_cases("meta-llama/Llama-3.1-8B", _records("reverse", 5), [], "alpaca", chat=True) == ([], "")
    assert heldout_cases("tiny:reverse", [], [], "text", chat=True) == ([], "")


def test_canonical_adapter_config_sorts_target_modules(tmp_path: Path):
    cfg = {"r": 8, "target_modules": ["v_proj", "q_proj", "down_proj"], "peft_type": "LORA"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    canonical_adapter_config(tmp_path)
    first = (tmp_path / "adapter_config.json").read_bytes()
    assert json.loads(first) == {**cfg, "target_modules": ["down_proj", "q_proj", "v_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "down_proj", "v_proj"]}))
    canonical_adapter_config(tmp_path)
    assert (tmp_path / "adapter_config.json").read_bytes() == first  # any input order, the same bytes
    canonical_adapter_config(tmp_path / "missing")  # a full fine-tune has no adapter config: no-op


def test_learning_lines_show_before_after_and_samples():
    summary = {
        "first_loss": 5.8, "final_loss": 0.07, "steps": 400, "tokens_per_s": 2500,
        "generation_eval": {
            "source": "tiny:reverse held-out", "examples": 16, "decoding": "greedy",
            "before": {"exact_match": 0.0, "char_accuracy": 0.01},
            "after": {"exact_match": 0.875, "char_accuracy": 0.953},
            "samples": [
                {"instruction": "Reverse the string.", "prompt": "hca", "expected": "ach", "after": "ach",
                 "before": "?C>", "correct": True},
                {"instruction": "Reverse the string.", "prompt": "dege", "expected": "eged", "after": "egde",
                 "before": "\n", "correct": False},
            ],
        },
    }
    lines = learning_lines(summary)
    assert lines[0] == "training loss 5.800 -> 0.070 over 400 steps (2,500 tokens/s)"
    assert "exact match 0% -> 88%" in lines[1] and "per character 1% -> 95%" in lines[1]
    assert lines[2] == "  Reverse the string. 'hca' → 'ach' ✓  [base model: '?C>']"
    assert lines[3] == "  Reverse the string. 'dege' → 'egde' ✗ (expected 'eged')  [base model: '\\n']"
    full = {**summary, "generation_eval": {**summary["generation_eval"], "before": None, "samples": []}}
    assert "exact match n/a -> 88%" in learning_lines(full)[1]
    assert learning_lines({"first_loss": 1.0, "final_loss": 0.5, "steps": 2}) == [
        "training loss 1.000 -> 0.500 over 2 steps (0 tokens/s)"]
