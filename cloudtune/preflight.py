"""Pre-flight checks: every problem that would stop a job, found at once, before anything is written.

Why: a first cloud job used to fail one error at a time and late (a missing boto3, then the S3
credentials, then the provider key only after the data was uploaded and a job row existed). `cloudtune
check`, `cloudtune run` and `run --dry-run` call `preflight()` before any job row, upload or launch,
and report every problem as one line naming the thing and the fix (exit 2).

The checks are cheap and import-light: installed extras are found with importlib.util.find_spec (no
SDK is imported), credentials are looked up where each provider's own tools keep them, and the store
is probed with one small write + delete (the only way to know a bucket is writable).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError

# provider (or store scheme) -> (importable module, pip extra) it needs on this machine.
EXTRAS: dict[str, tuple[str, str]] = {
    "aws": ("boto3", "aws"),
    "s3": ("boto3", "s3"),
    "modal": ("modal", "modal"),
    "skypilot": ("sky", "skypilot"),
}
# Hub organisations (and model-id prefixes) whose weights are gated behind an accepted licence.
GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/", "google/medgemma", "bigcode/starcoder2",
                  "tiiuae/falcon-180", "CohereForAI/", "CohereLabs/")
HF_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# GPUs sold only with an ARM (aarch64) host CPU: an amd64-only image cannot start on them.
ARM_GPUS = ("GH200", "GB200", "GB300")
# Images known to be built for linux/amd64 only (images/trainer builds amd64 by default).
AMD64_ONLY_IMAGES = ("ghcr.io/cloudtune/trainer", "pytorch/pytorch", "docker.io/pytorch/pytorch")
PROBE_PREFIX = ".cloudtune-check"


class PreflightFailed(UserError):
    """One or more pre-flight problems; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = f"{len(problems)} problem(s) found before launching anything:"
        super().__init__("\n".join([head, *[f"  - {p}" for p in problems]]))


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_extras(providers: Iterable[str], store_url: str) -> list[str]:
    """The Python packages each chosen provider (and the store) needs, installed on this machine."""
    needs: dict[str, tuple[str, list[str]]] = {}  # module -> (pip extra, who needs it)
    for p in [*providers, *(["s3"] if store_url.startswith("s3://") else [])]:
        if p in EXTRAS:
            module, extra = EXTRAS[p]
            needs.setdefault(module, (extra, []))[1].append(p)
    out = []
    for module, (extra, users) in needs.items():
        if not _has_module(module):
            what = " and ".join(("the s3:// store" if u == "s3" else f"provider {u}") for u in users)
            out.append(f"{what} needs the Python package {module!r}, which is not installed; "
                       f"pip install 'cloudtune[{extra}]'")
    return out


def _aws_credentials_present() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if os.environ.get("AWS_PROFILE") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return True
    if os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        path = Path(os.environ.get(var) or default).expanduser()
        try:
            text = path.read_text()
        except OSError:
            continue
        if "aws_access_key_id" in text or "sso_session" in text or "credential_process" in text \
                or "role_arn" in text:
            return True
    return False


def _provider_credentials(name: str) -> str | None:
    """None when `name`'s credentials are found on this machine, else the problem line."""
    if name == "runpod":
        from cloudtune.providers.runpod import load_api_key

        return None if load_api_key() else ("provider runpod: no API key; set RUNPOD_API_KEY or write api_key to "
                                            "~/.runpod/config.toml (runpod.io -> Settings -> API Keys)")
    if name == "vast":
        from cloudtune.providers.vast import load_api_key as vast_key

        return None if vast_key() else ("provider vast: no API key; set VAST_API_KEY or run `vastai set api-key "
                                        "<key>` (cloud.vast.ai -> Account -> API Keys)")
    if name == "lambda":
        from cloudtune.providers.lambdalabs import AUTH_HINT, read_api_key

        return None if read_api_key() else f"provider lambda: no API key; {AUTH_HINT}"
    if name == "modal":
        from cloudtune.providers.modal import _has_modal_credentials

        return None if _has_modal_credentials() else ("provider modal: no token; run `modal token new` or set "
                                                       "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET")
    if name == "aws":
        return None if _aws_credentials_present() else (
            "provider aws: no AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run "
            "`aws configure`")
    return None


def check_credentials(providers: Iterable[str]) -> list[str]:
    """Each chosen provider's credentials, where its own tools keep them (env var or config file)."""
    out = []
    for p in providers:
        problem = _provider_credentials(p)
        if problem:
            out.append(problem)
    return out


def check_provider_settings(providers: Iterable[str]) -> list[str]:
    """Settings a provider needs beyond its key: Lambda launches only with a registered SSH key."""
    out = []
    if "lambda" in providers:
        from cloudtune.providers.lambdalabs import ENV_SSH_KEY
        from cloudtune.run.providers_config import provider_config

        if not (provider_config("lambda").get("ssh_key_name") or os.environ.get(ENV_SSH_KEY)):
            out.append(f"provider lambda: no SSH key name (Lambda launches nothing without one); set {ENV_SSH_KEY} "
                       f"to a key listed at cloud.lambda.ai -> SSH keys, or ssh_key_name under lambda: in "
                       f"providers.yaml")
    return out


def hf_token_present() -> bool:
    if any(os.environ.get(v) for v in HF_TOKEN_VARS):
        return True
    hf_home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
                   / "huggingface").expanduser()
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or hf_home / "token").expanduser()
    try:
        return bool(token_file.read_text().strip())
    except OSError:
        return False


def is_gated(model: str) -> bool:
    return any(model.startswith(p) for p in GATED_PREFIXES)


def check_model_access(model: str) -> list[str]:
    """A gated hub model (meta-llama/*, google/gemma*, mistralai/* ...) needs a Hugging Face token."""
    if is_gated(model) and not hf_token_present():
        org = model.split("/", 1)[0]
        return [f"model {model!r} is gated on the Hugging Face hub and no token is set; accept its licence at "
                f"huggingface.co/{model}, then set HF_TOKEN (or run `huggingface-cli login`) - {org} models "
                f"download only with a token"]
    return []


def check_store(url: str, endpoint_url: str | None = None, region: str | None = None) -> list[str]:
    """The store exists and is writable: one small probe object written and deleted."""
    if url.startswith("file://") or url.startswith("/"):
        root = Path(url.removeprefix("file://"))
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            return [f"store {url}: {probe} is not a writable folder; choose a folder you can write in store.url "
                    f"(e.g. file://$HOME/cloudtune-store)"]
        return []
    if not url.startswith("s3://"):
        return [f"store {url}: not supported; use file:///path or s3://bucket/prefix"]
    if not _has_module("boto3"):
        return []  # check_extras already names the missing package
    if not _aws_credentials_present():
        return [f"store {url}: no AWS credentials to reach it; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                f"AWS_PROFILE (for R2/MinIO: that service's S3 keys, with store.endpoint_url)"]
    from cloudtune.store import open_store

    key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    try:
        store = open_store(url, endpoint_url=endpoint_url, region=region, retry_s=0)
        store.put_bytes(key, b"cloudtune check: this object is deleted right after it is written\n")
        store.delete(key)
    except UserError as err:
        return [f"store {url}: {str(err).splitlines()[0]}"]
    except Exception as err:  # noqa: BLE001 - any failure to write is the problem being checked for
        reason = getattr(err, "response", {}).get("Error", {}).get("Code") if hasattr(err, "response") else None
        return [f"store {url}: cannot write to it ({reason or type(err).__name__}); check that the bucket exists "
                f"(`aws s3 mb s3://{url[5:].split('/', 1)[0]}`) and that your keys may s3:PutObject and "
                f"s3:DeleteObject under it"]
    return []


def machine_arch(gpu: str) -> str:
    return "arm64" if any(gpu.upper().startswith(a) for a in ARM_GPUS) else "amd64"


def _image_repo(image: str) -> str:
    name = image.split("@", 1)[0]
    return name.rsplit(":", 1)[0] if ":" in name.split("/")[-1] else name


def registry_arches(image: str) -> set[str] | None:
    """The CPU architectures the image's registry lists for it (cloudtune/registry.py); None when that
    is unknown (offline, CLOUDTUNE_IMAGE_CHECK=off, not found), so the static table decides."""
    from cloudtune.registry import arch_of, lookup

    status, info = lookup(image)
    if status != "ok" or not info:
        return None
    return {arch_of(p) for p in info if p.startswith("linux/")} or None


def image_runs_on(image: str, gpu: str, arches: set[str] | None = None) -> bool:
    """Whether `gpu`'s host CPU can run `image`: by what its registry lists when known, else False only
    where the image is known to be amd64-only and the host is ARM."""
    if arches is not None:
        return machine_arch(gpu) in arches
    return not (_image_repo(image) in AMD64_ONLY_IMAGES and machine_arch(gpu) == "arm64")


def bootable(image: str, options: list[Any]) -> list[Any]:
    """The options whose machine can run `image` (`run` drops the others from the failover order)."""
    remote = [o for o in options if o.offer.provider != "local"]
    arches = registry_arches(image) if remote else None
    return [o for o in options if o.offer.provider == "local" or image_runs_on(image, o.offer.gpu, arches)]


def check_arch(image: str, options: Iterable[Any]) -> list[str]:
    """An image not built for the machines' CPU (an amd64-only image on a GH200's Grace CPU) cannot
    boot there: refuse a plan left with no machine that can run it."""
    options = [o for o in options if o.offer.provider != "local"]
    if not options or bootable(image, options):
        return []
    arches = registry_arches(image)
    offered = ", ".join(sorted(arches)) if arches else "amd64"
    wanted = sorted({machine_arch(o.offer.gpu) for o in options})
    machines = sorted({f"{o.offer.provider}/{o.offer.gpu}" for o in options})
    return [f"image {image} is built for {offered} but every planned machine is {'/'.join(wanted)}: "
            f"{', '.join(machines)}; set resources.gpu to another GPU, or build images/trainer for "
            f"linux/{wanted[0]} (docker buildx build --platform linux/{wanted[0]}) and set resources.image to it"]


def check_image(image: str, providers: Iterable[str], options: Iterable[Any] = ()) -> list[str]:
    """The image exists in its registry and offers the planned machines' CPU architecture.

    Read from the registry (OCI Distribution API, anonymous or with `docker login`'s credentials);
    unreachable (offline, timeout) is one warning line on stderr, not a problem, so `check` and
    `--dry-run` work offline; the static arch table then still applies."""
    import sys

    from cloudtune.registry import lookup

    if not image or not [p for p in providers if p != "local"]:
        return []  # the local provider runs in place: no image is pulled
    status, info = lookup(image)
    if status == "not_found":
        return [f"image {image}: {info[0]}; fix resources.image (check the name and tag: `docker manifest "
                f"inspect {image}`), or build images/trainer, push it and set resources.image to it (docs/trainer.md)"]
    if status == "unreachable":
        print(f"warning: image {image}: could not read its registry ({info[0]}); whether it exists and its "
              f"CPU architecture are not checked", file=sys.stderr)
    return check_arch(image, options)


def check_remote_store(providers: Iterable[str], url: str) -> list[str]:
    remote = [p for p in providers if p != "local"]
    if remote and not url.startswith("s3://"):
        return [f"{remote[0]}: the store {url} is on this machine and a {remote[0]} machine cannot reach it; set "
                f"store.url to an s3:// URL such as s3://bucket/prefix, or use --provider local"]
    return []


def check_forwarded(spec: Any, providers: Iterable[str], url: str, *, probe: bool = True) -> list[str]:
    """Names in env:/secrets: must be set here; a third-party machine's scoped store credentials must be mintable."""
    from cloudtune.run.forward_env import AWS_KEYS, THIRD_PARTY, federation_token, missing_names

    out = [f"{'secrets' if n in spec.secrets else 'env'}: {n} is named in the spec but not set in this shell; "
           f"export {n}=... or remove it from the spec" for n in missing_names(spec)]
    third = [p for p in providers if p in THIRD_PARTY]
    long_lived = os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get("AWS_SESSION_TOKEN")
    if probe and third and url.startswith("s3://") and long_lived and not set(AWS_KEYS[:2]) & set(spec.secrets) \
            and _has_module("boto3"):
        try:
            federation_token(url, "check", spec, 0, spec.store.endpoint_url, spec.store.region)
        except UserError as err:
            out.append(f"provider {third[0]}: {err}")
    return out


def preflight(spec: Any, providers: list[str], options: Iterable[Any] = (), *, probe_store: bool = True) -> list[str]:
    """Every problem found for this spec on these providers (empty: ready). Writes nothing but the
    store probe, which it deletes."""
    from cloudtune.home import default_store_url

    url = spec.store.url or default_store_url()
    problems: list[str] = []
    problems += check_extras(providers, url)
    problems += check_credentials(providers)
    problems += check_provider_settings(providers)
    problems += check_model_access(spec.model)
    problems += check_remote_store(providers, url)
    problems += check_forwarded(spec, providers, url, probe=probe_store)
    if probe_store:
        problems += check_store(url, spec.store.endpoint_url, spec.store.region)
    problems += check_image(spec.resources.image, providers, options)
    return problems


def print_checks(console: Any, problems: list[str]) -> None:
    """For `run --dry-run`: the checks' verdict (the dry run skips the store probe)."""
    if problems:
        console.print(f"check: {len(problems)} problem(s) a real run would refuse:", markup=False)
        for p in problems:
            console.print(f"  - {p}", markup=False)
    else:
        console.print("check: ready (the store is probed by `cloudtune check` and `cloudtune run`)", markup=False)
