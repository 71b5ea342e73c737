"""Did the adapter learn the task? Greedy generation on a few held-out prompts, before and after.

Why: a falling loss says little to a user (the tiny quickstart's loss falls from learning the output
alphabet alone); "reverse 'abc' -> 'cba'" right on prompts the model never trained on says the job
worked. The trainer runs this after every final byte is written (so it cannot disturb the bitwise
resume guarantee) and puts the result in final/summary.json, which `cloudtune run` prints.

Held-out prompts come from the validation records when there are any; for a `tiny:<task>` model,
from freshly generated task records that do not occur in the training data. "Before" is the same
model with the adapter disabled (the base model); a full fine-tune has no cheap "before" and
reports only "after". Greedy decoding consumes no random numbers.
"""

from __future__ import annotations

import logging
from typing import Any

from cloudtune.trainer.data import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_INPUT,
    Record,
    _alpaca_prompt,
    normalize_messages,
)

log = logging.getLogger("cloudtune.trainer")

EXAMPLES = 16  # greedy generations per model state: seconds on a CPU for the tiny model
SAMPLES = 3  # prompt -> completion pairs kept in the summary
HELDOUT_SEED = 10_000  # tiny task records for evaluation come from a seed no dataset file uses
MAX_NEW_TOKENS = 128


def _case(d: dict[str, Any], fmt: str, chat: bool) -> dict[str, Any] | None:
    """(shown prompt, messages or text prompt, expected answer) of one record; None when it has none."""
    if fmt == "alpaca":
        user = _alpaca_prompt(d)
        text = (ALPACA_TEMPLATE_INPUT if d.get("input") else ALPACA_TEMPLATE).format(
            instruction=d["instruction"], input=d.get("input", ""))
        return {"instruction": d["instruction"], "input": d.get("input") or d["instruction"],
                "messages": [{"role": "user", "content": user}], "text": text, "expected": d["output"]}
    if fmt in ("sharegpt", "messages", "prompt_completion"):
        if fmt == "prompt_completion":
            from cloudtune.trainer.chat import conversation

            msgs = conversation(d, fmt)[0]
        else:  # content parts joined, tool calls kept (the shapes validation accepts)
            msgs = normalize_messages(d["conversations"], "from", "value") if fmt == "sharegpt" else \
                normalize_messages(d["messages"])
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if not last or not msgs[last]["content"]:  # no prompt before it, or a tool call: nothing to compare
            return None
        prompt = msgs[:last]
        text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in prompt) + "### Assistant:\n"
        if fmt == "prompt_completion" and isinstance(d["prompt"], str):
            text = d["prompt"]  # the plain-text path trains on the prompt as given
        return {"instruction": "", "input": prompt[-1]["content"], "messages": prompt, "text": text,
                "expected": msgs[last]["content"]}
    if fmt == "preference" and isinstance(d.get("prompt"), str) and isinstance(d.get("chosen"), str):
        instruction, _, rest = d["prompt"].rpartition("\n\n")  # "instruction\n\ninput" shows as the input
        return {"instruction": instruction, "input": rest, "messages": [{"role": "user", "content": d["prompt"]}],
                "text": d["prompt"], "expected": d["chosen"]}
    return None


def heldout_cases(model_ref: str, train: list[Record], val: list[Record], fmt: str, chat: bool,
                  n: int = EXAMPLES) -> tuple[list[dict[str, Any]], str]:
    """Up to n evaluation cases and where they came from ('validation', 'tiny:<task> held-out' or '')."""
    from cloudtune import tiny

    cases = [c for c in (_case(r.data, fmt, chat) for r in val) if c][:n]
    if cases:
        return cases, "validation"
    if not tiny.is_tiny_ref(model_ref):
        return [], ""
    task = tiny.task_of(model_ref)
    if fmt not in ("alpaca", "preference"):
        return [], ""
    seen = {c["input"] for c in (_case(r.data, fmt, chat) for r in train) if c}  # never a trained prompt
    fresh = tiny.make_records(task, n * 20, seed=HELDOUT_SEED)
    if fmt == "preference":
        fresh = [{"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"]} for r in fresh]
    out = []
    for r in fresh:
        c = _case(r, fmt, chat)
        if c and c["input"] not in seen:
            seen.add(c["input"])
            out.append(c)
        if len(out) == n:
            break
    return out, f"{model_ref} held-out"


def _char_accuracy(pred: str, expected: str) -> float:
    """Position-wise matching characters over the longer string: partial credit for a near miss."""
    width = max(len(pred), len(expected))
    return 1.0 if width == 0 else sum(a == b for a, b in zip(pred, expected, strict=False)) / width


def _prompt_ids(tokenizer: Any, case: dict[str, Any], chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(case["text"])["input_ids"])


def stop_ids(model: Any, tokenizer: Any, chat: bool) -> list[int]:
    """Token ids that end a reply: eos, the model's generation_config stops and, for chat, the
    template's end-of-turn token (<|end|> for Phi-3, <end_of_turn> for Gemma, whose eos differs),
    so a reply is compared without whatever the model writes after its turn."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen if isinstance(gen, list) else [gen]
    if chat:
        from cloudtune.trainer.chat import end_of_turn

        eot = end_of_turn(tokenizer).strip()
        tid = tokenizer.convert_tokens_to_ids(eot) if eot else None
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return sorted({i for i in ids if isinstance(i, int)})


def _generate(model: Any, tokenizer: Any, cases: list[dict[str, Any]], chat: bool) -> list[str]:
    """Greedy completions of all cases in one left-padded batch (one decode loop, not one per prompt)."""
    import torch

    device = next(model.parameters()).device
    prompts = [_prompt_ids(tokenizer, c, chat) for c in cases]
    budget = min(MAX_NEW_TOKENS, 4 + max(len(tokenizer(c["expected"], add_special_tokens=False)["input_ids"])
                                         for c in cases))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                           num_beams=1, pad_token_id=pad, eos_token_id=stop_ids(model, tokenizer, chat))
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in y]


def _score(preds: list[str], cases: list[dict[str, Any]]) -> dict[str, float]:
    exp = [c["expected"].strip() for c in cases]
    return {"exact_match": round(sum(p == e for p, e in zip(preds, exp, strict=True)) / len(cases), 4),
            "char_accuracy": round(sum(_char_accuracy(p, e) for p, e in zip(preds, exp, strict=True)) / len(cases), 4)}


def generation_eval(model: Any, tokenizer: Any, cases: list[dict[str, Any]], source: str, chat: bool) -> dict[str, Any]:
    """Greedy completions of `cases` with the adapter (after) and without it (before, when it can)."""
    was_training = model.training
    model.eval()
    try:
        after = _generate(model, tokenizer, cases, chat)
        before = None
        if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            with model.disable_adapter():
                before = _generate(model, tokenizer, cases, chat)
    finally:
        model.train(was_training)
    samples = []
    for i, c in enumerate(cases[:SAMPLES]):
        samples.append({"instruction": c["instruction"], "prompt": c["input"], "expected": c["expected"],
                        "after": after[i], "before": before[i] if before else None,
                        "correct": after[i] == c["expected"].strip()})
    return {"source": source, "examples": len(cases), "decoding": "greedy",
            "before": _score(before, cases) if before else None, "after": _score(after, cases),
            "samples": samples}
