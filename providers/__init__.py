"""Provider adapters, imported lazily by name so the CLI never pays for an SDK it does not use."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from cloudtune.errors import UserError

# name -> (module, class). The catalog's provider names are these names.
_REGISTRY: dict[str, tuple[str, str]] = {
    "local": ("cloudtune.providers.local", "LocalProvider"),
    "aws": ("cloudtune.providers.aws", "AWSProvider"),
    "runpod": ("cloudtune.providers.runpod", "RunPodProvider"),
    "vast": ("cloudtune.providers.vast", "VastProvider"),
    "lambda": ("cloudtune.providers.lambdalabs", "LambdaProvider"),
    "modal": ("cloudtune.providers.modal", "ModalProvider"),
    # a launch route, not a catalog: multi-node options of aws/lambda run as SkyPilot clusters
    "skypilot": ("cloudtune.providers.skypilot", "SkyPilotProvider"),
}

KNOWN_PROVIDERS: tuple[str, ...] = tuple(_REGISTRY)
# Providers with catalog offers of their own (skypilot launches other providers' offers).
CLOUD_PROVIDERS: tuple[str, ...] = tuple(p for p in _REGISTRY if p not in ("local", "skypilot"))


def check_provider_name(name: str) -> str:
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, KNOWN_PROVIDERS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"unknown provider {name!r}; {hint}known providers: {', '.join(KNOWN_PROVIDERS)}")
    return name


def get_provider(name: str, **config: Any):
    """Instantiate the adapter for `name`. Raises UserError for an unknown or unavailable provider."""
    check_provider_name(name)
    module_name, cls_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("cloudtune.providers"):
            raise UserError(f"provider {name!r} is not available in this build of cloudtune") from None
        raise UserError(
            f"provider {name!r} needs the package {err.name!r}; install it with: pip install 'cloudtune[{name}]'"
        ) from None
    return getattr(module, cls_name)(**config)
