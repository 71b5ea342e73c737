"""Does a container image exist, and for which CPU architectures? Read from its registry, before renting.

Why: a job whose `resources.image` is misspelled, private without credentials, or built for amd64
only on an ARM host (a GH200's Grace CPU) used to fail after a GPU was rented, at `docker pull` on
the machine. `cloudtune check` / `run` ask the registry first, over the OCI Distribution Spec (the
Docker Registry HTTP API V2 that Docker Hub, GHCR, ECR, GCR/Artifact Registry, Quay and nvcr.io serve):

  GET /v2/<name>/manifests/<ref>   Accept: OCI image index, Docker manifest list, and the single-image types
  401 + WWW-Authenticate: Bearer realm=..,service=..,scope=..  ->  GET realm?service&scope  ->  {"token"}
  an index/list names each image's `platform` {os, architecture, variant}; a single image's config
  blob (GET /v2/<name>/blobs/<digest>) names its own.

Credentials: anonymous first; for a private image, what `docker login` left in ~/.docker/config.json
(`auths.<registry>.auth`, or a `credsStore`/`credHelpers` helper), sent to the token endpoint only,
never printed. Outcomes: the platforms; NotFound (404, NAME_UNKNOWN / MANIFEST_UNKNOWN, or a refusal
that anonymous access cannot tell from absence); Unreachable (no network, timeout, 5xx) - the
caller makes that a warning, so `check` and `--dry-run` work offline.

Why httpx and not an OCI client library: the two requests above are all that is needed, httpx is
already a dependency (providers/http.py), and the Python OCI clients on PyPI (oras) validate pushed
artifact manifests with jsonschema and bring requests in; none reads a platform list offline-testably
with less code.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DOCKER_HUB = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
TIMEOUT_S = 6.0
ENV_SWITCH = "CLOUDTUNE_IMAGE_CHECK"  # "off": skip the registry read (the static arch table still applies)
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """Base: the message names the image and never holds a credential."""


class NotFound(RegistryError):
    pass


class Unreachable(RegistryError):
    pass


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port], as the API is reached
    name: str  # repository path, e.g. library/ubuntu, pytorch/pytorch
    reference: str  # tag or sha256:... digest

    @property
    def base_url(self) -> str:
        host = self.registry.split(":")[0]
        # Docker treats loopback registries as plain HTTP by default; everything else is TLS
        scheme = "http" if host in ("localhost", "127.0.0.1", "::1") else "https"
        return f"{scheme}://{self.registry}"


def parse_image(image: str) -> ImageRef:
    """Docker's reference grammar: [registry/]name[:tag][@digest]; a first part with '.' or ':' (or
    'localhost') is a registry, Docker Hub otherwise (single names under library/)."""
    rest, digest = (image.split("@", 1) + [""])[:2]
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    tag = ""
    if ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
    if registry in ("docker.io", "index.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return ImageRef(registry=registry, name=path.lower() if registry == DOCKER_HUB else path,
                    reference=digest or tag or "latest")


def _docker_config() -> dict:
    path = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _auth_keys(registry: str) -> tuple[str, ...]:
    if registry == DOCKER_HUB:
        return DOCKER_HUB_AUTH_KEYS
    return (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/")


def credentials(registry: str) -> tuple[str, str] | None:
    """(user, secret) that `docker login` stored for `registry`, or None (anonymous)."""
    config = _docker_config()
    keys = _auth_keys(registry)
    for key in keys:
        entry = (config.get("auths") or {}).get(key) or {}
        if entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            if user and secret:
                return user, secret
    helper = next((config.get("credHelpers", {}).get(k) for k in keys if config.get("credHelpers", {}).get(k)),
                  config.get("credsStore"))
    if helper and re.fullmatch(r"[A-Za-z0-9_.-]+", helper):
        for key in keys[:2]:
            try:  # the docker-credential-helpers protocol: server URL on stdin, JSON on stdout
                out = subprocess.run([f"docker-credential-{helper}", "get"], input=key, capture_output=True,
                                     text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if out.returncode == 0:
                try:
                    doc = json.loads(out.stdout)
                except ValueError:
                    continue
                if doc.get("Username") and doc.get("Secret"):
                    return doc["Username"], doc["Secret"]
    return None


def _error_codes(resp) -> list[str]:
    try:
        return [str(e.get("code")) for e in resp.json().get("errors", [])]
    except (ValueError, AttributeError):
        return []


def _platform(p: dict) -> str:
    arch = str(p.get("architecture", "?"))
    return f"{p.get('os', '?')}/{arch}" + (f"/{p['variant']}" if p.get("variant") else "")


class _Session:
    """One registry conversation: follows the Bearer (or Basic) challenge once, reuses the token."""

    def __init__(self, ref: ImageRef, client) -> None:
        self.ref, self.client, self.headers = ref, client, {}
        self.creds = credentials(ref.registry)

    def get(self, path: str, accept: str):
        import httpx

        url = f"{self.ref.base_url}/v2/{self.ref.name}/{path}"
        try:
            resp = self.client.get(url, headers={"Accept": accept, **self.headers})
            if resp.status_code == 401 and not self.headers:
                self._authenticate(resp.headers.get("www-authenticate", ""))
                resp = self.client.get(url, headers={"Accept": accept, **self.headers})
        except httpx.HTTPError as err:
            raise Unreachable(f"{self.ref.registry} did not answer ({type(err).__name__})") from None
        return resp

    def _authenticate(self, challenge: str) -> None:
        import httpx

        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self.creds:
                self.headers = {"Authorization": "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()}
            return
        if scheme != "bearer":
            return
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            return
        params.setdefault("scope", f"repository:{self.ref.name}:pull")
        resp = self.client.get(realm, params=params, auth=httpx.BasicAuth(*self.creds) if self.creds else None)
        if resp.status_code >= 500:
            raise Unreachable(f"{self.ref.registry}'s token service answered HTTP {resp.status_code}")
        if resp.status_code != 200:
            return  # refused: the manifest request then answers 401, reported as not found or private
        try:
            doc = resp.json()
        except ValueError:
            return
        token = doc.get("token") or doc.get("access_token")
        if token:
            self.headers = {"Authorization": f"Bearer {token}"}


def platforms(image: str, *, timeout: float = TIMEOUT_S) -> list[str]:
    """The `os/arch[/variant]` list `image` is published for (attestation entries left out)."""
    import httpx

    ref = parse_image(image)
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)), follow_redirects=True) as client:
        s = _Session(ref, client)
        resp = s.get(f"manifests/{ref.reference}", ACCEPT)
        if resp.status_code in (401, 403, 404):
            codes = _error_codes(resp)
            private = resp.status_code != 404 and not ({"NAME_UNKNOWN", "MANIFEST_UNKNOWN"} & set(codes))
            how = ("the registry refused access: it does not exist or is private" if private else
                   f"not found ({', '.join(codes) or f'HTTP {resp.status_code}'})")
            raise NotFound(how + ("" if s.creds or not private else
                                  f"; for a private image run `docker login {ref.registry}` here"))
        if resp.status_code == 429 or resp.status_code >= 500:
            raise Unreachable(f"{ref.registry} answered HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise Unreachable(f"{ref.registry} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError:
            raise Unreachable(f"{ref.registry} sent a manifest that is not JSON") from None
        media = doc.get("mediaType") or resp.headers.get("content-type", "").split(";")[0]
        if media in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
            out = [_platform(m.get("platform") or {}) for m in doc.get("manifests", [])
                   if (m.get("platform") or {}).get("architecture") not in (None, "unknown")]
            return sorted(set(out))
        digest = (doc.get("config") or {}).get("digest")
        if not digest:
            raise Unreachable(f"{ref.registry} sent a manifest with no config (schema 1?)")
        blob = s.get(f"blobs/{digest}", "application/json")
        if blob.status_code != 200:
            raise Unreachable(f"{ref.registry} answered HTTP {blob.status_code} for the image config")
        try:
            return [_platform(blob.json())]
        except ValueError:
            raise Unreachable(f"{ref.registry} sent an image config that is not JSON") from None


@lru_cache(maxsize=32)
def lookup(image: str) -> tuple[str, tuple[str, ...]]:
    """("ok", platforms) | ("not_found", (reason,)) | ("unreachable", (reason,)) | ("off", ()): once per process."""
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "false", "no"):
        return "off", ()
    try:
        return "ok", tuple(platforms(image))
    except NotFound as err:
        return "not_found", (str(err),)
    except Unreachable as err:
        return "unreachable", (str(err),)
    except Exception as err:  # noqa: BLE001 - a surprise from a registry is no reason to refuse a job
        return "unreachable", (f"{type(err).__name__}",)


def arch_of(platform: str) -> str:
    """'linux/arm64/v8' -> 'arm64'; 'linux/amd64' -> 'amd64'."""
    parts = platform.split("/")
    return parts[1] if len(parts) > 1 else platform
