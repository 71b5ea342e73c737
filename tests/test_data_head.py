"""Pre-flight reads the head of the training data, never the whole of it (#14 item 3).

A 50 MiB JSONL object on moto_server, reached through a loopback proxy that counts the bytes of
every response body: `validate_data` (what `run`, `--dry-run` and `check` call) and `cloudtune run
--dry-run` transfer ~the 8 MiB head (one HEAD, one ranged GET), state the size and an *estimated*
record count, still name a malformed record inside the head by file:line, and honestly do not see
one past it, which the trainer's full read (`load_for_training`) does. Local files: the head is
streamed, the size comes from stat. Parquet: the footer and the first row group through ranged reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudtune.errors import DataError
from cloudtune.spec import parse_spec
from cloudtune.trainer.data import load_for_training, validate_data
from cloudtune.trainer.data_head import HEAD_BYTES, read_head
from tests.fakes.s3_proxy import S3Proxy

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
# ~1 KiB records: 8 MiB of head is ~8k of them; model "8b" has no tokenizer here, so no render check
RECORD = {"instruction": "Reverse the string. " + "x" * 900, "input": "abc", "output": "cba"}
LINE = (json.dumps(RECORD) + "\n").encode()


@pytest.fixture(scope="module")
def big(moto_server):
    """One bucket with a 50 MiB JSONL object (broken only in its last line) and a 20 MiB one broken at
    line 1000; written straight to moto, read through the counting proxy."""
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = f"ct-head-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    n = 50 * MiB // len(LINE)
    s3.put_object(Bucket=bucket, Key="sets/big.jsonl", Body=LINE * n + b'{"instruction": broken\n')
    s3.put_object(Bucket=bucket, Key="sets/early.jsonl", Body=LINE * 999 + b"{broken\n" + LINE * (20 * MiB // len(LINE)))
    with S3Proxy(moto_server) as proxy:
        yield {"bucket": bucket, "proxy": proxy, "lines": n + 1, "size": n * len(LINE) + 23, "s3": s3}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _spec(train: str, endpoint: str, bucket: str, **data: Any):
    return parse_spec({"model": "8b", "method": "qlora", "data": {"train": train, **data},
                       "store": {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint}})


def test_validate_reads_only_the_head_and_estimates_the_rows(big):
    proxy, bucket = big["proxy"], big["bucket"]
    proxy.reset()
    summary = validate_data(_spec(f"s3://{bucket}/sets/big.jsonl", proxy.url, bucket))
    methods = [r[0] for r in proxy.requests]
    assert methods == ["HEAD", "GET"], proxy.requests  # size, then one ranged GET
    assert proxy.requests[1][2] == f"bytes=0-{HEAD_BYTES - 1}"
    assert HEAD_BYTES <= proxy.body_bytes <= HEAD_BYTES + 64 * 1024, proxy.body_bytes  # not 50 MiB
    assert summary.size_bytes == big["size"] and summary.records_estimated
    assert summary.checked_records == HEAD_BYTES // len(LINE)
    assert abs(summary.records - big["lines"]) / big["lines"] < 0.01  # an estimate, and a good one
    line = summary.line()
    assert "50.0 MiB" in line and f"~{summary.records:,} records (estimated" in line, line
    assert any("the trainer checks every record" in n for n in summary.notes)


def test_a_broken_record_inside_the_head_is_named_by_file_and_line(big):
    proxy, bucket = big["proxy"], big["bucket"]
    proxy.reset()
    with pytest.raises(DataError, match=rf"s3://{bucket}/sets/early\.jsonl:1000: not valid JSON"):
        validate_data(_spec(f"s3://{bucket}/sets/early.jsonl", proxy.url, bucket))
    assert proxy.body_bytes <= HEAD_BYTES + 64 * 1024


def test_a_broken_record_past_the_head_is_caught_by_the_trainer_not_the_dry_run(big, tmp_path, monkeypatch):
    """Honest: pre-flight does not see the last line; the trainer's full read (on the machine) does."""
    proxy, bucket = big["proxy"], big["bucket"]
    monkeypatch.setenv("CLOUDTUNE_HOME", str(tmp_path / "home"))
    spec = _spec(f"s3://{bucket}/sets/big.jsonl", proxy.url, bucket)
    validate_data(spec)  # passes: the broken line is 42 MiB past the head
    proxy.reset()
    with pytest.raises(DataError, match=rf"s3://{bucket}/sets/big\.jsonl:{big['lines']}: not valid JSON"):
        load_for_training(spec)
    assert proxy.body_bytes >= big["size"]  # the trainer did read it all


def test_dry_run_through_the_cli_transfers_the_head_once_and_says_size_and_estimate(big, tmp_path):
    proxy, bucket = big["proxy"], big["bucket"]
    spec = {"name": "head-dry", "model": "8b", "method": "qlora",
            "data": {"train": f"s3://{bucket}/sets/big.jsonl", "max_seq_len": 1024},
            "store": {"url": f"s3://{bucket}/jobs", "endpoint_url": proxy.url},
            "resources": {"provider": "runpod"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "RUNPOD_API_KEY": "rp-fake-key"}
    proxy.reset()
    proc = subprocess.run([sys.executable, "-m", "cloudtune", "run", str(path), "--dry-run"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    gets = [r for r in proxy.requests if r[0] == "GET" and r[1].endswith("/sets/big.jsonl")]
    assert len(gets) == 1, proxy.requests  # validate and plan share the one ranged GET
    assert proxy.body_bytes <= HEAD_BYTES + 256 * 1024, proxy.body_bytes
    assert f"data: s3://{bucket}/sets/big.jsonl: alpaca, 50.0 MiB, ~" in out, out
    assert "records (estimated from the first 8.0 MiB" in out
    assert "dry run: nothing was written or launched" in out
    # the planner's workload came from the same head: the estimate, not the 10000-sample default
    plan = subprocess.run([sys.executable, "-m", "cloudtune", "run", str(path), "--dry-run", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert plan.returncode == 0, plan.stderr[-3000:]
    doc = json.loads(plan.stdout)
    assert doc["data"]["records_estimated"] is True and doc["data"]["size_bytes"] == big["size"]
    # nothing was written to the bucket by the dry runs
    listed = big["s3"].list_objects_v2(Bucket=bucket, Prefix="jobs/")
    assert listed.get("KeyCount", 0) == 0


def test_local_file_head_is_streamed_and_sized_by_stat(tmp_path):
    path = tmp_path / "big.jsonl"
    n = 20 * MiB // len(LINE)
    path.write_bytes(LINE * n + b"{broken\n")
    spec = parse_spec({"model": "8b", "data": {"train": str(path)}})
    summary = validate_data(spec)  # the broken last line is past the head
    assert summary.records_estimated and summary.size_bytes == path.stat().st_size
    assert summary.checked_records == HEAD_BYTES // len(LINE) and summary.head_bytes <= HEAD_BYTES
    with pytest.raises(DataError, match=rf"big\.jsonl:{n + 1}: not valid JSON"):
        validate_data(spec, full=True)  # what the trainer does
    from cloudtune.planner.plan import workload_for_spec

    w = workload_for_spec(spec)
    assert abs(w.samples - n) / n < 0.01 and "estimated" in w.source
    # a small file fits the head: exact and fully checked, as before
    small = tmp_path / "small.jsonl"
    small.write_bytes(LINE * 5)
    s = validate_data(parse_spec({"model": "8b", "data": {"train": str(small)}}))
    assert s.records == 5 and not s.records_estimated and "5 records, all checked" in s.line()


def test_a_first_record_longer_than_the_head_is_still_read_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDTUNE_DATA_HEAD_MB", "0.01")  # 10 KiB
    path = tmp_path / "long.jsonl"
    path.write_bytes((json.dumps({"text": "y" * 50_000}) + "\n").encode() + b'{"text": "z"}\n' * 3)
    head = read_head(str(path))
    assert len(head.records) == 1 and not head.complete and head.read_bytes > 50_000


def test_json_array_head_decodes_records_up_to_the_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDTUNE_DATA_HEAD_MB", "0.05")
    rows = [dict(RECORD, n=i) for i in range(500)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=1))
    head = read_head(str(path))
    assert 10 < len(head.records) < 500 and head.estimated
    assert head.records[3].data["n"] == 3 and head.records[3].where.endswith("record 4")
    assert abs(head.total_records - 500) < 25
    rows[5] = "not an object"
    path.write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=r"record 6: expected a JSON object"):
        read_head(str(path))
    path.write_text(json.dumps(rows[:4], indent=1)[:-2] + ",\n {\"a\": tru }," + "x" * 60_000)
    with pytest.raises(DataError, match=r"d\.json:\d+: not valid JSON"):
        read_head(str(path))


def test_parquet_on_s3_reads_the_footer_and_first_row_group_only(big, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    proxy, bucket = big["proxy"], big["bucket"]
    path = tmp_path / "d.parquet"
    rows = [dict(RECORD, instruction=f"{i} " + os.urandom(500).hex()) for i in range(12_000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1_000, compression="none")
    size = path.stat().st_size
    big["s3"].upload_file(str(path), bucket, "sets/d.parquet")
    proxy.reset()
    summary = validate_data(_spec(f"s3://{bucket}/sets/d.parquet", proxy.url, bucket))
    assert summary.records == 12_000 and not summary.records_estimated  # the footer's exact count
    assert summary.checked_records == 1_000 and summary.size_bytes == size
    assert proxy.body_bytes < size / 6, (proxy.body_bytes, size)  # footer + 1 of 12 row groups
