"""AWS EC2 adapter: GPU instances, spot or on-demand, launched from a Deep Learning AMI.

Why these choices:
- One `run_instances` per attempt, tried zone by zone (cheapest spot zone first): a capacity error
  in one availability zone says nothing about the next, and EC2 names the zone it failed in.
- The machine ends itself (user-data `shutdown -h now` + InstanceInitiatedShutdownBehavior=
  terminate), so no credentials live on it; the store is reached through an IAM instance profile.
- Machine ids are `<region>:<instance-id>`: an instance id is only meaningful within its region,
  and the watchdog and `gc` run in other processes that must find it again.
- boto3 is imported inside methods: `cloudtune --help` and `cloudtune plan` must not pay for it.
- Secret env values (HF_TOKEN...) go to one SSM SecureString parameter per machine,
  `/cloudtune/<machine name>/env`, written just before RunInstances and read by the boot script with
  the instance profile; user-data holds only the name. The parameter is deleted when a launch fails
  for sure, when we terminate the machine, and by `cloudtune gc` once its instance is gone.

Configuration (constructor argument, else environment variable):
  regions / region  CLOUDTUNE_AWS_REGIONS          comma list; default: aws_types.DEFAULT_REGIONS
  endpoint_url      CLOUDTUNE_AWS_ENDPOINT_URL     EC2/SSM endpoint (tests point it at moto_server)
  ami               CLOUDTUNE_AWS_AMI              fixed AMI id (skips the SSM lookup)
  ami_parameter     CLOUDTUNE_AWS_AMI_PARAMETER    SSM parameter holding the AMI id per region
  instance_profile  CLOUDTUNE_AWS_INSTANCE_PROFILE instance profile name or ARN (store access)
  key_name          CLOUDTUNE_AWS_KEY_NAME         EC2 key pair, only to let you ssh in and debug
  security_group_ids CLOUDTUNE_AWS_SECURITY_GROUP_IDS comma list (default: the VPC's default group)
  ssm_kms_key       CLOUDTUNE_AWS_SSM_KMS_KEY      KMS key for the secrets parameter (default: alias/aws/ssm)
  secret_grace_s    CLOUDTUNE_AWS_SECRET_GRACE_S   gc leaves a secrets parameter with no instance alone
                                                   this long (default 900 s: a launch may be in flight)
  subnets / subnet_id CLOUDTUNE_AWS_SUBNETS        subnets to launch into, for accounts without a default
                                                   VPC: {region: [subnet-...]} (env: us-east-1=subnet-a,
                                                   us-west-2=subnet-b); `subnet_id` is one subnet for the
                                                   single configured region. Zones are those of the subnets.
  consistency_grace_s CLOUDTUNE_AWS_CONSISTENCY_GRACE_S how long after RunInstances an
                                                   InvalidInstanceID.NotFound means "not visible yet"
                                                   (EC2 is eventually consistent), not "lost" (default 180 s);
                                                   also how long after an ambiguous RunInstances (5xx,
                                                   reset) find_by_name raises instead of answering None
  profile_name      AWS_PROFILE                    boto3 profile
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from cloudtune.providers.aws_errors import (
    NO_CREDENTIALS,
    AWSConfigError,
    RegionNotSwept,
    error_code,
    translate,
)
from cloudtune.providers.aws_types import DEFAULT_REGIONS, DLAMI_PARAMETER, INSTANCE_TYPES, OPT_IN_REGIONS
from cloudtune.providers.aws_userdata import (
    REDACTED,
    SECRETS_PREFIX,
    build_user_data,
    machine_name_of_parameter,
    secrets_parameter_name,
    secrets_value,
    strip_aws_credentials,
)
from cloudtune.providers.base import (
    TAG_ATTEMPT,
    TAG_JOB,
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
    parse_machine_name,
)

log = logging.getLogger("cloudtune.providers.aws")
T = TypeVar("T")

NAME = "aws"
LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
SPOT_INTERRUPTION_REASONS = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
# describe_spot_instance_requests Status.Code values that mean AWS took the machine back.
SPOT_REQUEST_INTERRUPTED = frozenset({
    "instance-terminated-by-price", "instance-terminated-no-capacity",
    "instance-terminated-capacity-oversubscribed", "instance-stopped-by-price",
    "instance-stopped-no-capacity", "instance-stopped-capacity-oversubscribed",
    "marked-for-termination", "marked-for-stop",
})
_STATE_MAP = {
    "pending": MachineState.PENDING,
    "running": MachineState.RUNNING,
    "stopping": MachineState.STOPPED,
    "stopped": MachineState.STOPPED,
    "shutting-down": MachineState.TERMINATING,
    "terminated": MachineState.TERMINATED,
}


DEFAULT_SECRET_GRACE_S = 900.0
# EC2's API reference ("Eventual consistency in the Amazon EC2 API"): a resource just created may be
# unknown to the describe calls "for up to a few minutes"; until then NotFound is not "machine lost".
DEFAULT_CONSISTENCY_GRACE_S = 180.0
SSM_DEFAULT_KEY = "alias/aws/ssm"  # what SSM uses for a SecureString when no KeyId is given


class _DropSecretRequestBodies(logging.Filter):
    """botocore logs each request's params at DEBUG ("Making request for ... with params"); for
    PutParameter those hold the secret values. Drop exactly those records so turning on botocore
    debug logging can never write a secret to a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return not any("PutParameter" in str(part) for part in (record.msg, *args))


_SECRET_LOG_FILTER = _DropSecretRequestBodies()


def _guard_botocore_logs() -> None:
    for name in ("botocore.endpoint", "botocore.parsers", "botocore.hooks", "botocore.awsrequest"):
        logger = logging.getLogger(name)
        if _SECRET_LOG_FILTER not in logger.filters:
            logger.addFilter(_SECRET_LOG_FILTER)


@dataclass(frozen=True)
class SecretParameter:
    """A cloudtune secrets parameter found by `orphan_secrets` (for `cloudtune gc`)."""

    region: str
    name: str
    machine_name: str
    age_s: float
    why: str


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name, "").strip()
    return [p.strip() for p in raw.split(",") if p.strip()] or None


def client_token(job_id: str, attempt: int, zone: str) -> str:
    """RunInstances idempotency token (<= 64 ASCII chars): a retried call cannot start a second machine."""
    digest = hashlib.sha256(f"{job_id}/{attempt}/{zone}".encode()).hexdigest()[:40]
    return f"cloudtune-{digest}"


def parse_subnets(raw: dict[str, list[str] | str] | str | None, subnet_id: str | None,
                  regions: list[str]) -> dict[str, list[str]]:
    """{region: [subnet ids]} from the `subnets` mapping, its env form
    ("us-east-1=subnet-a,us-east-1=subnet-b"), or `subnet_id` (only with one configured region)."""
    out: dict[str, list[str]] = {}
    if isinstance(raw, str):
        for item in (x.strip() for x in raw.split(",") if x.strip()):
            region, sep, sub = item.partition("=")
            if not sep or not sub.strip().startswith("subnet-"):
                raise AWSConfigError(f"CLOUDTUNE_AWS_SUBNETS item {item!r} is not region=subnet-id; "
                                     "e.g. CLOUDTUNE_AWS_SUBNETS=us-east-1=subnet-0abc,us-west-2=subnet-0def",
                                     provider=NAME)
            out.setdefault(region.strip(), []).append(sub.strip())
    elif isinstance(raw, dict):
        for region, subs in raw.items():
            items = [subs] if isinstance(subs, str) else list(subs or [])
            for sub in items:
                if not isinstance(sub, str) or not sub.startswith("subnet-"):
                    raise AWSConfigError(f"aws subnets[{region!r}]: {sub!r} is not a subnet id (subnet-...)",
                                         provider=NAME)
            out[str(region)] = items
    elif raw is not None:
        raise AWSConfigError(f"aws subnets must map region -> subnet ids, not {type(raw).__name__}", provider=NAME)
    if subnet_id:
        if len(regions) != 1:
            raise AWSConfigError(f"aws subnet_id={subnet_id!r} names one subnet but {len(regions)} regions are "
                                 "configured; use `subnets: {region: [subnet-...]}` instead", provider=NAME)
        out.setdefault(regions[0], []).append(subnet_id)
    unknown = sorted(set(out) - set(regions))
    if unknown:
        raise AWSConfigError(f"aws subnets name regions cloudtune does not use ({', '.join(unknown)}); add them to "
                             "CLOUDTUNE_AWS_REGIONS or remove those subnets", provider=NAME)
    return out


def format_machine_id(region: str, instance_id: str) -> str:
    return f"{region}:{instance_id}"


def latest_spot_prices(history: Iterable[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """{(instance type, zone): price} from SpotPriceHistory records, keeping the newest per pair."""
    newest: dict[tuple[str, str], tuple[Any, float]] = {}
    for rec in history:
        key = (rec["InstanceType"], rec["AvailabilityZone"])
        stamp = rec.get("Timestamp")
        price = float(rec["SpotPrice"])
        if key not in newest or (stamp is not None and stamp > newest[key][0]):
            newest[key] = (stamp, price)
    return {k: v[1] for k, v in newest.items()}


def min_spot_by_type(latest: dict[tuple[str, str], float]) -> dict[str, float]:
    """The cheapest zone's price per instance type (what a region row shows)."""
    out: dict[str, float] = {}
    for (itype, _zone), price in latest.items():
        out[itype] = min(price, out.get(itype, price))
    return out


def machine_from_instance(inst: dict[str, Any], region: str, spot_request_code: str = "") -> Machine:
    """Map one describe_instances record to a Machine.

    A spot instance that AWS reclaims shows StateReason Server.SpotInstanceTermination (or
    ...Shutdown for stop/hibernate behaviour). While it is shutting down or stopped it is reported
    PREEMPTED; once `terminated` it is TERMINATED (gone, nothing to tear down) with "preempted" in
    the detail, so teardown verification can rely on `state.is_gone`.
    """
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
    state_name = (inst.get("State") or {}).get("Name", "")
    reason = inst.get("StateReason") or {}
    reason_code = reason.get("Code") or ""
    state = _STATE_MAP.get(state_name, MachineState.UNKNOWN)
    preempted = reason_code in SPOT_INTERRUPTION_REASONS or spot_request_code in SPOT_REQUEST_INTERRUPTED
    if preempted and state_name in ("shutting-down", "stopping", "stopped"):
        state = MachineState.PREEMPTED
    detail = state_name
    if preempted:
        detail += f" (preempted: {reason_code or spot_request_code})"
    elif reason_code:
        detail += f" ({reason_code})"
    name = tags.get("Name", "")
    parsed = parse_machine_name(name)
    job_id = tags.get(TAG_JOB) or (parsed[0] if parsed else None)
    attempt_tag = tags.get(TAG_ATTEMPT, "")
    attempt = int(attempt_tag) if attempt_tag.isdigit() else (parsed[1] if parsed else None)
    return Machine(
        provider=NAME,
        machine_id=format_machine_id(region, inst["InstanceId"]),
        name=name,
        state=state,
        job_id=job_id,
        attempt=attempt,
        region=region,
        spot=inst.get("InstanceLifecycle") == "spot",
        detail=detail,
    )


class AWSProvider:
    """EC2 GPU instances. See the module docstring for configuration."""

    name = NAME

    def __init__(
        self,
        *,
        regions: list[str] | str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        ami: str | None = None,
        ami_parameter: str | None = None,
        instance_profile: str | None = None,
        key_name: str | None = None,
        security_group_ids: list[str] | None = None,
        profile_name: str | None = None,
        ssm_kms_key: str | None = None,
        secret_grace_s: float | None = None,
        subnets: dict[str, list[str] | str] | str | None = None,
        subnet_id: str | None = None,
        consistency_grace_s: float | None = None,
        max_workers: int = 8,
    ) -> None:
        if isinstance(regions, str):
            regions = [r.strip() for r in regions.split(",") if r.strip()]
        self.regions = list(regions or ([region] if region else None) or _env_list("CLOUDTUNE_AWS_REGIONS")
                            or DEFAULT_REGIONS)
        self.endpoint_url = endpoint_url or os.environ.get("CLOUDTUNE_AWS_ENDPOINT_URL") or None
        self.ami = ami or os.environ.get("CLOUDTUNE_AWS_AMI") or None
        self.ami_parameter = ami_parameter or os.environ.get("CLOUDTUNE_AWS_AMI_PARAMETER") or DLAMI_PARAMETER
        self.instance_profile = instance_profile or os.environ.get("CLOUDTUNE_AWS_INSTANCE_PROFILE") or None
        self.key_name = key_name or os.environ.get("CLOUDTUNE_AWS_KEY_NAME") or None
        self.security_group_ids = security_group_ids or _env_list("CLOUDTUNE_AWS_SECURITY_GROUP_IDS")
        self.profile_name = profile_name
        self.ssm_kms_key = ssm_kms_key or os.environ.get("CLOUDTUNE_AWS_SSM_KMS_KEY") or None
        grace = secret_grace_s if secret_grace_s is not None else os.environ.get("CLOUDTUNE_AWS_SECRET_GRACE_S")
        try:
            self.secret_grace_s = float(grace) if grace not in (None, "") else DEFAULT_SECRET_GRACE_S
        except ValueError:
            raise AWSConfigError(f"CLOUDTUNE_AWS_SECRET_GRACE_S={grace!r} is not a number of seconds; "
                                 "set it to e.g. 900 or unset it", provider=NAME) from None
        self.subnets = parse_subnets(subnets if subnets is not None else os.environ.get("CLOUDTUNE_AWS_SUBNETS"),
                                     subnet_id, self.regions)
        grace = consistency_grace_s if consistency_grace_s is not None else os.environ.get(
            "CLOUDTUNE_AWS_CONSISTENCY_GRACE_S")
        try:
            self.not_found_grace_s = float(grace) if grace not in (None, "") else DEFAULT_CONSISTENCY_GRACE_S
        except ValueError:
            raise AWSConfigError(f"CLOUDTUNE_AWS_CONSISTENCY_GRACE_S={grace!r} is not a number of seconds; "
                                 "set it to e.g. 180 or unset it", provider=NAME) from None
        # machine id -> when this process's RunInstances returned it (see status())
        self._launched_at: dict[str, float] = {}
        # machine name -> (when, region) of this process's RunInstances whose outcome is unknown (find_by_name)
        self._ambiguous: dict[str, tuple[float, str]] = {}
        self.max_workers = max_workers
        self._session: Any = None
        self._clients: dict[tuple[str, str, bool], Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ boto3 plumbing

    def _boto_session(self) -> Any:
        if self._session is None:
            import boto3
            from botocore import exceptions as bx

            try:
                self._session = boto3.session.Session(profile_name=self.profile_name)
            except bx.ProfileNotFound as err:
                raise translate(err, "loading the AWS profile") from None
        return self._session

    def _require_credentials(self) -> None:
        from botocore import exceptions as bx

        try:
            creds = self._boto_session().get_credentials()
        except bx.BotoCoreError as err:
            raise translate(err, "loading AWS credentials") from None
        if creds is None:
            raise AuthError(NO_CREDENTIALS, provider=NAME)

    def _client(self, service: str, region: str, *, launch: bool = False) -> Any:
        """A cached client. boto3 clients are thread-safe; creating one is not, hence the lock."""
        key = (service, region, launch)
        with self._lock:
            if key not in self._clients:
                from botocore.config import Config

                self._require_credentials()
                # RunInstances gets one attempt: a capacity error (HTTP 500) must move on to the next
                # zone at once, not back off three times; launch() retries a true 5xx itself.
                retries = {"mode": "standard", "total_max_attempts": 1 if launch else 5}
                config = Config(retries=retries, connect_timeout=10, read_timeout=60,
                                user_agent_extra="cloudtune")
                if service == "ssm":
                    _guard_botocore_logs()
                self._clients[key] = self._boto_session().client(
                    service, region_name=region, endpoint_url=self.endpoint_url, config=config
                )
            return self._clients[key]

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        from botocore import exceptions as bx

        try:
            return fn()
        except (bx.BotoCoreError, bx.ClientError) as err:
            raise translate(err, action) from None

    def _sweep(self, what: str, fn: Callable[[str], list[T]]) -> list[T]:
        """Run `fn(region)` over every configured region in parallel.

        A region that refuses us (opt-in region not enabled: AuthFailure/OptInRequired) is skipped
        as long as some region answered; if none did, the first error is raised.
        """
        self._require_credentials()
        results: list[T] = []
        errors: list[tuple[str, ProviderError]] = []

        def one(region: str) -> tuple[str, list[T] | ProviderError]:
            try:
                return region, fn(region)
            except ProviderError as err:
                return region, err

        for region, out in _in_daemon_threads(one, self.regions, self.max_workers):
            if isinstance(out, ProviderError):
                errors.append((region, out))
            else:
                results.extend(out)
        skippable = all(isinstance(e, AuthError | QuotaError) for _, e in errors)
        if errors and (len(errors) == len(self.regions) or not skippable):
            raise errors[0][1]
        for region, err in errors:
            log.warning("%s: skipped region %s: %s", what, region, err)
        return results

    # ------------------------------------------------------------ offers

    def catalog_offers(self) -> list[Offer]:
        """The bundled catalog's AWS rows in the configured regions (no network)."""
        from cloudtune.catalog import bundled_offers

        wanted = set(self.regions)
        return [o for o in bundled_offers() if o.provider == NAME and o.region in wanted]

    def spot_prices(self, region: str, instance_types: list[str] | None = None) -> dict[tuple[str, str], float]:
        """{(type, zone): current spot $/h} in one region, from describe_spot_price_history."""
        ec2 = self._client("ec2", region)
        types = instance_types or sorted(INSTANCE_TYPES)

        def fetch() -> dict[tuple[str, str], float]:
            pages = ec2.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=types,
                ProductDescriptions=["Linux/UNIX"],
                StartTime=datetime.now(UTC),
            )
            records: list[dict[str, Any]] = []
            for page in pages:
                records.extend(page.get("SpotPriceHistory", []))
            return latest_spot_prices(records)

        return self._call(f"DescribeSpotPriceHistory in {region}", fetch)

    def offers(self) -> list[Offer]:
        """Catalog on-demand prices overlaid with live spot prices (fresh=True), for `catalog refresh`.

        Without credentials this raises AuthError (refresh reports the provider as skipped) rather
        than passing the snapshot off as live; the planner reads the snapshot through cloudtune.catalog.
        """
        catalog = self.catalog_offers()
        self._require_credentials()
        from cloudtune.catalog import usable_gib

        live = self._sweep("spot prices", lambda r: [(r, t, p) for t, p in min_spot_by_type(self.spot_prices(r)).items()])
        spot = {(region, itype): price for region, itype, price in live}
        on_demand = {(o.region, o.offer_id): o for o in catalog}
        now = datetime.now(UTC).isoformat(timespec="seconds")
        out: list[Offer] = []
        for key in sorted(set(spot) | set(on_demand)):
            region, itype = key
            base = on_demand.get(key)
            spec = INSTANCE_TYPES.get(itype)
            if base is None and spec is None:
                continue
            gpu = base.gpu if base else spec.gpu  # type: ignore[union-attr]
            out.append(Offer(
                provider=NAME,
                offer_id=itype,
                gpu=gpu,
                gpu_count=base.gpu_count if base else spec.gpu_count,  # type: ignore[union-attr]
                vram_gib_per_gpu=base.vram_gib_per_gpu if base else usable_gib(gpu, _nominal_gb(gpu)),
                region=region,
                price_hr=base.price_hr if base else None,
                spot_price_hr=spot.get(key),
                as_of=now,
                billing_granularity_s=1,
                vcpus=base.vcpus if base else spec.vcpus,  # type: ignore[union-attr]
                ram_gb=base.ram_gb if base else float(spec.ram_gib),  # type: ignore[union-attr]
                fresh=key in spot,
                source=("live spot (DescribeSpotPriceHistory) + snapshot on-demand" if base else "live spot")
                if key in spot else "snapshot on-demand (no live spot price)",
            ))
        return out

    # ------------------------------------------------------------ launch

    def _check_request(self, req: LaunchRequest) -> None:
        if req.offer.provider != NAME:
            raise AWSConfigError(f"offer {req.offer.offer_id!r} belongs to provider {req.offer.provider!r}, not aws",
                                      provider=NAME)
        if req.offer.region not in self.regions:
            raise RegionNotSwept(
                f"region {req.offer.region!r} is not in the regions cloudtune sweeps ({', '.join(self.regions)}); "
                "add it to CLOUDTUNE_AWS_REGIONS so `cloudtune gc` can see what runs there",
                provider=NAME,
            )

    def _machine_env(self, req: LaunchRequest) -> tuple[dict[str, str], dict[str, str]]:
        """(plain env for user-data, secret env for the SSM parameter). A key in both is a secret."""
        secrets, _ = strip_aws_credentials(req.secret_env)
        store = req.env.get("CLOUDTUNE_STORE", "")
        if store and not store.startswith("s3://"):
            raise AWSConfigError(
                f"the store {store} is not reachable from an EC2 machine: set store.url in the job spec to an "
                "s3://bucket/prefix URL (docs/providers/aws.md)",
                provider=NAME,
            )
        if store and not self.instance_profile:
            raise AWSConfigError(
                f"the store {store} needs S3 access from the EC2 machine: set CLOUDTUNE_AWS_INSTANCE_PROFILE to an "
                "instance profile whose role may read and write that bucket (docs/providers/aws.md)",
                provider=NAME,
            )
        plain = {k: v for k, v in req.env.items() if k not in secrets}
        return plain, secrets

    def _tags(self, req: LaunchRequest) -> list[dict[str, str]]:
        return [{"Key": "Name", "Value": req.name}] + [{"Key": k, "Value": v} for k, v in req.tags.items()]

    def _run_params(self, req: LaunchRequest, plain: dict[str, str], *, image_id: str, root_device: str,
                    root_size_gb: int, secrets_parameter: str | None) -> dict[str, Any]:
        """RunInstances arguments, without Placement and ClientToken (set per zone). `plain` is the
        non-secret env (user-data); the secrets are only named, through `secrets_parameter`."""
        tags = self._tags(req)
        user_data = build_user_data(
            job_id=req.job_id, attempt=req.attempt, image=req.image, command=list(req.command),
            env=plain, max_lifetime_s=req.max_lifetime_s, workdir=req.workdir,
            secrets_parameter=secrets_parameter, region=req.offer.region,
        )
        params: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": req.offer.offer_id,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": user_data,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "BlockDeviceMappings": [{
                "DeviceName": root_device,
                "Ebs": {"VolumeSize": root_size_gb, "VolumeType": "gp3", "DeleteOnTermination": True},
            }],
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 2, "HttpEndpoint": "enabled"},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if req.spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        if self.instance_profile:
            key = "Arn" if self.instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: self.instance_profile}
        if self.key_name:
            params["KeyName"] = self.key_name
        if self.security_group_ids:
            params["SecurityGroupIds"] = list(self.security_group_ids)
        return params

    def resolve_ami(self, region: str) -> str:
        if self.ami:
            return self.ami
        ssm = self._client("ssm", region)
        try:
            return ssm.get_parameter(Name=self.ami_parameter)["Parameter"]["Value"]
        except Exception as err:  # noqa: BLE001 - translated below
            if error_code(err) == "ParameterNotFound":
                raise AWSConfigError(
                    f"SSM parameter {self.ami_parameter!r} (the Deep Learning AMI id) does not exist in {region}; "
                    "set CLOUDTUNE_AWS_AMI to an AMI id or CLOUDTUNE_AWS_AMI_PARAMETER to another parameter",
                    provider=NAME,
                ) from None
            raise translate(err, f"GetParameter {self.ami_parameter} in {region}") from None

    def _root_volume(self, region: str, image_id: str, disk_gb: int) -> tuple[str, int]:
        """(root device name, size): the AMI's own root device, grown to the job's disk need."""
        ec2 = self._client("ec2", region)
        images = self._call(f"DescribeImages {image_id} in {region}",
                            lambda: ec2.describe_images(ImageIds=[image_id])["Images"])
        if not images:
            raise InvalidRequestError(f"AMI {image_id} does not exist in {region}", provider=NAME)
        image = images[0]
        device = image.get("RootDeviceName") or "/dev/sda1"
        snapshot_gb = 0
        for mapping in image.get("BlockDeviceMappings") or []:
            if mapping.get("DeviceName") == device:
                snapshot_gb = int((mapping.get("Ebs") or {}).get("VolumeSize") or 0)
        return device, max(int(disk_gb), snapshot_gb, 8)

    def _zones(self, region: str, itype: str, spot: bool) -> list[str]:
        """Zones that offer the type, cheapest spot price first (alphabetical for on-demand)."""
        ec2 = self._client("ec2", region)
        offerings = self._call(
            f"DescribeInstanceTypeOfferings {itype} in {region}",
            lambda: ec2.describe_instance_type_offerings(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [itype]}]
            )["InstanceTypeOfferings"],
        )
        zones = sorted({o["Location"] for o in offerings})
        subnet_zones = self._subnet_zones(region)
        if subnet_zones is not None:
            zones = [z for z in zones if z in subnet_zones]
        if spot and zones:
            prices = self.spot_prices(region, [itype])
            zones.sort(key=lambda z: (prices.get((itype, z), float("inf")), z))
        return zones

    def _subnet_zones(self, region: str) -> dict[str, str] | None:
        """{zone: subnet id} of the configured subnets of `region` (DescribeSubnets), None if none set."""
        ids = self.subnets.get(region)
        if not ids:
            return None
        ec2 = self._client("ec2", region)
        try:
            found = self._call(f"DescribeSubnets {', '.join(ids)} in {region}",
                               lambda: ec2.describe_subnets(SubnetIds=list(ids))["Subnets"])
        except InvalidRequestError as err:  # InvalidSubnetID.NotFound / .Malformed
            raise AWSConfigError(f"{err}; fix the aws `subnets` setting (CLOUDTUNE_AWS_SUBNETS) for {region}",
                                 provider=NAME) from None
        by_zone: dict[str, str] = {}
        for sub in found:
            by_zone.setdefault(sub["AvailabilityZone"], sub["SubnetId"])
        return by_zone

    def launch(self, req: LaunchRequest) -> Machine:
        self._check_request(req)
        try:
            return self._launch(req)
        except AuthError as err:
            if req.offer.region not in OPT_IN_REGIONS:
                raise
            # Bad credentials would fail in every region; here the region itself is not enabled.
            raise QuotaError(
                f"{req.offer.region} refused the request ({err}); it is an opt-in region: enable it for this "
                "account or remove it from CLOUDTUNE_AWS_REGIONS",
                provider=NAME,
            ) from None

    # ------------------------------------------------------------ secrets parameter

    def _put_params(self, req: LaunchRequest, secrets: dict[str, str], *, redact: bool) -> dict[str, Any]:
        """PutParameter arguments for the machine's secrets (Value `***` when `redact`, for --dry-run)."""
        return {
            "Name": secrets_parameter_name(req.name, validate=not redact),
            "Description": f"cloudtune job {req.job_id} attempt {req.attempt}: the trainer's secret environment "
                           "(deleted with the machine)",
            "Value": REDACTED if redact else secrets_value(secrets),
            "Type": "SecureString",
            "KeyId": self.ssm_kms_key or SSM_DEFAULT_KEY,
            "Tier": "Standard",
            "Tags": self._tags(req),
        }

    def _put_secrets(self, req: LaunchRequest, secrets: dict[str, str]) -> str:
        """Write the secrets parameter; a leftover of the same name (an earlier try of this attempt) is
        overwritten (Tags cannot go with Overwrite; the old ones are the same)."""
        from botocore import exceptions as bx

        region = req.offer.region
        params = self._put_params(req, secrets, redact=False)
        name = params["Name"]
        ssm = self._client("ssm", region)
        action = f"PutParameter {name} in {region}"
        try:
            try:
                ssm.put_parameter(**params)
            except bx.ClientError as err:
                if error_code(err) != "ParameterAlreadyExists":
                    raise
                ssm.put_parameter(**{k: v for k, v in params.items() if k != "Tags"}, Overwrite=True)
        except bx.ParamValidationError:
            # botocore's validation text can quote the parameter values: never pass it on.
            raise AWSConfigError(f"{action}: botocore refused the request as malformed", provider=NAME) from None
        except (bx.BotoCoreError, bx.ClientError) as err:
            typed = translate(err, action)
            if isinstance(typed, AuthError):
                typed = AuthError(
                    f"{typed}. The job has secrets ({', '.join(sorted(secrets))}) that go to the machine through "
                    f"SSM: allow ssm:PutParameter and ssm:AddTagsToResource on arn:aws:ssm:*:*:parameter/cloudtune/* "
                    f"(and kms:Encrypt on a customer-managed key), see docs/providers/aws.md",
                    provider=NAME)
            raise typed from None
        log.info("wrote %d secret variable(s) to SSM parameter %s in %s", len(secrets), name, region)
        return name

    def _delete_parameter(self, region: str, name: str) -> bool:
        """Delete one secrets parameter. True if it existed; raises typed errors."""
        ssm = self._client("ssm", region)
        try:
            ssm.delete_parameter(Name=name)
        except Exception as err:  # noqa: BLE001 - translated below
            if error_code(err) == "ParameterNotFound":
                return False
            raise translate(err, f"DeleteParameter {name} in {region}") from None
        return True

    def _discard_secrets(self, region: str, names: Iterable[str], why: str) -> None:
        """Best-effort delete of the secrets parameters of machines that are gone or never started.

        Why it never raises: it runs after a terminate or a failed launch, whose own outcome matters
        more; a parameter left behind is reported here and swept by `cloudtune gc`."""
        for machine in names:
            parameter = secrets_parameter_name(machine)
            try:
                if self._delete_parameter(region, parameter):
                    log.info("deleted SSM parameter %s in %s (%s)", parameter, region, why)
            except ProviderError as err:
                log.warning("could not delete SSM parameter %s in %s (%s): %s; `cloudtune gc --yes` deletes it "
                            "once allowed ssm:DeleteParameter on arn:aws:ssm:*:*:parameter/cloudtune/*",
                            parameter, region, why, err)

    def _launch(self, req: LaunchRequest) -> Machine:
        region, itype = req.offer.region, req.offer.offer_id
        image_id = self.resolve_ami(region)
        device, size = self._root_volume(region, image_id, req.disk_gb)
        plain, secrets = self._machine_env(req)
        parameter = secrets_parameter_name(req.name) if secrets else None
        params = self._run_params(req, plain, image_id=image_id, root_device=device, root_size_gb=size,
                                  secrets_parameter=parameter)
        zones = self._zones(region, itype, req.spot)
        if not zones:
            where = (f"the zones of the configured subnets ({', '.join(self.subnets[region])})"
                     if self.subnets.get(region) else "any availability zone")
            raise CapacityError(f"{itype} is not offered in {where} of {region}", provider=NAME)
        ec2 = self._client("ec2", region, launch=True)
        if not secrets:
            try:
                return self._launch_in_zones(req, ec2, params, zones)
            except TransientError:
                self._ambiguous[req.name] = (time.time(), region)
                raise
        self._put_secrets(req, secrets)
        try:
            return self._launch_in_zones(req, ec2, params, zones)
        except TransientError:
            # The create's outcome is unknown: the orchestrator may find and adopt the machine, which
            # needs the parameter. If find_by_name proves it absent, the parameter goes (else gc, later).
            self._ambiguous[req.name] = (time.time(), region)
            log.info("kept SSM parameter %s: RunInstances ended with an unknown outcome", parameter)
            raise
        except BaseException:
            self._discard_secrets(region, [req.name], "the launch failed")
            raise

    def _launch_in_zones(self, req: LaunchRequest, ec2: Any, params: dict[str, Any], zones: list[str]) -> Machine:
        region, itype = req.offer.region, req.offer.offer_id
        failures: list[str] = []
        subnet_by_zone = self._subnet_zones(region) or {}
        for zone in zones:
            call = {**params, "Placement": {"AvailabilityZone": zone},
                    "ClientToken": client_token(req.job_id, req.attempt, zone)}
            if zone in subnet_by_zone:
                call["SubnetId"] = subnet_by_zone[zone]
            action = f"RunInstances {itype} ({'spot' if req.spot else 'on-demand'}) in {zone}"
            try:
                inst = self._run_once(ec2, call, action)
            except CapacityError as err:
                log.info("%s", err)
                failures.append(str(err))
                continue
            machine = machine_from_instance(inst, region)
            self._launched_at[machine.machine_id] = time.time()
            machine.price_hr = req.offer.spot_price_hr if req.spot else req.offer.price_hr
            if machine.name != req.name:  # moto or an old API may omit tags in the reply
                machine.name, machine.job_id, machine.attempt = req.name, req.job_id, req.attempt
            return machine
        raise CapacityError(
            f"no {'spot' if req.spot else 'on-demand'} {itype} capacity in {region} (tried {', '.join(zones)}); "
            f"last error: {failures[-1]}",
            provider=NAME,
        )

    def _run_once(self, ec2: Any, call: dict[str, Any], action: str) -> dict[str, Any]:
        """One zone: RunInstances, retried once on a 5xx/timeout with the same ClientToken (idempotent)."""
        last: ProviderError | None = None
        for _ in range(2):
            try:
                return self._call(action, lambda: ec2.run_instances(**call))["Instances"][0]
            except TransientError as err:
                last = err
        assert last is not None
        raise last

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        """The calls `launch` makes, secrets redacted, without touching the network."""
        self._check_request(req)
        region = req.offer.region
        out: list[dict] = []
        if self.ami:
            image_id = self.ami
        else:
            image_id = f"resolve:ssm:{self.ami_parameter}"
            out.append({"service": "ssm", "region": region, "operation": "GetParameter",
                        "params": {"Name": self.ami_parameter}})
        plain, secrets = self._machine_env(req)
        parameter = None
        if secrets:
            secrets_value(secrets)  # the same checks as a launch
            put = self._put_params(req, secrets, redact=True)
            parameter = put["Name"]
            out.append({"service": "ssm", "region": region, "operation": "PutParameter", "params": put})
        params = self._run_params(req, plain, image_id=image_id, root_device="/dev/sda1 (the AMI's root device)",
                                  root_size_gb=req.disk_gb, secrets_parameter=parameter)
        params["Placement"] = {"AvailabilityZone": f"each zone of {region} offering {req.offer.offer_id}, "
                                                   + ("cheapest spot price first" if req.spot else "in order")}
        params["ClientToken"] = client_token(req.job_id, req.attempt, "<zone>")
        if self.subnets.get(region):
            params["SubnetId"] = f"the subnet of that zone among {', '.join(self.subnets[region])}"
        out.append({"service": "ec2", "region": region, "operation": "RunInstances", "params": params})
        return out

    # ------------------------------------------------------------ status / terminate / list

    def _split_id(self, machine_id: str) -> tuple[str | None, str]:
        region, sep, instance_id = machine_id.rpartition(":")
        if not instance_id.startswith("i-"):
            raise AWSConfigError(f"{machine_id!r} is not an AWS machine id (<region>:i-...)", provider=NAME)
        return (region or None) if sep else None, instance_id

    def _describe_one(self, region: str, instance_id: str) -> dict[str, Any]:
        ec2 = self._client("ec2", region)
        reservations = self._call(f"DescribeInstances {instance_id} in {region}",
                                  lambda: ec2.describe_instances(InstanceIds=[instance_id])["Reservations"])
        for res in reservations:
            for inst in res.get("Instances", []):
                return inst
        raise NotFoundError(f"instance {instance_id} not found in {region}", provider=NAME)

    def _locate(self, machine_id: str) -> tuple[str, dict[str, Any]]:
        region, instance_id = self._split_id(machine_id)
        if region:
            return region, self._describe_one(region, instance_id)
        for candidate in self.regions:  # a bare instance id: look in every region we use
            try:
                return candidate, self._describe_one(candidate, instance_id)
            except NotFoundError:
                continue
        raise NotFoundError(f"instance {instance_id} not found in {', '.join(self.regions)}", provider=NAME)

    def status(self, machine_id: str) -> Machine:
        """The instance's state. InvalidInstanceID.NotFound within `not_found_grace_s` of our own
        RunInstances is PENDING, not lost: EC2's describe calls are eventually consistent, and reading
        it as lost would launch a second trainer onto the same store while the first boots."""
        try:
            region, inst = self._locate(machine_id)
        except NotFoundError:
            launched = self._launched_at.get(machine_id)
            if launched is None or time.time() - launched >= self.not_found_grace_s:
                raise
            region, instance_id = self._split_id(machine_id)
            return Machine(provider=NAME, machine_id=machine_id, name="", state=MachineState.PENDING,
                           region=region, detail=f"{instance_id} not yet visible to DescribeInstances "
                           f"{time.time() - launched:.0f}s after RunInstances (EC2 is eventually consistent)")
        spot_code = ""
        reason = (inst.get("StateReason") or {}).get("Code") or ""
        request_id = inst.get("SpotInstanceRequestId")
        if request_id and reason not in SPOT_INTERRUPTION_REASONS and inst["State"]["Name"] != "running":
            spot_code = self._spot_request_code(region, request_id)
        return machine_from_instance(inst, region, spot_code)

    def _spot_request_code(self, region: str, request_id: str) -> str:
        ec2 = self._client("ec2", region)
        try:
            requests = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])
        except Exception as err:  # noqa: BLE001 - best effort: the instance state is still reported
            log.debug("spot request %s: %s", request_id, err)
            return ""
        for item in requests.get("SpotInstanceRequests", []):
            return str((item.get("Status") or {}).get("Code") or "")
        return ""

    def terminate(self, machine_id: str) -> None:
        self.terminate_many([machine_id])

    def terminate_many(self, machine_ids: list[str]) -> None:
        """Terminate in one call per region; if one unknown id fails the batch, go one by one.

        Then delete the machines' secrets parameters (found through their Name tags), best effort:
        the terminate is what must not fail."""
        by_region: dict[str, list[str]] = {}
        for machine_id in machine_ids:
            region, instance_id = self._split_id(machine_id)
            if region is None:
                try:
                    region, _ = self._locate(machine_id)
                except NotFoundError:
                    continue
            by_region.setdefault(region, []).append(instance_id)
        for region, ids in by_region.items():
            ec2 = self._client("ec2", region)
            try:
                self._call(f"TerminateInstances in {region}", lambda c=ec2, ids=ids: c.terminate_instances(InstanceIds=ids))
            except NotFoundError:
                for instance_id in ids:
                    try:
                        self._call(f"TerminateInstances {instance_id} in {region}",
                                   lambda c=ec2, i=instance_id: c.terminate_instances(InstanceIds=[i]))
                    except NotFoundError:
                        pass  # already gone: done
            self._discard_secrets(region, self._names_of(region, ids), "machine terminated")

    def _names_of(self, region: str, instance_ids: list[str]) -> list[str]:
        """Name tags of these instances (an id filter, unlike InstanceIds=, tolerates unknown ids)."""
        ec2 = self._client("ec2", region)
        names: list[str] = []
        try:
            pages = ec2.get_paginator("describe_instances").paginate(
                Filters=[{"Name": "instance-id", "Values": instance_ids}])
            for page in pages:
                for res in page.get("Reservations", []):
                    for inst in res.get("Instances", []):
                        tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
                        if parse_machine_name(tags.get("Name", "")):
                            names.append(tags["Name"])
        except Exception as err:  # noqa: BLE001 - best effort, see _discard_secrets
            log.warning("could not read the names of %s in %s to delete their SSM secrets: %s; "
                        "`cloudtune gc` deletes them later", ", ".join(instance_ids), region,
                        translate(err, "DescribeInstances") if not isinstance(err, ProviderError) else err)
        return names

    # ------------------------------------------------------------ orphaned secrets (for gc)

    def orphan_secrets(self) -> list[SecretParameter]:
        """Secrets parameters (/cloudtune/<machine>/env) whose machine no longer exists, every region.

        A parameter with no live instance of its name is an orphan once it is older than
        `secret_grace_s`: a younger one may belong to a launch in flight (written just before
        RunInstances). Reads metadata only (DescribeParameters), never a value.
        """
        return self._sweep("secret parameters", self._orphan_secrets_in)

    def _orphan_secrets_in(self, region: str) -> list[SecretParameter]:
        ssm = self._client("ssm", region)

        def fetch() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            pages = ssm.get_paginator("describe_parameters").paginate(
                ParameterFilters=[{"Key": "Name", "Option": "BeginsWith", "Values": [SECRETS_PREFIX]}])
            for page in pages:
                out.extend(page.get("Parameters", []))
            return out

        found = self._call(f"DescribeParameters {SECRETS_PREFIX}* in {region}", fetch)
        ours = [(p, machine_name_of_parameter(p["Name"])) for p in found]
        ours = [(p, m) for p, m in ours if m]
        if not ours:
            return []
        live: set[str] = set()
        names = sorted({m for _, m in ours})
        for i in range(0, len(names), 100):  # a filter takes at most 200 values
            filters = [{"Name": "tag:Name", "Values": names[i:i + 100]},
                       {"Name": "instance-state-name", "Values": LIVE_STATES}]
            live.update(m.name for m in self._describe_filtered(region, filters))
        now = datetime.now(UTC)
        orphans: list[SecretParameter] = []
        for p, machine in ours:
            if machine in live:
                continue
            modified = p.get("LastModifiedDate")
            age = (now - modified).total_seconds() if isinstance(modified, datetime) else float("inf")
            if age < self.secret_grace_s:
                continue
            orphans.append(SecretParameter(region=region, name=p["Name"], machine_name=machine, age_s=age,
                                           why=f"no live instance named {machine} in {region}"))
        return orphans

    def delete_secret(self, secret: SecretParameter) -> bool:
        """Delete an orphaned secrets parameter (True if it existed). Typed errors on failure."""
        return self._delete_parameter(secret.region, secret.name)

    def _describe_filtered(self, region: str, filters: list[dict[str, Any]]) -> list[Machine]:
        ec2 = self._client("ec2", region)

        def fetch() -> list[Machine]:
            out = []
            for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
                for res in page.get("Reservations", []):
                    out.extend(machine_from_instance(inst, region) for inst in res.get("Instances", []))
            return out

        return self._call(f"DescribeInstances in {region}", fetch)

    def list_machines(self) -> list[Machine]:
        """Live (not yet terminated) instances tagged cloudtune:job, in every configured region."""
        filters = [{"Name": "tag-key", "Values": [TAG_JOB]},
                   {"Name": "instance-state-name", "Values": LIVE_STATES}]
        return self._sweep("list machines", lambda r: self._describe_filtered(r, filters))

    def find_by_name(self, name: str) -> Machine | None:
        filters = [{"Name": "tag:Name", "Values": [name]},
                   {"Name": "instance-state-name", "Values": LIVE_STATES}]
        found = self._sweep("find by name", lambda r: self._describe_filtered(r, filters))
        ambiguous = self._ambiguous.pop(name, None)
        if not found and ambiguous is not None:
            since = time.time() - ambiguous[0]
            if since < self.not_found_grace_s:
                # A filtered DescribeInstances is eventually consistent too: an instance our ambiguous
                # RunInstances made may not be listed yet. "None" now would launch a second trainer.
                self._ambiguous[name] = ambiguous
                raise TransientError(
                    f"no instance named {name} is listed {since:.0f}s after a RunInstances whose outcome is "
                    f"unknown; EC2 is eventually consistent, so this proves nothing before "
                    f"{self.not_found_grace_s:.0f}s (CLOUDTUNE_AWS_CONSISTENCY_GRACE_S)", provider=NAME)
            # proven absent: its secrets parameter, kept for an adoption that will not come, goes too
            self._discard_secrets(ambiguous[1], [name], "the ambiguous launch made no machine")
        if not found:
            return None
        if len(found) > 1:
            log.warning("%d live instances are named %s: %s", len(found), name,
                        ", ".join(m.machine_id for m in found))
        return found[0]

    def self_terminate(self) -> SelfTerminate:
        return SelfTerminate(
            command=["shutdown", "-h", "now"],
            note="the user-data script powers the instance off when the trainer exits; "
                 "InstanceInitiatedShutdownBehavior=terminate makes that a terminate (no credentials needed)",
        )


def _in_daemon_threads(fn: Callable[[str], Any], items: list[str], max_workers: int) -> list[Any]:
    """`[fn(x) for x in items]`, at most `max_workers` at a time, in daemon threads, in order.

    Why not ThreadPoolExecutor: its workers are joined at interpreter exit, so one region whose endpoint
    accepts and never answers (botocore: 60 s read timeout x 5 attempts) held `cloudtune gc` for minutes
    after gc's own deadline had given up on AWS. A daemon thread dies with the process."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    results: list[Any] = [None] * len(items)
    failures: list[BaseException | None] = [None] * len(items)
    gate = threading.Semaphore(max(1, max_workers))

    def run(i: int, x: str) -> None:
        with gate:
            try:
                results[i] = fn(x)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller, as pool.map did
                failures[i] = err

    threads = [threading.Thread(target=run, args=(i, x), daemon=True, name=f"aws-{x}") for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for err in failures:
        if err is not None:
            raise err
    return results


def _nominal_gb(gpu: str) -> float:
    from cloudtune.catalog import gpu_spec

    spec = gpu_spec(gpu)
    return spec.vram_gb if spec else 0.0
