"""LambdaProvider against a local fake of Lambda's v1 API, over real HTTP."""

from __future__ import annotations

import json
import stat
import sys
import time

import pytest
from cloudtune.providers import get_provider
from cloudtune.providers.base import (
    AuthError,
    CapacityError,
    InvalidRequestError,
    LaunchRequest,
    MachineState,
    Offer,
    TransientError,
)
from cloudtune.providers.http import RetryPolicy
from cloudtune.providers.lambdalabs import LambdaProvider, normalise_gpu, read_api_key

from tests.fakes.lambda_fake import LambdaFake

KEY = "lambda-test-key"
SECRET = "hf_SUPERSECRETTOKEN123"
FAST = RetryPolicy(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def fake():
    with LambdaFake(api_key=KEY) as f:
        yield f


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch, tmp_path):
    for var in ("LAMBDA_API_KEY", "CLOUDTUNE_LAMBDA_API_URL", "CLOUDTUNE_LAMBDA_SSH_KEY", "CLOUDTUNE_LAMBDA_TERMINATE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def provider(fake: LambdaFake, **kw) -> LambdaProvider:
    kw.setdefault("api_key", KEY)
    kw.setdefault("ssh_key_name", "my-key")
    kw.setdefault("retry", FAST)
    kw.setdefault("launch_interval_s", 0.0)
    return LambdaProvider(api_url=fake.url + "/api/v1", **kw)


def request(offer_id="gpu_1x_a10", region="us-east-1", gpu="A10", attempt=1, **kw) -> LaunchRequest:
    offer = Offer("lambda", offer_id, gpu, 1, 24, region, price_hr=1.29)
    return LaunchRequest(
        job_id="abcd2345",
        attempt=attempt,
        offer=offer,
        spot=False,
        image="ghcr.io/example/cloudtune-trainer:0.1",
        command=kw.pop("command", ["python", "-m", "cloudtune.trainer"]),
        env=kw.pop("env", {"CLOUDTUNE_JOB_ID": "abcd2345", "CLOUDTUNE_STORE": "s3://bucket/jobs"}),
        secret_env=kw.pop("secret_env", {"HF_TOKEN": SECRET}),
        **kw,
    )


def test_registry_returns_lambda_provider(fake):
    p = get_provider("lambda", api_key=KEY, base_url=fake.url + "/api/v1")
    assert isinstance(p, LambdaProvider) and p.name == "lambda"
    assert p.offers()  # reached the fake through the providers.yaml-style base_url
    assert KEY not in repr(p)


def test_offers_live_prices_capacity_and_normalised_gpus(fake):
    offers = provider(fake).offers()
    by = {(o.offer_id, o.region): o for o in offers}
    # only regions with capacity now; the 8x H100 has none; CPU types are skipped
    assert set(by) == {
        ("gpu_1x_a10", "us-east-1"),
        ("gpu_1x_a10", "us-west-1"),
        ("gpu_1x_h100_pcie", "us-west-1"),
        ("gpu_1x_a100_sxm4", "europe-central-1"),
        ("gpu_8x_a100_80gb_sxm4", "us-east-1"),
    }
    h100 = by[("gpu_1x_h100_pcie", "us-west-1")]
    assert (h100.gpu, h100.gpu_count, h100.vram_gib_per_gpu, h100.price_hr) == ("H100-80GB", 1, 79.65, 3.29)
    a100 = by[("gpu_8x_a100_80gb_sxm4", "us-east-1")]
    assert (a100.gpu, a100.gpu_count, a100.vram_gib_per_gpu, a100.price_hr) == ("A100-80GB", 8, 80.0, 22.32)
    assert by[("gpu_1x_a100_sxm4", "europe-central-1")].gpu == "A100-40GB"
    assert all(o.spot_price_hr is None and o.billing_granularity_s == 60 and o.fresh for o in offers)
    assert fake.calls("GET", "/instance-types")[0].bearer == KEY


def test_gpu_names_match_the_catalog():
    import csv
    from importlib import resources

    with resources.files("cloudtune").joinpath("data/offers.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["provider"] == "lambda"]
    assert rows
    for row in rows:
        assert normalise_gpu(row["offer_id"]) == row["gpu"], row["offer_id"]


def test_launch_sends_lambda_shapes_and_status_follows(fake):
    p = provider(fake)
    m = p.launch(request())
    assert m.state is MachineState.PENDING and m.name == "cloudtune-abcd2345-1"
    body = fake.calls("POST", "/instance-operations/launch")[0].json
    assert body["region_name"] == "us-east-1"
    assert body["instance_type_name"] == "gpu_1x_a10"
    assert body["ssh_key_names"] == ["my-key"]
    assert body["name"] == "cloudtune-abcd2345-1"
    assert body["tags"] == [
        {"key": "cloudtune:job", "value": "abcd2345"},
        {"key": "cloudtune:attempt", "value": "1"},
    ]
    ud = body["user_data"]
    assert ud.startswith("#!/bin/bash")
    assert "docker run --rm --gpus all" in ud and "ghcr.io/example/cloudtune-trainer:0.1 python -m cloudtune.trainer" in ud
    assert f"HF_TOKEN={SECRET}" in ud  # the real request carries the secret to the VM ...
    assert "nvidia-container-toolkit" in ud and "instance-operations/terminate" in ud
    # capacity was checked through instance-types before the launch
    assert fake.calls("GET", "/instance-types")

    st = p.status(m.machine_id)
    assert st.state is MachineState.RUNNING and st.job_id == "abcd2345" and st.attempt == 1
    assert st.region == "us-east-1" and st.price_hr == pytest.approx(1.29)
    found = p.find_by_name("cloudtune-abcd2345-1")
    assert found is not None and found.machine_id == m.machine_id


def test_describe_launch_is_redacted(fake):
    p = provider(fake, ssh_key_name=None)
    calls = p.describe_launch(request())
    text = json.dumps(calls)
    assert SECRET not in text and KEY not in text
    assert "HF_TOKEN=***" in text
    post = calls[-1]
    assert post["method"] == "POST" and post["url"].endswith("/instance-operations/launch")
    assert post["body"]["ssh_key_names"] == ["<set CLOUDTUNE_LAMBDA_SSH_KEY>"]
    assert not fake.log  # a dry run sends nothing


def test_missing_ssh_key_is_a_clear_error_and_sends_nothing(fake):
    p = provider(fake, ssh_key_name=None)
    with pytest.raises(AuthError, match="CLOUDTUNE_LAMBDA_SSH_KEY"):
        p.launch(request())
    assert not fake.calls("POST", "/instance-operations/launch")


def test_missing_api_key_names_the_variable(fake):
    p = LambdaProvider(api_url=fake.url + "/api/v1", ssh_key_name="my-key")
    with pytest.raises(AuthError, match="LAMBDA_API_KEY"):
        p.offers()
    assert not fake.log


def test_key_from_env_and_from_skypilot_keys_file(fake, monkeypatch, tmp_path):
    keys = tmp_path / "home" / ".lambda_cloud" / "lambda_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text(f"# lambda\napi_key = {KEY}\n")
    assert read_api_key() == KEY
    assert provider(fake, api_key=None).offers()
    monkeypatch.setenv("LAMBDA_API_KEY", "from-env")
    assert read_api_key() == "from-env"


def test_401_maps_to_auth_error_without_the_key(fake):
    p = provider(fake, api_key="wrong-key-value")
    with pytest.raises(AuthError) as err:
        p.offers()
    assert "global/invalid-api-key" in str(err.value) and "LAMBDA_API_KEY" in str(err.value)
    assert "wrong-key-value" not in str(err.value)
    assert len(fake.calls("GET", "/instance-types")) == 1  # not retried


def test_capacity_precheck_names_the_region_and_does_not_launch(fake):
    p = provider(fake)
    with pytest.raises(CapacityError, match="us-east-1") as err:
        p.launch(request(offer_id="gpu_1x_h100_pcie", gpu="H100-80GB"))
    assert "us-west-1" in str(err.value)  # where capacity is now
    assert not fake.calls("POST", "/instance-operations/launch")


def test_insufficient_capacity_from_launch_maps_to_capacity_error(fake):
    p = provider(fake, precheck_capacity=False)
    with pytest.raises(CapacityError) as err:
        p.launch(request(offer_id="gpu_8x_h100_sxm5", gpu="H100-SXM"))
    assert "insufficient-capacity" in str(err.value) and "us-east-1" in str(err.value)
    assert len(fake.calls("POST", "/instance-operations/launch")) == 1


def test_429_on_launch_is_retried_honouring_retry_after(fake):
    slept: list[float] = []
    p = provider(fake, sleep=slept.append)
    fake.inject(
        "POST",
        "/instance-operations/launch",
        status=429,
        body={"error": {"code": "global/rate-limited", "message": "slow down"}},
        headers={"Retry-After": "2"},
    )
    m = p.launch(request())
    assert m.machine_id in fake.instances
    assert len(fake.calls("POST", "/instance-operations/launch")) == 2
    assert 2.0 in slept


def test_500_on_get_is_retried(fake):
    p = provider(fake)
    fake.inject("GET", "/instances$", status=500, body={"error": {"code": "provider/internal", "message": "x"}}, times=2)
    assert p.list_machines() == []
    assert len(fake.calls("GET", "/instances$")) == 3


def test_500_after_launch_is_not_retried_and_the_machine_is_found_by_name(fake):
    p = provider(fake)
    fake.inject("POST", "/instance-operations/launch", status=500, body={"error": {"code": "global/unknown", "message": "boom"}}, after_handler=True)
    with pytest.raises(TransientError):
        p.launch(request())
    assert len(fake.calls("POST", "/instance-operations/launch")) == 1  # never double-launch
    adopted = p.find_by_name("cloudtune-abcd2345-1")
    assert adopted is not None and adopted.machine_id in fake.instances


def test_terminate_is_idempotent_and_verified(fake):
    fake.terminating_s = 0.2
    p = provider(fake)
    m = p.launch(request())
    p.terminate(m.machine_id)
    assert p.status(m.machine_id).state is MachineState.TERMINATING
    p.terminate(m.machine_id)  # again while terminating
    time.sleep(0.25)
    assert p.status(m.machine_id).state is MachineState.TERMINATED
    p.terminate(m.machine_id)  # gone: 404 object-does-not-exist counts as done
    p.terminate("0123456789abcdef")  # never existed
    assert p.find_by_name(m.name) is None


def test_list_machines_only_ours_and_status_mapping(fake):
    p = provider(fake)
    ours = p.launch(request())
    fake.ssh_keys.add("other")
    other = p.http.post_json(
        "/instance-operations/launch",
        {"region_name": "us-west-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["other"], "name": "notebook"},
    )["data"]["instance_ids"][0]
    ids = {m.machine_id for m in p.list_machines()}
    assert ids == {ours.machine_id} and other in fake.instances
    fake.set_status(ours.machine_id, "unhealthy")
    st = p.status(ours.machine_id)
    assert st.state is MachineState.RUNNING and "degraded" in st.detail
    fake.set_status(ours.machine_id, "preempted")
    assert p.status(ours.machine_id).state is MachineState.PREEMPTED


def test_launches_are_spaced_by_the_rate_limit(fake):
    fake.launch_interval_s = 0.4  # the fake answers 429 to launches closer than this
    p = provider(fake, launch_interval_s=0.4, retry=RetryPolicy(max_attempts=1))
    t0 = time.monotonic()
    p.launch(request(attempt=1))
    p.launch(request(attempt=2))
    assert time.monotonic() - t0 >= 0.4
    assert len(fake.calls("POST", "/instance-operations/launch")) == 2


def test_spot_and_bad_env_are_rejected_before_sending(fake):
    p = provider(fake)
    with pytest.raises(InvalidRequestError, match="spot"):
        p.launch(_spot_request())
    with pytest.raises(InvalidRequestError, match="newline"):
        p.launch(request(env={"CLOUDTUNE_SPEC": "{\n}"}))
    assert not fake.calls("POST", "/instance-operations/launch")


def _spot_request() -> LaunchRequest:
    req = request()
    req.spot = True
    return req


def test_user_data_boots_the_trainer_and_the_vm_terminates_itself(tmp_path):
    """The real user_data script runs (bash, with a docker shim); the workload sees its env and the
    secret; the script then terminates its own instance through the API over real HTTP."""
    out = tmp_path / "seen.json"
    code = (
        "import json, os, sys; "
        f"json.dump({{k: os.environ.get(k) for k in ('CLOUDTUNE_JOB_ID', 'HF_TOKEN', 'LAMBDA_API_KEY')}}, open({str(out)!r}, 'w')); "
        "sys.exit(75)"
    )
    with LambdaFake(api_key=KEY, run_user_data=True) as fake:
        p = provider(fake)
        m = p.launch(request(command=[sys.executable, "-c", code]))
        assert fake.wait_boot_exit(m.machine_id, timeout_s=60) == 0
        seen = json.loads(out.read_text())
        assert seen == {"CLOUDTUNE_JOB_ID": "abcd2345", "HF_TOKEN": SECRET, "LAMBDA_API_KEY": None}
        assert p.status(m.machine_id).state in (MachineState.TERMINATING, MachineState.TERMINATED)
        term = fake.calls("POST", "/instance-operations/terminate")
        assert term and term[0].json == {"instance_ids": [m.machine_id]} and term[0].bearer == KEY
        log = fake.bootstrap_log(m.machine_id)
        assert "trainer exited with 75" in log and SECRET not in log and KEY not in log
        boot = fake.instances[m.machine_id].boot_dir
        assert stat.S_IMODE((boot / "lambda_key").stat().st_mode) == 0o600
        assert stat.S_IMODE((boot / "env").stat().st_mode) == 0o600


def test_a_store_the_vm_cannot_reach_is_a_one_line_user_error(fake):
    from cloudtune.errors import UserError

    p = provider(fake)
    req = request(env={"CLOUDTUNE_STORE": "file:///home/me/.cloudtune/store"})
    for call in (p.describe_launch, p.launch):
        with pytest.raises(InvalidRequestError, match="s3://") as err:
            call(req)
        assert isinstance(err.value, UserError)
    assert not fake.calls("POST", "/instance-operations/launch")
