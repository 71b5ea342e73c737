"""Chat data through the model's own chat template: tokens, and loss on assistant turns only.

Why cloudtune's own mask and not TRL's `assistant_only_loss`: TRL needs `{% generation %}`
markers, which it can patch into some templates (Qwen, Gemma, Phi-3) but not others (Llama-3.1,
Mistral refuse), and where it can, its mask is not the assistant's text: measured on the real
templates (tests/test_families_labels.py builds them), Qwen2's mask starts with the role header's
"\\n" and ends with the "\\n" after <|im_end|>, Phi-3's takes the conversation-final
<|endoftext|>, and Qwen3's training template renders an empty <think></think> block into every
assistant turn, so the model trains on text the original template never renders at inference.

This module renders the original template once per conversation and finds each trainable
assistant turn in the rendered text: its content (as rendered) up to and including the token that
ends the turn (<|eot_id|>, <|im_end|>, </s>, <end_of_turn>, <|end|>: whatever the template writes
after an assistant message). Everything else (system prompt, user turns, headers, the empty think
block, the newline after the end-of-turn token) carries no loss. Tokens are mapped to characters
with the fast tokenizer's offsets, so the labels are exactly those characters' tokens.

The same function runs in `cloudtune run`'s validation (when the tokenizer is on this machine) and
in the trainer before the model loads, so a template that refuses a conversation (a system turn
for Mistral or Gemma, roles that do not alternate) and rows longer than data.max_seq_len are bad
input (exit 2, file:line and the fix) before anything is rented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudtune.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    """Tokenized SFT rows and what encoding them found (printed by validation, logged by the trainer)."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    too_long: int = 0  # rows longer than max_seq_len (truncated, keep_start)
    dropped: int = 0  # rows whose every loss token lies beyond max_seq_len (left out)
    longest: int = 0

    def notes(self, max_len: int, shown: str) -> list[str]:
        if not self.too_long:
            return []
        total = len(self.rows) + self.dropped
        return [f"{shown}: {self.too_long} of {total} rows are longer than data.max_seq_len {max_len} tokens "
                f"(longest {self.longest}) and are cut to {max_len}; {self.dropped} of them lose every trained "
                f"token and are left out; raise data.max_seq_len to keep them whole"]


def conversation(data: dict[str, Any], fmt: str) -> tuple[list[dict[str, Any]], int]:
    """(messages, index of the first message that may carry loss) of one checked SFT record."""
    from cloudtune.trainer.data import _alpaca_prompt, normalize_messages

    if fmt == "alpaca":
        return [{"role": "user", "content": _alpaca_prompt(data)}, {"role": "assistant", "content": data["output"]}], 1
    if fmt == "sharegpt":
        return normalize_messages(data["conversations"], "from", "value"), 0
    if fmt == "messages":
        return normalize_messages(data["messages"], "role", "content"), 0
    if fmt == "prompt_completion":
        prompt, completion = data["prompt"], data["completion"]
        p = normalize_messages(prompt, "role", "content") if isinstance(prompt, list) else \
            [{"role": "user", "content": prompt}]
        c = normalize_messages(completion, "role", "content") if isinstance(completion, list) else \
            [{"role": "assistant", "content": completion}]
        return p + c, len(p)
    raise DataError(f"data format {fmt!r} has no conversation")  # pragma: no cover - callers pass SFT chat formats


def _fix_for(message: str, has_system: bool) -> str:
    low = message.lower()
    if "system" in low or (has_system and ("alternate" in low or "role" in low)):
        return ("this model's chat template accepts no system turn: fold the system text into the first user "
                "turn, or drop it")
    if "alternate" in low:
        return "make the turns alternate user/assistant, starting with user (merge consecutive turns of one role)"
    if "role" in low:
        return "use only the roles this model's chat template accepts (user, assistant; system/tool where it allows)"
    return "fix the record, or pre-format it as {\"text\": ...} with data.format: text"


def _render(tokenizer: Any, messages: list[dict[str, Any]], where: str, model: str, **kw: Any) -> str:
    import jinja2

    tools = kw.pop("tools", None)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools, **kw)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{where}: the chat template of {model} refuses this conversation ({msg}); "
                        f"{_fix_for(msg, any(m.get('role') == 'system' for m in messages))}") from None


def end_of_turn(tokenizer: Any) -> str:
    """The special token the template writes right after an assistant message's content."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWERTEXT"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - an odd template: fall back to eos
        return tokenizer.eos_token or ""
    after = text[text.rfind("ANSWERTEXT") + len("ANSWERTEXT"):]
    specials = sorted((t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t),
                      key=len, reverse=True)
    best = None
    for tok in specials:
        i = after.find(tok)
        if i >= 0 and after[:i].strip() == "" and (best is None or i < best[0]):
            best = (i, tok)
    if best:
        return after[:best[0]] + best[1]  # whitespace the template puts before the token belongs to the turn
    return tokenizer.eos_token or ""


def _spans(tokenizer: Any, messages: list[dict[str, Any]], train_from: int, full: str, eot: str,
           where: str, model: str, tools: Any) -> list[tuple[int, int]]:
    """Character spans of `full` that carry loss: each assistant turn's content and its end-of-turn."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], where, model, add_generation_prompt=True, tools=tools) if i else ""
        if prefix and full.startswith(prefix):
            cursor = max(cursor, len(prefix))
        content = (m.get("content") or "").strip()
        if content:
            start = full.find(content, cursor)
            if start < 0:
                raise DataError(f"{where}: the chat template of {model} does not render assistant turn {i + 1}'s "
                                f"text as given, so its loss cannot be masked; pre-format it as {{\"text\": ...}} "
                                f"with data.format: text")
        elif prefix and full.startswith(prefix):  # a tool-call turn: what the template renders for it
            start = len(prefix)
        else:
            raise DataError(f"{where}: assistant turn {i + 1} has no text and the template's rendering of it "
                            f"cannot be located; give it content or tool_calls the template renders")
        end_content = start + len(content)
        stop = full.find(eot, end_content) if eot else -1
        end = stop + len(eot) if stop >= 0 else end_content
        if i >= train_from:
            spans.append((start, end))
        cursor = end
    return spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, Any]], train_from: int, *, where: str,
                        model: str, eot: str | None = None, tools: Any = None) -> dict[str, list[int]]:
    """input_ids and labels (IGNORE outside assistant turns) of one conversation, untruncated."""
    full = _render(tokenizer, messages, where, model, tools=tools)
    eot = end_of_turn(tokenizer) if eot is None else eot
    spans = _spans(tokenizer, messages, train_from, full, eot, where, model, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), []
    for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a <= s and e <= b for a, b in spans) and e > s
        labels.append(tid if inside else IGNORE)
    if not any(x != IGNORE for x in labels):
        raise DataError(f"{where}: no assistant turn to train on; give the conversation at least one assistant reply")
    return {"input_ids": ids, "labels": labels}


def encode_records(tokenizer: Any, records: list[Any], fmt: str, max_len: int, *, model: str) -> Encoded:
    """Encode checked SFT records (Record objects) for a model with a chat template.

    Rows longer than max_len are cut to max_len (as TRL would); a row whose trained tokens all lie
    beyond max_len is left out, and when that leaves nothing the data is refused."""
    out = Encoded()
    eot = end_of_turn(tokenizer)
    for rec in records:
        messages, train_from = conversation(rec.data, fmt)
        row = encode_conversation(tokenizer, messages, train_from, where=rec.where, model=model, eot=eot,
                                  tools=rec.data.get("tools"))
        n = len(row["input_ids"])
        out.longest = max(out.longest, n)
        if n > max_len:
            out.too_long += 1
            row = {k: v[:max_len] for k, v in row.items()}
            if all(x == IGNORE for x in row["labels"]):
                out.dropped += 1
                continue
        out.rows.append(row)
    if records and not out.rows:
        raise DataError(f"{records[0].where.rsplit(':', 1)[0]}: every row is longer than data.max_seq_len {max_len} "
                        f"tokens before its first trained token (longest {out.longest}); raise data.max_seq_len")
    return out


def local_tokenizer(model: str) -> Any | None:
    """The model's tokenizer when it is on this machine (tiny, a local folder, the HF cache); else None."""
    from pathlib import Path

    from cloudtune import tiny

    if tiny.is_tiny_ref(model):
        tiny.task_of(model)
        return tiny.build_tokenizer()
    p = Path(model).expanduser()
    if p.is_dir():
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    if "/" not in model or "://" in model:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "tokenizer_config.json")
    except Exception:  # noqa: BLE001 - not a repo id, no cache: nothing to check here
        return None
    if not isinstance(hit, str):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - a partial cache: the machine checks it again
        return None


def uses_chat(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def check_preference(tokenizer: Any, records: list[Any], max_len: int, *, model: str) -> list[str]:
    """Render each DPO pair (prompt + chosen, prompt + rejected) through the chat template: a refused
    conversation is a DataError naming the record; pairs longer than max_len are counted (TRL cuts them)."""
    from cloudtune.trainer.data import _preference_row

    too_long = longest = 0
    for rec in records:
        row = _preference_row(rec.data, True)
        n = 0
        for answer in ("chosen", "rejected"):
            text = _render(tokenizer, row["prompt"] + row[answer], rec.where, model)
            n = max(n, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        longest = max(longest, n)
        too_long += n > max_len
    if not too_long:
        return []
    shown = records[0].where.rsplit(":", 1)[0]
    return [f"{shown}: {too_long} of {len(records)} preference pairs are longer than data.max_seq_len {max_len} "
            f"tokens (longest {longest}) and are cut to {max_len}; raise data.max_seq_len to keep them whole"]
