"""The list of CLI command modules. Add yours here (one line) when you add a command group."""

from __future__ import annotations

MODULES: list = []
