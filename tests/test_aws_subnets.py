"""Accounts without a default VPC: the adapter launches into configured subnets (moto_server)."""

from __future__ import annotations

import boto3
import pytest
from cloudtune.providers.aws import AWSProvider, parse_subnets
from cloudtune.providers.aws_errors import AWSConfigError
from cloudtune.providers.base import CapacityError

from tests.fakes.aws_setup import AMI_PARAMETER, ensure_instance_profile, new_job_id, request, seed_region


def test_subnet_settings_parse_and_bad_ones_name_the_fix():
    assert parse_subnets("us-east-1=subnet-a, us-east-1=subnet-b,us-west-2=subnet-c", None,
                         ["us-east-1", "us-west-2"]) == {"us-east-1": ["subnet-a", "subnet-b"],
                                                        "us-west-2": ["subnet-c"]}
    assert parse_subnets({"us-east-1": "subnet-a"}, None, ["us-east-1"]) == {"us-east-1": ["subnet-a"]}
    assert parse_subnets(None, "subnet-z", ["eu-west-1"]) == {"eu-west-1": ["subnet-z"]}
    with pytest.raises(AWSConfigError, match="region=subnet-id"):
        parse_subnets("subnet-a", None, ["us-east-1"])
    with pytest.raises(AWSConfigError, match="2 regions"):
        parse_subnets(None, "subnet-a", ["us-east-1", "us-west-2"])
    with pytest.raises(AWSConfigError, match="ap-south-1"):
        parse_subnets({"ap-south-1": ["subnet-a"]}, None, ["us-east-1"])


def _provider(endpoint: str, subnets) -> AWSProvider:
    seed_region(endpoint, "us-east-1")
    return AWSProvider(regions=["us-east-1"], endpoint_url=endpoint, ami_parameter=AMI_PARAMETER,
                       instance_profile=ensure_instance_profile(endpoint), subnets=subnets)


def test_launch_goes_into_the_configured_subnet_and_its_zone(aws_env):
    ec2 = boto3.client("ec2", endpoint_url=aws_env, region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.3.0/24", AvailabilityZone="us-east-1c")["Subnet"]["SubnetId"]
    provider = _provider(aws_env, {"us-east-1": [subnet]})
    m = provider.launch(request(new_job_id(), spot=False))
    inst = ec2.describe_instances(InstanceIds=[m.machine_id.split(":")[1]])["Reservations"][0]["Instances"][0]
    assert inst["SubnetId"] == subnet and inst["Placement"]["AvailabilityZone"] == "us-east-1c"
    assert inst["VpcId"] == vpc
    provider.terminate(m.machine_id)


def test_unknown_subnet_is_a_config_error_and_no_zone_left_is_capacity(aws_env):
    provider = _provider(aws_env, {"us-east-1": ["subnet-00000000000000000"]})
    with pytest.raises(AWSConfigError, match="subnets"):
        provider.launch(request(new_job_id(), spot=False))
    ec2 = boto3.client("ec2", endpoint_url=aws_env, region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.8.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.8.1.0/24", AvailabilityZone="us-east-1e")["Subnet"]["SubnetId"]
    # moto offers p5.48xlarge in few zones; pick a type/zone pair the subnet's zone lacks, if any
    offered = {o["Location"] for o in ec2.describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": ["g5.xlarge"]}])[
        "InstanceTypeOfferings"]}
    if "us-east-1e" in offered:
        pytest.skip("moto offers g5.xlarge in us-east-1e")
    with pytest.raises(CapacityError, match="configured subnets"):
        _provider(aws_env, {"us-east-1": [subnet]}).launch(request(new_job_id(), spot=False))
