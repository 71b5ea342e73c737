"""The list of CLI command modules. Add yours here (one line) when you add a command group."""

from __future__ import annotations

from cloudtune.cli import (
    catalog_cmd,
    check_cmd,
    controller_cmd,
    export_cmd,
    jobs_cmd,
    models_cmd,
    plan_cmd,
    pull_cmd,
)

MODULES: list = [plan_cmd, jobs_cmd, catalog_cmd, models_cmd, export_cmd, controller_cmd, check_cmd, pull_cmd]
