"""What cloudtune asks Modal to run, as plain data, and its translation into Modal SDK objects.

Why split: the definition (GPU string, timeout, command, env, secrets, tags) is decided without the
network and without the SDK, so `--dry-run` and tests can show and check it exactly; only
`sandbox_kwargs` touches `modal`, and only to build objects (Image, Secret), which the SDK
does lazily and offline. The network is reached only by the client (providers/modal.py).

One attempt = one Modal Sandbox running the trainer container's command. A Sandbox lives at most
24 h; longer jobs are chained attempts that resume from the store's LATEST checkpoint. The command
is wrapped in coreutils `timeout` so the trainer gets SIGTERM (checkpoint, exit 75) a margin before
Modal's hard kill, and Modal's own preemption signal (SIGINT) is relayed to the trainer by
`timeout` the same way.

The store must be one both sides reach (S3 or S3-compatible): the orchestrator on this machine
reads heartbeat, LATEST and DONE from it. A Modal Volume store is not offered for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudtune.providers.base import InvalidRequestError, LaunchRequest, machine_tags
from cloudtune.providers.modal_pricing import CPU_PER_GPU, MEMORY_GIB_PER_GPU, cpu_memory_usd_per_hour  # noqa: F401

from cloudtune.errors import UserError

APP_NAME = "cloudtune"
MAX_TIMEOUT_S = 24 * 3600  # Modal: a Sandbox (and a Function attempt) lasts at most 24 h
SOFT_STOP_MARGIN_S = 600  # SIGTERM the trainer this long before the hard limit, to checkpoint
KILL_AFTER_S = 120  # then SIGKILL if it has not exited
MIN_TIMEOUT_S = 3  # tests chain attempts of a few seconds; production uses hours

TAG_MANAGED = "cloudtune:managed"
TAG_CAP = "cloudtune:cap"  # "attempt-limit": timeout is the per-attempt limit (chain); "job": the job's cap

# The catalog's normalised GPU names -> Modal's `gpu=` strings (modal.com/docs/guide/gpu).
MODAL_GPU: dict[str, str] = {
    "T4": "T4",
    "L4": "L4",
    "A10": "A10",
    "L40S": "L40S",
    "A100-40GB": "A100-40GB",
    "A100-80GB": "A100-80GB",
    "H100-SXM": "H100",
    "H100-80GB": "H100",
    "H200": "H200",
    "B200": "B200",
    "RTXPRO6000": "RTX-PRO-6000",
}
MAX_GPU_COUNT: dict[str, int] = {"A10": 4, "RTXPRO6000": 1}
DEFAULT_MAX_GPU_COUNT = 8

# CPU and memory requested per GPU, and their price: providers/modal_pricing.py (stdlib only, for the catalog).


class ModalConfigError(InvalidRequestError, UserError):
    """A request Modal cannot run as asked (GPU, store, lifetime, image). Also a UserError, so
    `cloudtune run --dry-run` prints it as one line; the orchestrator sees an InvalidRequestError."""


def modal_gpu(gpu: str, count: int) -> str:
    """`H100:8`-style string for Modal, or InvalidRequestError naming what Modal offers."""
    base = MODAL_GPU.get(gpu)
    if base is None:
        raise ModalConfigError(
            f"modal: GPU {gpu!r} is not offered on Modal; Modal has {', '.join(sorted(MODAL_GPU))}", provider="modal"
        )
    cap = MAX_GPU_COUNT.get(gpu, DEFAULT_MAX_GPU_COUNT)
    if not 1 <= count <= cap:
        raise ModalConfigError(f"modal: {count}x {gpu} is not possible; Modal allows 1..{cap}", provider="modal")
    return base if count == 1 else f"{base}:{count}"


@dataclass(frozen=True)
class ImageDefinition:
    """`registry`: the published trainer image; `build`: built by Modal from a requirements file."""

    kind: str
    ref: str  # registry tag, or the requirements file for `build`
    python: str = "3.11"
    registry_secret: str | None = None  # name of a Modal secret with REGISTRY_USERNAME/PASSWORD

    def describe(self) -> str:
        if self.kind == "registry":
            return f"modal.Image.from_registry({self.ref!r})"
        return (
            f"modal.Image.debian_slim(python_version={self.python!r}).pip_install_from_requirements({self.ref!r})"
            ".add_local_python_source('cloudtune')"
        )


@dataclass(frozen=True)
class SandboxDefinition:
    app_name: str
    name: str
    command: tuple[str, ...]
    image: ImageDefinition
    gpu: str
    timeout_s: int
    cpu: float
    memory_mib: int
    env: dict[str, str]  # not secret: passed as env=
    secret_keys: tuple[str, ...]  # passed as an ephemeral modal.Secret.from_dict
    secret_names: tuple[str, ...] = ()  # pre-created Modal secrets (modal.Secret.from_name)
    tags: dict[str, str] = field(default_factory=dict)
    region: str | None = None
    workdir: str | None = None

    def describe(self) -> dict[str, Any]:
        """What `modal.Sandbox.create` receives, secrets shown by name only."""
        out: dict[str, Any] = {
            "call": "modal.Sandbox.create",
            "app": f"modal.App.lookup({self.app_name!r}, create_if_missing=True)",
            "args": list(self.command),
            "name": self.name,
            "tags": dict(self.tags),
            "image": self.image.describe(),
            "gpu": self.gpu,
            "timeout": self.timeout_s,
            "cpu": self.cpu,
            "memory": self.memory_mib,
            "env": dict(self.env),
            "secrets": [f"modal.Secret.from_dict({{{', '.join(f'{k!r}: ***' for k in self.secret_keys)}}})"]
            + [f"modal.Secret.from_name({n!r})" for n in self.secret_names],
        }
        if self.region:
            out["region"] = self.region
        if self.workdir:
            out["workdir"] = self.workdir
        return out


def stop_margins(timeout_s: int) -> tuple[int, int]:
    """(seconds before the hard limit to send SIGTERM, seconds after that to SIGKILL)."""
    margin = min(SOFT_STOP_MARGIN_S, max(2, timeout_s // 6))
    kill_after = min(KILL_AFTER_S, max(1, margin // 2))
    return margin, kill_after


def wrap_command(command: list[str], timeout_s: int) -> tuple[str, ...]:
    """`timeout` sends SIGTERM a margin before Modal's hard kill and relays SIGINT (preemption)."""
    margin, kill_after = stop_margins(timeout_s)
    return (
        "timeout",
        "--preserve-status",
        "--signal=TERM",
        f"--kill-after={kill_after}s",
        f"{timeout_s - margin}s",
        *command,
    )


def build_definition(
    req: LaunchRequest,
    *,
    app_name: str = APP_NAME,
    image_requirements: str | None = None,
    registry_secret: str | None = None,
    secret_names: tuple[str, ...] = (),
    region: str | None = None,
    attempt_limit_s: int = MAX_TIMEOUT_S,
) -> SandboxDefinition:
    """The Sandbox for one attempt. Offline and SDK-free.

    The timeout is the job's lifetime cap or the per-attempt limit (Modal's 24 h, or shorter if
    configured), whichever is smaller; the tag TAG_CAP records which, so a timed-out attempt is
    told apart: the attempt limit means "chain the next attempt", the job's cap means "stop".
    """
    if req.spot:
        raise ModalConfigError("modal has no spot tier (every GPU sandbox may be preempted); launch on-demand",
                                  provider="modal")
    gpu = modal_gpu(req.offer.gpu, req.offer.gpu_count)
    if not MIN_TIMEOUT_S <= attempt_limit_s <= MAX_TIMEOUT_S:
        raise ModalConfigError(
            f"modal: attempt_limit_s={attempt_limit_s} is outside {MIN_TIMEOUT_S}..{MAX_TIMEOUT_S} (Modal's 24 h)",
            provider="modal",
        )
    job_cap = int(req.max_lifetime_s) if req.max_lifetime_s else None
    cap = min(job_cap, attempt_limit_s) if job_cap else attempt_limit_s
    if cap < MIN_TIMEOUT_S:
        raise ModalConfigError(f"modal: max lifetime {cap}s is too short; at least {MIN_TIMEOUT_S}s",
                                  provider="modal")
    env = dict(req.env)
    store = env.get("CLOUDTUNE_STORE", "")
    if store.startswith("file://") or (store and "://" not in store):
        raise ModalConfigError(
            f"modal: the store {store!r} is on this machine and a Modal sandbox cannot reach it; "
            "use an s3:// store (spec store.url) that both this machine and Modal can reach",
            provider="modal",
        )
    if image_requirements:
        if not Path(image_requirements).is_file():
            raise ModalConfigError(f"modal: image_requirements file {image_requirements!r} does not exist",
                                      provider="modal")
        image = ImageDefinition("build", str(image_requirements))
    else:
        image = ImageDefinition("registry", req.image, registry_secret=registry_secret)
    tags = {**machine_tags(req.job_id, req.attempt), TAG_MANAGED: "true",
            TAG_CAP: "job" if job_cap is not None and job_cap < attempt_limit_s else "attempt-limit"}
    return SandboxDefinition(
        app_name=app_name,
        name=req.name,
        command=wrap_command(req.command, cap),
        image=image,
        gpu=gpu,
        timeout_s=cap,
        cpu=CPU_PER_GPU * req.offer.gpu_count,
        memory_mib=MEMORY_GIB_PER_GPU * 1024 * req.offer.gpu_count,
        env=env,
        secret_keys=tuple(sorted(req.secret_env)),
        secret_names=tuple(secret_names),
        tags=tags,
        region=region,
        workdir=req.workdir,
    )


def build_image(image: ImageDefinition) -> Any:
    import modal

    if image.kind == "registry":
        secret = modal.Secret.from_name(image.registry_secret) if image.registry_secret else None
        return modal.Image.from_registry(image.ref, secret=secret)
    return (
        modal.Image.debian_slim(python_version=image.python)
        .pip_install_from_requirements(image.ref)
        .add_local_python_source("cloudtune")
    )


def sandbox_kwargs(defn: SandboxDefinition, secret_env: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments for `modal.Sandbox.create(*defn.command, app=..., **kwargs)`: real SDK
    objects, built offline (the SDK resolves them on create)."""
    import modal

    missing = set(defn.secret_keys) - set(secret_env)
    if missing:
        raise InvalidRequestError(f"modal: secret values missing for {sorted(missing)}", provider="modal")
    secrets = []
    if secret_env:
        secrets.append(modal.Secret.from_dict({k: secret_env[k] for k in defn.secret_keys}))
    secrets += [modal.Secret.from_name(n) for n in defn.secret_names]
    kwargs: dict[str, Any] = {
        "name": defn.name,
        "tags": dict(defn.tags),
        "image": build_image(defn.image),
        "gpu": defn.gpu,
        "timeout": defn.timeout_s,
        "cpu": defn.cpu,
        "memory": defn.memory_mib,
        "env": dict(defn.env),
        "secrets": secrets,
    }
    if defn.region:
        kwargs["region"] = defn.region
    if defn.workdir:
        kwargs["workdir"] = defn.workdir
    return kwargs
