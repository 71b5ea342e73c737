"""Lambda adapter and fake against the published spec (../shared/apis/lambda/openapi.json, 1.10.0).

The `checked` fixture validates every exchange crossing the fake. Each finding of issue #12 has a
test that failed before its fix.
"""

from __future__ import annotations

import pytest
from cloudtune.providers.base import CapacityError, InvalidRequestError, LaunchRequest, Offer
from cloudtune.providers.http import RetryPolicy
from cloudtune.providers.lambdalabs import LambdaProvider, _classify, normalise_gpu

from tests.fakes.contract import lambda_spec, validate_schema
from tests.fakes.lambda_fake import DEFAULT_TYPES, LambdaFake

KEY = "lambda-test-key"
FAST = RetryPolicy(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02)


@pytest.fixture
def checked():
    with LambdaFake(api_key=KEY) as fake:
        yield fake
        assert lambda_spec().check(fake.exchanges) == []


def provider(fake, **kw) -> LambdaProvider:
    kw.setdefault("ssh_key_name", "my-key")
    return LambdaProvider(api_url=fake.url + "/api/v1", api_key=KEY, retry=FAST, launch_interval_s=0.0, **kw)


def request(type_name="gpu_1x_a10", region="us-east-1") -> LaunchRequest:
    offer = Offer(provider="lambda", offer_id=type_name, gpu="A10", gpu_count=1, vram_gib_per_gpu=22.0,
                  region=region, price_hr=1.29)
    return LaunchRequest(job_id="jl", attempt=1, offer=offer, spot=False, image="ghcr.io/x/trainer:1",
                         command=["python", "-m", "cloudtune.trainer"], env={"CLOUDTUNE_STORE": "s3://b/jobs"})


def test_fake_instance_types_are_spec_instance_types():
    for itype in DEFAULT_TYPES.values():
        assert validate_schema(lambda_spec(), "InstanceType", itype) == []


def test_whole_lifecycle_conforms(checked):
    p = provider(checked)
    assert p.offers()
    m = p.launch(request())
    p.status(m.machine_id)
    assert p.find_by_name(m.name) is not None
    p.terminate(m.machine_id)
    p.terminate(m.machine_id)


def test_unknown_ssh_key_names_the_setting_not_offer_not_found(checked):
    with pytest.raises(InvalidRequestError, match="CLOUDTUNE_LAMBDA_SSH_KEY") as info:
        provider(checked, ssh_key_name="no-such-key").launch(request())
    assert "no-such-key" in str(info.value) and "\n" not in str(info.value)
    assert checked.exchanges[-2][1].status == 404  # launch: ApiErrorLaunchResourceNotFound


def test_launch_404_with_a_valid_key_tries_the_next_offer(checked):
    checked.inject("POST", "/instance-operations/launch", status=404, body={"error": {
        "code": "global/object-does-not-exist", "message": "Instance type not found.", "suggestion": "Check it."}})
    with pytest.raises(CapacityError):
        provider(checked, precheck_capacity=False).launch(request())


def test_suffixed_instance_types_reach_the_planner(checked):
    spec_example = lambda_spec().docs[0].doc["components"]["schemas"]["InstanceType"]["properties"]["name"]
    name = spec_example["examples"][0]
    assert name == "gpu_8x_h100_sxm5gdr" and normalise_gpu(name, "H100 (80 GB SXM5)") == "H100-SXM"
    checked.types[name] = {**DEFAULT_TYPES["gpu_8x_h100_sxm5"], "name": name}
    checked.capacity[name] = ["us-east-1"]
    offers = [o for o in provider(checked).offers() if o.offer_id == name]
    assert offers and offers[0].gpu == "H100-SXM" and offers[0].gpu_count == 8


def test_errors_branch_on_code_never_message():
    class R:
        status_code = 400
        headers: dict = {}

    same_message = "Not enough capacity to fulfill launch request."
    cap = _classify(R(), {"error": {"code": "instance-operations/launch/insufficient-capacity", "message": "x"}})
    bad = _classify(R(), {"error": {"code": "global/invalid-parameters", "message": same_message}})
    assert isinstance(cap, CapacityError) and isinstance(bad, InvalidRequestError)
    assert not isinstance(bad, CapacityError)


def test_observed_launch_rate_limit_is_a_429_with_retry_after():
    """The spec documents the 1-per-12-s launch limit in prose only (no 429 response): observed shape."""
    with LambdaFake(api_key=KEY, launch_interval_s=30.0) as fake:
        p = provider(fake)
        p.launch(request())
        fake.inject("POST", "/instance-operations/launch", status=429, times=1, headers={"Retry-After": "0"},
                    body={"error": {"code": "global/rate-limited", "message": "Too many launch requests."}})
        fake._last_launch = -1e9
        r = request()
        r.attempt = 2
        assert p.launch(r).machine_id
        errors = lambda_spec().check(fake.exchanges)
        assert all("-> 429" in e for e in errors) and errors  # only the observed 429 is outside the spec
