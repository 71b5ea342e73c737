"""`cloudtune run` refuses family and template problems as bad input before anything is created.

The tokenizer and config.json of a local model folder are on this machine, so `cloudtune run`'s
validation renders the data through the real chat template and applies the family rules: exit 2,
one line naming file:line (or the spec field) and the fix, no job, no store object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _families import build_all

from tests._run_util import cli, cli_env


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory)


def _job(tmp: Path, model: Path, rows: list[dict], **training) -> Path:
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"model": str(model), "method": "lora", "data": {"train": str(data), "max_seq_len": 128},
            "training": {"max_steps": 2, **training}, "store": {"url": f"file://{tmp / 'store'}"}}
    path = tmp / "job.json"
    path.write_text(json.dumps(spec))
    return path


OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
SYSTEM = {"messages": [{"role": "system", "content": "be brief"}, *OK["messages"]]}


@pytest.mark.parametrize("family,rows,training,needles", [
    ("mistral", [OK, OK, SYSTEM], {}, ["chat.jsonl:3:", "refuses this conversation", "accepts no system turn"]),
    ("gemma2", [OK], {"attention": "sdpa"}, ["training.attention: sdpa", "set training.attention: eager"]),
])
def test_run_refuses_before_renting(family_dirs, tmp_path: Path, family, rows, training, needles):
    env = cli_env(tmp_path / "home")
    out = cli(env, "run", str(_job(tmp_path, family_dirs[family], rows, **training)), "--yes")
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "home" / "state.db").exists() or "[]" in cli(env, "status", "--json").stdout


def test_gemma2_defaults_to_eager(family_dirs, tmp_path: Path):
    """Without training.attention, Gemma2 gets eager: validation notes it and the trainer loads."""
    from cloudtune.spec import load_spec
    from cloudtune.trainer.data import validate_data

    summary = validate_data(load_spec(_job(tmp_path, family_dirs["gemma2"], [OK])))
    assert any("gemma2: training.attention eager" in n for n in summary.notes), summary.notes


def test_trainer_refuses_on_the_machine_too(family_dirs, tmp_path: Path, monkeypatch):
    """The trainer repeats the template check (for tokenizers only the machine has): exit 2, FAILED.json."""
    from cloudtune.trainer import contract
    from cloudtune.trainer.cli import main

    monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", "")
    rc = main(["--spec", str(_job(tmp_path, family_dirs["gemma2"], [OK, SYSTEM])), "--job-id", "bad"])
    assert rc == contract.EXIT_BAD_INPUT
    failed = json.loads((tmp_path / "store" / "bad" / "FAILED.json").read_text())
    assert "chat.jsonl:2: the chat template of" in json.dumps(failed) and "system" in json.dumps(failed), failed
    assert not (tmp_path / "store" / "bad" / "checkpoints").exists()


def test_run_reports_rows_cut_at_max_seq_len(family_dirs, tmp_path: Path):
    long = {"messages": [{"role": "user", "content": "abcd " * 60}, {"role": "assistant", "content": "yo"}]}
    env = cli_env(tmp_path / "home")
    spec = _job(tmp_path, family_dirs["qwen2"], [OK, long, OK])
    out = cli(env, "run", str(spec), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "data: " in out.stdout + out.stderr and "1 of 3 rows are longer than data.max_seq_len 128" in \
        (out.stdout + out.stderr).replace("\n", " "), out.stdout + out.stderr


def test_hub_model_in_the_local_cache_is_rendered_too(family_dirs, tmp_path: Path):
    """A hub id whose tokenizer is in the Hugging Face cache (laid out as huggingface_hub writes it)
    is checked at validation like a local folder; offline, nothing is downloaded."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--mistralai--Mistral-tiny"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(family_dirs["mistral"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    spec = _job(tmp_path, Path("mistralai/Mistral-tiny"), [OK, SYSTEM])
    code = ("from cloudtune.spec import load_spec; from cloudtune.trainer.data import validate_data;"
            f"validate_data(load_spec({str(spec)!r}))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "chat.jsonl:2: the chat template of mistralai/Mistral-tiny refuses" in out.stderr, \
        out.stderr[-2000:]
