"""Provider (and GPU, region, exclude, secret-name) lists read the same on every command (#14 item 3):
`-p runpod -p vast` and `-p runpod,vast` mean the same thing; an unknown name is one line naming the
known ones, exit 2, no traceback; the help says "repeatable or comma-separated".

Real CLI processes (the one-line error and the exit code live in `cloudtune.cli.main`), the bundled
catalog, no credentials and no network: every command here stops before any provider request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cli(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_TOKEN_ID", "_TOKEN_SECRET"))}
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, "CLOUDTUNE_HOME": str(tmp / "home"), **env}, timeout=120)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lists", "model": "8b", "method": "qlora",
        "data": {"train": str(ROOT / "examples" / "data" / "reverse.jsonl"), "max_seq_len": 1024},
        "store": {"url": "s3://lists-bucket/jobs"}}))
    return path


def test_run_dry_run_takes_repeated_and_comma_separated_providers_alike(tmp_path, spec):
    runs = {}
    for form in (["-p", "runpod", "-p", "vast"], ["-p", "runpod,vast"], ["-p", "runpod, vast", "-p", "vast"]):
        proc = _cli(tmp_path, "run", str(spec), *form, "--dry-run", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[" ".join(form)] = json.loads(proc.stdout)["plan"]
    first, *rest = runs.values()
    assert all(r == first for r in rest)  # the same options in the same order
    assert {o["offer"]["provider"] for o in first} == {"runpod", "vast"}


def test_plan_takes_both_forms_for_providers_gpus_regions_and_excludes(tmp_path):
    a = _cli(tmp_path, "plan", "-m", "8b", "--method", "qlora", "-p", "runpod", "-p", "vast", "-p", "aws",
             "--exclude", "aws", "-g", "a100", "-g", "h100", "--region", "us", "--region", "eu", "--json")
    b = _cli(tmp_path, "plan", "-m", "8b", "--method", "qlora", "-p", "runpod,vast,aws", "--exclude", "aws",
             "-g", "a100,h100", "--region", "us,eu", "--json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["options"] == jb["options"] and ja["options"]
    assert {o["provider"] for o in ja["options"]} <= {"runpod", "vast"}


def test_check_without_spec_reports_exactly_the_listed_providers(tmp_path):
    for form in (["-p", "runpod", "-p", "vast"], ["-p", "runpod,vast"]):
        proc = _cli(tmp_path, "check", *form)
        assert proc.returncode == 2, proc.stdout + proc.stderr  # no keys here: both not ready
        heads = [line.split(":")[0] for line in proc.stdout.splitlines() if not line.startswith(" ")]
        assert heads == ["runpod", "vast"], proc.stdout


def test_gc_and_catalog_refresh_take_both_forms(tmp_path):
    gc = _cli(tmp_path, "gc", "-p", "runpod,vast", "-p", "lambda", "--json")
    assert gc.returncode == 0, gc.stderr
    assert set(json.loads(gc.stdout)["skipped"]) == {"runpod", "vast", "lambda"}  # no keys: skipped, by name
    ref = _cli(tmp_path, "catalog", "refresh", "-p", "runpod,vast", "--json")
    assert ref.returncode == 1, ref.stderr  # none could be refreshed without keys
    assert [r["provider"] for r in json.loads(ref.stdout)] == ["runpod", "vast"]


def test_controller_secret_env_takes_both_forms(tmp_path):
    proc = _cli(tmp_path, "controller", "deploy", "--store", "s3://b/jobs", "--secret-env", "CT_NOT_SET_A",
                "--secret-env", "CT_NOT_SET_B,CT_NOT_SET_C", MODAL_TOKEN_ID="ak-fake", MODAL_TOKEN_SECRET="as-fake")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--secret-env names CT_NOT_SET_A, CT_NOT_SET_B, CT_NOT_SET_C, which are not set" in proc.stderr


UNKNOWN = [
    ("run", "{spec}", "-p", "runpod,nosuchcloud", "--dry-run"),
    ("check", "-p", "runpod", "-p", "nosuchcloud"),
    ("check", "{spec}", "-p", "nosuchcloud"),
    ("gc", "-p", "runpod,nosuchcloud"),
    ("plan", "-m", "8b", "-p", "runpod,nosuchcloud"),
    ("plan", "-m", "8b", "--exclude", "nosuchcloud"),
    ("plan", "{spec}", "-p", "nosuchcloud"),
    ("catalog", "show", "-p", "vast,nosuchcloud"),
    ("catalog", "refresh", "-p", "vast,nosuchcloud"),
]


@pytest.mark.parametrize("args", UNKNOWN, ids=lambda a: " ".join(a[:2]))
def test_an_unknown_provider_is_one_line_listing_the_known_ones(tmp_path, spec, args):
    proc = _cli(tmp_path, *[a.format(spec=spec) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown provider 'nosuchcloud'" in lines[0] and "known providers: " in lines[0]
    assert "runpod" in lines[0].split("known providers: ")[1]
    assert not (tmp_path / "home" / "state.db").exists()  # nothing written


@pytest.mark.parametrize("command", [("run",), ("check",), ("gc",), ("plan",), ("catalog", "show"),
                                     ("catalog", "refresh")])
def test_the_help_says_repeatable_or_comma_separated(tmp_path, command):
    proc = _cli(tmp_path, *command, "--help", COLUMNS="400")
    assert proc.returncode == 0, proc.stderr
    provider_help = [line for line in proc.stdout.splitlines() if "--provider" in line]
    assert provider_help and "repeatable or comma-separated" in " ".join(provider_help), proc.stdout


def test_plan_with_a_spec_refuses_the_filters_it_would_ignore(tmp_path, spec):
    """`plan SPEC` plans what `run SPEC` runs; a --gpu/--region/--exclude there was silently dropped."""
    proc = _cli(tmp_path, "plan", str(spec), "-g", "h100", "--exclude", "aws")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--exclude, --gpu applies to plans without a SPEC" in proc.stderr
    ok = _cli(tmp_path, "plan", str(spec), "-p", "runpod", "-p", "vast", "--top", "0", "--json")
    assert ok.returncode == 0, ok.stderr
    assert {o["provider"] for o in json.loads(ok.stdout)["options"]} == {"runpod", "vast"}
