"""`cloudtune plan` stays fast: it imports only what planning and rendering need (bench/plan_latency.py
measures the time; these tests hold the import discipline that keeps it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
sys.argv = ["cloudtune", *sys.argv[1:]]
from cloudtune.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def _modules(*args: str) -> tuple[str, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "120"})
    mods = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    return proc.stdout, mods


def test_plan_registers_only_its_own_command_and_imports_nothing_heavy():
    for extra in ((), ("--json",)):
        out, mods = _modules("plan", "--model", "70b", "--method", "qlora", *extra)
        assert "choice" in out  # the full output is still there (table: "choice:", JSON: "choice")
        other_commands = {"cloudtune.cli.jobs_cmd", "cloudtune.cli.catalog_cmd", "cloudtune.cli.models_cmd",
                          "cloudtune.cli.commands", "cloudtune.run.orchestrator", "cloudtune.spec"}
        assert not mods & other_commands, mods & other_commands
        assert not {m for m in mods if m.split(".")[0] in ("torch", "boto3", "botocore", "httpx", "transformers",
                                                                    "pydantic")}
    assert "rich.table" not in mods  # --json renders no table


def test_help_still_lists_every_command():
    out, mods = _modules("--help")
    for command in ("plan", "run", "status", "logs", "stop", "cost", "gc", "catalog", "models"):
        assert f" {command} " in out, command
    assert "cloudtune.cli.jobs_cmd" in mods
