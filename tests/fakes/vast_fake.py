"""A local fake of the Vast.ai API subset cloudtune calls, with Vast's request/response shapes.

Shapes follow vast-ai/vast-cli `vastai/api/{offers,instances}.py` and vast-ai/docs `openapi.yaml`:
`POST /api/v0/bundles/` (query operators eq/neq/gt/gte/lt/lte/in/notin, order, limit) ->
`{"offers": [...]}`; `PUT /api/v0/asks/{id}/` -> `{"success": true, "new_contract": N}`;
`GET /api/v0/instances/{id}/` -> `{"instances": {...} | null}`; `GET /api/v1/instances/`
(JSON-encoded `select_filters`, pages of `limit` with `next_token`); `DELETE /api/v0/instances/{id}/`;
errors `{"success": false, "error": "no_such_ask|auth_error|not_found|...", "msg": ...}`.
Checked against the per-endpoint files of vast-ai/docs @ c624622 (../shared/apis/vast/endpoints):
create takes `env` as a Docker-flag string and enforces `x-input-validation` (400 invalid_args);
a bad key on search is a 404 (search_offers.yaml), elsewhere a 401 `Error`.

Test controls: `outbid(id)` pauses an interruptible instance (stopped, no notice) and kills its
process; `host_offline(id)`; `contract_on_failure=True` makes the next create fail with a
`new_contract` that still exists; with `run_commands=True` `args` run as a local process with
CONTAINER_ID and an instance-scoped CONTAINER_API_KEY.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
from typing import Any

from tests.fakes.server import FakeServer, LocalWorkloads, Request, Response, route


def _offer(i: int, gpu: str, n: int, ram: int, dph: float, **kw: Any) -> dict[str, Any]:
    base = {
        "id": i, "ask_contract_id": i, "machine_id": 1000 + i, "host_id": 500 + i, "gpu_name": gpu,
        "num_gpus": n, "gpu_ram": ram, "dph_total": dph, "dph_base": round(dph * 0.95, 4),
        "min_bid": round(dph * 0.45, 4), "storage_cost": 0.15, "inet_up_cost": 0.0, "inet_down_cost": 0.0,
        "reliability": 0.995, "reliability2": 0.995, "verified": True, "rentable": True, "rented": False,
        "external": False, "geolocation": "Texas, US", "cuda_max_good": 12.8, "cpu_cores_effective": 16.0,
        "cpu_ram": 64000, "disk_space": 500.0, "duration": 864000.0,
    }
    base.update(kw)
    return base


DEFAULT_OFFERS: list[dict[str, Any]] = [
    _offer(101, "RTX 4090", 1, 24564, 0.41),
    _offer(102, "RTX 4090", 1, 24564, 0.29, reliability=0.91, reliability2=0.91),  # unreliable host
    _offer(103, "RTX 4090", 2, 24564, 0.80, geolocation="Quebec, CA"),
    _offer(104, "H100 SXM", 1, 81559, 1.85),
    _offer(105, "A100 SXM4", 1, 81920, 0.95),
    _offer(106, "A100 PCIE", 1, 40960, 0.60, verified=False),  # unverified
    _offer(107, "RTX 3090", 1, 24576, 0.18, external=True),
    _offer(108, "RTX 4090", 1, 24564, 0.45, geolocation="Oslo, NO"),
]

_OPS = {
    "eq": lambda a, b: a == b, "neq": lambda a, b: a != b, "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b, "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}
_QUERY_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}


def err(status: int, error: str, msg: str, **extra: Any) -> Response:
    return Response(status, {"success": False, "error": error, "msg": msg, **extra})


class VastFake(FakeServer):
    FAULT_ROUTES = {"create": ("PUT", r"^/api/v0/asks/\d+/$"), "status": ("GET", r"^/api/v0/instances/\d+/$"),
                    "list": ("GET", r"^/api/v1/instances/$"), "terminate": ("DELETE", r"^/api/v0/instances/\d+/$"),
                    "search": ("POST", r"^/api/v0/bundles/$")}
    # x-rate-limit of each endpoint file (../shared/apis/vast/endpoints): search 10 per minute; the others a
    # minimum interval in seconds between requests ("API requests too frequent endpoint threshold=N").
    RATE_LIMITS = {"search": ("per_minute", 10), "create": ("threshold", 4.5), "status": ("threshold", 2.0),
                   "terminate": ("threshold", 3.0), "list": ("threshold", 1.0)}

    def fault_response(self, op: str, status: int, code: str | None, retry_after: float | None) -> Response:
        """Vast's error bodies: 429 `{"detail": "API requests too frequent ..."}` (create/show_instance
        .yaml; destroy: `rate_limit_exceeded`), else `{"success": false, "error", "msg"}`."""
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        if status == 429 and op == "terminate":
            return Response(429, {"success": False, "error": code or "rate_limit_exceeded",
                                  "msg": "API requests too frequent"}, headers)
        if status == 429:
            limit = self.RATE_LIMITS.get(op, ("threshold", 1.0))[1]
            return Response(429, {"detail": f"API requests too frequent endpoint threshold={limit}"}, headers)
        return Response(status, {"success": False, "error": code or "server_error", "msg": "planned fault"}, headers)

    def enforce_rate_limits(self, scale: float = 1.0) -> None:
        """Answer 429 as Vast does once an endpoint's documented limit is passed (`RATE_LIMITS`), with
        every window and threshold multiplied by `scale` (tests shrink time, not the rule)."""
        with self.lock:
            self._rate_scale = scale
            self._rate_seen: dict[str, list[float]] = {}

    def _rate_limited(self, req: Request) -> Response | None:
        import re as _re
        import time as _time

        scale = getattr(self, "_rate_scale", None)
        if scale is None:
            return None
        op = next((o for o, (m, rx) in self.FAULT_ROUTES.items() if m == req.method and _re.search(rx, req.path)),
                  None)
        if op is None:
            return None
        kind, value = self.RATE_LIMITS[op]
        now = _time.monotonic()
        with self.lock:
            seen = self._rate_seen.setdefault(op, [])
            if kind == "per_minute":
                seen[:] = [t for t in seen if now - t < 60.0 * scale]
                over = len(seen) >= value
            else:
                over = bool(seen) and now - seen[-1] < value * scale
            if over:
                return self.fault_response(op, 429, None, None)  # no Retry-After: Vast sends none
            seen.append(now)
        return None

    def _dispatch(self, req: Request) -> Response:
        limited = self._rate_limited(req)
        if limited is not None:
            with self.lock:
                self.log.append(req)
            return limited
        return super()._dispatch(req)

    def __init__(self, api_key: str | None = "vast-test-key", *, run_commands: bool = False,
                 offers: list[dict[str, Any]] | None = None, credit: float = 100.0, cwd: str | None = None,
                 log_dir: str | None = None) -> None:
        super().__init__(api_key)
        self.offers = [dict(o) for o in (offers or DEFAULT_OFFERS)]
        self.instances: dict[int, dict[str, Any]] = {}
        self.credit = credit
        self.run_commands = run_commands
        self.cwd = cwd
        self.contract_on_failure = False
        self.workloads = LocalWorkloads(log_dir)
        self._ids = itertools.count(9001)
        self.queries: list[dict[str, Any]] = []
        self.destroyed: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------ test controls

    def container_key(self, inst_id: int | str) -> str:
        return f"container-key-{inst_id}"

    def authorized(self, req: Request) -> bool:
        if super().authorized(req):
            return True
        parts = [p for p in req.path.split("/") if p]
        return (req.method in ("DELETE", "PUT") and len(parts) == 4 and parts[:3] == ["api", "v0", "instances"]
                and req.bearer == self.container_key(parts[3]))

    def unauthorized(self, req: Request) -> Response:
        if req.method == "POST" and req.path.startswith("/api/v0/bundles"):
            return Response(404, {"error": "auth_error", "msg": "Invalid user key"})  # search_offers.yaml 404
        return err(401, "auth_error", "Invalid user key")

    def not_found(self, req: Request) -> Response:
        return err(404, "not_found", f"no route for {req.method} {req.path}")

    def _set(self, inst_id: int, **fields: Any) -> None:
        with self.lock:
            self.instances[int(inst_id)].update(fields)

    def outbid(self, inst_id: int | str) -> None:
        """Vast pauses an outbid interruptible instance without notice; its disk keeps billing."""
        self.workloads.signal(str(inst_id), signal.SIGKILL, wait_s=0.0)
        self._set(int(inst_id), actual_status="stopped", cur_state="stopped", intended_status="stopped",
                  next_state="stopped", status_msg="")

    def host_offline(self, inst_id: int | str) -> None:
        self.workloads.signal(str(inst_id), signal.SIGKILL, wait_s=0.0)
        self._set(int(inst_id), actual_status="offline")

    def alive(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.instances.values())

    def on_stop(self) -> None:
        self.workloads.stop_all()

    # ------------------------------------------------------------ offers

    @staticmethod
    def _matches(offer: dict[str, Any], q: dict[str, Any]) -> bool:
        for field, cond in q.items():
            if field in _QUERY_KEYS:
                continue
            value = offer.get("reliability2" if field == "reliability" else field)
            if not isinstance(cond, dict):
                cond = {"eq": cond}
            for op, arg in cond.items():
                if op not in _OPS:
                    raise ValueError(f"unknown operator {op!r}")
                if not _OPS[op](value, arg):
                    return False
        return True

    @route("POST", r"/api/v0/bundles/")
    def bundles(self, req: Request) -> Response:
        q = req.json or {}
        self.queries.append(q)
        if q.get("type") not in ("ondemand", "bid", "reserved"):
            return err(400, "invalid_args", f"bad type {q.get('type')!r}")
        with self.lock:
            rows = [dict(o) for o in self.offers if self._matches(o, q)]
        for field, direction in reversed(q.get("order") or []):  # first key sorts last (stable sort)
            rows.sort(key=lambda o, f=field: o.get(f) or 0, reverse=direction == "desc")
        return Response(200, {"offers": rows[: int(q.get("limit") or 64)]})

    # ------------------------------------------------------------ create

    @route("PUT", r"/api/v0/asks/(?P<id>\d+)/")
    def accept(self, req: Request) -> Response:
        from tests.fakes.contract import parse_docker_env, vast_spec

        ask_id = int(req.params["id"])
        body = req.json or {}
        if not body.get("image"):
            return err(400, "invalid_args", "image is required")
        problems = vast_spec().check_request("PUT", req.path, {}, body)
        if problems:  # type errors and x-input-validation limits
            return err(400, "invalid_args", "; ".join(p.split(": ", 1)[-1] for p in problems)[:500], ask_id=ask_id)
        env_vars = parse_docker_env(body.get("env") or "")
        with self.lock:
            offer = next((o for o in self.offers if o["id"] == ask_id), None)
            if offer is None or offer["rented"]:
                return err(404, "no_such_ask", f"Instance type by id {ask_id} is not available.")
            price = float(body["price"]) if body.get("price") is not None else offer["dph_total"]
            if body.get("price") is not None and price < offer["min_bid"]:
                return err(400, "invalid_price", f"bid {price} is below the minimum bid {offer['min_bid']}")
            if self.credit < price:
                return err(400, "insufficient_credit", "Your account lacks credit; please add funds.")
            inst_id = next(self._ids)
            self.instances[inst_id] = {
                "id": inst_id, "machine_id": offer["machine_id"], "label": body.get("label"),
                "image_uuid": body["image"], "image_args": body.get("args") or [], "onstart": body.get("onstart"),
                "extra_env": [[k, v] for k, v in env_vars.items()],
                "actual_status": None, "intended_status": "running", "cur_state": "running",
                "next_state": "running", "status_msg": "", "is_bid": body.get("price") is not None,
                "dph_total": price, "geolocation": offer["geolocation"], "gpu_name": offer["gpu_name"],
                "num_gpus": offer["num_gpus"], "disk_space": body.get("disk"), "start_date": 1.0,
                "_reads": 0, "_ask": ask_id,
            }
            offer["rented"] = True
            fail = self.contract_on_failure
            self.contract_on_failure = False
        if self.run_commands and body.get("args"):
            env = {**env_vars,
                   "CONTAINER_ID": str(inst_id), "CONTAINER_API_KEY": self.container_key(inst_id),
                   "VAST_CONTAINERLABEL": f"C.{inst_id}", "GPU_COUNT": str(offer["num_gpus"])}
            self.workloads.start(str(inst_id), list(body["args"]), env, cwd=self.cwd)
        if fail:
            return err(500, "server_error", "error while starting the instance", new_contract=inst_id)
        return Response(200, {"success": True, "new_contract": inst_id})

    # ------------------------------------------------------------ read

    def _public(self, inst: dict[str, Any], *, v0: bool = False) -> dict[str, Any]:
        """An Instance as each endpoint documents it (show_instance: extra_env strings; v1: pairs)."""
        out = {k: v for k, v in inst.items() if not k.startswith("_") and v is not None or k == "actual_status"}
        if v0:
            out["extra_env"] = [f"{k}={v}" for k, v in inst["extra_env"]]
        return out

    @route("GET", r"/api/v0/instances/(?P<id>\d+)/")
    def show(self, req: Request) -> Response:
        with self.lock:
            inst = self.instances.get(int(req.params["id"])) or self.destroyed.get(int(req.params["id"]))
            if inst is None:  # show_instance.yaml: 400 = invalid instance id
                return err(400, "invalid_args", f"error 400: Invalid instance id {req.params['id']}")
            if inst["actual_status"] in (None, "loading") and inst["intended_status"] == "running":
                inst["_reads"] += 1
                inst["actual_status"] = "loading" if inst["_reads"] == 1 else "running"
            return Response(200, {"instances": self._public(inst, v0=True)})

    @route("GET", r"/api/v1/instances/")
    def list_v1(self, req: Request) -> Response:
        filters = json.loads(req.arg("select_filters") or "{}")
        limit = int(req.arg("limit") or 25)
        after = int(req.arg("after_token") or 0)
        with self.lock:
            rows = [self._public(i) for i in sorted(self.instances.values(), key=lambda i: i["id"])
                    if i["id"] > after and self._matches(i, filters)]
        page = rows[:limit]
        token = str(page[-1]["id"]) if len(rows) > limit else None
        labels: dict[str, int] = {}
        for r in rows:
            labels[r["label"]] = labels.get(r["label"], 0) + 1
        return Response(200, {"instances": page, "next_token": token, "total_instances": len(rows),
                              "label_counts": labels})

    # ------------------------------------------------------------ destroy

    @route("DELETE", r"/api/v0/instances/(?P<id>\d+)/")
    def destroy(self, req: Request) -> Response:
        inst_id = int(req.params["id"])
        with self.lock:
            inst = self.instances.pop(inst_id, None)
            if inst is not None:  # still readable for a while, as destroyed (issue #12)
                self.destroyed[inst_id] = {**inst, "actual_status": "destroyed", "intended_status": "stopped",
                                           "cur_state": "stopped", "next_state": "stopped"}
            for o in self.offers:
                if inst is not None and o["id"] == inst["_ask"]:
                    o["rented"] = False
        if inst is None:
            return err(404, "no_such_instance", f"Instance {inst_id} not found.")
        if req.bearer != self.container_key(inst_id):
            threading.Thread(target=self.workloads.signal, args=(str(inst_id), signal.SIGTERM, 5.0),
                             daemon=True).start()
        return Response(200, {"success": True})
