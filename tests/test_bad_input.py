"""Table-driven bad input (#16 finding 8): every case exits 2 with one line on stderr, no traceback,
and nothing written (no job row, no store object), all before any machine is rented.

Cases run in-process through `cloudtune.cli.main` (the real entry point: its error mapping included),
so 90+ cases cost about a second."""

from __future__ import annotations

import copy
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._run_util import QUICKSTART, ROOT

BASE = yaml.safe_load(QUICKSTART.read_text())
BASE["data"]["train"] = str(ROOT / "examples" / "data" / "reverse.jsonl")
DROP = object()


def _set(spec: dict, dotted: str, value: Any) -> dict:
    spec = copy.deepcopy(spec)
    *parents, leaf = dotted.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    if value is DROP:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


# (case id, dotted key, bad value, a word the one-line error must contain)
VALUES = [
    ("epochs-negative", "training.epochs", -1, "epochs"),
    ("epochs-zero", "training.epochs", 0, "epochs"),
    ("max-steps-zero", "training.max_steps", 0, "max_steps"),
    ("max-steps-negative", "training.max_steps", -5, "max_steps"),
    ("max-steps-text", "training.max_steps", "many", "max_steps"),
    ("lr-negative", "training.learning_rate", -2e-4, "learning_rate"),
    ("lr-zero", "training.learning_rate", 0, "learning_rate"),
    ("lr-huge", "training.learning_rate", 5, "learning_rate"),
    ("scheduler-typo", "training.lr_scheduler", "cosinee", "cosine"),
    ("scheduler-empty", "training.lr_scheduler", "", "lr_scheduler"),
    ("scheduler-unknown", "training.lr_scheduler", "onecycle", "lr_scheduler"),
    ("micro-batch-zero", "training.micro_batch", 0, "micro_batch"),
    ("grad-accum-zero", "training.grad_accum", 0, "grad_accum"),
    ("warmup-over-one", "training.warmup_ratio", 1.5, "warmup_ratio"),
    ("warmup-negative", "training.warmup_ratio", -0.1, "warmup_ratio"),
    ("weight-decay-negative", "training.weight_decay", -1, "weight_decay"),
    ("grad-norm-negative", "training.max_grad_norm", -1, "max_grad_norm"),
    ("logging-steps-zero", "training.logging_steps", 0, "logging_steps"),
    ("eval-steps-zero", "training.eval_steps", 0, "eval_steps"),
    ("optimizer-unknown", "training.optimizer", "adam9", "optimizer"),
    ("attention-unknown", "training.attention", "flash", "attention"),
    ("precision-unknown", "training.precision", "fp8", "precision"),
    ("report-to-mapping", "training.report_to", {"a": 1}, "report_to"),
    ("training-typo", "training.max_stpes", 10, "max_steps"),
    ("lora-alpha-negative", "lora.alpha", -16, "alpha"),
    ("lora-alpha-zero", "lora.alpha", 0, "alpha"),
    ("lora-rank-zero", "lora.rank", 0, "rank"),
    ("lora-dropout-one", "lora.dropout", 1.0, "dropout"),
    ("lora-dropout-negative", "lora.dropout", -0.1, "dropout"),
    ("lora-targets-empty", "lora.targets", "", "targets"),
    ("every-steps-zero", "checkpoint.every_steps", 0, "every_steps"),
    ("every-steps-negative", "checkpoint.every_steps", -1, "every_steps"),
    ("every-minutes-negative", "checkpoint.every_minutes", -1, "every_minutes"),
    ("every-minutes-zero", "checkpoint.every_minutes", 0, "every_minutes"),
    ("keep-zero", "checkpoint.keep", 0, "keep"),
    ("heartbeat-zero", "limits.heartbeat_timeout_s", 0, "heartbeat_timeout_s"),
    ("heartbeat-negative", "limits.heartbeat_timeout_s", -1, "heartbeat_timeout_s"),
    ("heartbeat-one-second", "limits.heartbeat_timeout_s", 1, "heartbeat_timeout_s"),
    ("max-restarts-negative", "limits.max_restarts", -1, "max_restarts"),
    ("max-hours-zero", "limits.max_hours", 0, "max_hours"),
    ("max-hours-negative", "limits.max_hours", -1, "max_hours"),
    ("max-hours-text", "limits.max_hours", "soon", "max_hours"),
    ("max-price-negative", "resources.max_price_hr", -1, "max_price_hr"),
    ("disk-zero", "resources.disk_gb", 0, "disk_gb"),
    ("gpus-zero", "resources.gpus", 0, "gpus"),
    ("spot-text", "resources.spot", "maybe", "spot"),
    ("preempt-after-negative", "local.preempt_after_s", -1, "preempt_after_s"),
    ("preempt-every-zero", "local.preempt_every_s", 0, "preempt_every_s"),
    ("notice-negative", "local.notice_s", -1, "notice_s"),
    ("local-price-negative", "local.price_hr", -1, "price_hr"),
    ("preempt-clock-unknown", "local.preempt_clock", "wall", "preempt_clock"),
    ("seq-len-zero", "data.max_seq_len", 0, "max_seq_len"),
    ("val-split-one", "data.val_split", 1.0, "val_split"),
    ("format-unknown", "data.format", "csv", "format"),
    ("train-empty", "data.train", "", "data.train"),
    ("train-missing-file", "data.train", "/nonexistent/train.jsonl", "train.jsonl"),
    ("train-missing-key", "data.train", DROP, "data.train"),
    ("name-slash-brackets", "name", "[/]", "name"),
    ("name-space", "name", "my job", "name"),
    ("name-dotdot", "name", "../x", "name"),
    ("name-empty", "name", "", "name"),
    ("name-too-long", "name", "x" * 100, "name"),
    ("name-leading-dash", "name", "-job", "name"),
    ("name-newline", "name", "job\nrm -rf", "name"),
    ("name-unicode", "name", "名前", "name"),
    ("name-shell", "name", "$(reboot)", "name"),
    ("bucket-space", "store.url", "s3://My Bucket/jobs", "bucket"),
    ("bucket-short", "store.url", "s3://ab", "bucket"),
    ("bucket-underscore", "store.url", "s3://bad_bucket", "bucket"),
    ("bucket-dashes", "store.url", "s3://-x-", "bucket"),
    ("bucket-dotdot", "store.url", "s3://a..b", "bucket"),
    ("bucket-upper", "store.url", "s3://MyBucket", "bucket"),
    ("store-scheme", "store.url", "ftp://host/x", "store"),
    ("method-unknown", "method", "qlora4", "method"),
    ("quant-bits-3", "quant_bits", 3, "quant_bits"),
    ("quant-bits-lora", "quant_bits", 4, "quant_bits"),
    ("stage-unknown", "stage", "rl", "stage"),
    ("dpo-beta-zero", "dpo.beta", 0, "beta"),
    ("dpo-beta-negative", "dpo.beta", -1, "beta"),
    ("model-missing", "model", DROP, "model"),
    ("unknown-top-key", "trainig", {"epochs": 1}, "training"),
    ("merge-text", "merge", "perhaps", "merge"),
    ("limits-not-mapping", "limits", [1, 2], "limits"),
]

LONG_LINE = 400  # an error echoes at most a short excerpt of the input


def _raw_files(tmp: Path) -> list[tuple[str, Path, str]]:
    """Hostile or broken files: (case id, path, a word the error must contain)."""
    out = []

    def w(name: str, data: bytes | str, word: str) -> None:
        p = tmp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        out.append((name, p, word))

    good = yaml.safe_dump(BASE).encode()
    w("invalid-utf8.yaml", good + b"\nname: caf\xe9\xff\n", "UTF-8")
    w("latin1.yaml", "name: caf\xe9\n".encode("latin-1") + good, "UTF-8")
    bomb = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    w("alias-bomb.yaml", bomb + "model: *i\n", "alias")
    w("alias-bomb-in-value.yaml", bomb.replace("a: &a", "x: &a") + "model: tiny:reverse\ntraining: {report_to: *e}\n",
      "alias")
    w("syntax.yaml", "model: [unclosed\n", "YAML")
    w("tabs.yaml", "model: tiny:reverse\n\tdata: x\n", "YAML")
    w("top-list.yaml", "- 1\n- 2\n", "mapping")
    w("top-string.yaml", "just a string\n", "mapping")
    w("empty.yaml", "", "model")
    w("bad.json", "{\"model\": ", "JSON")
    w("huge.yaml", b"# " + b"x" * (2 << 20) + b"\n", "bytes")
    w("deep.yaml", "model: " + "[" * 5000 + "]" * 5000 + "\n", "")
    w("big-value.yaml", yaml.safe_dump(_set(BASE, "name", "n" * 200_000)), "name")
    w("nul-bytes.yaml", good + b"\x00\x00", "")
    return out


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from cloudtune import cli

    monkeypatch.setattr(sys, "argv", ["cloudtune", *args])
    monkeypatch.setattr(cli.app, "registered_commands", [])  # main() registers the commands afresh
    monkeypatch.setattr(cli.app, "registered_groups", [])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def _nothing_written(home: Path, store: Path) -> None:
    db = home / "state.db"
    if db.exists() and db.stat().st_size:
        rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        assert rows == 0, "a job row was written for bad input"
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*")), "store objects were written"


def _assert_refused(code: int, out: str, err: str, word: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-1000:]
    assert "Traceback" not in err and len(lines[0]) <= LONG_LINE + 200, lines[0][:500]
    assert word.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case,key,value,word", VALUES, ids=[v[0] for v in VALUES])
def test_bad_spec_value_is_refused_before_anything_is_written(tmp_path, _isolated_home, monkeypatch, capsys,
                                                              case, key, value, word):
    spec = _set(BASE, key, value)
    spec["store"] = {"url": f"file://{tmp_path / 'store'}"} if key != "store.url" else spec["store"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = _run_main(monkeypatch, capsys, "run", str(path), "--yes", "--detach")
    _assert_refused(code, out, err, word)
    _nothing_written(_isolated_home, tmp_path / "store")


def test_bad_files_are_refused(tmp_path, _isolated_home, monkeypatch, capsys):
    """One test for the file-level cases (each is also counted in docs/operations.md)."""
    files = _raw_files(tmp_path)
    for name, path, word in files:
        code, out, err = _run_main(monkeypatch, capsys, "run", str(path), "--yes", "--detach")
        try:
            _assert_refused(code, out, err, word)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        _nothing_written(_isolated_home, tmp_path / "store")
    assert len(files) == 14


CLI_CASES = [
    ("spec-missing", ["run", "/nonexistent/job.yaml", "--yes"], "not found"),
    ("spec-is-a-folder", ["run", "/tmp", "--yes"], "not found"),
    ("provider-unknown", ["run", "{spec}", "--yes", "--provider", "nosuchcloud"], "nosuchcloud"),
    ("gc-provider-unknown", ["gc", "--provider", "nosuchcloud"], "nosuchcloud"),
    ("status-unknown-job", ["status", "nojob123"], "nojob123"),
    ("cost-unknown-job", ["cost", "nojob123"], "nojob123"),
    ("logs-unknown-job", ["logs", "nojob123"], "nojob123"),
    ("stop-unknown-job", ["stop", "nojob123"], "nojob123"),
    ("cost-json-and-csv", ["cost", "--json", "--csv"], "--json"),
]


@pytest.mark.parametrize("case,args,word", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_one_line(tmp_path, _isolated_home, monkeypatch, capsys, case, args, word):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "store": {"url": f"file://{tmp_path / 'store'}"}}))
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    spec_ro = tmp_path / "ro.yaml"
    spec_ro.write_text(yaml.safe_dump({**BASE, "store": {"url": f"file://{blocker}/store"}}))
    argv = [a.format(spec=spec, spec_ro=spec_ro) for a in args]
    code, out, err = _run_main(monkeypatch, capsys, *argv)
    _assert_refused(code, out, err, word)
    _nothing_written(_isolated_home, tmp_path / "store")


def test_scheduler_names_match_transformers():
    """The CLI checks lr_scheduler without importing transformers; the list must be transformers' own."""
    from transformers import SchedulerType

    from cloudtune.spec import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_case_count():
    assert len(VALUES) + 14 + len(CLI_CASES) >= 80, len(VALUES) + 14 + len(CLI_CASES)
