"""EC2 errors moto cannot produce, played by a loopback proxy in front of moto_server (real HTTP)."""

from __future__ import annotations

import pytest
from cloudtune.providers.aws import AWSProvider
from cloudtune.providers.base import (
    AuthError,
    CapacityError,
    MachineState,
    NotFoundError,
    QuotaError,
    RateLimitedError,
    TransientError,
)

from tests.fakes.aws_setup import new_job_id, provider_via, proxy_in_front, request
from tests.fakes.ec2_proxy import EC2CapacityProxy


@pytest.fixture
def proxy(aws_env):
    with proxy_in_front(EC2CapacityProxy, aws_env) as fake:
        yield fake


@pytest.fixture
def provider(proxy) -> AWSProvider:
    return provider_via(proxy.url)


def test_capacity_error_in_one_zone_fails_over_to_the_next(proxy, provider):
    proxy.fail_run_instances("InsufficientInstanceCapacity", zone="us-east-1a")
    m = provider.launch(request(new_job_id()))
    zones = [c["Placement.AvailabilityZone"] for c in proxy.run_instances_calls]
    assert zones[0] == "us-east-1a" and len(zones) == 2 and zones[1] != "us-east-1a"
    tokens = [c["ClientToken"] for c in proxy.run_instances_calls]
    assert len(set(tokens)) == 2  # one idempotency token per (job, attempt, zone)
    assert provider.status(m.machine_id).state.is_alive
    provider.terminate(m.machine_id)


def test_no_capacity_anywhere_is_a_capacity_error_and_leaves_nothing(proxy, provider):
    proxy.fail_run_instances("InsufficientInstanceCapacity", instance_type="g5.xlarge")
    job = new_job_id()
    with pytest.raises(CapacityError, match=r"no spot g5.xlarge capacity in us-east-1 \(tried us-east-1a, .*us-east-1f\)"):
        provider.launch(request(job))
    assert len(proxy.run_instances_calls) == 5  # every zone tried once: no botocore retry storm
    assert provider.find_by_name(f"cloudtune-{job}-0") is None


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("SpotMaxPriceTooLow", CapacityError),
        ("MaxSpotInstanceCountExceeded", QuotaError),  # the account's spot limit: another zone cannot help
        ("UnfulfillableCapacity", CapacityError),
        ("VcpuLimitExceeded", QuotaError),
        ("UnauthorizedOperation", AuthError),
        ("RequestLimitExceeded", RateLimitedError),
    ],
)
def test_ec2_error_codes_become_typed_errors(proxy, provider, code, error):
    proxy.fail_run_instances(code)
    with pytest.raises(error, match=code):
        provider.launch(request(new_job_id()))


def test_internal_error_is_retried_once_with_the_same_token(proxy, provider):
    proxy.fail_run_instances("InternalError", times=1)
    m = provider.launch(request(new_job_id()))
    calls = proxy.run_instances_calls
    assert len(calls) == 2 and calls[0]["ClientToken"] == calls[1]["ClientToken"]
    provider.terminate(m.machine_id)


def test_persistent_5xx_is_transient(proxy, provider):
    proxy.fail_run_instances("InternalError", times=2)
    with pytest.raises(TransientError, match="InternalError"):
        provider.launch(request(new_job_id()))


def test_spot_interruption_is_reported_as_preempted(proxy, provider):
    m = provider.launch(request(new_job_id()))
    iid = m.machine_id.split(":")[1]
    proxy.preempt(iid, "shutting-down")
    s = provider.status(m.machine_id)
    assert s.state is MachineState.PREEMPTED and "Server.SpotInstanceTermination" in s.detail
    proxy.preempt(iid, "terminated")
    gone = provider.status(m.machine_id)
    assert gone.state is MachineState.TERMINATED and gone.state.is_gone and "preempted" in gone.detail
    provider.terminate(m.machine_id)


def test_unsupported_in_one_zone_tries_the_next_zone(proxy, provider):
    proxy.fail_run_instances("Unsupported", zone="us-east-1a")
    m = provider.launch(request(new_job_id()))
    zones = [c["Placement.AvailabilityZone"] for c in proxy.run_instances_calls]
    assert zones[0] == "us-east-1a" and len(zones) == 2
    provider.terminate(m.machine_id)


def test_max_spot_count_stops_the_zone_loop_at_once(proxy, provider):
    proxy.fail_run_instances("MaxSpotInstanceCountExceeded")
    with pytest.raises(QuotaError, match="Service Quotas"):
        provider.launch(request(new_job_id()))
    assert len(proxy.run_instances_calls) == 1  # a quota is the account's: no point trying 5 zones


def test_not_found_just_after_run_instances_is_pending_not_lost(proxy, provider):
    proxy.hide_new_instances(3)
    m = provider.launch(request(new_job_id()))
    for _ in range(3):
        s = provider.status(m.machine_id)
        assert s.state is MachineState.PENDING and "eventually consistent" in s.detail
    assert provider.status(m.machine_id).state.is_alive  # visible now: the real state
    assert len(proxy.run_instances_calls) == 1
    provider.terminate(m.machine_id)


def test_not_found_after_the_grace_window_is_not_found(proxy):
    from tests.fakes.aws_setup import AMI_PARAMETER, INSTANCE_PROFILE

    provider = AWSProvider(regions=["us-east-1"], endpoint_url=proxy.url, ami_parameter=AMI_PARAMETER,
                           instance_profile=INSTANCE_PROFILE, consistency_grace_s=0)
    proxy.hide_new_instances(1)
    m = provider.launch(request(new_job_id()))
    with pytest.raises(NotFoundError):
        provider.status(m.machine_id)
    provider.terminate(m.machine_id)
    # an instance this process never launched gets no grace either
    with pytest.raises(NotFoundError):
        provider_via(proxy.url).status("us-east-1:i-0123456789abcdef0")
