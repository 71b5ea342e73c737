"""The serverless controller on Modal: a scheduled Function that runs `controller.control()`.

Why Modal: a Function on `modal.Period(minutes=1)` costs nothing between invocations (no VM that
bills around the clock, as SkyPilot's controller does; no server to keep up, as dstack's), and
cloudtune already speaks Modal. Each invocation ticks the jobs handed to it for about 50 s and
returns; the on-machine guards hold the machines in between.

Secrets: the provider keys and store credentials the controller needs are put in a Modal Secret
(`cloudtune-controller` by default) by `controller deploy`, from environment variables the user
names; they never appear in a spec, in the App definition or in output.

The SDK surface used here (App, Image, Period, Secret, App.deploy/lookup/stop, Secret.objects) is
small on purpose: tests build the App for real with the installed `modal` and drive deploy, status
and remove through a fake client whose methods' signatures are checked against the SDK's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

APP_NAME = "cloudtune-controller"
SECRET_NAME = "cloudtune-controller"
TICK_SECONDS = 50  # of each per-minute invocation
FUNCTION_TIMEOUT_S = 120
# What the controller itself always needs, when set in the deploying environment.
DEFAULT_SECRET_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
    "RUNPOD_API_KEY", "VAST_API_KEY", "LAMBDA_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET",
)


@dataclass(frozen=True)
class Deployment:
    store_url: str
    store_endpoint: str | None = None
    app_name: str = APP_NAME
    secret_name: str = SECRET_NAME

    def to_dict(self) -> dict[str, Any]:
        return {"on": "modal", "store_url": self.store_url, "store_endpoint": self.store_endpoint,
                "app_name": self.app_name, "secret_name": self.secret_name}


def secret_values(names: tuple[str, ...] | list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: env[k] for k in names if env.get(k)}


def _providers_dir() -> tuple[Path, Path]:
    """(cloudtune's package dir, cloudtune.providers' dir): in an editable install they are apart."""
    import cloudtune
    import cloudtune.providers

    return Path(cloudtune.__file__).parent, Path(cloudtune.providers.__file__).parent


def build_app(dep: Deployment) -> Any:
    """The modal.App of the controller, built with the real SDK (no network)."""
    return define_app(dep)[0]


def define_app(dep: Deployment) -> tuple[Any, Any]:
    """(the modal.App, its scheduled `tick` modal.Function): the function handle comes from the
    decorator itself (App.registered_functions is deprecated, to go in modal 1.7)."""
    import modal

    pkg, providers = _providers_dir()
    image = (
        modal.Image.debian_slim(python_version="3.11")
        .pip_install("typer>=0.26,<0.29", "rich>=13.7", "pydantic>=2.6", "pyyaml>=6.0", "httpx>=0.27",
                     "tenacity>=8.2", "psutil>=5.9", "boto3>=1.34", "modal>=1.0")
        .add_local_python_source("cloudtune")
    )
    if providers.parent != pkg:  # editable install: providers/ sits beside the package
        image = image.add_local_dir(providers, "/root/cloudtune/providers")
    app = modal.App(dep.app_name, tags={"cloudtune": "controller"})
    store_url, endpoint, holder = dep.store_url, dep.store_endpoint, f"controller:modal/{dep.app_name}:0:scheduled"

    def tick() -> list[dict[str, Any]]:
        from cloudtune.run.controller import control
        from cloudtune.store import open_store

        reports = control(open_store(store_url, endpoint_url=endpoint), holder=holder, seconds=TICK_SECONDS)
        return [r.to_dict() for r in reports]

    fn = app.function(
        image=image,
        schedule=modal.Period(minutes=1),
        secrets=[modal.Secret.from_name(dep.secret_name)],
        timeout=FUNCTION_TIMEOUT_S,
        max_containers=1,  # invocations never overlap on one job
        env={"CLOUDTUNE_HOME": "/tmp/cloudtune"},
        serialized=True,
        name="tick",
    )(tick)
    return app, fn


class ControllerClient(Protocol):
    """What `controller deploy/status/remove` need from Modal (the SDK, or the tests' fake)."""

    def put_secret(self, name: str, env_dict: dict[str, str]) -> None: ...

    def deploy(self, app: Any, name: str) -> str: ...

    def deployed(self, name: str) -> bool: ...

    def stop(self, name: str) -> None: ...


class SdkControllerClient:
    """The real SDK calls. Each maps to one documented call; errors come back as they are."""

    def put_secret(self, name: str, env_dict: dict[str, str]) -> None:
        import modal

        modal.Secret.objects.delete(name, allow_missing=True)
        modal.Secret.objects.create(name, env_dict)

    def deploy(self, app: Any, name: str) -> str:
        app.deploy(name=name)
        return app.app_id or name

    def deployed(self, name: str) -> bool:
        import modal

        try:
            modal.App.lookup(name, create_if_missing=False)
        except modal.exception.NotFoundError:
            return False
        return True

    def stop(self, name: str) -> None:
        import modal

        modal.App.lookup(name, create_if_missing=False).stop()


def deploy(dep: Deployment, client: ControllerClient, secret_env: dict[str, str]) -> str:
    client.put_secret(dep.secret_name, secret_env)
    return client.deploy(build_app(dep), dep.app_name)
