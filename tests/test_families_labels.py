"""Which tokens carry loss, per family and data format: exactly the assistant text plus end-of-turn.

Each family's tiny model folder (tests/_families.py: its real chat template, a tokenizer trained
here) encodes the same records through cloudtune/trainer/chat.py, the path the trainer takes; the
test decodes every run of labelled tokens and compares it with what the assistant said. Template
refusals and length problems are checked through validate_data, the check `cloudtune run` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _families import FAMILIES, build_all, conversations

from cloudtune.errors import DataError
from cloudtune.spec import parse_spec
from cloudtune.trainer.chat import IGNORE, encode_records
from cloudtune.trainer.data import Record, check_records, validate_data


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory)

ALL = list(FAMILIES)


def _tok(family_dirs, name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family_dirs[name])


def _spans(tok, row) -> list[str]:
    out, cur = [], []
    for tid, lab in zip(row["input_ids"], row["labels"], strict=True):
        if lab != IGNORE:
            assert lab == tid
            cur.append(tid)
        elif cur:
            out.append(tok.decode(cur)), cur.clear()
    if cur:
        out.append(tok.decode(cur))
    return out


def _records(fam) -> dict[str, tuple[list[dict], list[str]]]:
    """format -> (records, the texts that must carry loss in the first record)."""
    conv = conversations(2, system=fam.system)[0]
    said = [m["content"] for m in conv if m["role"] == "assistant"]
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                   "value": m["content"]} for m in conv]}
    parts = {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in conv]}
    return {
        "messages": ([{"messages": conv}], said),
        "sharegpt": ([sharegpt], said),
        "content_parts": ([parts], said),
        "alpaca": ([{"instruction": "Reverse", "input": "abcd", "output": "dcba"}], ["dcba"]),
        "prompt_completion": ([{"prompt": "Reverse abcd", "completion": "dcba"}], ["dcba"]),
        # conversational prompt/completion: an earlier assistant turn in the prompt carries no loss
        "prompt_completion_chat": ([{"prompt": conv[:-1], "completion": conv[-1:]}], said[-1:]),
    }


@pytest.mark.parametrize("name", ALL)
def test_loss_only_on_assistant_text_and_end_of_turn(family_dirs, name):
    fam = FAMILIES[name]
    tok = _tok(family_dirs, name)
    for fmt_name, (recs, said) in _records(fam).items():
        records = [Record(r, f"d.jsonl:{i + 1}") for i, r in enumerate(recs)]
        fmt = check_records(records, "auto", "text", "d.jsonl")
        enc = encode_records(tok, records, fmt, 512, model=name)
        got = _spans(tok, enc.rows[0])
        assert got == [s + fam.eot for s in said], (name, fmt_name, got)
        # the unmasked sequence is what the template renders (nothing added, nothing lost)
        messages = enc.rows[0]["input_ids"]
        assert tok.decode(messages) == tok.decode(tok.apply_chat_template(
            *_rendered_args(records[0].data, fmt), tokenize=True, return_dict=False))


def _rendered_args(data, fmt):
    from cloudtune.trainer.chat import conversation

    return (conversation(data, fmt)[0],)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_openai_tool_calls_train_the_call(family_dirs, name):
    """An assistant turn with content null + tool_calls is trained on the call the template renders."""
    tok = _tok(family_dirs, name)
    rec = {"messages": [
        {"role": "user", "content": "Reverse abcd"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"s\": \"abcd\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "dcba"},
        {"role": "assistant", "content": "dcba"}]}
    records = [Record(rec, "t.jsonl:1")]
    enc = encode_records(tok, records, check_records(records, "auto", "text", "t.jsonl"), 512, model=name)
    spans = _spans(tok, enc.rows[0])
    eot = FAMILIES[name].eot
    assert len(spans) == 2 and spans[1] == "dcba" + eot, spans
    assert "lookup" in spans[0] and spans[0].endswith(eot) and "Reverse" not in spans[0], spans
    assert "<|im_start|>" not in spans[0] and "<|start_header_id|>" not in spans[0]


def _spec(model: str, train: Path, **data):
    return parse_spec({"model": model, "data": {"train": str(train), **data}})


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name,rows,match", [
    ("mistral", [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]}], "accepts no system turn"),
    ("gemma2", [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}]}], "accepts no system turn"),
    ("mistral", [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                               {"role": "assistant", "content": "yo"}]}], "alternate user/assistant"),
])
def test_template_refusal_is_bad_input_at_validation(family_dirs, tmp_path, name, rows, match):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _jsonl(tmp_path / "chat.jsonl", [ok, *rows])
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: the chat template of .* refuses .*; .*{match}"):
        validate_data(_spec(str(family_dirs[name]), path))


def test_too_long_rows_are_counted_and_all_too_long_refused(family_dirs, tmp_path):
    model = str(family_dirs["qwen2"])
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    long = {"messages": [{"role": "user", "content": "abcd " * 60}, {"role": "assistant", "content": "yo"}]}
    path = _jsonl(tmp_path / "d.jsonl", [short, long, long])
    summary = validate_data(_spec(model, path, max_seq_len=64))
    assert any("2 of 3 rows are longer than data.max_seq_len 64" in n and "2 of them lose every trained token" in n
               for n in summary.notes), summary.notes
    only_long = _jsonl(tmp_path / "l.jsonl", [long, long])
    with pytest.raises(DataError, match=r"every row is longer than data.max_seq_len 64 .*raise data.max_seq_len"):
        validate_data(_spec(model, only_long, max_seq_len=64))


def test_dpo_pairs_are_rendered_at_validation(family_dirs, tmp_path):
    """A DPO pair the template refuses (a system turn for Gemma) is exit-2 input at validation too."""
    ok = {"prompt": "Reverse abcd", "chosen": "dcba", "rejected": "abcd"}
    bad = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Reverse abcd"}],
           "chosen": "dcba", "rejected": "abcd"}
    path = _jsonl(tmp_path / "pref.jsonl", [ok, bad])
    spec = parse_spec({"model": str(family_dirs["gemma3"]), "stage": "dpo", "data": {"train": str(path)}})
    assert validate_data(spec).format == "preference"  # gemma3's template takes a system turn
    spec.model = str(family_dirs["gemma2"])
    with pytest.raises(DataError, match=r"pref\.jsonl:2: the chat template of .* refuses .*system"):
        validate_data(spec)
    long = {"prompt": "abcd " * 80, "chosen": "dcba", "rejected": "abcd"}
    spec.data.train, spec.data.max_seq_len = str(_jsonl(tmp_path / "l.jsonl", [ok, long])), 64
    assert any("1 of 2 preference pairs are longer than data.max_seq_len 64" in n for n in validate_data(spec).notes)


def test_trl_batches_carry_these_labels(family_dirs, tmp_path):
    """Through TRL's SFTTrainer and its collator, a training batch's loss tokens are still exactly
    the assistant turns (TRL takes given labels as they are; a TRL change would show here)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from cloudtune.store import open_store
    from cloudtune.trainer.train import Attempt, build_trainer, training_rows

    fam = FAMILIES["llama"]
    convs = conversations(4, system=True)
    records = [Record({"messages": c}, f"d.jsonl:{i + 1}") for i, c in enumerate(convs)]
    spec = parse_spec({"model": str(family_dirs["llama"]), "data": {"train": "d.jsonl", "max_seq_len": 256},
                       "training": {"max_steps": 1, "micro_batch": 4, "gradient_checkpointing": False}})
    tok = _tok(family_dirs, "llama")
    train_rows, _ = training_rows(spec, tok, records, [], "messages", True)
    att = Attempt(spec=spec, job_id="j", attempt=1, store=open_store(f"file://{tmp_path / 's'}"), work_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], dtype=torch.float32)
    trainer = build_trainer(att, model, tok, train_rows, [], "fp32", TrainerCallback())
    batch = next(iter(trainer.get_train_dataloader()))
    got = sorted(tuple(_spans(tok, {"input_ids": ids.tolist(), "labels": [x if x != -100 else IGNORE for x in lab.tolist()]}))
                 for ids, lab in zip(batch["input_ids"], batch["labels"], strict=True))
    want = sorted(tuple(m["content"] + fam.eot for m in c if m["role"] == "assistant") for c in convs)
    assert got == want
