"""The list of CLI command modules. Add yours here (one line) when you add a command group."""

from __future__ import annotations

from cloudtune.cli import jobs_cmd

MODULES: list = [jobs_cmd]
