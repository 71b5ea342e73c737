"""The AWS adapter against botocore's service models: the artifact boto3 itself is generated from.

Every EC2/SSM call the adapter makes on its real paths (offers, launch with secrets and a subnet,
status, list, find, terminate, orphaned secrets) is recorded through botocore's own event hooks
while it talks to moto_server, and each operation and every parameter (nested structures included)
must exist in botocore's model. The error codes `aws_errors` maps are checked against the model too:
SSM's model lists its error shapes; EC2's model lists none (EC2 is a query protocol with free-form
codes), so EC2 codes are checked against the codes botocore's EC2 waiters match on, and the rest
against the EC2 API reference's error-code page, named in the test that relies on it.
"""

from __future__ import annotations

from typing import Any

import botocore.session
import pytest
from cloudtune.providers import aws_errors
from cloudtune.providers.aws import AWSProvider

from tests.fakes.aws_setup import AMI_PARAMETER, ensure_instance_profile, new_job_id, request, seed_region

SESSION = botocore.session.get_session()


def _check_shape(shape: Any, value: Any, path: str, problems: list[str]) -> None:
    """Every key of `value` is a member of `shape` (recursively through structures, lists, maps)."""
    if shape is None:
        return
    if shape.type_name == "structure":
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a structure, got {type(value).__name__}")
            return
        for key, sub in value.items():
            if key not in shape.members:
                problems.append(f"{path}.{key}: not a member of {shape.name}")
                continue
            _check_shape(shape.members[key], sub, f"{path}.{key}", problems)
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _check_shape(shape.member, item, f"{path}[{i}]", problems)
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            _check_shape(shape.value, item, f"{path}[{key}]", problems)


def check_call(service: str, operation: str, params: dict[str, Any]) -> list[str]:
    model = SESSION.get_service_model(service)
    if operation not in model.operation_names:
        return [f"{service}:{operation} is not an operation in botocore's model"]
    problems: list[str] = []
    _check_shape(model.operation_model(operation).input_shape, params, f"{service}:{operation}", problems)
    return problems


def test_the_checker_catches_a_wrong_parameter():
    assert check_call("ec2", "RunInstances", {"ImageId": "ami-1", "MinCount": 1, "MaxCount": 1}) == []
    assert check_call("ec2", "RunInstances", {"Subnet": "subnet-1"}) == ["ec2:RunInstances.Subnet: not a member "
                                                                         "of RunInstancesRequest"]
    assert check_call("ec2", "RunInstances", {"Placement": {"Zone": "a"}})[0].endswith("not a member of Placement")
    assert check_call("ec2", "LaunchInstance", {}) == ["ec2:LaunchInstance is not an operation in botocore's model"]


@pytest.fixture
def recording(aws_env):
    """An AWSProvider on moto whose every API call (service, operation, params) is recorded."""
    seed_region(aws_env, "us-east-1")
    profile = ensure_instance_profile(aws_env)
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=aws_env, region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24", AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
    provider = AWSProvider(regions=["us-east-1"], endpoint_url=aws_env, ami_parameter=AMI_PARAMETER,
                           instance_profile=profile, subnets={"us-east-1": [subnet]})
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        calls.append((model.service_model.service_name, model.name, dict(params)))

    provider._boto_session().events.register("provide-client-params", record)
    return provider, calls, subnet


def test_every_call_the_adapter_makes_exists_in_botocores_model(recording):
    provider, calls, subnet = recording
    job = new_job_id()
    provider.offers()
    m = provider.launch(request(job, spot=False))
    provider.status(m.machine_id)
    provider.list_machines()
    provider.find_by_name(m.name)
    provider.terminate(m.machine_id)
    provider.orphan_secrets()
    ops = {(s, o) for s, o, _ in calls}
    # the paths above really ran: the checked set is not trivially small
    assert {("ec2", "RunInstances"), ("ec2", "DescribeInstances"), ("ec2", "TerminateInstances"),
            ("ec2", "DescribeSpotPriceHistory"), ("ec2", "DescribeInstanceTypeOfferings"), ("ec2", "DescribeSubnets"),
            ("ssm", "PutParameter"), ("ssm", "GetParameter"), ("ssm", "DeleteParameter"),
            ("ssm", "DescribeParameters")} <= ops
    run = next(p for s, o, p in calls if o == "RunInstances")
    assert run["SubnetId"] == subnet and run["Placement"] == {"AvailabilityZone": "us-east-1b"}
    problems = [p for s, o, params in calls for p in check_call(s, o, params)]
    assert problems == []


def test_dry_run_describes_only_real_operations_and_parameters(recording):
    provider, _, _ = recording
    for call in provider.describe_launch(request(new_job_id())):
        assert check_call(call["service"], call["operation"], call["params"]) == []


def test_mapped_ssm_error_codes_are_error_shapes_of_ssms_model():
    ssm = {e.name for e in SESSION.get_service_model("ssm").error_shapes}
    mapped = {"ParameterNotFound", "ParameterLimitExceeded", "ParameterAlreadyExists", "TooManyUpdates",
              "InvalidKeyId"}
    assert mapped <= ssm, mapped - ssm
    assert {"ParameterNotFound"} <= aws_errors.NOT_FOUND_CODES and "ParameterLimitExceeded" in aws_errors.QUOTA_CODES


def test_ec2_not_found_code_is_the_one_botocores_ec2_waiters_match():
    import json

    assert SESSION.get_service_model("ec2").error_shapes == []  # EC2's model lists no error codes at all
    waiters = json.dumps(SESSION.get_waiter_model("ec2")._waiter_config)
    ec2_not_found = {c for c in aws_errors.NOT_FOUND_CODES if c != "ParameterNotFound"}
    assert ec2_not_found == {"InvalidInstanceID.NotFound"}
    assert all(f'"expected": "{c}"' in waiters for c in ec2_not_found)


# The EC2 API reference, "Error codes for the Amazon EC2 API"
# (docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html): the common client errors,
# the action-specific client errors and the server errors this adapter maps. botocore is silent on
# EC2 codes, so this list is the documented source the mapping is checked against.
EC2_DOCUMENTED_CODES = {
    # common client errors
    "AuthFailure", "Blocked", "OptInRequired", "PendingVerification", "RequestExpired", "RequestLimitExceeded",
    "UnauthorizedOperation", "Unsupported", "InvalidClientTokenId", "SignatureDoesNotMatch",
    # action-specific client errors
    "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "VcpuLimitExceeded",
    "InvalidInstanceID.NotFound",
    # server errors
    "InsufficientCapacity", "InsufficientHostCapacity", "InsufficientInstanceCapacity", "InternalError",
    "ServiceUnavailable", "Unavailable", "UnfulfillableCapacity",
}


def test_mapped_ec2_codes_are_documented_ec2_error_codes_spec_is_the_api_reference_not_botocore():
    ec2_codes = (aws_errors.CAPACITY_CODES | aws_errors.QUOTA_CODES | aws_errors.AUTH_CODES | aws_errors.RATE_CODES
                 | aws_errors.TRANSIENT_CODES | aws_errors.NOT_FOUND_CODES)
    non_ec2 = {  # SSM / STS / generic AWS JSON-protocol codes, checked above or outside EC2
        "ParameterLimitExceeded", "ParameterNotFound", "TooManyUpdates", "AccessDenied", "AccessDeniedException",
        "UnrecognizedClientException", "ExpiredToken", "Throttling", "ThrottlingException",
        "TooManyRequestsException", "InternalFailure",
    }
    assert ec2_codes - non_ec2 <= EC2_DOCUMENTED_CODES, (ec2_codes - non_ec2) - EC2_DOCUMENTED_CODES
    # the documented meaning decides the class: a spot-count limit is the account's quota, not the market
    assert "MaxSpotInstanceCountExceeded" in aws_errors.QUOTA_CODES
    assert "MaxSpotInstanceCountExceeded" not in aws_errors.CAPACITY_CODES
    assert "Unsupported" in aws_errors.CAPACITY_CODES
