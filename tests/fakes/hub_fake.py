"""A fake Hugging Face Hub HTTP API on loopback: the endpoints `huggingface_hub`'s `create_repo` and
`upload_folder` (legacy commit path) really call, with the Hub's request and answer shapes.

Routes, as huggingface_hub 2.x sends them (hf_api.py, _commit_api.py, lfs.py):
- POST /api/repos/create                      {name, organization, visibility?, type?} -> {url}; 409 if it exists
- GET  /api/models/{ns}/{name}[/revision/{rev}] repo_info (create_repo's exist_ok path; a commit with nothing
                                               changed answers with the current revision)
- POST /api/validate-yaml                      {content, repoType} -> {errors, warnings}: a README.md's
                                               YAML front matter, checked before any hashing
- POST /api/models/{ns}/{name}/preupload/{rev} {files: [{path, sample, size}]} -> {files: [{path, uploadMode,
                                               shouldIgnore, oid}]}: "lfs" for the Hub's default
                                               .gitattributes patterns (*.safetensors, *.bin, *.gguf, ...)
                                               and for files over 10 MB, "regular" otherwise
- POST /{ns}/{name}.git/info/lfs/objects/batch git-lfs Batch API (basic transfer): an upload href per
                                               object the fake does not hold yet, no actions for known ones
- PUT  /lfs-upload/{oid}                       the basic-transfer PUT; the sha256 and size are checked
- POST /api/models/{ns}/{name}/commit/{rev}    application/x-ndjson: header, file (base64), lfsFile (oid)
                                               -> {commitUrl, commitOid}; an lfsFile whose object was never
                                               uploaded is a 422, as on the Hub

(GET /api/agent-harnesses, a best-effort registry fetch the client makes, is answered 404 like any
unknown path; the client ignores that.)

Auth: every write needs `Authorization: Bearer <token>`; a wrong token is a 401 with the Hub's
`{"error": ...}` body. The Xet storage protocol (hf_xet's chunked CAS upload) is not emulated:
tests run the client with HF_HUB_DISABLE_XET=1, which makes it use the LFS path above.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.server import FakeServer, Request, Response, route

# The Hub's default .gitattributes for a new model repo (the LFS-tracked patterns).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
    "*tfevents*", "*.gguf",
)
LFS_SIZE = 10 * 1024 * 1024


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[dict[str, Any]] = field(default_factory=list)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubFake(FakeServer):
    """State: repos by id, LFS objects by sha256. `token` is the one write token it accepts."""

    def __init__(self, token: str = "hf_test_token", user: str = "alice") -> None:
        super().__init__(api_key=token)
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}

    def unauthorized(self, req: Request) -> Response:
        return Response(401, {"error": "Invalid credentials in Authorization header"})

    def not_found(self, req: Request) -> Response:
        return Response(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})

    def _repo(self, req: Request) -> Repo | None:
        return self.repos.get(f"{req.params['ns']}/{req.params['name']}")

    # ------------------------------------------------------------------ repos

    @route("POST", r"^/api/repos/create$")
    def create_repo(self, req: Request) -> Response:
        body = req.json or {}
        name, org = body.get("name"), body.get("organization") or self.user
        if body.get("type", "model") != "model":
            return Response(400, {"error": "this fake holds model repos only"})
        if not name or "/" in name:
            return Response(400, {"error": f"invalid repo name {name!r}"})
        if org != self.user:
            return Response(403, {"error": f"You don't have the rights to create a model under the namespace \"{org}\""})
        repo_id = f"{org}/{name}"
        if repo_id in self.repos:
            return Response(409, {"error": "You already created this model repo", "url": f"{self._base(req)}/{repo_id}"})
        self.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        return Response(200, {"url": f"{self._base(req)}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    @route("GET", r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/revision/(?P<rev>[^/]+)$")
    def repo_info_at(self, req: Request) -> Response:
        return self.repo_info(req)

    @route("GET", r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)$")
    def repo_info(self, req: Request) -> Response:
        repo = self._repo(req)
        if repo is None:
            return self.not_found(req)
        sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
        return Response(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                              "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    @route("POST", r"^/api/validate-yaml$")
    def validate_yaml(self, req: Request) -> Response:
        import yaml

        content = (req.json or {}).get("content", "")
        if not content.startswith("---"):
            return Response(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        front = content.split("---", 2)[1] if content.count("---") >= 2 else ""
        try:
            meta = yaml.safe_load(front) or {}
        except yaml.YAMLError as err:
            return Response(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
        if not isinstance(meta, dict):
            return Response(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return Response(200, {"errors": [], "warnings": []})

    # ------------------------------------------------------------------ upload

    @route("POST", r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/preupload/(?P<rev>[^/]+)$")
    def preupload(self, req: Request) -> Response:
        repo = self._repo(req)
        if repo is None:
            return self.not_found(req)
        out = []
        for f in (req.json or {}).get("files", []):
            path, size = f["path"], int(f["size"])
            base64.b64decode(f["sample"], validate=True)  # the client sends the first 512 bytes
            lfs = size > LFS_SIZE or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
            old = repo.files.get(path)
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if path in repo.lfs_paths else _git_blob_sha1(old)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return Response(200, {"files": out})

    @route("POST", r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch$")
    def lfs_batch(self, req: Request) -> Response:
        repo = self._repo(req)
        if repo is None:
            return self.not_found(req)
        body = req.json or {}
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            return Response(422, {"message": "only basic uploads are supported"})
        objects = []
        for obj in body.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self._base(req)}/lfs-upload/{obj['oid']}",
                                               "header": {}, "expires_in": 3600}}
            objects.append(entry)
        return Response(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    @route("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")
    def lfs_put(self, req: Request) -> Response:
        if hashlib.sha256(req.body).hexdigest() != req.params["oid"]:
            return Response(400, {"error": "sha256 of the body does not match the object id"})
        self.lfs_objects[req.params["oid"]] = req.body
        return Response(200, "")

    @route("POST", r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/commit/(?P<rev>[^/]+)$")
    def commit(self, req: Request) -> Response:
        repo = self._repo(req)
        if repo is None:
            return self.not_found(req)
        if not req.headers.get("content-type", "").startswith("application/x-ndjson"):
            return Response(400, {"error": "commit bodies are application/x-ndjson"})
        lines = [json.loads(x) for x in req.body.splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            return Response(400, {"error": "the first line of a commit must be its header"})
        staged: dict[str, tuple[bytes, bool]] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return Response(400, {"error": "file content must be base64"})
                staged[value["path"]] = (base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None or (value.get("size") is not None and len(data) != value["size"]):
                    return Response(422, {"error": f"LFS pointer {value['path']} points to a file that was not uploaded"})
                staged[value["path"]] = (data, True)
            elif key in ("deletedFile", "deletedFolder"):
                staged[value["path"]] = (b"", False)
            else:
                return Response(400, {"error": f"unknown commit operation {key!r}"})
        for path, (data, lfs) in staged.items():
            repo.files[path] = data
            (repo.lfs_paths.add if lfs else repo.lfs_paths.discard)(path)
        oid = hashlib.sha1(req.body).hexdigest()
        repo.commits.append({"oid": oid, "summary": lines[0]["value"].get("summary"), "paths": sorted(staged)})
        return Response(200, {"commitUrl": f"{self._base(req)}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                              "success": True})

    # ------------------------------------------------------------------ helpers

    def _base(self, req: Request) -> str:
        return self.url

    def authorized(self, req: Request) -> bool:
        # The LFS PUT goes to storage with a pre-signed URL (no token), as on the real Hub.
        if req.path.startswith("/lfs-upload/") or req.path in ("/api/validate-yaml", "/api/agent-harnesses"):
            return True
        return super().authorized(req)
