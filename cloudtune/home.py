"""Where cloudtune keeps its local state: $CLOUDTUNE_HOME, default ~/.cloudtune."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("CLOUDTUNE_HOME") or Path.home() / ".cloudtune").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_store_url() -> str:
    return f"file://{home() / 'store'}"


def cache_dir() -> Path:
    path = home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
