"""SkyPilot adapter: real `sky.Task`/`sky.Resources` built by the installed SDK, a fake of the SDK
surface whose signatures are the real ones, and the cluster lifecycle the orchestrator relies on."""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import pytest

sky = pytest.importorskip("sky")

from cloudtune.providers.base import (  # noqa: E402
    AuthError,
    CapacityError,
    InvalidRequestError,
    LaunchRequest,
    MachineState,
    NotFoundError,
    Offer,
    TransientError,
)
from cloudtune.providers.skypilot import (  # noqa: E402
    MULTI_NODE_CLOUDS,
    NO_SPOT_CLOUDS,
    SKY_CLOUDS,
    SkyPilotProvider,
    wrap_offer,
)
from sky.clouds.cloud import CloudImplementationFeatures as F  # noqa: E402

from tests.fakes.skypilot_fake import SDK_FUNCTIONS, FakeSky  # noqa: E402

SECRET = "aws-secret-skypilot-test-31"
OFFER = wrap_offer(Offer("aws", "p5.48xlarge", "H100-SXM", 8, 80, "us-east-1", price_hr=55.04, spot_price_hr=20.0))


def request(tmp_path: Path, attempt: int = 1, *, offer: Offer = OFFER, nodes: int = 2, spot: bool = True,
            command: list[str] | None = None, lifetime: float | None = None) -> LaunchRequest:
    return LaunchRequest(
        job_id="abcd2345", attempt=attempt, offer=offer, spot=spot, image="ghcr.io/example/cloudtune-trainer:0.1",
        command=command or ["python", "-m", "cloudtune.trainer"],
        env={"CLOUDTUNE_JOB_ID": "abcd2345", "CLOUDTUNE_STORE": "s3://bucket/jobs", "CLOUDTUNE_NODE_RANK": "0",
             "OUT": str(tmp_path)},
        secret_env={"AWS_SECRET_ACCESS_KEY": SECRET}, disk_gb=300, max_lifetime_s=lifetime, nodes=nodes,
    )


@pytest.fixture
def fake():
    f = FakeSky(idle_minute_s=0.2)
    yield f
    f.close()


def test_fake_functions_have_the_real_sdks_signatures():
    for name in SDK_FUNCTIONS:
        real = inspect.signature(getattr(sky, name))
        ours = inspect.signature(getattr(FakeSky, name))
        got = [(p.name, p.kind, p.default) for p in list(ours.parameters.values())[1:]]
        assert got == [(p.name, p.kind, p.default) for p in real.parameters.values()], name


def test_multi_node_and_spot_tables_are_skypilots_own():
    import sky.clouds as clouds

    cls = {"aws": clouds.AWS, "lambda": clouds.Lambda, "runpod": clouds.RunPod, "vast": clouds.Vast}
    assert set(cls) == set(SKY_CLOUDS)
    assert set(MULTI_NODE_CLOUDS) == {n for n, c in cls.items() if F.MULTI_NODE not in getattr(c, "_CLOUD_UNSUPPORTED_FEATURES", {})}
    assert set(NO_SPOT_CLOUDS) == {n for n, c in cls.items() if F.SPOT_INSTANCE in getattr(c, "_CLOUD_UNSUPPORTED_FEATURES", {})}
    from cloudtune.planner.plan import MULTI_NODE_PROVIDERS

    assert set(MULTI_NODE_CLOUDS) <= set(MULTI_NODE_PROVIDERS)


def test_the_task_is_a_real_sky_task_with_nodes_accelerators_spot_disk_autodown(tmp_path):
    p = SkyPilotProvider(sdk=FakeSky())
    tc = p.task_config(request(tmp_path, lifetime=7200))
    task = p.build_task(tc)
    assert isinstance(task, sky.Task) and task.num_nodes == 2
    (res,) = task.resources
    assert isinstance(res, sky.Resources) and str(res.cloud) == "AWS" and res.region == "us-east-1"
    assert res.accelerators == {"H100": 8} and res.use_spot is True and res.disk_size == 300
    assert res.autostop_config.enabled and res.autostop_config.down and res.autostop_config.idle_minutes == 10
    assert tc.cluster_name == "cloudtune-abcd2345-1" and res.labels["cloudtune-job"] == "abcd2345"
    assert "CLOUDTUNE_NODE_RANK" not in task.envs  # each node's rank comes from SKYPILOT_NODE_RANK
    assert task.run.startswith("timeout --preserve-status --signal=TERM --kill-after=120s 6600s python -m "
                               "cloudtune.trainer.launch")
    res.cloud.check_features_are_supported(res, {F.MULTI_NODE, F.SPOT_INSTANCE})  # the SDK's own check


def test_describe_launch_shows_the_yaml_with_secrets_redacted(tmp_path):
    p = SkyPilotProvider(sdk=FakeSky())
    (desc,) = p.describe_launch(request(tmp_path))
    assert SECRET not in json.dumps(desc)
    assert desc["validated_by_sdk"] and "AWS_SECRET_ACCESS_KEY: <redacted>" in desc["task_yaml"]
    assert "num_nodes: 2" in desc["task_yaml"] and desc["down"] is True


def test_what_skypilot_cannot_launch_is_refused_before_any_call(tmp_path):
    f = FakeSky()
    p = SkyPilotProvider(sdk=f)
    runpod = wrap_offer(Offer("runpod", "8x_H100_SECURE", "H100-SXM", 8, 80, "US", price_hr=20))
    with pytest.raises(InvalidRequestError, match="cannot launch a 2-node cluster on runpod"):
        p.launch(request(tmp_path, offer=runpod))
    lam = wrap_offer(Offer("lambda", "gpu_8x_h100_sxm5", "H100-SXM", 8, 80, "us-east-1", price_hr=23.92))
    with pytest.raises(InvalidRequestError, match="no spot"):
        p.launch(request(tmp_path, offer=lam, spot=True))
    assert f.calls == []


def test_without_an_api_server_the_sdk_is_not_touched(monkeypatch, tmp_path):
    monkeypatch.delenv("SKYPILOT_API_SERVER_ENDPOINT", raising=False)
    monkeypatch.setenv("SKYPILOT_GLOBAL_CONFIG", str(tmp_path / "none.yaml"))
    with pytest.raises(AuthError, match="SKYPILOT_API_SERVER_ENDPOINT"):
        SkyPilotProvider().list_machines()


NODE = f"{sys.executable} -c \"import os,time; open(os.environ['OUT']+'/rank'+os.environ['SKYPILOT_NODE_RANK'],'w')" \
       f".write(os.environ['SKYPILOT_NUM_NODES']+' '+os.environ['SKYPILOT_NUM_GPUS_PER_NODE']+' '+" \
       f"os.environ['SKYPILOT_NODE_IPS'].replace(chr(10),',')+' '+os.environ['AWS_SECRET_ACCESS_KEY']); " \
       f"time.sleep(float(os.environ.get('SLEEP','30')))\""


def wait_until(pred, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_lifecycle_launch_status_lost_node_relaunch_terminate(fake, tmp_path):
    p = SkyPilotProvider(sdk=fake, refresh_every_s=0)
    m = p.launch(request(tmp_path, command=["bash", "-c", NODE]))
    assert m.machine_id == m.name == "cloudtune-abcd2345-1" and m.job_id == "abcd2345" and m.attempt == 1
    assert m.state is MachineState.RUNNING and m.price_hr == pytest.approx(2 * 20.0)
    call = dict(fake.calls[0][1])
    assert call == {"cluster_name": "cloudtune-abcd2345-1", "idle_minutes_to_autostop": 10, "down": True,
                    "retry_until_up": False}
    wait_until(lambda: (tmp_path / "rank0").exists() and (tmp_path / "rank1").exists())
    assert (tmp_path / "rank1").read_text() == f"2 8 127.0.0.1,127.0.0.1 {SECRET}"
    assert [x.name for x in p.list_machines()] == ["cloudtune-abcd2345-1"]
    # a node dies: SkyPilot shows the cluster INIT; the attempt is lost as a whole
    fake.lose_node(m.machine_id, rank=1)
    st = p.status(m.machine_id)
    assert st.state is MachineState.PREEMPTED and "node" in st.detail
    p.terminate(m.machine_id)  # what the orchestrator does: sky.down the whole cluster ...
    with pytest.raises(NotFoundError):
        p.status(m.machine_id)
    p.terminate(m.machine_id)  # ... idempotently
    m2 = p.launch(request(tmp_path, attempt=2, command=["bash", "-c", NODE]))  # ... and relaunch as one attempt
    assert m2.name == "cloudtune-abcd2345-2" and len(fake.launched) == 2 and fake.launched[1].num_nodes == 2
    p.terminate(m2.machine_id)


def test_job_end_maps_to_exited_and_autodown_is_the_backstop(fake, tmp_path):
    p = SkyPilotProvider(sdk=fake, refresh_every_s=0, autodown_idle_minutes=1)
    ok = p.launch(request(tmp_path, command=["bash", "-c", "exit 0"]))
    fake.wait_job(ok.machine_id)
    st = p.status(ok.machine_id)
    assert st.state is MachineState.EXITED and st.exit_code == 0
    bad = p.launch(request(tmp_path, attempt=2, command=["bash", "-c", 'test "$SKYPILOT_NODE_RANK" = 0 || exit 3; sleep 30']))
    fake.wait_job(bad.machine_id)  # one node failed: the job fails and the other node is killed
    st = p.status(bad.machine_id)
    assert st.state is MachineState.EXITED and "FAILED" in st.detail and st.exit_code is None
    assert all(proc.poll() is not None for proc in fake.clusters[bad.machine_id].procs)
    time.sleep(0.3)  # one idle "minute": SkyPilot's autodown removes both clusters without any sky.down
    assert p.find_by_name(ok.machine_id) is None and p.find_by_name(bad.machine_id) is None


def test_status_reads_the_cloud_only_every_refresh_interval(fake, tmp_path):
    now = [0.0]
    p = SkyPilotProvider(sdk=fake, refresh_every_s=60, clock=lambda: now[0])
    m = p.launch(request(tmp_path, command=["bash", "-c", NODE]))
    fake.preempt(m.machine_id)  # spot cluster taken back
    assert p.status(m.machine_id).state is MachineState.RUNNING  # the cached view lags, as SkyPilot's does
    now[0] += 61
    with pytest.raises(NotFoundError):  # the refresh sees it gone: the orchestrator relaunches
        p.status(m.machine_id)
    refreshes = [c[1]["refresh"] for c in fake.calls if c[0] == "status"]
    assert refreshes.count(sky.StatusRefreshMode.FORCE) == 1 and sky.StatusRefreshMode.NONE in refreshes


def test_find_by_name_after_an_ambiguous_launch_and_error_mapping(fake, tmp_path):
    p = SkyPilotProvider(sdk=fake, refresh_every_s=0)
    fake.fail_next("launch", sky.exceptions.ApiServerConnectionError("http://127.0.0.1:46580"), after=True)
    with pytest.raises(TransientError):
        p.launch(request(tmp_path, command=["bash", "-c", NODE]))
    found = p.find_by_name("cloudtune-abcd2345-1")  # the orchestrator's adopt-or-terminate look-up
    assert found is not None and found.state.is_alive and len(fake.launched) == 1
    assert p.find_by_name("cloudtune-abcd2345-9") is None
    fake.fail_next("launch", sky.exceptions.ResourcesUnavailableError("no H100:8 in us-east-1"))
    with pytest.raises(CapacityError):
        p.launch(request(tmp_path, attempt=2))
    fake.fail_next("launch", sky.exceptions.NoCloudAccessError("no cloud access"))
    with pytest.raises(AuthError, match="sky check"):
        p.launch(request(tmp_path, attempt=3))
    p.terminate("cloudtune-abcd2345-1")
