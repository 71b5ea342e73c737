"""`cloudtune run/status/stop/logs` on bad input: one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._run_util import cli, cli_env, quickstart_spec


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path / "home")


def _nothing_written(tmp: Path, env) -> None:
    home = Path(env["CLOUDTUNE_HOME"])
    store = tmp / "store"
    assert not store.exists() or not any(store.iterdir()), list(store.iterdir())
    if (home / "state.db").exists():
        out = cli(env, "status", "--json")
        assert out.stdout.strip() == "[]"


def _one_line_error(out, *needles: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_malformed_yaml_names_line_and_column(tmp_path, env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny:reverse\ndata:\n  train: [unclosed\n")
    _one_line_error(cli(env, "run", str(bad), "--yes"), "malformed YAML", "line 4")
    _nothing_written(tmp_path, env)


def test_unknown_key_suggests_the_nearest(tmp_path, env):
    spec = quickstart_spec(tmp_path, "typo", training={"max_stpes": 3})
    _one_line_error(cli(env, "run", str(spec), "--yes"), "training.max_stpes", "max_steps")
    _nothing_written(tmp_path, env)


def test_missing_dataset(tmp_path, env):
    spec = quickstart_spec(tmp_path, "nodata", data={"train": str(tmp_path / "nope.jsonl")})
    _one_line_error(cli(env, "run", str(spec), "--yes"), "nope.jsonl")
    _nothing_written(tmp_path, env)


def test_budget_already_exceeded(tmp_path, env):
    spec = quickstart_spec(tmp_path, "broke", local={"price_hr": 10.0}, limits={"max_cost_usd": 0})
    _one_line_error(cli(env, "run", str(spec), "--yes"), "max_cost_usd")
    _nothing_written(tmp_path, env)


def test_paid_job_without_tty_needs_yes(tmp_path, env):
    spec = quickstart_spec(tmp_path, "paid", local={"price_hr": 1.0})
    _one_line_error(cli(env, "run", str(spec)), "--yes")
    _nothing_written(tmp_path, env)


def test_unknown_provider(tmp_path, env):
    spec = quickstart_spec(tmp_path, "prov")
    _one_line_error(cli(env, "run", str(spec), "--provider", "locl", "--yes"), "'locl'", "did you mean 'local'")


def test_unknown_job_id(env):
    for cmd in (["status", "zzzzzzzz"], ["stop", "zzzzzzzz"], ["logs", "zzzzzzzz"], ["cost", "zzzzzzzz"]):
        _one_line_error(cli(env, *cmd), "no job with id 'zzzzzzzz'")


def test_dry_run_launches_nothing_and_redacts_secrets(tmp_path, env):
    spec = quickstart_spec(tmp_path, "dry")
    out = cli({**env, "HF_TOKEN": "hf_supersecret"}, "run", str(spec), "--dry-run", "--json", "--provider", "local")
    assert out.returncode == 0, out.stderr
    import json

    plan = json.loads(out.stdout)
    assert plan["plan"][0]["offer"]["provider"] == "local"
    launch = plan["launch"][0]
    assert launch["command"][-2:] == ["-m", "cloudtune.trainer.launch"]
    assert "hf_supersecret" not in out.stdout + out.stderr
    _nothing_written(tmp_path, env)


@pytest.mark.parametrize("name", ["quickstart", "llama8b-qlora", "llama70b-qlora", "dpo"])
def test_example_specs_are_valid(name):
    from cloudtune.spec import load_spec
    from tests._run_util import ROOT

    spec = load_spec(ROOT / "examples" / f"{name}.yaml")
    assert spec.name and spec.limits.max_restarts >= 1
    if name == "quickstart":
        assert spec.model == "tiny:reverse" and (spec.resources.provider or "local") == "local"
        assert Path(spec.data.train).is_file()
