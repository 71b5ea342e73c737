"""Test-side setup for the AWS adapter against moto_server: what a real account already has.

moto does not seed the Deep Learning AMI's public SSM parameter (and refuses writes under /aws/),
so tests publish an AMI id under their own parameter name and point the adapter at it with
`ami_parameter=`, which exercises the same GetParameter lookup. The instance profile must exist
because moto checks it on RunInstances, as EC2 does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from cloudtune.providers.base import LaunchRequest, Offer

AMI_PARAMETER = "/cloudtune-test/dlami/ami-id"
INSTANCE_PROFILE = "cloudtune-test-profile"


def _client(service: str, endpoint: str, region: str = "us-east-1"):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name=region,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@cache
def seed_region(endpoint: str, region: str) -> str:
    """Publish an AMI id (one of moto's Ubuntu-like images) under AMI_PARAMETER in `region`."""
    ec2 = _client("ec2", endpoint, region)
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "root-device-name", "Values": ["/dev/sda1"]}])
    ami = sorted(i["ImageId"] for i in images["Images"])[0]
    _client("ssm", endpoint, region).put_parameter(Name=AMI_PARAMETER, Value=ami, Type="String", Overwrite=True)
    return ami


@cache
def ensure_instance_profile(endpoint: str) -> str:
    iam = _client("iam", endpoint)
    try:
        iam.create_instance_profile(InstanceProfileName=INSTANCE_PROFILE)
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    return INSTANCE_PROFILE


@contextmanager
def proxy_in_front(proxy_cls, endpoint: str) -> Iterator:
    """A fault proxy (tests/fakes) in front of moto, with us-east-1 seeded: the fixtures of the tests
    that inject AWS errors moto cannot produce."""
    seed_region(endpoint, "us-east-1")
    ensure_instance_profile(endpoint)
    with proxy_cls(endpoint) as fake:
        yield fake


def provider_via(url: str):
    """An AWSProvider for us-east-1 whose calls go to `url` (moto, or a proxy in front of it)."""
    from cloudtune.providers.aws import AWSProvider

    return AWSProvider(regions=["us-east-1"], endpoint_url=url, ami_parameter=AMI_PARAMETER,
                       instance_profile=INSTANCE_PROFILE)


def new_job_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def offer(itype: str = "g5.xlarge", region: str = "us-east-1", gpu: str = "A10G", count: int = 1) -> Offer:
    return Offer(provider="aws", offer_id=itype, gpu=gpu, gpu_count=count, vram_gib_per_gpu=22.5,
                 region=region, price_hr=1.006, spot_price_hr=0.35)


def request(job_id: str, *, region: str = "us-east-1", itype: str = "g5.xlarge", spot: bool = True,
            attempt: int = 0, **kw) -> LaunchRequest:
    fields = dict(
        job_id=job_id,
        attempt=attempt,
        offer=offer(itype, region),
        spot=spot,
        image="ghcr.io/cloudtune/trainer:0.1",
        command=["python", "-m", "cloudtune.trainer"],
        env={"CLOUDTUNE_JOB_ID": job_id, "CLOUDTUNE_ATTEMPT": str(attempt), "CLOUDTUNE_STORE": "s3://bucket/jobs"},
        secret_env={"HF_TOKEN": "hf_secretvalue123"},
        disk_gb=150,
    )
    fields.update(kw)
    return LaunchRequest(**fields)
