"""AWSProvider against moto_server over real HTTP: launch, tags, status, terminate, list, offers."""

from __future__ import annotations

import base64
import json

import boto3
import pytest
from cloudtune.providers import get_provider
from cloudtune.providers.aws import AWSProvider, latest_spot_prices, machine_from_instance, min_spot_by_type
from cloudtune.providers.base import (
    TAG_ATTEMPT,
    TAG_JOB,
    AuthError,
    InvalidRequestError,
    MachineState,
    NotFoundError,
    QuotaError,
)

from cloudtune.errors import UserError
from tests.fakes.aws_setup import AMI_PARAMETER, ensure_instance_profile, new_job_id, request, seed_region


@pytest.fixture
def ec2(aws_env):
    return boto3.client("ec2", endpoint_url=aws_env, region_name="us-east-1")


@pytest.fixture
def provider(aws_env) -> AWSProvider:
    seed_region(aws_env, "us-east-1")
    profile = ensure_instance_profile(aws_env)
    return AWSProvider(regions=["us-east-1"], endpoint_url=aws_env, ami_parameter=AMI_PARAMETER,
                       instance_profile=profile)


def _instance(ec2, machine_id: str) -> dict:
    iid = machine_id.split(":")[1]
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def _user_data(ec2, machine_id: str) -> str:
    attr = ec2.describe_instance_attribute(InstanceId=machine_id.split(":")[1], Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def test_launch_spot_sets_market_tags_volume_metadata_and_user_data(provider, ec2, caplog):
    job = new_job_id()
    req = request(job, attempt=2, secret_env={"HF_TOKEN": "hf_secretvalue123", "AWS_SECRET_ACCESS_KEY": "AKIAlongterm"})
    m = provider.launch(req)

    assert m.machine_id.startswith("us-east-1:i-")
    assert m.name == f"cloudtune-{job}-2" and m.job_id == job and m.attempt == 2
    assert m.spot is True and m.state.is_alive and m.price_hr == 0.35
    inst = _instance(ec2, m.machine_id)
    assert inst["InstanceType"] == "g5.xlarge"
    assert inst["InstanceLifecycle"] == "spot"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags == {"Name": f"cloudtune-{job}-2", TAG_JOB: job, TAG_ATTEMPT: "2"}
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    assert inst["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    assert inst["IamInstanceProfile"]["Arn"].endswith("instance-profile/cloudtune-test-profile")
    shutdown = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [inst["InstanceId"]]}])["Volumes"]
    assert len(volumes) == 1 and volumes[0]["Size"] == 150
    assert {t["Key"]: t["Value"] for t in volumes[0]["Tags"]}[TAG_JOB] == job

    script = _user_data(ec2, m.machine_id)
    assert script.startswith("#!/bin/bash\n")
    assert "trap 'echo \"cloudtune: powering off\"; shutdown -h now' EXIT" in script
    assert ("docker run --rm --name cloudtune-trainer --gpus all --ipc=host --network host "
            "--env-file /run/cloudtune/job.env ghcr.io/cloudtune/trainer:0.1 python -m cloudtune.trainer") in script
    env_block = script.split("<<'CLOUDTUNE_ENV_EOF'\n", 1)[1].split("\nCLOUDTUNE_ENV_EOF\n", 1)[0].splitlines()
    assert f"CLOUDTUNE_JOB_ID={job}" in env_block and "CLOUDTUNE_ATTEMPT=2" in env_block
    # Secrets come from SSM at boot (tests/test_aws_secrets.py): user-data names only the parameter.
    assert "hf_secretvalue123" not in script and "HF_TOKEN" not in script
    assert f"--name /cloudtune/cloudtune-{job}-2/env --with-decryption" in script
    assert not any(line.startswith("AWS_") for line in env_block)  # never long-lived AWS keys
    assert "AKIAlongterm" not in script
    assert "AWS_SECRET_ACCESS_KEY" in caplog.text and "AKIAlongterm" not in caplog.text


def test_launch_on_demand_has_no_spot_market(provider, ec2):
    m = provider.launch(request(new_job_id(), spot=False))
    inst = _instance(ec2, m.machine_id)
    assert "InstanceLifecycle" not in inst or inst["InstanceLifecycle"] != "spot"
    assert m.spot is False and m.price_hr == 1.006


def test_status_terminate_is_idempotent_and_verified(provider, ec2):
    m = provider.launch(request(new_job_id()))
    assert provider.status(m.machine_id).state in (MachineState.PENDING, MachineState.RUNNING)
    provider.terminate(m.machine_id)
    provider.terminate(m.machine_id)  # second call: no error
    after = provider.status(m.machine_id)
    assert after.state is MachineState.TERMINATED and after.state.is_gone
    assert "Client.UserInitiatedShutdown" in after.detail
    provider.terminate("us-east-1:i-0123456789abcdef0")  # never existed: done
    with pytest.raises(NotFoundError):
        provider.status("us-east-1:i-0123456789abcdef0")


def test_terminate_many_survives_one_unknown_id(provider, ec2):
    a = provider.launch(request(new_job_id()))
    b = provider.launch(request(new_job_id()))
    # One bad id fails EC2's whole batch; the adapter must fall back to one by one.
    provider.terminate_many([a.machine_id, "us-east-1:i-0fffffffffffffff0", b.machine_id])
    assert provider.status(a.machine_id).state is MachineState.TERMINATED
    assert provider.status(b.machine_id).state is MachineState.TERMINATED


def test_list_machines_by_tag_across_two_regions(aws_env):
    for region in ("us-east-1", "eu-west-1"):
        seed_region(aws_env, region)
    p = AWSProvider(regions=["us-east-1", "eu-west-1"], endpoint_url=aws_env, ami_parameter=AMI_PARAMETER)
    job = new_job_id()
    east = p.launch(request(job, region="us-east-1", attempt=0, env={"CLOUDTUNE_JOB_ID": job}))
    west = p.launch(request(job, region="eu-west-1", attempt=1, env={"CLOUDTUNE_JOB_ID": job}))
    # An untagged instance in the same account is not ours and must not be listed.
    boto3.client("ec2", endpoint_url=aws_env, region_name="eu-west-1").run_instances(
        ImageId=seed_region(aws_env, "eu-west-1"), InstanceType="t3.micro", MinCount=1, MaxCount=1)

    ours = {m.machine_id: m for m in p.list_machines() if m.job_id == job}
    assert set(ours) == {east.machine_id, west.machine_id}
    assert ours[west.machine_id].region == "eu-west-1" and ours[west.machine_id].attempt == 1
    assert all(m.job_id for m in p.list_machines())  # every listed machine carries our tag

    p.terminate(west.machine_id)
    assert {m.machine_id for m in p.list_machines() if m.job_id == job} == {east.machine_id}
    p.terminate(east.machine_id)


def test_find_by_name(provider):
    job = new_job_id()
    m = provider.launch(request(job, attempt=3))
    found = provider.find_by_name(f"cloudtune-{job}-3")
    assert found is not None and found.machine_id == m.machine_id and found.attempt == 3
    assert provider.find_by_name(f"cloudtune-{job}-4") is None
    provider.terminate(m.machine_id)
    assert provider.find_by_name(f"cloudtune-{job}-3") is None  # terminated machines are not adopted


def test_offers_use_live_spot_history_and_catalog_on_demand(provider):
    offers = provider.offers()
    assert offers and all(o.provider == "aws" and o.region == "us-east-1" for o in offers)
    # live only where the spot price is live; the on-demand price is the bundled CSV's, and says so
    assert all(o.fresh == (o.spot_price_hr is not None) for o in offers)
    assert all(("snapshot on-demand" in o.source) == (o.price_hr is not None) for o in offers)
    by_type = {o.offer_id: o for o in offers}
    g5 = by_type["g5.xlarge"]
    assert g5.gpu == "A10G" and g5.gpu_count == 1
    assert g5.spot_price_hr == pytest.approx(0.00001)  # moto's spot price history, not the catalog's
    catalog = {o.offer_id: o for o in provider.catalog_offers()}
    assert g5.price_hr == catalog["g5.xlarge"].price_hr  # on-demand from the bundled catalog
    # Types moto prices but the catalog lacks still appear, with no on-demand price.
    assert by_type["g6.2xlarge"].gpu == "L4" and by_type["g6.2xlarge"].price_hr is None
    assert by_type["p5.48xlarge"].gpu_count == 8 and by_type["p5.48xlarge"].gpu == "H100-SXM"


def test_offers_without_credentials_is_auth_error_and_refresh_skips(monkeypatch, tmp_path):
    _no_credentials(monkeypatch, tmp_path)
    p = AWSProvider(regions=["us-east-1", "us-west-2"])
    with pytest.raises(AuthError, match="no AWS credentials found"):
        p.offers()
    catalog = p.catalog_offers()  # the snapshot, for the planner, limited to the configured regions
    assert catalog and not any(o.fresh for o in catalog)
    assert {o.region for o in catalog} == {"us-east-1", "us-west-2"}
    from cloudtune import catalog as cat

    monkeypatch.setenv("CLOUDTUNE_AWS_REGIONS", "us-east-1")
    (result,) = cat.refresh(["aws"])
    assert result.status == "skipped" and "no AWS credentials" in result.message
    assert cat.read_cache("aws") is None


def test_catalog_refresh_writes_live_aws_offers(provider, aws_env, monkeypatch):
    from cloudtune import catalog as cat

    monkeypatch.setenv("CLOUDTUNE_AWS_ENDPOINT_URL", aws_env)
    monkeypatch.setenv("CLOUDTUNE_AWS_REGIONS", "us-east-1,eu-west-1")
    (result,) = cat.refresh(["aws"])
    assert result.status == "ok", result.message
    fetched, offers = cat.read_cache("aws")
    assert {o.region for o in offers} == {"us-east-1", "eu-west-1"}
    assert all(o.fresh == (o.spot_price_hr is not None) for o in offers) and any(o.fresh for o in offers)
    planned = [o for o in cat.load_offers(["aws"]) if o.offer_id == "g5.xlarge" and o.region == "us-east-1"]
    assert planned and planned[0].spot_price_hr == pytest.approx(0.00001)


def _no_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)


def test_launch_without_credentials_is_a_clear_auth_error(monkeypatch, tmp_path):
    _no_credentials(monkeypatch, tmp_path)
    p = AWSProvider(regions=["us-east-1"], endpoint_url="http://127.0.0.1:9")
    with pytest.raises(AuthError, match="no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID"):
        p.launch(request(new_job_id()))


def test_missing_ami_parameter_names_the_parameter(aws_env):
    p = AWSProvider(regions=["us-east-1"], endpoint_url=aws_env, ami_parameter="/no/such/parameter")
    with pytest.raises(InvalidRequestError, match="'/no/such/parameter'.*CLOUDTUNE_AWS_AMI"):
        p.launch(request(new_job_id()))


def test_region_outside_the_swept_regions_fails_over(provider):
    # A QuotaError makes the orchestrator try its next option; gc could never see a machine there.
    with pytest.raises(QuotaError, match="region 'ap-south-1' is not in the regions.*CLOUDTUNE_AWS_REGIONS"):
        provider.launch(request(new_job_id(), region="ap-south-1"))


def test_s3_store_without_instance_profile_is_refused(aws_env):
    seed_region(aws_env, "us-east-1")
    p = AWSProvider(regions=["us-east-1"], endpoint_url=aws_env, ami_parameter=AMI_PARAMETER)
    with pytest.raises(InvalidRequestError, match="CLOUDTUNE_AWS_INSTANCE_PROFILE"):
        p.launch(request(new_job_id()))


def test_local_store_is_refused_as_a_user_error(provider):
    req = request(new_job_id(), env={"CLOUDTUNE_STORE": "file:///home/me/.cloudtune/store"})
    with pytest.raises(InvalidRequestError, match="file:///home/me/.cloudtune/store is not reachable") as info:
        provider.describe_launch(req)
    assert isinstance(info.value, UserError)  # the CLI prints it as one line


def test_multiline_env_value_is_refused(provider):
    with pytest.raises(InvalidRequestError, match="CLOUDTUNE_SPEC has a multi-line value"):
        provider.describe_launch(request(new_job_id(), env={"CLOUDTUNE_SPEC": "{\n}"}))


def test_describe_launch_redacts_secrets_without_network(monkeypatch, tmp_path):
    _no_credentials(monkeypatch, tmp_path)
    p = get_provider("aws", regions="us-east-1", endpoint_url="http://127.0.0.1:9",
                     instance_profile="arn:aws:iam::123456789012:instance-profile/ct")
    job = new_job_id()
    calls = p.describe_launch(request(job, max_lifetime_s=3 * 3600))
    text = json.dumps(calls)
    assert "hf_secretvalue123" not in text
    assert [c["operation"] for c in calls] == ["GetParameter", "PutParameter", "RunInstances"]
    assert calls[1]["params"]["Value"] == "***" and calls[1]["params"]["Type"] == "SecureString"
    run = calls[2]["params"]
    assert run["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
    assert run["InstanceMarketOptions"]["SpotOptions"] == {"SpotInstanceType": "one-time",
                                                           "InstanceInterruptionBehavior": "terminate"}
    assert run["IamInstanceProfile"] == {"Arn": "arn:aws:iam::123456789012:instance-profile/ct"}
    assert "shutdown -h +180 " in run["UserData"]  # the hard lifetime cap
    assert run["InstanceInitiatedShutdownBehavior"] == "terminate"


@pytest.mark.parametrize(
    ("state", "reason", "lifecycle", "expected", "in_detail"),
    [
        ("pending", "", None, MachineState.PENDING, "pending"),
        ("running", "", "spot", MachineState.RUNNING, "running"),
        ("stopping", "Client.UserInitiatedShutdown", None, MachineState.STOPPED, "Client.UserInitiatedShutdown"),
        ("stopped", "", None, MachineState.STOPPED, "stopped"),
        ("shutting-down", "", None, MachineState.TERMINATING, "shutting-down"),
        ("terminated", "Client.UserInitiatedShutdown", None, MachineState.TERMINATED, "UserInitiated"),
        ("shutting-down", "Server.SpotInstanceTermination", "spot", MachineState.PREEMPTED, "preempted"),
        ("stopped", "Server.SpotInstanceShutdown", "spot", MachineState.PREEMPTED, "preempted"),
        ("terminated", "Server.SpotInstanceTermination", "spot", MachineState.TERMINATED, "preempted"),
    ],
)
def test_state_mapping(state, reason, lifecycle, expected, in_detail):
    inst = {"InstanceId": "i-1", "State": {"Name": state}, "StateReason": {"Code": reason, "Message": reason},
            "Tags": [{"Key": "Name", "Value": "cloudtune-jobx-4"}]}
    if lifecycle:
        inst["InstanceLifecycle"] = lifecycle
    m = machine_from_instance(inst, "us-west-2")
    assert m.state is expected and in_detail in m.detail
    assert m.machine_id == "us-west-2:i-1" and (m.job_id, m.attempt) == ("jobx", 4)  # from the Name tag


def test_spot_request_status_marks_preemption():
    inst = {"InstanceId": "i-2", "State": {"Name": "stopped"}, "StateReason": {}}
    m = machine_from_instance(inst, "us-east-1", spot_request_code="instance-stopped-no-capacity")
    assert m.state is MachineState.PREEMPTED


def test_spot_history_keeps_newest_per_zone_then_cheapest_zone():
    from datetime import datetime, timedelta

    t0 = datetime(2026, 11, 1)
    history = [
        {"InstanceType": "g5.xlarge", "AvailabilityZone": "us-east-1a", "SpotPrice": "0.20", "Timestamp": t0},
        {"InstanceType": "g5.xlarge", "AvailabilityZone": "us-east-1a", "SpotPrice": "0.50",
         "Timestamp": t0 + timedelta(hours=1)},
        {"InstanceType": "g5.xlarge", "AvailabilityZone": "us-east-1b", "SpotPrice": "0.40", "Timestamp": t0},
        {"InstanceType": "p5.48xlarge", "AvailabilityZone": "us-east-1b", "SpotPrice": "30.1", "Timestamp": t0},
    ]
    latest = latest_spot_prices(history)
    assert latest[("g5.xlarge", "us-east-1a")] == 0.50  # the old 0.20 is history, not the price now
    assert min_spot_by_type(latest) == {"g5.xlarge": 0.40, "p5.48xlarge": 30.1}


def test_instance_table_matches_catalog_gpu_names():
    from cloudtune.providers.aws_types import INSTANCE_TYPES

    from cloudtune.catalog import bundled_offers, gpu_specs

    specs = gpu_specs()
    assert all(t.gpu in specs for t in INSTANCE_TYPES.values())
    for o in bundled_offers():
        if o.provider == "aws" and o.offer_id in INSTANCE_TYPES:
            t = INSTANCE_TYPES[o.offer_id]
            assert (t.gpu, t.gpu_count) == (o.gpu, o.gpu_count), o.offer_id
