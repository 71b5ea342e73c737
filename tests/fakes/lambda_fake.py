"""A fake Lambda Cloud API (v1) on loopback, following the published OpenAPI 1.10.0 shapes.

Routes (under /api/v1): GET /instance-types, POST /instance-operations/launch, GET /instances,
GET /instances/{id}, POST /instance-operations/terminate. Errors use Lambda's body
`{"error": {"code", "message", "suggestion"}}` with its codes (global/invalid-api-key,
instance-operations/launch/insufficient-capacity, global/object-does-not-exist, ...), and launch
keeps Lambda's rate limit (one per `launch_interval_s`, else 429).

With `run_user_data=True` the fake "boots" each instance by running its cloud-init user_data
script as a local bash process, with a `docker` shim on PATH that runs the container's command
as a local process (the image is this machine). The script's own self-terminate call then comes
back to this fake over real HTTP, exactly as it would reach Lambda.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.server import FakeServer, Request, Response, route

TAG_KEY_RE = re.compile(r"^[a-z][a-z0-9-:]+$")


def _err(status: int, code: str, message: str, suggestion: str | None = None) -> Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if suggestion:
        body["error"]["suggestion"] = suggestion
    return Response(status, body)


def instance_type(name: str, gpu_description: str, cents: int, gpus: int, vcpus: int, mem: int) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"{gpus}x {gpu_description}",
        "gpu_description": gpu_description,
        "price_cents_per_hour": cents,
        "specs": {"vcpus": vcpus, "memory_gib": mem, "storage_gib": 512, "gpus": gpus},
    }


DEFAULT_TYPES = {
    "gpu_1x_a10": instance_type("gpu_1x_a10", "A10 (24 GB PCIe)", 129, 1, 30, 200),
    "gpu_1x_h100_pcie": instance_type("gpu_1x_h100_pcie", "H100 (80 GB PCIe)", 329, 1, 26, 200),
    "gpu_8x_h100_sxm5": instance_type("gpu_8x_h100_sxm5", "H100 (80 GB SXM5)", 3192, 8, 208, 1800),
    "gpu_1x_a100_sxm4": instance_type("gpu_1x_a100_sxm4", "A100 (40 GB SXM4)", 199, 1, 30, 200),
    "gpu_8x_a100_80gb_sxm4": instance_type("gpu_8x_a100_80gb_sxm4", "A100 (80 GB SXM4)", 2232, 8, 240, 1800),
    "cpu_4x_general": {
        "name": "cpu_4x_general",
        "description": "4x CPU",
        "gpu_description": "",
        "price_cents_per_hour": 20,
        "specs": {"vcpus": 4, "memory_gib": 16, "storage_gib": 64, "gpus": 0},
    },
}

REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "europe-central-1": "Germany",
}

DOCKER_SHIM = r'''
"""docker, as far as the Lambda bootstrap needs it: info, pull, run (the command runs locally)."""
import os, subprocess, sys

args = sys.argv[1:]
if not args:
    sys.exit(0)
if args[0] == "info":
    print("Runtimes: io.containerd.runc.v2 nvidia runc")
    sys.exit(0)
if args[0] == "pull":
    sys.exit(0)
if args[0] != "run":
    sys.exit(0)
rest = args[1:]
env = dict(os.environ)
env.pop("CLOUDTUNE_BOOT_DIR", None)
workdir = None
with_value = {"--gpus", "--name", "--env-file", "-w", "--workdir", "-e", "--shm-size", "--ipc"}
while rest and rest[0].startswith("-"):
    flag = rest.pop(0)
    name, eq, value = flag.partition("=")
    if not eq and name in with_value:
        value = rest.pop(0)
    if name == "--env-file":
        for line in open(value).read().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                env[k] = v
    elif name in ("-w", "--workdir"):
        workdir = value
    elif name == "-e":
        k, _, v = value.partition("=")
        env[k] = v
image, cmd = rest[0], rest[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as fh:
    fh.write(f"run {image} {cmd}\n")
sys.exit(subprocess.call(cmd, env=env, cwd=workdir))
'''


@dataclass
class FakeInstance:
    id: str
    name: str
    type_name: str
    region: str
    ssh_key_names: list[str]
    tags: list[dict[str, str]]
    user_data: str | None
    status: str = "booting"
    created_at: float = field(default_factory=time.monotonic)
    terminate_at: float | None = None
    proc: subprocess.Popen | None = None
    boot_dir: Path | None = None


class LambdaFake(FakeServer):
    """State: instance types, capacity per (type, region), SSH keys, instances."""

    FAULT_ROUTES = {"create": ("POST", r"^/api/v1/instance-operations/launch$"),
                    "status": ("GET", r"^/api/v1/instances/[^/]+$"), "list": ("GET", r"^/api/v1/instances$"),
                    "terminate": ("POST", r"^/api/v1/instance-operations/terminate$"),
                    "search": ("GET", r"^/api/v1/instance-types$")}
    # Error codes per status: the ApiError* schemas of openapi 1.10.0; `global/rate-limited` (429, launch: one
    # per 12 s) is from Lambda's docs, not the spec, which lists no 429.
    DEFAULT_CODES = {400: "global/invalid-parameters", 401: "global/invalid-api-key", 403: "global/account-inactive",
                     404: "global/object-does-not-exist", 429: "global/rate-limited", 500: "global/internal-error",
                     503: "global/internal-error"}

    def fault_response(self, op: str, status: int, code: str | None, retry_after: float | None) -> Response:
        """Lambda's `{"error": {"code", "message", "suggestion"}}`; the message is deliberately
        misleading, since clients must branch on `code` only (the spec: messages may change)."""
        resp = _err(status, code or self.DEFAULT_CODES.get(status, "global/internal-error"),
                    "Planned fault; this message is free text and may say anything (e.g. capacity).")
        if retry_after is not None:
            resp.headers["Retry-After"] = f"{retry_after:g}"
        return resp

    def __init__(
        self,
        api_key: str = "lambda-test-key",
        *,
        ssh_keys: tuple[str, ...] = ("my-key",),
        capacity: dict[str, list[str]] | None = None,
        boot_s: float = 0.0,
        terminating_s: float = 0.0,
        launch_interval_s: float = 0.0,
        run_user_data: bool = False,
        extra_path: str | None = None,
    ) -> None:
        super().__init__(api_key=api_key)
        self.types = dict(DEFAULT_TYPES)
        self.capacity: dict[str, list[str]] = (
            capacity
            if capacity is not None
            else {
                "gpu_1x_a10": ["us-east-1", "us-west-1"],
                "gpu_1x_h100_pcie": ["us-west-1"],
                "gpu_8x_h100_sxm5": [],
                "gpu_1x_a100_sxm4": ["europe-central-1"],
                "gpu_8x_a100_80gb_sxm4": ["us-east-1"],
                "cpu_4x_general": ["us-east-1"],
            }
        )
        self.ssh_keys = set(ssh_keys)
        self.instances: dict[str, FakeInstance] = {}
        self.boot_s = boot_s
        self.terminating_s = terminating_s
        self.launch_interval_s = launch_interval_s
        self._last_launch = -1e9
        self.run_user_data = run_user_data
        self.extra_path = extra_path
        self._tmp = tempfile.TemporaryDirectory(prefix="lambda-fake-")
        self.docker_log = Path(self._tmp.name) / "docker.log"

    # ------------------------------------------------------------ helpers

    def unauthorized(self, req: Request) -> Response:
        return _err(
            401,
            "global/invalid-api-key",
            "API key was invalid, expired, or deleted.",
            "Check your API key or create a new one, then try again.",
        )

    def not_found(self, req: Request) -> Response:
        return _err(404, "global/not-found", f"Not found: {req.path}")

    def _tick(self, inst: FakeInstance) -> None:
        now = time.monotonic()
        if inst.status == "booting" and now - inst.created_at >= self.boot_s:
            inst.status = "active"
        if inst.status == "terminating" and inst.terminate_at is not None and now >= inst.terminate_at:
            inst.status = "terminated"

    def _region(self, name: str) -> dict[str, str]:
        return {"name": name, "description": REGIONS.get(name, name)}

    def _view(self, inst: FakeInstance) -> dict[str, Any]:
        self._tick(inst)
        view: dict[str, Any] = {
            "id": inst.id,
            "name": inst.name,
            "status": inst.status,
            "ssh_key_names": inst.ssh_key_names,
            "file_system_names": [],
            "region": self._region(inst.region),
            "instance_type": self.types[inst.type_name],
            "hostname": inst.name,
            "is_reserved": False,
            "tags": inst.tags,
            "actions": {
                "migrate": {"available": False},
                "rebuild": {"available": False},
                "restart": {"available": inst.status == "active"},
                "cold_reboot": {"available": False},
                "terminate": {"available": inst.status in ("booting", "active", "unhealthy")},
            },
        }
        if inst.status == "active":
            view["ip"] = "198.51.100.7"
            view["private_ip"] = "10.0.0.7"
        return view

    def set_status(self, instance_id: str, status: str) -> None:
        with self.lock:
            self.instances[instance_id].status = status

    # ------------------------------------------------------------ routes

    @route("GET", r"/api/v1/instance-types")
    def list_types(self, req: Request) -> Response:
        with self.lock:
            data = {
                name: {
                    "instance_type": itype,
                    "regions_with_capacity_available": [self._region(r) for r in self.capacity.get(name, [])],
                }
                for name, itype in self.types.items()
            }
        return Response(200, {"data": data})

    @route("GET", r"/api/v1/ssh-keys")
    def list_ssh_keys(self, req: Request) -> Response:
        with self.lock:
            keys = sorted(self.ssh_keys)
        return Response(200, {"data": [{"id": f"key{i:04d}", "name": k, "public_key": f"ssh-ed25519 AAAA{i} {k}"}
                                       for i, k in enumerate(keys)]})

    @route("POST", r"/api/v1/instance-operations/launch")
    def launch(self, req: Request) -> Response:
        body = req.json or {}
        with self.lock:
            now = time.monotonic()
            if now - self._last_launch < self.launch_interval_s:
                return Response(
                    429,
                    {"error": {"code": "global/rate-limited", "message": "Too many launch requests."}},
                    headers={"Retry-After": "1"},
                )
            for required in ("region_name", "instance_type_name", "ssh_key_names"):
                if required not in body:
                    return _err(400, "global/invalid-parameters", f"Missing required field '{required}'.")
            keys = body["ssh_key_names"]
            if not isinstance(keys, list) or len(keys) != 1:
                return _err(400, "global/invalid-parameters", "Exactly one SSH key name must be specified.")
            if keys[0] not in self.ssh_keys:  # ApiErrorLaunchResourceNotFound (launch 404)
                return _err(404, "global/object-does-not-exist", f"SSH key '{keys[0]}' does not exist.",
                            "Check the name of the SSH key and try again.")
            name = body.get("name")
            if name is not None and len(name) > 64:
                return _err(400, "global/invalid-parameters", "Instance name is too long.")
            tags = body.get("tags") or []
            for tag in tags:
                if not TAG_KEY_RE.match(tag.get("key", "")) or len(tag["key"]) > 55 or len(tag.get("value", "")) > 128:
                    return _err(400, "global/invalid-parameters", f"Invalid tag {tag!r}.")
            user_data = body.get("user_data")
            if user_data is not None and len(user_data.encode()) > 1_000_000:
                return _err(400, "global/invalid-parameters", "user_data exceeds 1 MB.")
            type_name = body["instance_type_name"]
            if type_name not in self.types:
                return _err(400, "global/invalid-parameters", f"Unknown instance type '{type_name}'.")
            if body["region_name"] not in REGIONS:
                return _err(400, "global/invalid-parameters", f"Unknown region '{body['region_name']}'.")
            if body["region_name"] not in self.capacity.get(type_name, []):
                return _err(
                    400,
                    "instance-operations/launch/insufficient-capacity",
                    "Not enough capacity to fulfill launch request.",
                    "Choose an instance type with more availability, or try again later.",
                )
            self._last_launch = now
            inst = FakeInstance(
                id=uuid.uuid4().hex,
                name=name or "",
                type_name=type_name,
                region=body["region_name"],
                ssh_key_names=keys,
                tags=tags,
                user_data=user_data,
            )
            self.instances[inst.id] = inst
        if self.run_user_data and user_data:
            self._boot(inst)
        return Response(200, {"data": {"instance_ids": [inst.id]}})

    @route("GET", r"/api/v1/instances")
    def list_instances(self, req: Request) -> Response:
        with self.lock:
            views = [self._view(i) for i in self.instances.values()]
        return Response(200, {"data": [v for v in views if v["status"] != "terminated"]})

    @route("GET", r"/api/v1/instances/(?P<id>[^/]+)")
    def get_instance(self, req: Request) -> Response:
        with self.lock:
            inst = self.instances.get(req.params["id"])
            if inst is None:
                return _err(404, "global/object-does-not-exist", "Specified instance does not exist.")
            return Response(200, {"data": self._view(inst)})

    @route("POST", r"/api/v1/instance-operations/terminate")
    def terminate(self, req: Request) -> Response:
        ids = (req.json or {}).get("instance_ids") or []
        with self.lock:
            missing = [i for i in ids if i not in self.instances or self.instances[i].status == "terminated"]
            if missing:
                return _err(404, "global/object-does-not-exist", "Specified instance does not exist.")
            out = []
            for i in ids:
                inst = self.instances[i]
                if inst.status != "terminating":
                    inst.status = "terminating"
                    inst.terminate_at = time.monotonic() + self.terminating_s
                out.append(self._view(inst))
        return Response(200, {"data": {"terminated_instances": out}})

    # ------------------------------------------------------------ booting user_data locally

    def _boot(self, inst: FakeInstance) -> None:
        root = Path(self._tmp.name)
        shim_dir = root / "bin"
        shim_dir.mkdir(exist_ok=True)
        shim = shim_dir / "docker"
        if not shim.exists():
            shim.write_text(f"#!{sys.executable}\n{DOCKER_SHIM}")
            shim.chmod(0o755)
        inst.boot_dir = root / inst.id
        script = root / f"{inst.id}.user_data.sh"
        script.write_text(inst.user_data or "")
        path = os.pathsep.join(p for p in (str(shim_dir), self.extra_path, os.environ.get("PATH", "")) if p)
        env = {**os.environ, "PATH": path, "CLOUDTUNE_BOOT_DIR": str(inst.boot_dir), "FAKE_DOCKER_LOG": str(self.docker_log)}
        inst.proc = subprocess.Popen(
            ["bash", str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def bootstrap_log(self, instance_id: str) -> str:
        inst = self.instances[instance_id]
        path = (inst.boot_dir or Path("/nonexistent")) / "bootstrap.log"
        return path.read_text() if path.exists() else ""

    def wait_boot_exit(self, instance_id: str, timeout_s: float = 60) -> int | None:
        proc = self.instances[instance_id].proc
        return None if proc is None else proc.wait(timeout=timeout_s)

    def on_stop(self) -> None:
        import signal

        for inst in self.instances.values():
            if inst.proc is not None:  # the whole group: the lifetime-cap sleeper outlives bash
                try:
                    os.killpg(inst.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                inst.proc.wait()
        self._tmp.cleanup()
