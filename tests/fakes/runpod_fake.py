"""A local fake of the RunPod REST v2 subset cloudtune calls, following runpod/openapi-v2.json.

Shapes are the spec's (../shared/apis/runpod/openapi-v2.json, info.version 2.0.0): GpuType rows
with `maxCount`/`price` per cloud and, with include=AVAILABILITY, `availability`, `dataCenters`
and `cudaVersions` scoped by `count`, `cloud` and `minCudaVersion`; Pod objects; RFC 9457
problem+json errors with the status codes createPod documents (400 = no capacity, free-text
detail only; 403 = pool not open to this account; 402 = balance; 422 = body breaks the contract,
validated against CreatePodRequest itself); RateLimit/RateLimit-Policy headers on every answer.
tests/test_contract_runpod.py validates every exchange against the spec.

Behaviour worth knowing in tests:
- a created pod goes PROVISIONING -> STARTING -> RUNNING, one step per GET of that pod;
- `interrupt(pod_id)` makes it EXITED (cost 0), killing its local process (host loss);
- with `run_commands=True` the pod's `args` run as a local process with the pod's env plus
  RUNPOD_POD_ID and a pod-scoped RUNPOD_API_KEY, which the fake accepts for that pod only;
- `ghost_terminated=True`: DELETE leaves the pod listed as RUNNING while GET reads TERMINATED
  (the dstack incident), to test the loud report;
- `stock[(gpu_id, cloud)]` = free GPUs per machine (default: maxCount); a count above it is no stock;
- `forbidden_pools`: GPU ids whose create answers 403; `host_cuda`: the CUDA version of the hosts.
"""

from __future__ import annotations

import itertools
import signal
import threading
from typing import Any

from tests.fakes.server import FakeServer, LocalWorkloads, Request, Response, route


def gpu_row(gpu_id: str, name: str, memory: int, secure: float, community: float | None, availability: str,
            max_secure: int, max_community: int, pool: str | None = None) -> dict[str, Any]:
    """A GpuType as the spec defines it (community price 0 and `community: false` when not offered)."""
    return {"id": gpu_id, "name": name, "pool": pool, "manufacturer": "NVIDIA", "memory": memory,
            "secure": True, "community": community is not None,
            "price": {"secure": secure, "community": community or 0.0},
            "maxCount": {"secure": max_secure, "community": max_community if community is not None else 0},
            "_availability": availability}


DEFAULT_GPUS: list[dict[str, Any]] = [
    gpu_row("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0.34, "HIGH", 8, 4, "ADA_24"),
    gpu_row("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 1.99, "LOW", 8, 8, "HOPPER_141"),
    gpu_row("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.39, 1.19, "NONE", 8, 8, "AMPERE_80"),
    gpu_row("NVIDIA A100-SXM4-80GB", "A100 SXM", 80, 1.49, None, "MEDIUM", 8, 0, "AMPERE_80"),
    gpu_row("NVIDIA L40S", "L40S", 48, 0.86, None, "MEDIUM", 2, 0, "ADA_48_PRO"),
]

# What createPod answers when a GPU type cannot be placed (the spec: a 400 with only a `detail`).
CAPACITY_MSG = ("There are no longer any instances available with the requested specifications. "
                "Please refresh and try again.")
FUNDS_MSG = "Insufficient balance: an on-demand deploy needs at least one hour of credit."
RATE_POLICY = '"minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400'


def _cuda_ge(a: str, b: str) -> bool:
    """major.minor compared numerically (the spec: 12.11 is above 12.2)."""
    pa, pb = [int(x) for x in a.split(".")], [int(x) for x in (b.split(".") + ["0"])[:2]]
    return pa >= pb


def problem(status: int, title: str, detail: str, errors: list[str] | None = None) -> Response:
    body: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return Response(status, body, content_type="application/problem+json")


class RunPodFake(FakeServer):
    FAULT_ROUTES = {"create": ("POST", r"^/v2/pods$"), "status": ("GET", r"^/v2/pods/[^/]+$"),
                    "list": ("GET", r"^/v2/pods$"), "terminate": ("DELETE", r"^/v2/pods/[^/]+$"),
                    "search": ("GET", r"^/v2/catalog/gpus$")}

    def fault_response(self, op: str, status: int, code: str | None, retry_after: float | None) -> Response:
        """RFC 9457 problem+json, as every RunPod v2 error."""
        from http import HTTPStatus

        resp = problem(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error",
                       code or "planned fault")
        if retry_after is not None:
            resp.headers["Retry-After"] = f"{retry_after:g}"
        return resp

    def __init__(self, api_key: str | None = "rp-test-key", *, run_commands: bool = False,
                 gpus: list[dict[str, Any]] | None = None, balance: float = 100.0, cwd: str | None = None,
                 log_dir: str | None = None) -> None:
        super().__init__(api_key)
        self.gpus = [dict(g) for g in (gpus or DEFAULT_GPUS)]
        self.pods: dict[str, dict[str, Any]] = {}
        self.balance = balance
        self.run_commands = run_commands
        self.cwd = cwd
        self.ghost_terminated = False
        self.workloads = LocalWorkloads(log_dir)
        self._ids = (f"rp{n:06d}x" for n in itertools.count(1))
        self.stock: dict[tuple[str, str], int] = {}
        self.forbidden_pools: set[str] = set()
        self.host_cuda = ["12.8", "12.6", "12.2"]
        self.requests_left = {"minute": 59, "hour": 2999, "day": 49999}
        self.reset_s = 12

    # ------------------------------------------------------------ helpers for tests

    def pod_key(self, pod_id: str) -> str:
        return f"pod-scoped-{pod_id}"

    def authorized(self, req: Request) -> bool:
        if super().authorized(req):
            return True
        m = req.path.rstrip("/").rsplit("/", 1)
        return req.method == "DELETE" and len(m) == 2 and req.bearer == self.pod_key(m[1])

    def unauthorized(self, req: Request) -> Response:
        return problem(401, "Unauthorized", "missing bearer token" if not req.bearer else "invalid bearer token")

    def not_found(self, req: Request) -> Response:
        return problem(404, "Not Found", "resource not found")

    def set_status(self, pod_id: str, status: str) -> None:
        with self.lock:
            self.pods[pod_id]["status"] = status
            self.pods[pod_id]["cost"] = 0.0 if status in ("EXITED", "TERMINATED") else self.pods[pod_id]["_price"]

    def interrupt(self, pod_id: str) -> None:
        """A spot reclaim / host loss: SIGTERM, 5 s, SIGKILL (RunPod's documented spot behaviour)."""
        self.workloads.signal(pod_id, signal.SIGTERM, wait_s=5.0)
        self.set_status(pod_id, "EXITED")

    def alive(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.pods.values() if p["status"] != "TERMINATED"]

    def on_stop(self) -> None:
        self.workloads.stop_all()

    def _public(self, pod: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in pod.items() if not k.startswith("_")}
        out["actions"] = {"RUNNING": ["stop", "restart", "terminate"], "EXITED": ["start", "terminate"],
                          "TERMINATED": []}.get(pod["status"], ["terminate"])
        out["runtime"] = {"uptime": 1, "ports": []} if pod["status"] == "RUNNING" else None
        return out

    def _gpu(self, gpu_id: str) -> dict[str, Any] | None:
        return next((g for g in self.gpus if g["id"] == gpu_id), None)

    def response_headers(self, req: Request, resp: Response) -> dict[str, str]:
        """RateLimit headers accompany every authenticated answer (components.headers)."""
        with self.lock:
            left = dict(self.requests_left)  # static unless a test spends a window
        return {"RateLimit": f'"minute";r={left["minute"]};t={self.reset_s}, "hour";r={left["hour"]};t=1800, '
                             f'"day";r={left["day"]};t=45000',
                "RateLimit-Policy": RATE_POLICY}

    def free(self, g: dict[str, Any], cloud: str) -> int:
        """GPUs free on one machine of this type and cloud now (0 when availability is NONE)."""
        if g["_availability"] == "NONE" or not g[cloud.lower()]:
            return 0
        return self.stock.get((g["id"], cloud), g["maxCount"][cloud.lower()])

    def _cuda_ok(self, floor: str | None) -> list[str]:
        return [v for v in self.host_cuda if floor is None or _cuda_ge(v, floor)]

    # ------------------------------------------------------------ REST v2

    @route("GET", r"/v2/catalog/gpus")
    def catalog(self, req: Request) -> Response:
        include = req.arg("include") == "AVAILABILITY"
        product = req.arg("product")
        if include != (product is not None):
            return problem(400, "Bad Request", "product is required with include=AVAILABILITY, and valid only with it")
        cloud = (req.arg("cloud") or "SECURE").upper()
        count = int(req.arg("count") or 1)
        cudas = self._cuda_ok(req.arg("minCudaVersion"))
        gpus = []
        for g in self.gpus:
            item = {k: v for k, v in g.items() if not k.startswith("_")}
            if include:
                ok = self.free(g, cloud) >= count and bool(cudas)
                item["availability"] = g["_availability"] if ok else "NONE"
                if ok:
                    item["dataCenters"] = [{"id": "US-TX-3", "name": "US Texas 3", "availability": item["availability"]}]
                    item["cudaVersions"] = [{"version": v, "available": True} for v in cudas]
            gpus.append(item)
        return Response(200, {"gpus": gpus})

    @route("POST", r"/v2/pods")
    def create(self, req: Request) -> Response:
        from tests.fakes.contract import runpod_spec

        body = req.json or {}
        violations = runpod_spec().check_request("POST", "/v2/pods", {}, body)
        if violations:  # the contract itself: a leftover field is a 422 naming it
            return problem(422, "Unprocessable Entity", "Request validation failed.",
                           [v.split("request body: ", 1)[-1] for v in violations])
        gpu = self._gpu((body.get("gpu") or {}).get("id", ""))
        if gpu is None:
            return problem(400, "Bad Request", f"unknown GPU type {(body.get('gpu') or {}).get('id')!r}")
        if gpu["id"] in self.forbidden_pools:
            return problem(403, "Forbidden", "access denied")
        cloud = body.get("cloud", "SECURE")
        count = int((body.get("gpu") or {}).get("count", 1))
        floor = (body.get("gpu") or {}).get("minCudaVersion")
        if count > gpu["maxCount"][cloud.lower()]:
            return problem(400, "Bad Request", f"gpu.count {count} is above maxCount for {cloud}")
        if self.free(gpu, cloud) < count or not self._cuda_ok(floor):
            return problem(400, "Bad Request", CAPACITY_MSG)
        price = round(gpu["price"][cloud.lower()] * count, 4)
        if self.balance < price:
            return problem(402, "Payment Required", FUNDS_MSG)
        return Response(201, self._public(self._new_pod(body, gpu, cloud, count, price,
                                                        cuda=self._cuda_ok(floor)[0])))

    def _new_pod(self, body: dict[str, Any], gpu: dict[str, Any], cloud: str, count: int, price: float,
                 *, cuda: str = "12.8") -> dict[str, Any]:
        with self.lock:
            pod_id = next(self._ids)
            pod = {
                "id": pod_id, "name": body["name"], "status": "PROVISIONING", "image": body.get("image"),
                "args": body.get("args", ""), "disk": body.get("disk", 50), "env": body.get("env") or {},
                "ports": body.get("ports") or [], "mounts": {}, "registry": None, "cloud": cloud,
                "dataCenterId": "US-TX-3", "cudaVersion": cuda, "ssh": {"proxy": None, "direct": None},
                "template": None, "cost": price, "locked": False, "createdAt": "2026-11-22T00:00:00Z",
                "startedAt": None, "globalNetworking": {"enabled": False},
                "gpu": {"id": gpu["id"], "count": count}, "_price": price,
            }
            self.pods[pod_id] = pod
        if self.run_commands and pod["args"]:
            env = {**{k: str(v) for k, v in pod["env"].items()},
                   "RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": self.pod_key(pod_id), "RUNPOD_GPU_COUNT": str(count)}
            self.workloads.start(pod_id, pod["args"], env, cwd=self.cwd)
        return pod

    @route("GET", r"/v2/pods")
    def list_pods(self, req: Request) -> Response:
        with self.lock:
            pods = [self._public(p) for p in self.pods.values()
                    if p["status"] != "TERMINATED" or p.get("_ghost")]
            for p in pods:
                if self.pods[p["id"]].get("_ghost"):
                    p["status"], p["cost"] = "RUNNING", self.pods[p["id"]]["_price"]
        return Response(200, {"pods": pods})

    @route("GET", r"/v2/pods/(?P<id>[^/]+)")
    def get_pod(self, req: Request) -> Response:
        pod_id = req.params["id"]
        with self.lock:
            pod = self.pods.get(pod_id)
            if pod is None or (pod["status"] == "TERMINATED" and not pod.get("_ghost")):
                return problem(404, "Not Found", "The requested Pod does not exist.")
            if pod["status"] in ("PROVISIONING", "STARTING"):
                pod["status"] = {"PROVISIONING": "STARTING", "STARTING": "RUNNING"}[pod["status"]]
                if pod["status"] == "RUNNING":
                    pod["startedAt"] = "2026-11-22T00:00:05Z"
            return Response(200, self._public(pod))

    @route("DELETE", r"/v2/pods/(?P<id>[^/]+)")
    def delete_pod(self, req: Request) -> Response:
        pod_id = req.params["id"]
        with self.lock:
            pod = self.pods.get(pod_id)
            if pod is None or pod["status"] == "TERMINATED":
                return problem(404, "Not Found", "The requested Pod does not exist.")
            pod["status"], pod["cost"] = "TERMINATED", 0.0
            if self.ghost_terminated:
                pod["_ghost"] = True
        if req.bearer != self.pod_key(pod_id):  # a self-delete comes from inside the process
            threading.Thread(target=self.workloads.signal, args=(pod_id, signal.SIGTERM, 5.0), daemon=True).start()
        return Response(204)
