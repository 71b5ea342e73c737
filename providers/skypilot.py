"""SkyPilot adapter: one attempt of a multi-node job is one SkyPilot cluster of `num_nodes` machines.

Why SkyPilot: it already provisions N machines of one cloud, networks them, runs the same `run`
command on every node with SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS / SKYPILOT_NUM_NODES /
SKYPILOT_NUM_GPUS_PER_NODE set, and tears them down. cloudtune's orchestrator stays the one owner
of recovery: a lost node is a lost attempt; the cluster is torn down (`sky.down`) and relaunched
as one new attempt, which resumes from the store's LATEST checkpoint. We use plain clusters
(`sky.launch`), not SkyPilot managed jobs, so no second recovery loop runs beside ours.

Shape of a launch:
- cluster name = `machine_name(job, attempt)` (deterministic, set before the create call), which is
  also the machine id: `find_by_name` after an ambiguous launch is `sky.status([name])`;
- `sky.Resources(infra="<cloud>/<region>", accelerators={GPU: count}, use_spot, disk_size,
  image_id="docker:<image>", autostop={idle_minutes, down: True})` and `sky.launch(...,
  idle_minutes_to_autostop=N, down=True)`: SkyPilot's autodown is the backstop when cloudtune's
  watchdog is gone; the job's lifetime cap is a `timeout` around the run command;
- run = `python -m cloudtune.trainer.launch` on every node (the trainer's entry command maps the
  SKYPILOT_* variables to the torch rendezvous).

The SDK (`sky`, a heavy import) is loaded lazily; tests pass `sdk=` a fake of the SDK surface
whose signatures are checked against the installed SDK's (tests/fakes/skypilot_fake.py).
Which clouds SkyPilot can run multi-node on is its own table (`sky.clouds.<Cloud>.
_CLOUD_UNSUPPORTED_FEATURES`); `MULTI_NODE_CLOUDS` mirrors it and a test keeps them equal.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import Any

from cloudtune.providers.base import (
    NAME_PREFIX,
    AuthError,
    CapacityError,
    InvalidRequestError,
    LaunchRequest,
    Machine,
    MachineState,
    NotFoundError,
    Offer,
    ProviderError,
    QuotaError,
    SelfTerminate,
    TransientError,
    machine_tags,
    parse_machine_name,
)

PROVIDER = "skypilot"

# cloudtune provider name -> SkyPilot infra (cloud) name, for the clouds whose offers the catalog has.
SKY_CLOUDS: dict[str, str] = {"aws": "aws", "lambda": "lambda", "runpod": "runpod", "vast": "vast"}
# Clouds where SkyPilot launches a cluster of several nodes: its RunPod and Vast clouds list
# MULTI_NODE among their unsupported features (tests/test_skypilot_sdk.py checks this table).
MULTI_NODE_CLOUDS: tuple[str, ...] = ("aws", "lambda")
# SkyPilot clouds without a spot tier (Lambda lists SPOT_INSTANCE as unsupported).
NO_SPOT_CLOUDS: tuple[str, ...] = ("lambda",)

# cloudtune's normalised GPU names (gpus.csv) -> SkyPilot's accelerator names (skypilot-catalog's
# AcceleratorName column; ../shared/catalog/README.md "GPU names" lists the renames made there).
SKY_GPU_NAMES: dict[str, str] = {
    "A100-40GB": "A100", "A100-80GB": "A100-80GB", "H100-SXM": "H100", "H100-80GB": "H100", "H200": "H200",
    "B200": "B200", "L40S": "L40S", "A10G": "A10G", "A10": "A10", "L4": "L4", "T4": "T4", "V100": "V100",
    "V100-32GB": "V100-32GB", "A6000": "A6000", "GH200": "GH200",
}

# The nodes' own shape comes from SkyPilot's variables; these would pin every node to one rank.
_PER_NODE_ENV = ("CLOUDTUNE_NODE_RANK", "CLOUDTUNE_MASTER_ADDR", "CLOUDTUNE_NNODES", "CLOUDTUNE_NPROC_PER_NODE")
LAUNCH_MODULE = "cloudtune.trainer.launch"
AUTH_HINT = ("configure the cloud's credentials for SkyPilot (`sky check`), and a SkyPilot API server "
             "(`sky api login`, or a local one that `sky` starts)")
TERM_BEFORE_CAP_S = 600  # the trainer gets SIGTERM this long before the lifetime cap, SIGKILL 2 min later


def cloud_of(offer: Offer) -> str:
    """The SkyPilot cloud behind an offer: a `skypilot` offer's id is `<cloud>:<offer id>`."""
    if offer.provider == PROVIDER:
        cloud, sep, _ = offer.offer_id.partition(":")
        if not sep:
            raise InvalidRequestError(f"skypilot offer id {offer.offer_id!r} is not '<cloud>:<offer id>'",
                                      provider=PROVIDER)
        return cloud
    return offer.provider


def wrap_offer(offer: Offer) -> Offer:
    """The same offer, launched through SkyPilot: provider `skypilot`, id `<cloud>:<offer id>`.

    The price and GPU count stay per node; the node count travels in LaunchRequest.nodes."""
    from dataclasses import replace

    if offer.provider == PROVIDER:
        return offer
    return replace(offer, provider=PROVIDER, offer_id=f"{offer.provider}:{offer.offer_id}")


def launch_problem(offer: Offer, nodes: int, spot: bool) -> str | None:
    """Why SkyPilot cannot launch this (offer, nodes, spot), or None. Pure: no SDK import."""
    cloud = cloud_of(offer)
    if cloud not in SKY_CLOUDS:
        return f"SkyPilot has no {cloud} cloud"
    if nodes > 1 and cloud not in MULTI_NODE_CLOUDS:
        return (f"SkyPilot cannot launch a {nodes}-node cluster on {cloud} (multi-node runs on "
                f"{', '.join(MULTI_NODE_CLOUDS)})")
    if spot and cloud in NO_SPOT_CLOUDS:
        return f"{cloud} has no spot instances"
    if offer.gpu not in SKY_GPU_NAMES:
        return f"no SkyPilot accelerator name known for {offer.gpu}"
    return None


@dataclass
class TaskConfig:
    """The task YAML (as a dict) and the `sky.launch` arguments of one attempt."""

    cluster_name: str
    config: dict[str, Any]  # what `sky.Task.from_yaml_config` reads; secrets under "secrets"
    idle_minutes_to_autostop: int
    down: bool = True


_SKY_ERRORS_CAPACITY = {"ResourcesUnavailableError"}
_SKY_ERRORS_AUTH = {"NoCloudAccessError", "CloudUserIdentityError", "ApiServerAuthenticationError",
                    "PermissionDeniedError", "NoWorkspaceAccessError"}
_SKY_ERRORS_INVALID = {"ResourcesMismatchError", "InvalidSkyPilotConfigError", "InvalidClusterNameError",
                       "NotSupportedError", "ProvisionPrechecksError", "APIVersionMismatchError"}
_SKY_ERRORS_TRANSIENT = {"ApiServerConnectionError", "ServerTemporarilyUnavailableError", "NetworkError",
                         "ClusterStatusFetchingError", "RequestInterruptedError", "FetchClusterInfoError",
                         "ExecutionRetryableError", "ConnectionError", "TimeoutError"}


def map_error(err: Exception) -> ProviderError:
    """`sky.exceptions.*` (matched by class name, so no SDK import is needed) -> typed errors."""
    if isinstance(err, ProviderError):
        return err
    names = {cls.__name__ for cls in type(err).__mro__}
    text = f"skypilot: {type(err).__name__}: {str(err)[:300]}"
    if "ClusterDoesNotExist" in names:
        return NotFoundError(text, provider=PROVIDER)
    if names & _SKY_ERRORS_CAPACITY:
        return CapacityError(text, provider=PROVIDER)
    if names & _SKY_ERRORS_AUTH:
        return AuthError(f"{text}; {AUTH_HINT}", provider=PROVIDER)
    if "QuotaError" in names or "quota" in str(err).lower():
        return QuotaError(text, provider=PROVIDER)
    if names & _SKY_ERRORS_INVALID or isinstance(err, (ValueError, TypeError)):
        return InvalidRequestError(text, provider=PROVIDER)
    return TransientError(text, provider=PROVIDER)


class SkyPilotProvider:
    """Clusters of `nodes` machines of one cloud through the SkyPilot SDK."""

    name = PROVIDER

    def __init__(
        self,
        *,
        sdk: Any = None,
        autodown_idle_minutes: int = 10,
        refresh_every_s: float = 60.0,
        local_api_server: bool = False,
        clock: Any = time.monotonic,
    ) -> None:
        self._sdk = sdk
        self.local_api_server = bool(local_api_server)
        self.autodown_idle_minutes = int(autodown_idle_minutes)
        self.refresh_every_s = float(refresh_every_s)
        self._clock = clock
        self._refreshed: dict[str, float] = {}

    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            if not (self.local_api_server or _api_server_configured()):
                # without one, the SDK starts a local API server process: never as a side effect of gc/status
                raise AuthError("no SkyPilot API server configured; set SKYPILOT_API_SERVER_ENDPOINT or run "
                                "`sky api login`, or set `skypilot: {local_api_server: true}` in providers.yaml",
                                provider=PROVIDER)
            self._sdk = _import_sky()
        return self._sdk

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        """One SDK call resolved to its result (`sky.get` of the request id), errors typed."""
        try:
            return self.sdk.get(fn(*args, **kwargs))
        except ProviderError:
            raise
        except Exception as err:  # noqa: BLE001 - every SDK error is mapped to a typed one
            raise map_error(err) from None

    # ------------------------------------------------------------ offers

    def offers(self) -> list[Offer]:
        """The catalog's offers of the clouds SkyPilot runs, re-labelled as launched through SkyPilot."""
        from cloudtune.catalog import bundled_offers

        return [wrap_offer(o) for o in bundled_offers() if o.provider in SKY_CLOUDS and o.gpu in SKY_GPU_NAMES]

    # ------------------------------------------------------------ the task

    def task_config(self, req: LaunchRequest) -> TaskConfig:
        offer, nodes = req.offer, max(1, int(getattr(req, "nodes", 1) or 1))
        why = launch_problem(offer, nodes, req.spot)
        if why:
            raise InvalidRequestError(f"skypilot: {why}", provider=PROVIDER)
        cloud = cloud_of(offer)
        env = {k: v for k, v in req.env.items() if k not in _PER_NODE_ENV}
        resources: dict[str, Any] = {
            "infra": f"{cloud}/{offer.region}" if offer.region and offer.region != "auto" else cloud,
            "accelerators": {SKY_GPU_NAMES[offer.gpu]: offer.gpu_count},
            "use_spot": bool(req.spot),
            "disk_size": int(req.disk_gb),
            "autostop": {"idle_minutes": self.autodown_idle_minutes, "down": True},
            "labels": {k.replace(":", "-"): v for k, v in machine_tags(req.job_id, req.attempt).items()},
        }
        if req.image:
            resources["image_id"] = f"docker:{req.image}"
        config: dict[str, Any] = {
            "name": req.name,
            "num_nodes": nodes,
            "resources": resources,
            "envs": env,
            "run": self.run_command(req),
        }
        if req.workdir:
            config["workdir"] = req.workdir
        if req.secret_env:
            config["secrets"] = dict(req.secret_env)
        return TaskConfig(cluster_name=req.name, config=config,
                          idle_minutes_to_autostop=self.autodown_idle_minutes)

    @staticmethod
    def run_command(req: LaunchRequest) -> str:
        """The same entry command on every node; a `timeout` caps the attempt's lifetime."""
        cmd = list(req.command)
        if cmd[:3] == ["python", "-m", "cloudtune.trainer"]:
            cmd = ["python", "-m", LAUNCH_MODULE, *cmd[3:]]
        if req.max_lifetime_s:
            cap = max(60, int(req.max_lifetime_s))
            soft = max(30, cap - TERM_BEFORE_CAP_S)
            cmd = ["timeout", "--preserve-status", "--signal=TERM", "--kill-after=120s", f"{soft}s", *cmd]
        return shlex.join(cmd)

    def build_task(self, tc: TaskConfig) -> Any:
        """A real `sky.Task` (with its `sky.Resources`), validated by the SDK.

        Building a Task is client-side (no API server request), so a dry run validates it without one."""
        try:
            import copy

            sdk = self._sdk if self._sdk is not None else _import_sky()
            return sdk.Task.from_yaml_config(copy.deepcopy(tc.config))  # the SDK pops keys from it
        except AuthError:
            raise
        except Exception as err:  # noqa: BLE001 - the SDK's validation errors, one line
            raise InvalidRequestError(f"skypilot rejected the task: {type(err).__name__}: {str(err)[:300]}",
                                      provider=PROVIDER) from None

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        """The task YAML `launch` would submit, secrets redacted; normalised by the SDK when it is installed."""
        tc = self.task_config(req)
        config = {**tc.config}
        if "secrets" in config:
            config["secrets"] = {k: "<redacted>" for k in config["secrets"]}
        validated = False
        try:
            import sky  # noqa: F401 - only to validate; the dry run works without the SDK
        except ModuleNotFoundError:
            pass
        else:
            from sky.task import redact_task_yaml_dict

            task = self.build_task(TaskConfig(tc.cluster_name, config, tc.idle_minutes_to_autostop))
            config = {k: v for k, v in task.to_yaml_config().items() if not k.startswith("_")}
            redact_task_yaml_dict(config)
            validated = True
        return [{
            "call": "sky.launch",
            "cluster_name": tc.cluster_name,
            "idle_minutes_to_autostop": tc.idle_minutes_to_autostop,
            "down": tc.down,
            "retry_until_up": False,
            "validated_by_sdk": validated,
            "task_yaml": _dump_yaml(config),
            "note": (f"{tc.config['num_nodes']} node(s) of {req.offer.gpu} x{req.offer.gpu_count} on "
                     f"{cloud_of(req.offer)}; SkyPilot autodowns the cluster after {tc.idle_minutes_to_autostop} "
                     "idle minutes; a lost node ends the attempt: cloudtune tears the cluster down and relaunches "
                     "it, resuming from LATEST"),
        }]

    # ------------------------------------------------------------ lifecycle

    def launch(self, req: LaunchRequest) -> Machine:
        tc = self.task_config(req)
        task = self.build_task(tc)
        sdk = self.sdk
        self._call(sdk.launch, task, cluster_name=tc.cluster_name, retry_until_up=False,
                   idle_minutes_to_autostop=tc.idle_minutes_to_autostop, down=True)
        self._refreshed[tc.cluster_name] = self._clock()
        m = self.status(tc.cluster_name)
        m.price_hr = None if req.offer.price_hr is None else (
            (req.offer.spot_price_hr if req.spot and req.offer.spot_price_hr else req.offer.price_hr)
            * tc.config["num_nodes"])
        return m

    def _records(self, names: list[str] | None, refresh: bool) -> list[Any]:
        sdk = self.sdk
        mode = sdk.StatusRefreshMode.FORCE if refresh else sdk.StatusRefreshMode.NONE
        return list(self._call(sdk.status, cluster_names=names, refresh=mode) or [])

    def _job_state(self, name: str) -> Any | None:
        """The status of the cluster's latest job (None: no job submitted yet)."""
        statuses = self._call(self.sdk.job_status, name, job_ids=None) or {}
        values = [v for _, v in sorted(statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
        return values[-1] if values else None

    def _machine(self, rec: Any, with_job: bool = True) -> Machine:
        name = _field(rec, "name")
        status = _value(_field(rec, "status"))
        parsed = parse_machine_name(name or "")
        detail = f"SkyPilot cluster {status}"
        state = MachineState.UNKNOWN
        exit_code = None
        if status == "UP":
            state = MachineState.RUNNING
            if with_job:
                job = _value(self._job_state(name))
                if job == "SUCCEEDED":
                    state, exit_code, detail = MachineState.EXITED, 0, "SkyPilot job SUCCEEDED"
                elif job in ("FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED"):
                    state, detail = MachineState.EXITED, f"SkyPilot job {job} (the trainer's exit code is in the log)"
                elif job in (None, "INIT", "PENDING", "SETTING_UP"):
                    state, detail = MachineState.PENDING, f"SkyPilot cluster UP, job {job or 'not submitted'}"
        elif status in ("INIT", "PENDING"):
            # INIT after the cluster was UP: SkyPilot marks a cluster INIT when some of its nodes are
            # down or unreachable. The attempt is lost; cloudtune tears the cluster down and relaunches.
            if status == "INIT" and _field(rec, "cluster_ever_up"):
                state = MachineState.PREEMPTED
                detail = "SkyPilot cluster INIT after it was UP: a node is down or unreachable; relaunch the cluster"
            else:
                state, detail = MachineState.PENDING, f"SkyPilot cluster {status} (provisioning)"
        elif status in ("STOPPED", "AUTOSTOPPING"):
            state, detail = MachineState.STOPPED, f"SkyPilot cluster {status} (still bills its disks): terminate it"
        return Machine(
            provider=PROVIDER, machine_id=name, name=name, state=state,
            job_id=parsed[0] if parsed else None, attempt=parsed[1] if parsed else None,
            region=_field(rec, "region"), detail=detail, exit_code=exit_code,
        )

    def status(self, machine_id: str) -> Machine:
        now = self._clock()
        refresh = now - self._refreshed.get(machine_id, float("-inf")) >= self.refresh_every_s
        recs = [r for r in self._records([machine_id], refresh) if _field(r, "name") == machine_id]
        if refresh:
            self._refreshed[machine_id] = now
        if not recs:
            raise NotFoundError(f"skypilot: no cluster {machine_id}", provider=PROVIDER)
        try:
            return self._machine(recs[0])
        except (NotFoundError, TransientError):
            # the cluster went away (or its head is unreachable) between the two calls
            return self._machine(recs[0], with_job=False)

    def terminate(self, machine_id: str) -> None:
        """`sky.down`: the whole cluster, every node, its disks. A missing cluster counts as done."""
        try:
            self._call(self.sdk.down, machine_id)
        except NotFoundError:
            return
        self._refreshed.pop(machine_id, None)

    def list_machines(self) -> list[Machine]:
        return [self._machine(r, with_job=False) for r in self._records(None, False)
                if str(_field(r, "name") or "").startswith(NAME_PREFIX)]

    def find_by_name(self, name: str) -> Machine | None:
        try:
            return self.status(name)
        except NotFoundError:
            return None

    def self_terminate(self) -> SelfTerminate:
        return SelfTerminate(
            command=[], env=(),
            note=("SkyPilot autodowns the cluster when it has been idle for the configured minutes after the "
                  "job ends (idle_minutes_to_autostop with down=True); cloudtune's watchdog tears it down sooner"),
        )


def _import_sky() -> Any:
    try:
        import sky  # lazy: pandas, sqlalchemy, the API client
    except ModuleNotFoundError:
        raise AuthError("the SkyPilot SDK is not installed; pip install 'cloudtune[skypilot]'",
                        provider=PROVIDER) from None
    return sky


def _api_server_configured() -> bool:
    import os
    from pathlib import Path

    if os.environ.get("SKYPILOT_API_SERVER_ENDPOINT"):
        return True
    cfg = Path(os.environ.get("SKYPILOT_GLOBAL_CONFIG") or Path.home() / ".sky" / "config.yaml")
    try:
        return "api_server" in cfg.read_text()
    except OSError:
        return False


def _field(rec: Any, key: str) -> Any:
    return rec.get(key) if isinstance(rec, dict) else getattr(rec, key, None)


def _value(status: Any) -> str | None:
    if status is None:
        return None
    return str(getattr(status, "value", status))


def _dump_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
