"""How many samples a dataset file holds and roughly how many tokens each: the planner's workload.

Why an estimate and not the tokenizer: `cloudtune plan` must answer in well under a second and
offline, and the model's tokenizer may not be on this machine. English text averages about 4
characters per token with the BPE vocabularies of Llama-3, Qwen and Mistral (32k-152k tokens), so
tokens ~ characters of every string value / 4, plus a few tokens per record for the chat template
(role markers, BOS/EOS). The characters are measured on the first `SAMPLE_RECORDS` records and
averaged. Only the head of a file is read (trainer/data_head.py's byte budget, 8 MiB): a larger file's
record count is *estimated* from the head's records per byte times its size (stat, S3 HEAD), and
flagged as such; Parquet's count is exact (its footer). So a multi-GB file or an s3:// object costs
one small read, the same head `cloudtune run` validates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.errors import DataError

CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS_PER_RECORD = 8
SAMPLE_RECORDS = 2000


@dataclass(frozen=True)
class DatasetStats:
    path: str
    records: int
    avg_tokens: float
    sampled: int
    method: str = f"chars/{CHARS_PER_TOKEN:g} + {TEMPLATE_TOKENS_PER_RECORD} template tokens per record"
    estimated: bool = False  # `records` scaled from the head (the file is larger than what was read)
    size_bytes: int | None = None

    def records_text(self) -> str:
        return f"~{self.records:,} records (estimated from the file's head)" if self.estimated else \
            f"{self.records:,} records"


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _tokens(record: Any) -> float:
    return _chars(record) / CHARS_PER_TOKEN + TEMPLATE_TOKENS_PER_RECORD


def dataset_stats(path: str | Path) -> DatasetStats:
    """Records and average tokens per record of a .jsonl, .json or .parquet file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset {str(p)!r} not found; pass a local .jsonl, .json or .parquet file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(p)
    if suffix == ".json":
        return _json(p)
    if suffix == ".parquet":
        return _parquet(p)
    raise DataError(f"dataset {str(p)!r}: unsupported extension {p.suffix!r}; use .jsonl, .json or .parquet")


def _jsonl(p: Path) -> DatasetStats:
    from cloudtune.trainer.data_head import head_bytes

    records = 0
    total = 0.0
    sampled = 0
    budget = head_bytes()
    consumed = 0
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if consumed >= budget and records:
                    break  # the head is spent: the rest is estimated from it
                consumed += len(raw)
                if not raw.strip():
                    continue
                records += 1
                if sampled < SAMPLE_RECORDS:
                    try:
                        total += _tokens(json.loads(raw))
                    except (ValueError, UnicodeDecodeError) as err:
                        raise DataError(f"dataset {str(p)!r} line {lineno}: not valid JSON ({err})") from None
                    sampled += 1
    except OSError as err:
        raise DataError(f"dataset {str(p)!r} is unreadable: {err.strerror}") from None
    if consumed < size and records:
        est = max(records, round(records * size / consumed))
        return _finish(p, est, total, sampled, estimated=True, size=size)
    return _finish(p, records, total, sampled, size=size)


def _json(p: Path) -> DatasetStats:
    from cloudtune.trainer.data_head import head_bytes

    try:
        size = p.stat().st_size
    except OSError as err:
        raise DataError(f"dataset {str(p)!r} is unreadable: {err.strerror}") from None
    if size > head_bytes():  # a JSON array too large to parse whole here: decode its head
        return from_head(str(p))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"dataset {str(p)!r}: not a readable JSON file ({err})") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: take the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"dataset {str(p)!r}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"dataset {str(p)!r}: expected a JSON list of records, got {type(data).__name__}")
    sample = data[:SAMPLE_RECORDS]
    return _finish(p, len(data), sum(_tokens(r) for r in sample), len(sample), size=size)


def from_head(ref: str, store: dict[str, Any] | None = None) -> DatasetStats | None:
    """Stats of any data reference `cloudtune run` accepts (local file or folder, s3:// object or
    prefix) from the head trainer/data_head.py reads: the same bytes validate_data checked, read once.

    An s3:// reference is never fetched here: its stats come from the head validate_data already read
    in this process (`run`, `check`), else None (`plan SPEC` stays offline and uses the defaults)."""
    from cloudtune.trainer.data_head import peek_head, read_head

    head = peek_head(ref) if ref.startswith("s3://") else read_head(ref, store=store)
    if head is None:
        return None
    sample = [r.data for r in head.records[:SAMPLE_RECORDS]]
    return _finish(Path(head.shown), head.total_records, sum(_tokens(r) for r in sample), len(sample),
                   estimated=head.estimated, size=head.size_bytes, shown=head.shown)


def _parquet(p: Path) -> DatasetStats:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"dataset {str(p)!r}: reading parquet needs pyarrow (pip install pyarrow), "
            "or pass --samples and --avg-tokens"
        ) from None
    try:
        pf = pq.ParquetFile(p)
        records = pf.metadata.num_rows
        rows: list[dict[str, Any]] = []
        for batch in pf.iter_batches(batch_size=min(SAMPLE_RECORDS, max(1, records))):
            rows = batch.to_pylist()
            break
    except Exception as err:  # pyarrow raises its own hierarchy (ArrowInvalid, OSError ...)
        raise DataError(f"dataset {str(p)!r}: not a readable parquet file ({err})") from None
    return _finish(p, records, sum(_tokens(r) for r in rows), len(rows))


def _finish(p: Path, records: int, total: float, sampled: int, *, estimated: bool = False,
            size: int | None = None, shown: str | None = None) -> DatasetStats:
    if records == 0 or sampled == 0:
        raise DataError(f"dataset {shown or str(p)!r} holds no records")
    return DatasetStats(shown or str(p), records, total / sampled, sampled, estimated=estimated, size_bytes=size)
