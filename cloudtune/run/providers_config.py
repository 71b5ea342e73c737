"""How the orchestrator constructs a provider adapter: `get_provider(name, **config)`.

Why configurable: tests and provider fakes point an adapter at a local HTTP endpoint, and a user may
pin a region or an account. The config is read at construction time, in whichever process builds
the provider (the CLI, the detached watchdog, `status`, `gc`), so all of them agree:

1. `$CLOUDTUNE_HOME/providers.yaml` (or the file named by `$CLOUDTUNE_PROVIDERS_FILE`):
       runpod: {base_url: "http://127.0.0.1:8123"}
       aws: {region: us-east-1}
2. `$CLOUDTUNE_PROVIDER_CONFIG`: the same mapping as JSON (wins over the file, key by key).

Credentials never go here: adapters read them from their own environment variables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError

ENV_FILE = "CLOUDTUNE_PROVIDERS_FILE"
ENV_JSON = "CLOUDTUNE_PROVIDER_CONFIG"


def _file_config() -> dict[str, Any]:
    from cloudtune.home import home

    path = Path(os.environ.get(ENV_FILE) or home() / "providers.yaml")
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: malformed YAML ({err}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of provider name -> options")
    return data


def provider_config(name: str) -> dict[str, Any]:
    cfg = dict(_file_config().get(name) or {})
    raw = os.environ.get(ENV_JSON)
    if raw:
        try:
            cfg.update((json.loads(raw) or {}).get(name) or {})
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"${ENV_JSON} is not a JSON object of provider name -> options") from None
    return cfg


def make_provider(name: str):
    from cloudtune.providers import get_provider

    return get_provider(name, **provider_config(name))
