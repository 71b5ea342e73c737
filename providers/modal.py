"""Modal adapter: each attempt is a Modal Sandbox running the trainer's command on Modal GPUs.

Why a Sandbox and not a Function: a Sandbox is "run this image with this command" with a unique
name and tags inside an app, which is exactly the protocol (deterministic name before create, find
by name, list ours by tag, terminate that is a no-op once finished). Modal has no spot tier, but
GPU containers can be preempted (SIGINT, 30 s grace) and nothing lives longer than 24 h; both end
the attempt and the orchestrator chains the next one, which resumes from the store's LATEST
checkpoint. Billing is per second with no idle tail: a finished sandbox costs nothing, so
"terminate" is only needed to cut an attempt short.

The `modal` SDK (gRPC) is imported lazily, inside `SdkModalClient`, so nothing pays for it unless
Modal is used. Tests replace the client with a fake that follows Modal's documented behaviour.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cloudtune.providers.base import (
    AuthError,
    InvalidRequestError,
    LaunchRequest,
    Machine,
    MachineState,
    NotFoundError,
    Offer,
    ProviderError,
    QuotaError,
    RateLimitedError,
    SelfTerminate,
    TransientError,
    parse_machine_name,
)
from cloudtune.providers.modal_app import (
    APP_NAME,
    CPU_PER_GPU,
    MAX_TIMEOUT_S,
    MEMORY_GIB_PER_GPU,
    TAG_CAP,
    TAG_MANAGED,
    SandboxDefinition,
    build_definition,
    sandbox_kwargs,
)

from cloudtune.trainer.contract import EXIT_PREEMPTED

PROVIDER = "modal"
AUTH_HINT = "set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or run `modal token new` (writes ~/.modal.toml)"

RC_TIMEOUT = 124  # the SDK's returncode for a sandbox that hit its timeout
RC_TERMINATED = 137  # ... and for one that was terminated

# The SDK's `returncode` (sandbox/_common.py `_result_returncode`) maps only TIMEOUT (124) and
# TERMINATED (137); for every other GenericResult status it returns `result.exitcode`, which is 0
# when Modal itself ended the container. These statuses (modal_proto api_pb2.GenericResult) mean
# Modal lost or evicted the container, not that the trainer finished: the SDK's own Function path
# retries INTERNAL_FAILURE as "lost inputs or worker preemption" (_functions.py). Relaunch.
LOST_STATUSES = frozenset({"INTERNAL_FAILURE", "MEMORY_MANAGER_EVICTION", "MEMORY_THRASHING_EVICTION"})


@dataclass
class SandboxInfo:
    """What the adapter needs to know about one sandbox (the client's answer)."""

    sandbox_id: str
    name: str | None
    tags: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None  # None while running
    result_status: str | None = None  # GenericResult status name once finished, e.g. "INTERNAL_FAILURE"


class ModalClient(Protocol):
    """The few SDK operations the adapter uses. Errors are raised as `modal.exception.*`."""

    def create(self, defn: SandboxDefinition, secret_env: dict[str, str]) -> SandboxInfo: ...

    def get(self, sandbox_id: str) -> SandboxInfo: ...

    def find(self, app_name: str, name: str) -> SandboxInfo | None: ...

    def list(self, app_name: str, tags: dict[str, str]) -> list[SandboxInfo]: ...

    def terminate(self, sandbox_id: str) -> None: ...


class SdkModalClient:
    """The real client: `modal.Sandbox.create/from_id/from_name/list/terminate`."""

    def __init__(self) -> None:
        import modal  # lazy: gRPC, protobuf, aiohttp

        self.modal = modal
        self._apps: dict[str, Any] = {}

    def _app(self, name: str) -> Any:
        if name not in self._apps:
            self._apps[name] = self.modal.App.lookup(name, create_if_missing=True)
        return self._apps[name]

    @staticmethod
    def _info(sb: Any, name: str | None = None) -> SandboxInfo:
        try:
            tags = dict(sb.get_tags())
        except Exception:  # noqa: BLE001 - tags are a convenience; the name is authoritative
            tags = {}
        rc = sb.poll()
        return SandboxInfo(sandbox_id=sb.object_id, name=name, tags=tags, returncode=rc,
                           result_status=None if rc is None else SdkModalClient.result_status(sb))

    @staticmethod
    def result_status(sb: Any) -> str | None:
        """The finished sandbox's GenericResult status name. The SDK keeps the result `poll()` read on
        its implementation object (`sb._impl.result`, modal 1.x) and exposes only `returncode`, which
        hides why Modal ended it; None when the SDK keeps it elsewhere (then rc alone decides)."""
        result = getattr(getattr(sb, "_impl", None), "result", None)
        status = getattr(result, "status", None)
        if not status:
            return None
        try:
            from modal_proto import api_pb2

            return str(api_pb2.GenericResult.GenericStatus.Name(status)).removeprefix("GENERIC_STATUS_")
        except (ImportError, ValueError):
            return None

    def create(self, defn: SandboxDefinition, secret_env: dict[str, str]) -> SandboxInfo:
        kwargs = sandbox_kwargs(defn, secret_env)
        sb = self.modal.Sandbox.create(*defn.command, app=self._app(defn.app_name), **kwargs)
        return SandboxInfo(sandbox_id=sb.object_id, name=defn.name, tags=dict(defn.tags), returncode=None)

    def get(self, sandbox_id: str) -> SandboxInfo:
        return self._info(self.modal.Sandbox.from_id(sandbox_id))

    def find(self, app_name: str, name: str) -> SandboxInfo | None:
        try:
            sb = self.modal.Sandbox.from_name(app_name, name)
        except self.modal.exception.NotFoundError:
            return None
        return self._info(sb, name)

    def list(self, app_name: str, tags: dict[str, str]) -> list[SandboxInfo]:
        """The app's sandboxes with these tags. Scoped by app_id: listing without one scans the whole
        Environment, which modal deprecated from 2026-08-10 (`Sandbox.list` warns on every call)."""
        app = self._apps.get(app_name)
        if app is None:
            try:  # listing must not create the app (gc runs where no job ever launched on Modal)
                app = self.modal.App.lookup(app_name)
            except self.modal.exception.NotFoundError:
                return []  # no app, no sandboxes
        return [self._info(sb) for sb in self.modal.Sandbox.list(app_id=app.app_id, tags=tags)]

    def terminate(self, sandbox_id: str) -> None:
        self.modal.Sandbox.from_id(sandbox_id).terminate()


# ---------------------------------------------------------------- errors

_TRANSIENT = {"ConnectionError", "InternalError", "InternalFailure", "ServiceError", "TimeoutError",
              "ClientClosed", "DataLossError"}


def map_error(err: Exception) -> ProviderError | None:
    """`modal.exception.*` (matched by class name, so the SDK need not be imported) -> typed errors."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if not any(cls.__module__.startswith("modal") for cls in type(err).__mro__):
        return None
    text = f"modal: {type(err).__name__}: {err}"
    if names & {"AuthError", "PermissionDeniedError"}:
        return AuthError(f"modal rejected the credentials ({type(err).__name__}); {AUTH_HINT}", provider=PROVIDER)
    if "NotFoundError" in names:
        return NotFoundError(text, provider=PROVIDER)
    if "ResourceExhaustedError" in names:
        return RateLimitedError(text, provider=PROVIDER)
    if names & _TRANSIENT:
        return TransientError(text, provider=PROVIDER)
    if names & {"InvalidError", "ImageBuildError", "VersionError", "DeprecationError"}:
        return InvalidRequestError(text, provider=PROVIDER)
    if "WorkspaceManagementError" in names:
        return QuotaError(text, provider=PROVIDER)
    return TransientError(text, provider=PROVIDER)


T = TypeVar("T")


# ---------------------------------------------------------------- the adapter


def _has_modal_credentials() -> bool:
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    cfg = Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")
    try:
        text = cfg.read_text()
    except OSError:
        return False
    return "token_id" in text and "token_secret" in text


class ModalProvider:
    """Modal Sandboxes on Modal's GPUs, named and tagged per attempt."""

    name = PROVIDER
    max_attempt_s = MAX_TIMEOUT_S  # one attempt lasts at most this long; longer jobs chain attempts

    def __init__(
        self,
        *,
        client: ModalClient | None = None,
        app_name: str = APP_NAME,
        image_requirements: str | None = None,
        registry_secret: str | None = None,
        secret_names: list[str] | tuple[str, ...] = (),
        region: str | None = None,
        attempt_limit_s: int = MAX_TIMEOUT_S,
        max_attempts: int = 4,
        backoff_initial_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self.app_name = app_name
        self.image_requirements = image_requirements
        self.registry_secret = registry_secret
        self.secret_names = tuple(secret_names)
        self.region = region
        self.attempt_limit_s = int(attempt_limit_s)
        self.max_attempt_s = self.attempt_limit_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_initial_s = backoff_initial_s
        self._sleep = sleep

    @property
    def client(self) -> ModalClient:
        if self._client is None:
            if not _has_modal_credentials():
                raise AuthError(f"no Modal credentials found; {AUTH_HINT}", provider=PROVIDER)
            try:
                self._client = SdkModalClient()
            except ModuleNotFoundError:
                raise AuthError(
                    "the Modal SDK is not installed; pip install 'cloudtune[modal]'", provider=PROVIDER
                ) from None
        return self._client

    def _call(self, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run one SDK call, mapping errors, retrying transient ones with backoff and jitter."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except ProviderError:
                raise
            except Exception as err:  # noqa: BLE001 - mapped below; non-Modal errors re-raise
                mapped = map_error(err)
                if mapped is None:
                    raise
            if not (retry and mapped.retryable and attempt < self.max_attempts):
                raise mapped
            cap = min(30.0, self.backoff_initial_s * 2 ** (attempt - 1))
            self._sleep(random.uniform(cap / 2, cap))

    # ------------------------------------------------------------ offers

    def offers(self) -> list[Offer]:
        """Modal publishes no price API: the catalog's Modal rows, whose price is already the per-second
        GPU rate plus the CPU and memory this adapter requests per GPU at Modal's sandbox rates (about
        $1.34/h per GPU; cloudtune.catalog.modal_all_in), times the region multiplier when a region is
        pinned (providers/modal_pricing.py), so the price compares with a VM's all-in hourly price.
        Billing is per second; a finished sandbox costs nothing (no idle tail)."""
        from dataclasses import replace

        from cloudtune.providers.modal_pricing import region_multiplier

        from cloudtune.catalog import bundled_offers

        mult = region_multiplier(self.region)
        return [
            replace(
                o,
                price_hr=round(o.price_hr * mult, 4) if o.price_hr is not None else None,
                vcpus=int(CPU_PER_GPU * o.gpu_count),
                ram_gb=float(MEMORY_GIB_PER_GPU * o.gpu_count),
                billing_granularity_s=1,
                region=self.region or o.region,
                source="snapshot (Modal publishes no price API)" + (f", x{mult:g} pinned region" if mult != 1 else ""),
            )
            for o in bundled_offers()
            if o.provider == PROVIDER and o.price_hr is not None
        ]

    # ------------------------------------------------------------ launch

    def definition(self, req: LaunchRequest) -> SandboxDefinition:
        return build_definition(
            req,
            app_name=self.app_name,
            image_requirements=self.image_requirements,
            registry_secret=self.registry_secret,
            secret_names=self.secret_names,
            region=self.region,
            attempt_limit_s=self.attempt_limit_s,
        )

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        defn = self.definition(req)
        desc = defn.describe()
        desc["note"] = (
            f"billed per second for {defn.gpu} plus {defn.cpu:g} CPU cores and {defn.memory_mib // 1024} GiB; "
            f"the sandbox ends after at most {defn.timeout_s}s (Modal's limit is 24 h per attempt); "
            "a preempted or time-limited attempt is chained and resumes from the store's LATEST checkpoint"
        )
        return [desc]

    def launch(self, req: LaunchRequest) -> Machine:
        defn = self.definition(req)
        client = self.client

        def create() -> SandboxInfo:
            try:
                return client.create(defn, req.secret_env)
            except Exception as err:
                if type(err).__name__ == "AlreadyExistsError":
                    # a previous create went through (or its retry raced it): adopt that sandbox
                    found = client.find(defn.app_name, defn.name)
                    if found is not None:
                        return found
                raise

        info = self._call(create)  # a retried create is safe: the name is unique within the app
        m = self._machine(info)
        m.name, m.job_id, m.attempt = req.name, req.job_id, req.attempt
        m.price_hr = req.offer.price_hr
        return m

    # ------------------------------------------------------------ status, list, terminate

    def _machine(self, info: SandboxInfo) -> Machine:
        rc = info.returncode
        tags = info.tags or {}
        name = info.name or ""
        job_id, attempt = tags.get("cloudtune:job"), tags.get("cloudtune:attempt")
        parsed = parse_machine_name(name)
        if job_id is None and parsed:
            job_id, attempt = parsed[0], str(parsed[1])
        if not name and job_id and attempt:
            name = f"cloudtune-{job_id}-{attempt}"
        if rc is None:
            state, detail = MachineState.RUNNING, "running"
        elif info.result_status in LOST_STATUSES:
            state = MachineState.PREEMPTED
            detail = (f"Modal ended the sandbox ({info.result_status}, returncode {rc}): lost or evicted by Modal, "
                      "not finished by the trainer; chain the next attempt")
        elif rc == EXIT_PREEMPTED:
            state = MachineState.PREEMPTED
            detail = ("the trainer checkpointed on a signal and exited 75 (Modal preemption or the attempt's "
                      "time limit): chain the next attempt")
        elif rc == RC_TIMEOUT and tags.get(TAG_CAP) == "attempt-limit":
            state = MachineState.PREEMPTED
            detail = "hit the per-attempt time limit (Modal: 24 h per sandbox): chain the next attempt"
        elif rc == RC_TIMEOUT:
            state, detail = MachineState.EXITED, "hit the job's max lifetime (sandbox timeout)"
        elif rc == RC_TERMINATED:
            state, detail = MachineState.TERMINATED, "terminated"
        else:
            state, detail = MachineState.EXITED, f"exited with {rc}"
        return Machine(
            provider=PROVIDER,
            machine_id=info.sandbox_id,
            name=name,
            state=state,
            job_id=job_id,
            attempt=int(attempt) if attempt and str(attempt).isdigit() else None,
            region=self.region or "auto",
            spot=False,
            detail=detail,
            exit_code=rc,
        )

    def status(self, machine_id: str) -> Machine:
        return self._machine(self._call(lambda: self.client.get(machine_id)))

    def terminate(self, machine_id: str) -> None:
        """Modal documents terminate as a no-op on a finished sandbox; NotFound also counts as done."""
        try:
            self._call(lambda: self.client.terminate(machine_id))
        except NotFoundError:
            return

    def list_machines(self) -> list[Machine]:
        return [self._machine(i) for i in self._call(lambda: self.client.list(self.app_name, {TAG_MANAGED: "true"}))]

    def find_by_name(self, name: str) -> Machine | None:
        info = self._call(lambda: self.client.find(self.app_name, name))
        return None if info is None else self._machine(info)

    def self_terminate(self) -> SelfTerminate:
        return SelfTerminate(
            command=[],
            env=(),
            note="a Modal sandbox ends when its command exits, and billing stops with it; nothing to call",
        )
