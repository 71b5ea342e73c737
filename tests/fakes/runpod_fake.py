"""A local fake of the RunPod API subset cloudtune calls, with RunPod's request/response shapes.

Shapes follow runpod/docs `api-reference-v2/openapi.json` (Pod, CreatePodRequest, PodStatus,
problem+json errors, wrapped lists `{"pods": [...]}`) and the GraphQL `gpuTypes` /
`podRentInterruptable` documents of runpod-python. Served under `/v2/...` and `/graphql`.

Behaviour worth knowing in tests:
- a created pod goes PROVISIONING -> STARTING -> RUNNING, one step per GET of that pod;
- `interrupt(pod_id)` makes it EXITED (cost 0), killing its local process like a spot reclaim;
- with `run_commands=True` the pod's `args` run as a local process with the pod's env plus
  RUNPOD_POD_ID and a pod-scoped RUNPOD_API_KEY, which the fake accepts for that pod only;
- `ghost_terminated=True`: DELETE leaves the pod listed as RUNNING while GET reads TERMINATED
  (the dstack incident), to test the loud report.
"""

from __future__ import annotations

import itertools
import signal
import threading
from typing import Any

from tests.fakes.server import FakeServer, LocalWorkloads, Request, Response, route

DEFAULT_GPUS: list[dict[str, Any]] = [
    {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "memory": 24,
     "price": {"secure": 0.69, "community": 0.34}, "availability": "HIGH", "maxGpuCount": 8},
    {"id": "NVIDIA H100 80GB HBM3", "name": "H100 SXM", "memory": 80,
     "price": {"secure": 2.69, "community": 1.99}, "availability": "LOW", "maxGpuCount": 8},
    {"id": "NVIDIA A100 80GB PCIe", "name": "A100 PCIe", "memory": 80,
     "price": {"secure": 1.39, "community": 1.19}, "availability": "NONE", "maxGpuCount": 8},
    {"id": "NVIDIA L40S", "name": "L40S", "memory": 48,
     "price": {"secure": 0.86, "community": None}, "availability": "MEDIUM", "maxGpuCount": 2},
]

CAPACITY_MSG = ("There are no longer any instances available with the requested specifications. "
                "Please refresh and try again.")
FUNDS_MSG = "Insufficient balance: an on-demand deploy needs at least one hour of credit."


def problem(status: int, title: str, detail: str) -> Response:
    return Response(status, {"title": title, "status": status, "detail": detail},
                    content_type="application/problem+json")


class RunPodFake(FakeServer):
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
        self._reads: dict[str, int] = {}
        self.v2_catalog = True  # False: /v2/catalog/gpus answers 404 (exercise the GraphQL fallback)

    # ------------------------------------------------------------ helpers for tests

    def pod_key(self, pod_id: str) -> str:
        return f"pod-scoped-{pod_id}"

    def authorized(self, req: Request) -> bool:
        if super().authorized(req):
            return True
        m = req.path.rstrip("/").rsplit("/", 1)
        return req.method == "DELETE" and len(m) == 2 and req.bearer == self.pod_key(m[1])

    def unauthorized(self, req: Request) -> Response:
        return problem(401, "Unauthorized", "invalid bearer token")

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

    # ------------------------------------------------------------ REST v2

    @route("GET", r"/v2/catalog/gpus")
    def catalog(self, req: Request) -> Response:
        if not self.v2_catalog:
            return problem(404, "Not Found", "resource not found")
        cloud = (req.arg("cloud") or "SECURE").upper()
        include = req.arg("include") == "AVAILABILITY"
        if include and req.arg("product") is None:
            return problem(400, "Bad Request", "product is required with include=AVAILABILITY")
        gpus = []
        for g in self.gpus:
            item = {"id": g["id"], "name": g["name"], "memory": g["memory"], "price": g["price"],
                    "maxGpuCount": g["maxGpuCount"]}
            if include:
                community_missing = cloud == "COMMUNITY" and not g["price"].get("community")
                item["availability"] = "NONE" if community_missing else g["availability"]
                item["dataCenters"] = [{"id": "US-TX-3", "availability": item["availability"]}]
                item["cudaVersions"] = ["12.8", "12.6"]
            gpus.append(item)
        return Response(200, {"gpus": gpus})

    @route("POST", r"/v2/pods")
    def create(self, req: Request) -> Response:
        body = req.json or {}
        missing = [k for k in ("name", "image") if not body.get(k)]
        if missing:
            return Response(422, {"title": "Unprocessable Entity", "status": 422, "detail": "Request validation failed.",
                                  "errors": [f"{k} is required" for k in missing]},
                            content_type="application/problem+json")
        gpu = self._gpu((body.get("gpu") or {}).get("id", ""))
        if gpu is None:
            return problem(400, "Bad Request", f"unknown GPU type {(body.get('gpu') or {}).get('id')!r}")
        cloud = body.get("cloud", "SECURE")
        per_gpu = gpu["price"].get(cloud.lower())
        if gpu["availability"] == "NONE" or not per_gpu:
            return problem(500, "Internal Server Error", CAPACITY_MSG)
        count = int((body.get("gpu") or {}).get("count", 1))
        price = round(per_gpu * count, 4)
        if self.balance < price:
            return problem(402, "Payment Required", FUNDS_MSG)
        return Response(201, self._public(self._new_pod(body, gpu, cloud, count, price)))

    def _new_pod(self, body: dict[str, Any], gpu: dict[str, Any], cloud: str, count: int, price: float,
                 *, interruptible: bool = False) -> dict[str, Any]:
        with self.lock:
            pod_id = next(self._ids)
            pod = {
                "id": pod_id, "name": body["name"], "status": "PROVISIONING", "image": body.get("image"),
                "args": body.get("args", ""), "disk": body.get("disk", 50), "env": body.get("env") or {},
                "ports": body.get("ports") or [], "mounts": {}, "registry": None, "cloud": cloud,
                "dataCenterId": "US-TX-3", "cudaVersion": "12.8", "ssh": {"proxy": None, "direct": None},
                "template": None, "cost": price, "locked": False, "createdAt": "2026-11-22T00:00:00Z",
                "startedAt": None, "globalNetworking": {"enabled": False},
                "gpu": {"id": gpu["id"], "count": count}, "_price": price, "_interruptible": interruptible,
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

    # ------------------------------------------------------------ GraphQL

    @route("POST", r"/graphql")
    def graphql(self, req: Request) -> Response:
        body = req.json or {}
        query = body.get("query", "")
        variables = body.get("variables") or {}
        if "gpuTypes" in query:
            secure = ((variables.get("input") or {}).get("secureCloud"))
            out = []
            for g in self.gpus:
                stock = {"HIGH": "High", "MEDIUM": "Medium", "LOW": "Low"}.get(g["availability"])
                if secure is False and not g["price"].get("community"):
                    stock = None
                out.append({
                    "id": g["id"], "displayName": g["name"], "memoryInGb": g["memory"],
                    "maxGpuCount": g["maxGpuCount"], "securePrice": g["price"]["secure"],
                    "communityPrice": g["price"].get("community"),
                    "secureSpotPrice": round(g["price"]["secure"] * 0.5, 3),
                    "communitySpotPrice": round((g["price"].get("community") or 0) * 0.5, 3) or None,
                    "lowestPrice": {"uninterruptablePrice": g["price"]["secure"],
                                    "minimumBidPrice": round(g["price"]["secure"] * 0.5, 3), "stockStatus": stock},
                })
            return Response(200, {"data": {"gpuTypes": out}})
        if "podRentInterruptable" in query:
            inp = variables.get("input") or {}
            gpu = self._gpu(inp.get("gpuTypeId", ""))
            if gpu is None or gpu["availability"] == "NONE":
                return Response(200, {"errors": [{"message": CAPACITY_MSG, "extensions": {"code": "RUNPOD"}}],
                                      "data": {"podRentInterruptable": None}})
            count = int(inp.get("gpuCount", 1))
            env = {e["key"]: e["value"] for e in inp.get("env") or []}
            pod = self._new_pod({"name": inp.get("name"), "image": inp.get("imageName"), "args": inp.get("dockerArgs"),
                                 "env": env}, gpu, inp.get("cloudType", "SECURE"), count,
                                round(float(inp.get("bidPerGpu", 0)) * count, 4), interruptible=True)
            return Response(200, {"data": {"podRentInterruptable": {
                "id": pod["id"], "name": pod["name"], "desiredStatus": "RUNNING", "costPerHr": pod["cost"]}}})
        return Response(200, {"errors": [{"message": "Cannot query this field", "extensions": {"code": "GRAPHQL"}}]})
