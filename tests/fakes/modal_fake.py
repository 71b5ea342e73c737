"""A fake Modal client that follows Modal's documented Sandbox behaviour, running each sandbox's
command as a local process (the "container" is this machine).

What it keeps from Modal (modal.com/docs/guide/sandboxes, modal-client `sandbox/_sandbox.py`,
`sandbox/_common.py`, ../shared/providers.md section 4):
- `create` takes exactly what `modal.Sandbox.create` takes: the kwargs the adapter builds are bound
  against the real SDK's signature and built as real SDK objects (Image, Secret), and the GPU
  string goes through the SDK's own parser. A name is unique among the app's running sandboxes
  (AlreadyExistsError).
- `timeout` is the sandbox's maximum lifetime; when it passes the process is killed and the
  returncode is 124. `terminate` kills it (returncode 137) and is a no-op once it has finished.
- `from_id` of an unknown id raises NotFoundError; `from_name` finds only running sandboxes;
  `list(tags=...)` returns running sandboxes that carry at least those tags.
- Preemption (`preempt`): the container's main process receives SIGINT, has `grace_s` (Modal: 30 s)
  to exit, then is killed (137). Sandboxes are not restarted.
- An internal failure or eviction (`end_by_modal`): Modal kills the container and records a
  GenericResult with that status and exitcode 0; `returncode` is then computed by the real SDK's
  `_result_returncode`, which gives 0 for it (only TIMEOUT -> 124 and TERMINATED -> 137 are mapped),
  and the status name is reported the way SdkModalClient.result_status reads it.
Errors are the real `modal.exception` classes; `fail_next` injects one, and `fault`/`apply` take the
fault plan every fake shares (tests/_faults_util.py): a planned status becomes the exception the SDK
itself raises for that gRPC status (`modal._grpc_client.grpc_error_to_modal_exception`: 500 INTERNAL ->
InternalError, 503 UNAVAILABLE -> ServiceError, 429 RESOURCE_EXHAUSTED, 404 NOT_FOUND, a timeout
DEADLINE_EXCEEDED -> ServiceError), a reset a `modal.exception.ConnectionError`. Ops: create, status
(from_id), list (from_name and list), terminate. `workload=` runs that argv in every sandbox instead of
the trainer command (a stand-in machine for orchestrator-level tests).
"""

from __future__ import annotations

import inspect
import itertools
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import modal
import modal.exception as mexc
from cloudtune.providers.modal import SandboxInfo
from cloudtune.providers.modal_app import SandboxDefinition, sandbox_kwargs

_ids = itertools.count(1)
# modal.com/docs/guide/gpu
DOCUMENTED_GPUS = {"T4", "L4", "A10", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000", "H100", "H100!",
                   "H200", "B200", "B200+"}


@dataclass
class FakeSandbox:
    sandbox_id: str
    app_name: str
    name: str
    tags: dict[str, str]
    kwargs: dict[str, Any]
    command: tuple[str, ...]
    proc: subprocess.Popen
    deadline: float
    env: dict[str, str] = field(default_factory=dict)
    forced_rc: int | None = None  # 124 (timeout) or 137 (terminated) once Modal ended it
    forced_status: str | None = None  # GenericResult status name when Modal ended it otherwise

    def result_status(self) -> str | None:
        if self.poll() is None:
            return None
        if self.forced_status:
            return self.forced_status
        return {124: "TIMEOUT", 137: "TERMINATED"}.get(self.forced_rc or -1, "SUCCESS" if self.proc.returncode == 0
                                                        else "FAILURE")

    def poll(self) -> int | None:
        if self.forced_status is not None:
            self.proc.poll()
            from modal.sandbox._common import _result_returncode
            from modal_proto import api_pb2

            status = api_pb2.GenericResult.GenericStatus.Value(f"GENERIC_STATUS_{self.forced_status}")
            return _result_returncode(api_pb2.GenericResult(status=status))  # the SDK's own mapping
        if self.forced_rc is not None:
            self.proc.poll()
            return self.forced_rc
        rc = self.proc.poll()
        if rc is None and time.monotonic() >= self.deadline:
            self._kill()
            self.forced_rc = 124
            return 124
        return rc

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class FakeModalClient:
    """Implements the adapter's `ModalClient` protocol the way Modal's SDK behaves."""

    FAULT_METHODS = {"create": ("create",), "status": ("get",), "list": ("find", "list"), "terminate": ("terminate",)}
    _GRPC_STATUS = {500: "INTERNAL", 503: "UNAVAILABLE", 502: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
                    429: "RESOURCE_EXHAUSTED", 404: "NOT_FOUND", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                    400: "INVALID_ARGUMENT", 409: "ALREADY_EXISTS"}

    def __init__(self, *, extra_env: dict[str, str] | None = None, workload: list[str] | None = None) -> None:
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.created: list[FakeSandbox] = []
        self.calls: list[str] = []
        self.extra_env = dict(extra_env or {})
        self.workload = list(workload) if workload else None
        self._faults: list[list[Any]] = []  # [methods, exception, after, times left]
        self._lock = threading.RLock()

    # ------------------------------------------------------------ test controls

    def fail_next(self, method: str, exc: Exception, *, after: bool = False) -> None:
        """Raise `exc` from the next call of `method`; `after=True` performs the call first."""
        self._faults.append([(method,), exc, after, 1])

    def fault(self, op: str, *, status: int = 500, after_effect: bool = False, times: int = 1,
              delay_s: float = 0.0, reset: bool = False, code: str | None = None,
              retry_after: float | None = None) -> None:
        """A fault plan entry (see tests/fakes/server.py FakeServer.fault) as the SDK would raise it."""
        if op not in self.FAULT_METHODS:
            raise ValueError(f"FakeModalClient has no fault route for op {op!r} (Modal has no offers API)")
        if reset:
            exc: Exception = mexc.ConnectionError("connection reset by peer (planned fault)")
        else:
            from grpclib import GRPCError, Status
            from modal._grpc_client import grpc_error_to_modal_exception

            name = "DEADLINE_EXCEEDED" if status == 0 and delay_s else self._GRPC_STATUS.get(status, "INTERNAL")
            exc = grpc_error_to_modal_exception(GRPCError(Status[name], code or f"planned fault ({name})"))
        self._faults.append([self.FAULT_METHODS[op], exc, after_effect, times])

    def apply(self, plan: list[dict[str, Any]]) -> None:
        for entry in plan:
            self.fault(**entry)

    def clear_faults(self) -> None:
        self._faults.clear()

    def alive(self) -> list[FakeSandbox]:
        """Sandboxes still running (what would bill)."""
        return [sb for sb in self.sandboxes.values() if sb.poll() is None]

    def _fault(self, method: str) -> tuple[Exception, bool] | None:
        for i, entry in enumerate(self._faults):
            methods, exc, after, _ = entry
            if method in methods:
                entry[3] -= 1
                if entry[3] <= 0:
                    del self._faults[i]
                return exc, after
        return None

    def preempt(self, sandbox_id: str, grace_s: float = 30.0) -> int:
        """Modal's preemption: SIGINT to the container's main process, then a kill after the grace."""
        sb = self.sandboxes[sandbox_id]
        if sb.poll() is not None:
            return sb.poll()  # type: ignore[return-value]
        sb.proc.send_signal(signal.SIGINT)
        try:
            return sb.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            sb._kill()
            sb.forced_rc = 137
            return 137

    def end_by_modal(self, sandbox_id: str, status: str = "INTERNAL_FAILURE") -> int | None:
        """Modal ends the container itself (internal failure, eviction): killed, GenericResult `status`."""
        sb = self.sandboxes[sandbox_id]
        if sb.poll() is None:
            sb._kill()
            sb.forced_status = status
        return sb.poll()

    def expire(self, sandbox_id: str) -> None:
        """Modal's hard timeout now, whatever the process does: killed, returncode 124."""
        sb = self.sandboxes[sandbox_id]
        if sb.poll() is None:
            sb._kill()
            sb.forced_rc = 124

    def wait(self, sandbox_id: str, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        sb = self.sandboxes[sandbox_id]
        while (rc := sb.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sandbox {sandbox_id} still running")
            time.sleep(0.05)
        return rc

    def close(self) -> None:
        for sb in self.sandboxes.values():
            if sb.proc.poll() is None:
                sb._kill()

    # ------------------------------------------------------------ the ModalClient protocol

    def create(self, defn: SandboxDefinition, secret_env: dict[str, str]) -> SandboxInfo:
        self.calls.append("create")
        fault = self._fault("create")
        if fault and not fault[1]:
            raise fault[0]
        kwargs = sandbox_kwargs(defn, secret_env)  # real SDK objects, built offline
        inspect.signature(modal.Sandbox.create).bind(*defn.command, app=object(), **kwargs)  # TypeError if wrong
        from modal._utils.function_utils import parse_gpu_config

        gpu = parse_gpu_config(kwargs["gpu"])  # raises modal.exception.InvalidError for a malformed string
        if gpu.gpu_type not in DOCUMENTED_GPUS:  # the server's check
            raise mexc.InvalidError(f"unknown GPU type {gpu.gpu_type!r}")
        if not isinstance(kwargs["image"], modal.Image) or not all(isinstance(s, modal.Secret) for s in kwargs["secrets"]):
            raise mexc.InvalidError("image must be a modal.Image and secrets modal.Secret objects")
        if not 1 <= kwargs["timeout"] <= 24 * 3600:
            raise mexc.InvalidError("timeout must be between 1 second and 24 hours")
        with self._lock:
            for sb in self.sandboxes.values():
                if sb.app_name == defn.app_name and sb.name == defn.name and sb.poll() is None:
                    raise mexc.AlreadyExistsError(f"Sandbox with name '{defn.name}' already exists")
            env = {**os.environ, **self.extra_env, **kwargs["env"], **secret_env}
            proc = subprocess.Popen(
                self.workload or list(defn.command), env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=defn.workdir,
            )
            sb = FakeSandbox(
                sandbox_id=f"sb-fake{next(_ids):06d}",
                app_name=defn.app_name,
                name=defn.name,
                tags=dict(kwargs["tags"]),
                kwargs=kwargs,
                command=defn.command,
                proc=proc,
                deadline=time.monotonic() + kwargs["timeout"],
                env={**kwargs["env"], **secret_env},
            )
            self.sandboxes[sb.sandbox_id] = sb
            self.created.append(sb)
        if fault:
            raise fault[0]
        return SandboxInfo(sb.sandbox_id, sb.name, dict(sb.tags), None)

    def _get(self, sandbox_id: str) -> FakeSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            raise mexc.NotFoundError(f"Sandbox {sandbox_id} not found")
        return sb

    def get(self, sandbox_id: str) -> SandboxInfo:
        self.calls.append("get")
        fault = self._fault("get")
        if fault:
            raise fault[0]
        sb = self._get(sandbox_id)
        return SandboxInfo(sb.sandbox_id, None, dict(sb.tags), sb.poll(), sb.result_status())

    def find(self, app_name: str, name: str) -> SandboxInfo | None:
        self.calls.append("find")
        fault = self._fault("find")
        if fault:
            raise fault[0]
        for sb in self.sandboxes.values():
            if sb.app_name == app_name and sb.name == name and sb.poll() is None:
                return SandboxInfo(sb.sandbox_id, sb.name, dict(sb.tags), None)
        return None

    def list(self, app_name: str, tags: dict[str, str]) -> list[SandboxInfo]:
        self.calls.append("list")
        fault = self._fault("list")
        if fault:
            raise fault[0]
        # the SDK's own signature, and the app scope it asks for (no app_id is deprecated since 2026-08-10)
        inspect.signature(modal.Sandbox.list).bind(app_id=f"ap-{app_name}", tags=dict(tags))
        return [
            SandboxInfo(sb.sandbox_id, None, dict(sb.tags), None)
            for sb in self.sandboxes.values()
            if sb.app_name == app_name and sb.poll() is None and all(sb.tags.get(k) == v for k, v in tags.items())
        ]

    def terminate(self, sandbox_id: str) -> None:
        self.calls.append("terminate")
        fault = self._fault("terminate")
        if fault and not fault[1]:
            raise fault[0]
        sb = self._get(sandbox_id)
        if sb.poll() is None:  # a no-op once finished
            sb._kill()
            sb.forced_rc = 137
        if fault:
            raise fault[0]
