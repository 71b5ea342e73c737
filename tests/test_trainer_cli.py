"""`python -m cloudtune.trainer`: where the spec comes from, and every bad input's one clear line."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from _trainer_util import ROOT, tiny_spec, write_spec

from cloudtune.trainer import contract
from cloudtune.trainer.cli import main


def _failed(tmp: Path, job: str) -> dict:
    return json.loads((tmp / "store" / job / "FAILED.json").read_text())


def test_no_spec_is_one_line_exit_2(monkeypatch, capsys):
    for var in ("CLOUDTUNE_SPEC", "CLOUDTUNE_SPEC_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main([]) == contract.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no job spec: pass --spec job.yaml") and "Traceback" not in "".join(err)


def test_malformed_record_fails_before_any_model_is_loaded(tmp_path: Path, _isolated_home: Path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outptu": "b"}\n')
    spec = tiny_spec(tmp_path, data={"train": str(data)})
    assert main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "bad"]) == contract.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"error: {data}:2: field 'output' is missing" in err and "Traceback" not in err
    failed = _failed(tmp_path, "bad")
    assert failed["kind"] == "bad_input" and failed["exit_code"] == 2 and ":2: field 'output'" in failed["reason"]
    assert json.loads((tmp_path / "store" / "bad" / "heartbeat.json").read_text())["phase"] == "failed"
    assert not (_isolated_home / "cache" / "tiny").exists()  # no model was built or loaded
    assert not (tmp_path / "store" / "bad" / "checkpoints").exists()


def test_bad_model_ref_and_targets(tmp_path: Path, capsys):
    spec = tiny_spec(tmp_path, model="tiny:nope")
    assert main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "m"]) == contract.EXIT_BAD_INPUT
    assert "unknown tiny model 'tiny:nope'" in _failed(tmp_path, "m")["reason"]
    spec = tiny_spec(tmp_path, model=str(tmp_path))
    assert main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "m2"]) == contract.EXIT_BAD_INPUT
    assert "has no config.json" in _failed(tmp_path, "m2")["reason"]
    spec = tiny_spec(tmp_path, lora={"targets": ["q_proj", "qkv"]})
    assert main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "t"]) == contract.EXIT_BAD_INPUT
    reason = _failed(tmp_path, "t")["reason"]
    assert "lora.targets ['qkv'] match no module of llama; available:" in reason and "v_proj" in reason
    assert "Traceback" not in capsys.readouterr().err


def test_invalid_spec_from_env(monkeypatch, capsys):
    monkeypatch.setenv("CLOUDTUNE_SPEC", json.dumps({"model": "x", "data": {"train": "a.jsonl"}, "methd": "lora"}))
    assert main([]) == contract.EXIT_BAD_INPUT
    assert "unknown key 'methd' (did you mean 'method'?)" in capsys.readouterr().err
    monkeypatch.setenv("CLOUDTUNE_SPEC", "b64:!!!")
    assert main([]) == contract.EXIT_BAD_INPUT
    assert "not valid base64" in capsys.readouterr().err


def test_spec_from_env_b64_and_store_url(tmp_path: Path, monkeypatch, capsys):
    spec = tiny_spec(tmp_path)
    monkeypatch.setenv("CLOUDTUNE_SPEC", "b64:" + base64.b64encode(json.dumps(spec).encode()).decode())
    assert main(["--validate-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "alpaca" and out["records"] == 300
    monkeypatch.delenv("CLOUDTUNE_SPEC")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setenv("CLOUDTUNE_SPEC_URL", f"file://{tmp_path}/s/spec.json")
    assert main(["--validate-only"]) == 0
    monkeypatch.setenv("CLOUDTUNE_SPEC_URL", f"file://{tmp_path}/s/nope.json")
    assert main(["--validate-only"]) == contract.EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_done_job_is_not_rerun(tmp_path: Path):
    spec = tiny_spec(tmp_path)
    (tmp_path / "store" / "d").mkdir(parents=True)
    (tmp_path / "store" / "d" / "DONE.json").write_text("{}")
    assert main(["--spec", str(write_spec(tmp_path, spec)), "--job-id", "d"]) == contract.EXIT_DONE
    assert not (tmp_path / "store" / "d" / "checkpoints").exists()


def test_module_help_is_fast_and_light():
    code = "import sys, cloudtune.trainer.cli; assert 'torch' not in sys.modules and 'boto3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    out = subprocess.run([sys.executable, "-m", "cloudtune.trainer", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--spec" in out and "--job-id" in out and "--store" in out
