"""A fake of the SkyPilot SDK surface the adapter uses, running each cluster's nodes as local processes.

What it keeps from SkyPilot (sky/client/sdk.py, docs "Environment variables", ../shared/providers.md
section 6):
- the functions have the real SDK's signatures (tests/test_skypilot_sdk.py compares them with
  inspect.signature); each returns a request id that `get` / `stream_and_get` resolves to the
  result or raises the error, as the API server does;
- `launch` takes a real `sky.Task`: one `sky.Resources` with a cloud and accelerators; the cloud's
  own feature check (`Cloud.check_features_are_supported`, e.g. RunPod has no MULTI_NODE) runs as
  in SkyPilot's optimizer; a cluster name is reused as in SkyPilot (a second launch on an UP cluster
  runs the task again, no second cluster);
- every node runs the task's `run` in bash with SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS (head first),
  SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE and the task's envs and secrets; the job FAILS when
  any node fails, and the other nodes are then killed;
- `status` returns real `StatusResponse` records; the cloud's truth is only seen with
  refresh=FORCE (a lost node shows as INIT, a preempted spot cluster disappears); `job_status` of
  a cluster that is not UP raises ClusterNotUpError; `down` of an unknown cluster raises
  ClusterDoesNotExist; autostop with down=True removes a cluster idle for its minutes.
Errors are the real `sky.exceptions` classes; `fail_next` injects one.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sky
import sky.exceptions as sexc
from sky.clouds.cloud import CloudImplementationFeatures as Features
from sky.schemas.api.responses import StatusResponse
from sky.skylet.job_lib import JobStatus
from sky.utils.common import OptimizeTarget, StatusRefreshMode
from sky.utils.status_lib import ClusterStatus

Task = sky.Task
Resources = sky.Resources
# docs.skypilot.co "GPUs and accelerators" / skypilot-catalog AcceleratorName values the adapter may send
DOCUMENTED_ACCELERATORS = {"A100", "A100-80GB", "H100", "H200", "B200", "L40S", "A10G", "A10", "L4", "T4", "V100",
                           "V100-32GB", "A6000", "GH200"}
_req_ids = itertools.count(1)


@dataclass
class FakeCluster:
    name: str
    task: Any
    num_nodes: int
    gpus_per_node: int
    cloud: str
    region: str | None
    use_spot: bool
    idle_minutes: int | None
    down_when_idle: bool
    procs: list[subprocess.Popen] = field(default_factory=list)
    status: ClusterStatus = ClusterStatus.UP  # the cloud's truth
    seen: ClusterStatus = ClusterStatus.UP  # what the last refresh recorded
    job_id: int = 0
    job: JobStatus | None = None
    ended_at: float | None = None
    launched_at: float = field(default_factory=time.time)
    launches: int = 0

    def poll(self) -> None:
        """The job's status from its node processes (SkyPilot: FAILED if any node fails)."""
        if self.job is None or self.job in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            return
        codes = [p.poll() for p in self.procs]
        if any(c not in (None, 0) for c in codes):
            for p in self.procs:
                _kill(p)
            self.job, self.ended_at = JobStatus.FAILED, time.monotonic()
        elif all(c == 0 for c in codes):
            self.job, self.ended_at = JobStatus.SUCCEEDED, time.monotonic()

    def kill(self) -> None:
        for p in self.procs:
            _kill(p)


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


class FakeSky:
    """Module-like: pass as `SkyPilotProvider(sdk=FakeSky())`."""

    Task = sky.Task
    Resources = sky.Resources
    StatusRefreshMode = StatusRefreshMode
    ClusterStatus = ClusterStatus
    JobStatus = JobStatus
    exceptions = sexc

    def __init__(self, *, idle_minute_s: float = 60.0, extra_env: dict[str, str] | None = None,
                 cwd: str | None = None, log_dir: str | None = None) -> None:
        self.clusters: dict[str, FakeCluster] = {}
        self.launched: list[FakeCluster] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.idle_minute_s = idle_minute_s  # one autostop "minute", scaled down for tests
        self.extra_env = dict(extra_env or {})
        self.cwd = cwd
        self.log_dir = log_dir  # each node's output to <log_dir>/<cluster>-job<id>-node<rank>.log (`sky logs`)
        self._results: dict[str, tuple[Any, BaseException | None]] = {}
        self._faults: list[tuple[str, BaseException, bool]] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------ test controls

    def fail_next(self, method: str, exc: BaseException, *, after: bool = False) -> None:
        """The next `method` request resolves to `exc`; `after=True` does the work first (an ambiguous launch)."""
        self._faults.append((method, exc, after))

    def _fault(self, method: str) -> tuple[BaseException, bool] | None:
        for i, (m, exc, after) in enumerate(self._faults):
            if m == method:
                del self._faults[i]
                return exc, after
        return None

    def lose_node(self, name: str, rank: int = 1) -> None:
        """A node dies (hardware, spot): its processes are killed and the cloud reports the cluster INIT."""
        c = self.clusters[name]
        _kill(c.procs[rank])
        c.status = ClusterStatus.INIT

    def preempt(self, name: str) -> None:
        """The spot cluster is taken back: every node is gone; SkyPilot drops it on the next refresh."""
        c = self.clusters[name]
        c.kill()
        c.status = None  # type: ignore[assignment]

    def wait_job(self, name: str, timeout_s: float = 120.0) -> JobStatus:
        deadline = time.monotonic() + timeout_s
        c = self.clusters[name]
        while True:
            c.poll()
            if c.job in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
                return c.job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job on {name} still {c.job}")
            time.sleep(0.05)

    def close(self) -> None:
        for c in self.clusters.values():
            c.kill()

    def _request(self, method: str, work) -> str:
        rid = f"req-{next(_req_ids)}"
        fault = self._fault(method)
        if fault and not fault[1]:
            self._results[rid] = (None, fault[0])
            return rid
        try:
            result, err = work(), None
        except Exception as e:  # noqa: BLE001 - the server answers the request with the error
            result, err = None, e
        if fault:
            err = fault[0]
        self._results[rid] = (result, err)
        return rid

    def _autostop(self) -> None:
        now = time.monotonic()
        for name, c in list(self.clusters.items()):
            c.poll()
            if c.idle_minutes is not None and c.ended_at is not None and c.down_when_idle \
                    and now - c.ended_at >= c.idle_minutes * self.idle_minute_s:
                c.kill()
                del self.clusters[name]

    # ------------------------------------------------------------ the SDK surface (real signatures)

    def launch(self, task: sky.Task | sky.Dag, cluster_name: str | None = None, retry_until_up: bool = False,
               idle_minutes_to_autostop: int | None = None, wait_for: Any = None, dryrun: bool = False,
               down: bool = False, backend: Any = None, optimize_target: OptimizeTarget = OptimizeTarget.COST,
               no_setup: bool = False, clone_disk_from: str | None = None, fast: bool = False,
               resize: bool = False, _need_confirmation: bool = False, _is_launched_by_jobs_controller: bool = False,
               _is_launched_by_sky_serve_controller: bool = False, _disable_controller_check: bool = False,
               _file_mounts_blob_id: str | None = None, _extra_launch_context: dict[str, Any] | None = None,
               _include_credentials: bool = False) -> str:
        self.calls.append(("launch", {"cluster_name": cluster_name, "idle_minutes_to_autostop": idle_minutes_to_autostop,
                                      "down": down, "retry_until_up": retry_until_up}))
        return self._request("launch", lambda: self._launch(task, cluster_name, idle_minutes_to_autostop, down))

    def _launch(self, task: Any, name: str | None, idle: int | None, down: bool) -> tuple[int, None]:
        if not isinstance(task, sky.Task):
            raise TypeError("launch takes a sky.Task")
        if not name:
            raise sexc.InvalidClusterNameError("cluster_name is required here")
        resources = list(task.resources)
        if len(resources) != 1 or resources[0].cloud is None:
            raise ValueError("the fake expects one sky.Resources with a cloud")
        res = resources[0]
        (acc, count), = (res.accelerators or {"": 0}).items()
        if acc not in DOCUMENTED_ACCELERATORS or count < 1:
            raise sexc.ResourcesUnavailableError(f"no {acc}:{count} in the {res.cloud} catalog")
        features = {Features.MULTI_NODE} if task.num_nodes > 1 else set()
        if res.use_spot:
            features.add(Features.SPOT_INSTANCE)
        res.cloud.check_features_are_supported(res, features)  # NotSupportedError, as SkyPilot raises
        with self._lock:
            self._autostop()
            c = self.clusters.get(name)
            if c is not None and c.status is not ClusterStatus.UP:
                raise sexc.ClusterNotUpError(f"cluster {name} is {c.status}; `sky down` it first")
            if c is None:
                c = FakeCluster(name=name, task=task, num_nodes=task.num_nodes, gpus_per_node=int(count),
                                cloud=str(res.cloud).lower(), region=res.region, use_spot=bool(res.use_spot),
                                idle_minutes=idle, down_when_idle=down)
                self.clusters[name] = c
                self.launched.append(c)
            c.task, c.launches, c.job_id = task, c.launches + 1, c.job_id + 1
            c.job, c.ended_at = JobStatus.RUNNING, None
            c.procs = [self._start_node(task, c, rank) for rank in range(c.num_nodes)]
            return c.job_id, None

    def _start_node(self, task: Any, c: FakeCluster, rank: int) -> subprocess.Popen:
        secrets = {k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v) for k, v in task.secrets.items()}
        env = {**os.environ, **self.extra_env, **task.envs, **secrets,
               "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * c.num_nodes),
               "SKYPILOT_NUM_NODES": str(c.num_nodes), "SKYPILOT_NUM_GPUS_PER_NODE": str(c.gpus_per_node),
               "SKYPILOT_TASK_ID": f"sky-fake-{c.name}-{c.job_id}", "SKYPILOT_CLUSTER_INFO": "{}"}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        out: Any = subprocess.DEVNULL
        if self.log_dir:
            out = open(os.path.join(self.log_dir, f"{c.name}-job{c.job_id}-node{rank}.log"), "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(["bash", "-c", task.run], env=env, start_new_session=True, cwd=self.cwd,
                                    stdout=out, stderr=subprocess.STDOUT if self.log_dir else subprocess.DEVNULL)
        finally:
            if self.log_dir:
                out.close()  # the child holds its own copy

    def status(self, cluster_names: list[str] | None = None, refresh: StatusRefreshMode = StatusRefreshMode.NONE,
               all_users: bool = False, *, _include_credentials: bool = False,
               _summary_response: bool = False) -> str:
        self.calls.append(("status", {"cluster_names": cluster_names, "refresh": refresh}))

        def work() -> list[StatusResponse]:
            with self._lock:
                self._autostop()
                out = []
                for name, c in list(self.clusters.items()):
                    if cluster_names is not None and name not in cluster_names:
                        continue
                    if refresh is not StatusRefreshMode.NONE:
                        if c.status is None:  # preempted: gone from the cloud
                            del self.clusters[name]
                            continue
                        c.seen = c.status
                    out.append(StatusResponse(
                        name=name, launched_at=int(c.launched_at), status=c.seen,
                        autostop=-1 if c.idle_minutes is None else c.idle_minutes, to_down=c.down_when_idle,
                        cluster_hash=f"h{abs(hash(name)) % 10**8}", cluster_ever_up=True, user_hash="fakeuser",
                        user_name="fake", workspace="default", is_managed=False, nodes=c.num_nodes,
                        cloud=c.cloud, region=c.region,
                    ))
                return out

        return self._request("status", work)

    def job_status(self, cluster_name: str, job_ids: list[int] | None = None) -> str:
        self.calls.append(("job_status", {"cluster_name": cluster_name}))

        def work() -> dict[int | None, JobStatus | None]:
            c = self.clusters.get(cluster_name)
            if c is None:
                raise sexc.ClusterDoesNotExist(f"cluster {cluster_name} does not exist")
            if c.status is not ClusterStatus.UP:
                raise sexc.ClusterNotUpError(f"cluster {cluster_name} is not UP")
            c.poll()
            if job_ids is None:
                return {c.job_id: c.job} if c.job_id else {}
            return {j: (c.job if j == c.job_id else None) for j in job_ids}

        return self._request("job_status", work)

    def down(self, cluster_name: str, purge: bool = False, graceful: bool = False,
             graceful_timeout: int | None = None) -> str:
        self.calls.append(("down", {"cluster_name": cluster_name}))

        def work() -> None:
            with self._lock:
                c = self.clusters.pop(cluster_name, None)
                if c is None:
                    raise sexc.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
                c.kill()

        return self._request("down", work)

    def get(self, request_id: str) -> Any:
        result, err = self._results.pop(request_id)
        if err is not None:
            raise err
        return result

    def stream_and_get(self, request_id: str | None = None, log_path: str | None = None, tail: int | None = None,
                       follow: bool = True, output_stream: Any = None, relay_rich_status: bool = False) -> Any:
        return self.get(request_id)  # type: ignore[arg-type]


SDK_FUNCTIONS = ("launch", "status", "job_status", "down", "get", "stream_and_get")
