"""The head of a training set: what `cloudtune run`, `--dry-run` and `check` read before renting.

Why a head and not the file: a training set can be many GB in a bucket, and pre-flight must answer
in seconds and download nothing it does not need. The trainer on the machine still reads (and
checks) every record before it loads the model; this module only decides what a person learns
before paying: the format, the first records checked with file:line, the total size, and a row
count that is exact when the whole file fit in the head (or Parquet's footer says it) and otherwise
*estimated* from the head's records per byte.

What is read, per format:
  JSONL (and .json that is really JSONL)  the first `head_bytes` (one ranged GET on S3), cut at the
                                          last full line; the first line is line 1, so file:line is exact.
  .json array (or {"data": [...]})        the same bytes, records decoded one by one (json.raw_decode)
                                          up to the last complete one; a file that fits is parsed whole.
  .parquet                                the footer (exact row count) and the first `HEAD_ROWS` rows
                                          of the first row group, through ranged reads: what pyarrow asks
                                          for, i.e. the footer and that row group's column chunks, whose
                                          size the file's writer chose.
  a folder / s3:// prefix                 sizes from the listing; heads of its files in name order until
                                          the byte budget is spent; files past it are sized, not read.
Sizes come from stat (local) or HEAD / the listing (S3). boto3 is imported only for s3:// data.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudtune.errors import DataError

MiB = 1024 * 1024
HEAD_BYTES = 8 * MiB  # ~4k-40k chat records: enough to check format, fields and the chat template
HEAD_ROWS = 20_000  # Parquet rows read from the first row group (the render check's own limit)
SUFFIXES = (".jsonl", ".json", ".parquet")


def head_bytes() -> int:
    """The pre-flight byte budget; $CLOUDTUNE_DATA_HEAD_MB overrides it (a fat pipe, a huge first record)."""
    raw = os.environ.get("CLOUDTUNE_DATA_HEAD_MB")
    if not raw:
        return HEAD_BYTES
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DataError(f"CLOUDTUNE_DATA_HEAD_MB={raw!r} is not a positive number of MiB; unset it or use e.g. 8")
    return max(4096, int(value * MiB))


@dataclass
class Head:
    """Records of a head and what they stand for."""

    shown: str
    records: list[Any] = field(default_factory=list)  # trainer.data.Record
    size_bytes: int = 0  # every file's total size
    read_bytes: int = 0  # bytes the records came from (cut at the last full line / record)
    complete: bool = True  # every record of every file is in `records`
    exact_records: int | None = None  # a total known without reading (Parquet footers), else None
    files: int = 1
    files_read: int = 1

    @property
    def total_records(self) -> int:
        """Exact when complete or from footers; else the head's records per byte times the size."""
        if self.complete:
            return len(self.records)
        if self.exact_records is not None:
            return self.exact_records
        if not self.read_bytes:
            return len(self.records)
        return max(len(self.records), round(len(self.records) * self.size_bytes / self.read_bytes))

    @property
    def estimated(self) -> bool:
        return not self.complete and self.exact_records is None


# ------------------------------------------------------------------------------- byte sources


class _Source:
    """One file: its size and ranged reads (a local file, or an S3 object through GET Range)."""

    name: str
    size: int
    version: str = ""  # mtime (local) or ETag (S3): a changed file is read again

    def read(self, start: int, end: int) -> bytes:  # [start, end)
        raise NotImplementedError


class _LocalSource(_Source):
    def __init__(self, path: Path, shown: str) -> None:
        self.path, self.name = path, shown
        try:
            st = path.stat()
            self.size, self.version = st.st_size, str(st.st_mtime_ns)
        except OSError as err:
            raise DataError(f"data file {shown!r} is unreadable ({err.strerror}); check its permissions") from None

    def read(self, start: int, end: int) -> bytes:
        try:
            with self.path.open("rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except OSError as err:
            raise DataError(f"data file {self.name!r} is unreadable ({err.strerror}); check its permissions") from None


class _S3Source(_Source):
    def __init__(self, s3: Any, key: str, size: int, shown: str, etag: str = "") -> None:
        self.s3, self.key, self.size, self.name, self.version = s3, key, size, shown, etag

    def read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            resp = self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}")
            return resp["Body"].read()
        except Exception as err:  # noqa: BLE001 - translated to one line
            raise _s3_error(self.s3, err, self.key, self.name) from None


def _s3_error(s3: Any, err: Exception, key: str, shown: str) -> Exception:
    from cloudtune.store.base import StoreNotFound

    wrapped = s3._wrap(err, key)
    if isinstance(wrapped, StoreNotFound):
        return DataError(f"data file {shown!r} does not exist; check the bucket and key")
    return wrapped


class _RangedFile(io.RawIOBase):
    """A seekable read-only file over a _Source, for pyarrow's Parquet reader (footer, then chunks)."""

    def __init__(self, src: _Source) -> None:
        self.src, self.pos, self.fetched = src, 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.src.size + offset}[whence]
        return self.pos

    def readinto(self, buf: Any) -> int:
        end = min(self.src.size, self.pos + len(buf))
        data = self.src.read(self.pos, end)
        buf[:len(data)] = data
        self.pos += len(data)
        self.fetched += len(data)
        return len(data)


# ---------------------------------------------------------------------------------- sources


def _sources(ref: str, store: dict[str, Any] | None) -> tuple[list[_Source], str, bool]:
    """(files, shown name, is a folder) of a data reference, sizes known, nothing read yet."""
    if ref.startswith("s3://"):
        return _s3_sources(ref, store)
    files, shown, is_dir = local_files(ref)
    return [_LocalSource(f, str(f) if is_dir else shown) for f in files], shown, is_dir


def local_files(ref: str) -> tuple[list[Path], str, bool]:
    """(data files, shown name, is a folder) of a local path or file:// URL; one line if there are none.
    Shared by the head read here and the trainer's full read (data.read_records)."""
    if ref.startswith("file://"):
        path, shown = Path(ref[len("file://"):]), ref[len("file://"):]
    else:
        path, shown = Path(ref).expanduser(), ref
    if not path.exists():
        raise DataError(f"data file {shown!r} not found; give a .jsonl/.json/.parquet path, s3:// URL or hub id")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"data folder {shown!r} has no .jsonl/.json/.parquet files")
        return files, shown, True
    return [path], shown, False


def _s3_sources(url: str, store: dict[str, Any] | None) -> tuple[list[_Source], str, bool]:
    from cloudtune.store.s3 import S3Store

    bucket, _, key = url[len("s3://"):].partition("/")
    if not key:
        raise DataError(f"data url {url!r} names a bucket but no object; use s3://bucket/path/train.jsonl")
    opts = store or {}
    s3 = S3Store(f"s3://{bucket}", endpoint_url=opts.get("endpoint_url"), region=opts.get("region"))
    if key.endswith("/"):
        found: list[_Source] = []
        try:
            for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if "/" not in k[len(key):] and Path(k).suffix.lower() in SUFFIXES:
                        found.append(_S3Source(s3, k, int(obj["Size"]), f"s3://{bucket}/{k}", obj.get("ETag", "")))
        except Exception as err:  # noqa: BLE001
            raise _s3_error(s3, err, key, url) from None
        if not found:
            raise DataError(f"data url {url!r} holds no .jsonl/.json/.parquet objects; check the bucket and prefix")
        return sorted(found, key=lambda s: s.name), url, True
    try:
        meta = s3.client.head_object(Bucket=bucket, Key=key)
    except Exception as err:  # noqa: BLE001
        raise _s3_error(s3, err, key, url) from None
    return [_S3Source(s3, key, int(meta["ContentLength"]), url, meta.get("ETag", ""))], url, False


# ---------------------------------------------------------------------------------- reading


def read_head(ref: str, *, store: dict[str, Any] | None = None, budget: int | None = None) -> Head:
    """The head of a local file/folder or s3:// object/prefix: checked-ready records and sizes."""
    budget = head_bytes() if budget is None else budget
    files, shown, _ = _sources(ref, store)  # stat / HEAD / list: sizes and versions, no body
    key = (ref, budget, tuple((f.name, f.size, f.version) for f in files))
    if _CACHE.get("key") == key:  # run validates, then plans: one ranged GET serves both
        return _CACHE["head"]
    head = Head(shown=shown, files=len(files), files_read=0, size_bytes=sum(f.size for f in files))
    exact: int | None = 0
    left = budget
    for src in files:
        if left <= 0:  # sized by the listing, not read
            head.complete, exact = False, None
            continue
        part = _read_one(src, left)
        head.records.extend(part.records)
        head.read_bytes += part.read_bytes
        head.files_read += 1
        left -= max(part.read_bytes, 1)
        head.complete = head.complete and part.complete
        known = part.exact_records if part.exact_records is not None else (len(part.records) if part.complete else None)
        exact = None if exact is None or known is None else exact + known
    head.exact_records = None if head.complete else exact
    _CACHE.update(key=key, head=head)
    return head


_CACHE: dict[str, Any] = {}  # the last head read (keyed by sizes and mtimes/ETags, so never stale)


def peek_head(ref: str) -> Head | None:
    """The head this process last read for `ref` (validate_data in `run`/`check`), without any request:
    the planner sizes s3:// data from it and never talks to S3 itself (`plan` stays offline)."""
    key = _CACHE.get("key")
    return _CACHE["head"] if key is not None and key[0] == ref else None


def _read_one(src: _Source, budget: int) -> Head:
    suffix = Path(src.name).suffix.lower()
    if suffix == ".parquet":
        return _parquet_head(src)
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"data file {src.name!r} has unsupported suffix {suffix!r}; use .jsonl, .json or .parquet")
    data, complete = _bytes_head(src, budget)
    if suffix == ".jsonl" or data.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
        return _jsonl_head(src, data, complete)
    return _json_head(src, data, complete)


def _bytes_head(src: _Source, budget: int) -> tuple[bytes, bool]:
    """The first `budget` bytes (all of a smaller file), and whether that is the whole file."""
    if src.size <= budget:
        return src.read(0, src.size), True
    return src.read(0, budget), False


def _line_text(raw: bytes, where: str, first: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 (byte {err.start + 1} of the line); save the file as UTF-8") from None
    return text.removeprefix("\ufeff") if first else text


def _jsonl_head(src: _Source, data: bytes, complete: bool) -> Head:
    from cloudtune.trainer.data import record_from_line

    if not complete:
        cut = data.rfind(b"\n")
        if cut < 0:  # one record longer than the budget: read on to the end of that first line
            data, complete = _first_line(src, len(data))
        else:
            data = data[:cut + 1]
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{src.name}:{lineno}"
        line = _line_text(raw, where, lineno == 1)
        if line.strip():
            out.append(record_from_line(line, where))
    return Head(shown=src.name, records=out, size_bytes=src.size, read_bytes=len(data), complete=complete)


def _first_line(src: _Source, start: int) -> tuple[bytes, bool]:
    """Bytes up to and including the first newline (or the whole file), and whether that is all of it."""
    data = src.read(0, start)
    step = max(start, MiB)
    while b"\n" not in data and len(data) < src.size:
        data += src.read(len(data), min(src.size, len(data) + step))
        step *= 2
    nl = data.find(b"\n")
    if nl >= 0:
        data = data[:nl + 1]
    return data, len(data) >= src.size


def _json_head(src: _Source, data: bytes, complete: bool) -> Head:
    """A JSON array's records: the whole file when it fits, else decoded one by one up to the cut."""
    from cloudtune.trainer.data import _as_record

    if complete:
        try:
            parsed = json.loads(_line_text(data, src.name, True))
        except json.JSONDecodeError as err:
            raise DataError(f"{src.name}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
            parsed = parsed["data"]
        if not isinstance(parsed, list):
            raise DataError(f"{src.name}: expected a JSON array of records (or JSONL), got {type(parsed).__name__}")
        recs = [_as_record(r, f"{src.name}: record {i + 1}") for i, r in enumerate(parsed)]
        return Head(shown=src.name, records=recs, size_bytes=src.size, read_bytes=len(data), complete=True)
    text = data.decode("utf-8", errors="ignore").removeprefix("\ufeff")  # a cut multi-byte char is dropped
    import re

    m = re.match(r'\s*(\[|\{\s*"data"\s*:\s*\[)', text)
    if not m:
        raise DataError(f"{src.name}: a JSON file larger than {len(data) // MiB} MiB must be an array of records "
                        f"(or {{\"data\": [...]}}) to be checked before renting; convert it to JSONL")
    dec, pos, out = json.JSONDecoder(), m.end(), []
    end_text = len(text.rstrip())
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, nxt = dec.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if err.msg.startswith("Unterminated string") or err.pos >= end_text:
                break  # the head's cut, not a broken record
            line = text.count("\n", 0, err.pos) + 1
            raise DataError(f"{src.name}:{line}: not valid JSON ({err.msg} at column {err.colno})") from None
        if nxt >= end_text:  # a number or literal may continue past the cut
            break
        out.append(_as_record(obj, f"{src.name}: record {len(out) + 1}"))
        pos = nxt
    read = len(text[:pos].encode("utf-8"))
    return Head(shown=src.name, records=out, size_bytes=src.size, read_bytes=read, complete=False)


def _parquet_head(src: _Source) -> Head:
    from cloudtune.trainer.data import _as_record

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{src.name}: reading Parquet needs pyarrow; pip install pyarrow") from None
    f = _RangedFile(src)
    try:
        pf = pq.ParquetFile(io.BufferedReader(f, buffer_size=64 * 1024))
        total = pf.metadata.num_rows
        rows: list[dict[str, Any]] = []
        if total and pf.metadata.num_row_groups:
            for batch in pf.iter_batches(batch_size=min(HEAD_ROWS, total), row_groups=[0]):
                rows = batch.to_pylist()
                break
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow's own hierarchy (ArrowInvalid, OSError ...)
        raise DataError(f"{src.name}: not a readable Parquet file ({str(err).splitlines()[0][:200]})") from None
    recs = [_as_record(r, f"{src.name}: row {i + 1}") for i, r in enumerate(rows)]
    complete = len(recs) == total
    return Head(shown=src.name, records=recs, size_bytes=src.size, read_bytes=f.fetched, complete=complete,
                exact_records=total)
