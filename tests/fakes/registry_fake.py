"""A fake container registry on loopback, following the OCI Distribution Spec (v1.1) and Docker's
token authentication spec, as Docker Hub, GHCR and a self-hosted `distribution` registry answer.

Routes:
- GET /v2/                                   401 + `WWW-Authenticate: Bearer realm="<url>/token",service="fake"`
- GET /token?service=&scope=repository:<name>:pull
                                             {"token", "access_token", "expires_in", "issued_at"}; a private
                                             repository's pull is granted only with the right Basic auth
                                             (else a token without it, as Docker Hub does)
- GET /v2/<name>/manifests/<reference>      needs a Bearer token holding pull on <name>, else 401 with the
                                             challenge naming the scope and `{"errors": [{"code": "UNAUTHORIZED"}]}`;
                                             404 `NAME_UNKNOWN` (or, `hub_style=True`, Docker Hub's 401 for an
                                             unknown repository) / `MANIFEST_UNKNOWN`; content negotiation by
                                             Accept: an image index is served only when Accept lists its
                                             media type; headers Content-Type (the mediaType),
                                             Docker-Content-Digest, Docker-Distribution-API-Version
- GET /v2/<name>/blobs/<digest>              the image config ({"architecture", "os", ...}) of a single image

Error bodies use the spec's codes (`errors: [{code, message, detail}]`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.server import FakeServer, Request, Response, route

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass
class Repo:
    tags: dict[str, list[tuple[str, str]]]  # tag -> [(os, architecture[/variant]), ...]
    private: bool = False
    index_type: str = OCI_INDEX  # what a multi-platform tag is served as (OCI index or Docker list)
    blobs: dict[str, bytes] = field(default_factory=dict)


class RegistryFake(FakeServer):
    def __init__(self, *, user: str = "robot", password: str = "s3cret-registry-pass", hub_style: bool = False) -> None:
        super().__init__(api_key=None)
        self.user, self.password, self.hub_style = user, password, hub_style
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, set[str]] = {}  # token -> repositories it may pull

    # ------------------------------------------------------------ fixtures

    def add(self, name: str, tag: str, platforms: list[str], *, private: bool = False,
            index_type: str = OCI_INDEX) -> None:
        """`platforms`: ["linux/amd64", "linux/arm64/v8"]; one entry publishes a single image (no index)."""
        repo = self.repos.setdefault(name, Repo(tags={}, private=private, index_type=index_type))
        repo.private = private
        repo.tags[tag] = [tuple(p.split("/", 1)) for p in platforms]  # type: ignore[misc]

    # ------------------------------------------------------------ helpers

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response(status, {"errors": [{"code": code, "message": message, "detail": None}]},
                        {"Docker-Distribution-API-Version": "registry/2.0", **(headers or {})})

    def _challenge(self, scope: str | None = None) -> dict[str, str]:
        value = f'Bearer realm="{self.url}/token",service="fake-registry"'
        if scope:
            value += f',scope="{scope}"'
        return {"WWW-Authenticate": value}

    def _may_pull(self, req: Request, name: str) -> bool:
        return name in self.tokens.get(req.bearer or "", set())

    def _manifest_of(self, os_: str, arch: str) -> tuple[bytes, bytes]:
        architecture, _, variant = arch.partition("/")
        config = json.dumps({"architecture": architecture, "os": os_, **({"variant": variant} if variant else {}),
                             "rootfs": {"type": "layers", "diff_ids": []}, "config": {}}).encode()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
                               "layers": []}).encode()
        return manifest, config

    # ------------------------------------------------------------ routes

    @route("GET", r"^/v2/$")
    def base(self, req: Request) -> Response:
        if req.bearer in self.tokens:
            return Response(200, {}, {"Docker-Distribution-API-Version": "registry/2.0"})
        return self._error(401, "UNAUTHORIZED", "authentication required", self._challenge())

    @route("GET", r"^/token$")
    def token(self, req: Request) -> Response:
        scope = req.arg("scope") or ""
        granted: set[str] = set()
        auth = req.headers.get("authorization", "")
        basic_ok = False
        if auth.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                user, pw = "", ""
            if (user, pw) != (self.user, self.password):
                return Response(401, {"details": "incorrect username or password"})
            basic_ok = True
        for part in scope.split(" "):
            bits = part.split(":")
            if len(bits) == 3 and bits[0] == "repository" and "pull" in bits[2].split(","):
                repo = self.repos.get(bits[1])
                if repo is None or not repo.private or basic_ok:
                    granted.add(bits[1])
        tok = secrets.token_hex(16)
        self.tokens[tok] = granted
        return Response(200, {"token": tok, "access_token": tok, "expires_in": 300,
                              "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    @route("GET", r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
    def manifest(self, req: Request) -> Response:
        name, ref = req.params["name"], req.params["ref"]
        scope = f"repository:{name}:pull"
        repo = self.repos.get(name)
        if not self._may_pull(req, name) or (repo is None and self.hub_style):
            # Docker Hub cannot tell "private" from "absent" to a caller without access
            return self._error(401, "UNAUTHORIZED", "authentication required", self._challenge(scope))
        if repo is None:
            return self._error(404, "NAME_UNKNOWN", "repository name not known to registry")
        plats = repo.tags.get(ref)
        if plats is None:
            return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        accept = req.headers.get("accept", "")
        if len(plats) == 1:
            manifest, config = self._manifest_of(*plats[0])
            repo.blobs[_digest(config)] = config
            body, media = manifest, OCI_MANIFEST
        else:
            if repo.index_type not in accept:
                return self._error(404, "MANIFEST_UNKNOWN", "no manifest in an accepted media type")
            entries = []
            for os_, arch in plats:
                manifest, config = self._manifest_of(os_, arch)
                repo.blobs[_digest(config)] = config
                architecture, _, variant = arch.partition("/")
                entries.append({"mediaType": OCI_MANIFEST if repo.index_type == OCI_INDEX else DOCKER_MANIFEST,
                                "digest": _digest(manifest), "size": len(manifest),
                                "platform": {"architecture": architecture, "os": os_,
                                             **({"variant": variant} if variant else {})}})
            # buildx adds attestation manifests with an "unknown" platform: a client must skip them
            entries.append({"mediaType": OCI_MANIFEST, "digest": _digest(b"att"), "size": 3,
                            "platform": {"architecture": "unknown", "os": "unknown"},
                            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
            body = json.dumps({"schemaVersion": 2, "mediaType": repo.index_type, "manifests": entries}).encode()
            media = repo.index_type
        return Response(200, body, {"Docker-Content-Digest": _digest(body),
                                    "Docker-Distribution-API-Version": "registry/2.0"}, content_type=media)

    @route("GET", r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
    def blob(self, req: Request) -> Response:
        name, digest = req.params["name"], req.params["digest"]
        repo = self.repos.get(name)
        if not self._may_pull(req, name):
            return self._error(401, "UNAUTHORIZED", "authentication required", self._challenge(f"repository:{name}:pull"))
        if repo is None or digest not in repo.blobs:
            return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        return Response(200, repo.blobs[digest], {"Docker-Content-Digest": digest}, content_type=OCI_CONFIG)

    def describe(self) -> dict[str, Any]:
        return {n: {"private": r.private, "tags": sorted(r.tags)} for n, r in self.repos.items()}
