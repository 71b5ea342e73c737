"""Training data: read, check and shape records for TRL, and fail early with file, line and field.

Why two halves: `validate_data` is import-light (stdlib json; pyarrow only for .parquet, boto3 only
for s3://) so `cloudtune run` can check a dataset before it rents anything, and the trainer calls
the same function before it loads a model. `to_trl_rows` (used by the trainer) shapes the checked
records into the dataset layouts TRL expects: conversational prompt/completion or messages when the
tokenizer has a chat template, plain-text prompt/completion otherwise, and prompt/chosen/rejected
for DPO.

Formats (data.format, or `auto` to detect from the first record's keys):
  alpaca      {"instruction": str, "input": str (optional), "output": str}
  sharegpt    {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
  messages    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}; OpenAI
              shapes too: content parts ([{"type": "text", "text": str}]), an assistant turn with
              "content": null and "tool_calls", tool results ({"role": "tool", "tool_call_id", ...})
  prompt_completion  TRL's {"prompt": str|messages, "completion": str|messages} (loss on the completion)
  text        {"<data.text_field>": str}
  preference  {"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}; without a
              prompt, chosen/rejected are whole conversations and their shared start is the prompt

Files may start with a UTF-8 byte-order mark (Windows editors write one).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloudtune.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")
SUFFIXES = (".jsonl", ".json", ".parquet")
# Suffixes that say "a file" (so a missing dir/x.csv is "not found", never a hub dataset id)
FILE_SUFFIXES = SUFFIXES + (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx", ".yaml", ".yml")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Record:
    """One record and where it came from, so a later error can still name file and line."""

    data: dict[str, Any]
    where: str  # "path:line" (JSONL), "path: record N" (JSON array), "path: row N" (Parquet)


@dataclass
class DataSummary:
    """What validate_data found: printed by `cloudtune run` before anything is rented."""

    train: str
    format: str
    records: int
    validation: str | None = None
    validation_records: int = 0
    checked: bool = True  # False for hub datasets that could not be read offline
    notes: list[str] = field(default_factory=list)
    # pre-flight reads a head (trainer/data_head.py): what it saw, and whether `records` is an estimate
    size_bytes: int | None = None
    checked_records: int | None = None  # records checked here (all of them when the file fit in the head)
    head_bytes: int | None = None  # bytes the checked records came from
    records_estimated: bool = False  # `records` scaled from the head's records per byte

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for a person: what the data is, how big, how many records, and how sure."""
        if not self.checked:
            return f"{self.train}: {'; '.join(self.notes) or 'not checked here'}"
        size = f", {_size(self.size_bytes)}" if self.size_bytes is not None else ""
        total = self.records + (self.validation_records if self.validation and "% of train" in self.validation else 0)
        if self.records_estimated:
            count = (f"~{total:,} records (estimated from the first {_size(self.head_bytes)}; "
                     f"{self.checked_records:,} checked here, the trainer checks every record)")
        elif self.checked_records is not None and self.checked_records < total:
            count = (f"{total:,} records ({self.checked_records:,} checked here, the trainer checks every record)")
        else:
            count = f"{total:,} records, all checked"
        val = f"; validation: {self.validation} ({self.validation_records:,})" if self.validation else ""
        return f"{self.train}: {self.format}{size}, {count}{val}"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# -------------------------------------------------------------------------------------- reading


def _is_hub_id(ref: str) -> bool:
    return "://" not in ref and not ref.startswith((".", "/", "~")) and ref.count("/") == 1 and \
        Path(ref).suffix.lower() not in FILE_SUFFIXES


def _fetch_s3(url: str, store: dict[str, Any] | None) -> Path:
    """Download an s3:// object (or every data file under an s3://.../ prefix) into the cache once, keyed by URL."""
    import hashlib

    from cloudtune.home import cache_dir
    from cloudtune.store.s3 import S3Store

    bucket_and_key = url[len("s3://"):]
    bucket, _, key = bucket_and_key.partition("/")
    if not key:
        raise DataError(f"data url {url!r} names a bucket but no object; use s3://bucket/path/train.jsonl")
    opts = store or {}
    s3 = S3Store(f"s3://{bucket}", endpoint_url=opts.get("endpoint_url"), region=opts.get("region"))
    if key.endswith("/"):  # a folder of data files, e.g. a local data folder staged by `cloudtune run`
        folder = cache_dir() / "data" / hashlib.sha256(url.encode()).hexdigest()[:16]
        keys = [k for k in s3.list(key) if "/" not in k[len(key):] and Path(k).suffix.lower() in SUFFIXES]
        if not keys:
            raise DataError(f"data url {url!r} holds no .jsonl/.json/.parquet objects; check the bucket and prefix")
        for k in keys:
            _download_once(s3, k, folder / Path(k).name, url)
        return folder
    dest = cache_dir() / "data" / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(key).name
    _download_once(s3, key, dest, url)
    return dest


def _download_once(s3: Any, key: str, dest: Path, url: str) -> None:
    if not dest.is_file():
        from cloudtune.store.base import StoreNotFound

        tmp = dest.with_name(dest.name + ".part")
        try:
            s3.download_file(key, tmp)
        except StoreNotFound:
            raise DataError(f"data file {url!r} does not exist; check the bucket and key") from None
        os.replace(tmp, dest)


def read_records(ref: str, *, store: dict[str, Any] | None = None) -> tuple[list[Record], str]:
    """All records of a local file or s3:// object, each with its location. Returns (records, shown name)."""
    from cloudtune.trainer.data_head import local_files

    files, shown, is_dir = local_files(str(_fetch_s3(ref, store)) if ref.startswith("s3://") else ref)
    if ref.startswith("s3://"):
        shown = ref  # the downloaded copy is read, the URL is what the user wrote
    out: list[Record] = []
    for f in files:
        out.extend(_read_file(f, str(f) if is_dir else shown))
    return out, shown


def _read_file(path: Path, shown: str) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(path)):
        return _read_jsonl(path, shown)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise DataError(f"{shown}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{shown}: expected a JSON array of records (or JSONL), got {type(data).__name__}")
        return [_as_record(r, f"{shown}: record {i + 1}") for i, r in enumerate(data)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{shown}: reading Parquet needs pyarrow; pip install pyarrow") from None
        rows = pq.read_table(path).to_pylist()
        return [_as_record(r, f"{shown}: row {i + 1}") for i, r in enumerate(rows)]
    raise DataError(f"data file {shown!r} has unsupported suffix {suffix!r}; use .jsonl, .json or .parquet")


def _looks_like_jsonl(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")


def _read_jsonl(path: Path, shown: str) -> list[Record]:
    out = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is not data
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                out.append(record_from_line(line, f"{shown}:{lineno}"))
    return out


def record_from_line(line: str, where: str) -> Record:
    """One JSONL line as a Record, or the one-line error naming file:line (the full read and the head share it)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    return _as_record(obj, where)


def _as_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with named fields, got {type(obj).__name__}")
    return Record(obj, where)


# ------------------------------------------------------------------------------------ checking


def detect_format(rec: Record, text_field: str = "text") -> str:
    keys = set(rec.data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if text_field in keys:
        return "text"
    raise DataError(
        f"{rec.where}: cannot tell the data format from fields {sorted(keys)}; expected alpaca "
        f"(instruction/output), sharegpt (conversations), messages, prompt_completion (prompt/completion), "
        f"preference (prompt/chosen/rejected) "
        f"or text ({text_field!r}); or set data.format"
    )


def _str_field(rec: Record, name: str, *, required: bool = True, empty_ok: bool = False) -> None:
    if name not in rec.data or rec.data[name] is None:
        if required:
            raise DataError(f"{rec.where}: field {name!r} is missing")
        return
    value = rec.data[name]
    if not isinstance(value, str):
        raise DataError(f"{rec.where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not empty_ok and not value.strip():
        raise DataError(f"{rec.where}: field {name!r} is empty")


def _turns(rec: Record, name: str, role_key: str, text_key: str, roles: Any) -> None:
    turns = rec.data.get(name)
    if turns is None:
        raise DataError(f"{rec.where}: field {name!r} is missing")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{rec.where}: field {name!r} must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{rec.where}: field '{name}[{i}]' must be an object with {role_key!r} and {text_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(
                f"{rec.where}: field '{name}[{i}].{role_key}' is {role!r}; expected one of {', '.join(roles)}"
            )
        _turn_text(rec, f"{name}[{i}]", turn, text_key)


def _turn_text(rec: Record, at: str, turn: dict[str, Any], text_key: str) -> None:
    """A turn's text: a string, OpenAI content parts of type text, or null beside tool_calls."""
    value = turn.get(text_key)
    if isinstance(value, str):
        return
    if value is None and isinstance(turn.get("tool_calls"), list) and turn["tool_calls"]:
        for j, call in enumerate(turn["tool_calls"]):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise DataError(f"{rec.where}: field '{at}.tool_calls[{j}].function.name' must be a string")
        return
    if isinstance(value, list):
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{rec.where}: field '{at}.{text_key}[{j}]' is a {kind!r} part; only text parts "
                                f"({{\"type\": \"text\", \"text\": ...}}) can be trained on a text model")
        return
    raise DataError(f"{rec.where}: field '{at}.{text_key}' must be a string, a list of text parts, or null "
                    f"beside tool_calls")


def _part_text(value: Any) -> str:
    if isinstance(value, list):
        return "".join(p["text"] for p in value)
    return "" if value is None else value


def normalize_messages(turns: list[dict[str, Any]], role_key: str = "role", text_key: str = "content") -> list[dict[str, Any]]:
    """Checked turns as chat-template messages: roles mapped, text parts joined, tool calls kept.

    Tool-call arguments given as a JSON string (OpenAI's wire format) become a mapping, which is what
    the families' templates render (`tojson`)."""
    out = []
    for t in turns:
        role = SHAREGPT_ROLES.get(t[role_key], t[role_key]) if role_key == "from" else t[role_key]
        m: dict[str, Any] = {"role": role, "content": _part_text(t.get(text_key))}
        if t.get("tool_calls"):
            calls = []
            for call in t["tool_calls"]:
                fn = dict(call["function"])
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**call, "type": call.get("type", "function"), "function": fn})
            m["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if key in t:
                m[key] = t[key]
        out.append(m)
    return out


def check_record(rec: Record, fmt: str, text_field: str = "text") -> None:
    """Raise DataError naming the record's location and the field when it does not fit fmt."""
    if fmt == "alpaca":
        _str_field(rec, "instruction")
        _str_field(rec, "input", required=False)
        _str_field(rec, "output", empty_ok=False)
    elif fmt == "sharegpt":
        _turns(rec, "conversations", "from", "value", tuple(SHAREGPT_ROLES))
    elif fmt == "messages":
        _turns(rec, "messages", "role", "content", MESSAGE_ROLES)
    elif fmt == "text":
        _str_field(rec, text_field)
    elif fmt == "prompt_completion":
        for name in ("prompt", "completion"):
            if isinstance(rec.data.get(name), list):
                _turns(rec, name, "role", "content", MESSAGE_ROLES)
            else:
                _str_field(rec, name)
        if isinstance(rec.data["completion"], list) and not any(
                t["role"] == "assistant" for t in rec.data["completion"]):
            raise DataError(f"{rec.where}: field 'completion' has no assistant turn to train on")
    elif fmt == "preference":
        for name in ("prompt", "chosen", "rejected"):
            value = rec.data.get(name)
            if isinstance(value, list):
                _turns(rec, name, "role", "content", MESSAGE_ROLES)
            else:
                _str_field(rec, name, required=name != "prompt" or "prompt" in rec.data)
        if rec.data.get("prompt") is None:
            prompt, chosen, _ = split_implicit_prompt(rec.data["chosen"], rec.data["rejected"])
            if not prompt or (isinstance(chosen, list) and (not chosen or chosen[0]["role"] != "assistant")):
                raise DataError(f"{rec.where}: field 'prompt' is missing and 'chosen'/'rejected' do not start with "
                                f"the same turns up to an assistant reply; add a 'prompt' field")
    else:
        raise DataError(f"data.format {fmt!r} is unknown; use auto or one of {', '.join(FORMATS)}")


def check_records(records: list[Record], fmt: str, text_field: str, shown: str) -> str:
    if not records:
        raise DataError(f"data file {shown!r} has no records")
    if fmt == "auto":
        fmt = detect_format(records[0], text_field)
    for rec in records:
        check_record(rec, fmt, text_field)
    return fmt


def _spec_parts(spec: Any) -> tuple[Any, str, dict[str, Any]]:
    store = {"endpoint_url": spec.store.endpoint_url or os.environ.get("CLOUDTUNE_STORE_ENDPOINT"),
             "region": spec.store.region}
    return spec.data, spec.stage, store


def load_checked(spec: Any, *, head: bool = False) -> tuple[list[Record], list[Record], DataSummary]:
    """Read and check train (and validation) records of a spec. Raises DataError on the first bad one.

    head=True (pre-flight): only the head of each file (trainer/data_head.py: a ranged GET on S3, the
    first bytes of a local file), with sizes and an estimated record count; head=False (the trainer):
    every record."""
    data, stage, store = _spec_parts(spec)
    if _is_hub_id(data.train) and not Path(data.train).exists():
        return [], [], DataSummary(train=data.train, format=data.format, records=0, checked=False,
                                   notes=["hub dataset: checked when the trainer downloads it"])
    if head:
        from cloudtune.trainer.data_head import read_head

        h = read_head(data.train, store=store)
        train, shown = h.records, h.shown
        n_train = h.total_records
    else:
        train, shown = read_records(data.train, store=store)
        n_train = len(train)
    fmt = check_records(train, data.format, data.text_field, shown)
    if stage == "dpo" and fmt != "preference":
        raise DataError(f"{shown}: stage dpo needs preference records (prompt/chosen/rejected), found {fmt}")
    if stage == "sft" and fmt == "preference":
        raise DataError(f"{shown}: preference records (prompt/chosen/rejected) need stage: dpo, or use an SFT format")
    if stage == "dpo" and data.packing:
        raise DataError("data.packing applies to stage sft only: DPO scores whole prompt/chosen/rejected pairs, "
                        "which cannot be packed; set data.packing: false")
    val: list[Record] = []
    summary = DataSummary(train=shown, format=fmt, records=n_train)
    if head:
        summary.size_bytes, summary.checked_records, summary.head_bytes = h.size_bytes, len(train), h.read_bytes
        summary.records_estimated = h.estimated
        if not h.complete:
            unread = f"; {h.files - h.files_read} of {h.files} files were only sized" if h.files_read < h.files else ""
            summary.notes.append(f"checked the first {len(train):,} records ({_size(h.read_bytes)} of "
                                 f"{_size(h.size_bytes)}){unread}; the trainer checks every record on the machine "
                                 f"before it loads the model")
    if data.validation:
        if head:
            vh = read_head(data.validation, store=store)
            val, vshown, n_val_records = vh.records, vh.shown, vh.total_records
        else:
            val, vshown = read_records(data.validation, store=store)
            n_val_records = len(val)
        vfmt = check_records(val, data.format if data.format != "auto" else fmt, data.text_field, vshown)
        if vfmt != fmt:
            raise DataError(f"{vshown}: validation data is {vfmt} but training data is {fmt}")
        summary.validation, summary.validation_records = vshown, n_val_records
    elif data.val_split > 0:
        n_val = max(1, int(round(n_train * data.val_split)))
        if n_val >= n_train:
            raise DataError(f"data.val_split {data.val_split} leaves no training records out of {n_train}")
        summary.validation, summary.validation_records = f"{data.val_split:.0%} of train", n_val
        summary.records = n_train - n_val
    return train, val, summary


def validate_data(spec: Any, *, full: bool = False) -> DataSummary:
    """Check a JobSpec's data before anything is rented or loaded. Raises DataError (file, line, field).

    Pre-flight (the default) reads only the head of each file (trainer/data_head.py): a record broken
    past it is not seen here but stops the trainer on the machine (exit 2 there, before the model
    loads). full=True reads and checks every record, as the trainer does.

    When the model's tokenizer is on this machine (tiny:, a local folder, the HF cache), the records
    also go through its chat template and the length check (render_check), so a refused
    conversation or data that is all too long is exit 2 here; the trainer repeats that check on the
    machine before it loads the model, for tokenizers only the machine can download."""
    train, val, summary = load_checked(spec, head=not full)
    from cloudtune.trainer import families

    summary.notes.extend(families.check(spec, families.local_config(spec.model)))
    if summary.checked:
        from cloudtune.trainer.chat import local_tokenizer

        tokenizer = local_tokenizer(spec.model)
        if tokenizer is not None:
            summary.notes.extend(render_check(spec, tokenizer, train, val, summary.format, limit=RENDER_LIMIT))
    return summary


# Records rendered by `cloudtune run` itself (~1.5 ms each on one core: 30 s at most); beyond it the
# machine renders the rest before it loads the model (still exit 2, but after renting).
RENDER_LIMIT = 20_000


def render_check(spec: Any, tokenizer: Any, train: list[Record], val: list[Record], fmt: str,
                 limit: int | None = None) -> list[str]:
    """Render the SFT records through the chat template and measure them; returns the notes
    (rows cut at max_seq_len). Raises DataError on a refused conversation or all-too-long data."""
    from cloudtune.trainer.chat import check_preference, encode_records, uses_chat

    if fmt == "text" or not uses_chat(tokenizer):
        return []
    notes = []
    if spec.stage == "dpo":
        for recs in (train, val):
            if recs:
                notes += check_preference(tokenizer, recs[:limit] if limit else recs, spec.data.max_seq_len,
                                          model=spec.model)
        return notes
    for recs in (train, val):
        if limit is not None and len(recs) > limit:
            notes.append(f"{recs[0].where.rsplit(':', 1)[0]}: the chat template was checked on the first "
                         f"{limit} of {len(recs)} records here; the trainer checks all before loading the model")
            recs = recs[:limit]
        if recs:
            enc = encode_records(tokenizer, recs, fmt, spec.data.max_seq_len, model=spec.model)
            notes += enc.notes(spec.data.max_seq_len, recs[0].where.rsplit(":", 1)[0])
    return notes


def split_validation(train: list[Record], val_split: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A deterministic train/validation split (the same records for the same seed on every attempt)."""
    if val_split <= 0:
        return train, []
    idx = list(range(len(train)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(len(train) * val_split)))
    val_idx = set(idx[:n_val])
    return [r for i, r in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)]


# ------------------------------------------------------------------------------------- shaping


def _alpaca_prompt(d: dict[str, Any]) -> str:
    if d.get("input"):
        return f"{d['instruction']}\n\n{d['input']}"
    return str(d["instruction"])


def to_trl_rows(records: list[Record], fmt: str, *, chat: bool, text_field: str = "text",
                eos: str = "") -> list[dict[str, Any]]:
    """Shape checked records into the dataset rows TRL's SFTTrainer/DPOTrainer expect.

    chat=True (tokenizer has a chat template): conversational rows. The trainer tokenizes SFT chat
    rows itself (cloudtune/trainer/chat.py: loss on assistant turns only); these rows serve DPO and
    the held-out evaluation. chat=False: plain-text prompt/completion with an Alpaca-style prompt
    (TRL masks the prompt), and DPO prompts in the same Alpaca frame as the SFT stage.
    """
    rows: list[dict[str, Any]] = []
    for rec in records:
        d = rec.data
        if fmt == "alpaca":
            if chat:
                rows.append({"prompt": [{"role": "user", "content": _alpaca_prompt(d)}],
                             "completion": [{"role": "assistant", "content": d["output"]}]})
            else:
                tpl = ALPACA_TEMPLATE_INPUT if d.get("input") else ALPACA_TEMPLATE
                rows.append({"prompt": tpl.format(instruction=d["instruction"], input=d.get("input", "")),
                             "completion": d["output"] + eos})
        elif fmt in ("sharegpt", "messages"):
            msgs = normalize_messages(d["conversations"], "from", "value") if fmt == "sharegpt" else \
                normalize_messages(d["messages"])
            if chat:
                rows.append({"messages": msgs})
            else:
                rows.append({"text": "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in msgs) + eos})
        elif fmt == "prompt_completion":
            rows.append(_prompt_completion_row(d, chat, eos))
        elif fmt == "text":
            rows.append({"text": d[text_field]})
        elif fmt == "preference":
            rows.append(_preference_row(d, chat))
        else:  # pragma: no cover - check_record rejects unknown formats first
            raise DataError(f"unknown data format {fmt!r}")
    return rows


def _plain(value: Any) -> str:
    """Messages as the plain-text frame the non-chat SFT path uses; a string as itself."""
    if isinstance(value, list):
        return "".join(f"### {m['role'].capitalize()}:\n{_part_text(m.get('content'))}\n\n" for m in value)
    return value


def _prompt_completion_row(d: dict[str, Any], chat: bool, eos: str) -> dict[str, Any]:
    prompt, completion = d["prompt"], d["completion"]
    if chat:
        p = normalize_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        c = normalize_messages(completion) if isinstance(completion, list) else \
            [{"role": "assistant", "content": completion}]
        return {"prompt": p, "completion": c}
    if isinstance(completion, list):
        completion = "".join(_part_text(m.get("content")) for m in completion if m["role"] == "assistant")
    return {"prompt": _plain(prompt), "completion": completion + eos}


def alpaca_frame(prompt: str) -> str:
    """A DPO prompt string in the SFT stage's Alpaca frame: "instruction\n\ninput" is how alpaca
    records with an input become one user text (_alpaca_prompt), so split it back the same way."""
    instruction, sep, rest = prompt.partition("\n\n")
    if sep and rest:
        return ALPACA_TEMPLATE_INPUT.format(instruction=instruction, input=rest)
    return ALPACA_TEMPLATE.format(instruction=prompt, input="")


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) for preference data without a prompt: the shared start of both
    conversations is the prompt (TRL's convention), not an empty user turn."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    return "", chosen, rejected


def _preference_row(d: dict[str, Any], chat: bool) -> dict[str, Any]:
    def as_chat(value: Any, role: str) -> Any:
        if isinstance(value, list):
            return normalize_messages(value)
        return [{"role": role, "content": value}] if chat else value

    if "prompt" in d and d["prompt"] is not None:
        prompt, chosen, rejected = d["prompt"], d["chosen"], d["rejected"]
    else:
        prompt, chosen, rejected = split_implicit_prompt(d["chosen"], d["rejected"])
    if not chat:
        prompt = alpaca_frame(prompt) if isinstance(prompt, str) else _plain(prompt) + "### Assistant:\n"
        as_text = lambda v: "".join(_part_text(t.get("content")) for t in v) if isinstance(v, list) else v  # noqa: E731
        return {"prompt": prompt, "chosen": as_text(chosen), "rejected": as_text(rejected)}
    return {"prompt": as_chat(prompt, "user"), "chosen": as_chat(chosen, "assistant"),
            "rejected": as_chat(rejected, "assistant")}


def load_hub_records(ref: str, split: str = "train") -> list[Record]:
    """Records of a hub dataset (needs the network; a clear DataError when it cannot be reached)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading hub dataset {ref!r} needs the 'datasets' package; pip install cloudtune[train]") from None
    try:
        ds = datasets.load_dataset(ref, split=split)
    except Exception as err:  # noqa: BLE001 - offline, missing, gated: all one message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot load hub dataset {ref!r} ({first}); check the id and the network, or download it "
            "and point data.train at a local .jsonl/.parquet file"
        ) from None
    return [_as_record(dict(row), f"{ref}: row {i + 1}") for i, row in enumerate(ds)]


def load_for_training(spec: Any) -> tuple[list[Record], list[Record], str]:
    """Checked (train, validation, format) for the trainer, hub datasets included, split applied."""
    train, val, summary = load_checked(spec)
    fmt = summary.format
    if not summary.checked:
        train = load_hub_records(spec.data.train)
        fmt = check_records(train, spec.data.format, spec.data.text_field, spec.data.train)
        if spec.stage == "dpo" and fmt != "preference":
            raise DataError(f"{spec.data.train}: stage dpo needs preference records, found {fmt}")
    if not val and spec.data.val_split > 0:
        train, val = split_validation(train, spec.data.val_split, spec.training.seed)
    return train, val, fmt
