"""Lambda Cloud adapter (REST, on-demand VMs only).

Why it looks the way it does:
- Lambda sells VMs, not containers, so the trainer container is started by a cloud-init script in
  `user_data` (see `bootstrap_script`), which also terminates the VM through the API when the
  trainer exits. Lambda injects no instance id and has no scoped keys, so that script carries an
  account API key (a separate, revocable key if you set CLOUDTUNE_LAMBDA_TERMINATE_KEY). The key is
  written to a root-only file on the VM and is never given to the training container.
- Lambda has no spot tier and no stop: teardown is always terminate; `preempted` still maps to
  PREEMPTED in case Lambda ever takes a machine back.
- Launch is rate-limited to one per 12 s by Lambda; this adapter spaces launches itself and checks
  capacity through GET /instance-types first (Lambda asks clients not to probe with launches).
- A launch that fails with a 5xx may still have created the instance; it is not retried here, the
  orchestrator looks the machine up by its deterministic name (`find_by_name`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudtune.providers.base import (
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
    RateLimitedError,
    SelfTerminate,
    TransientError,
    machine_tags,
    parse_machine_name,
)
from cloudtune.providers.http import REDACTED, HttpClient, RetryPolicy, parse_retry_after

from cloudtune.errors import UserError

PROVIDER = "lambda"
DEFAULT_API_URL = "https://cloud.lambda.ai/api/v1"
ENV_API_KEY = "LAMBDA_API_KEY"
ENV_API_URL = "CLOUDTUNE_LAMBDA_API_URL"
ENV_SSH_KEY = "CLOUDTUNE_LAMBDA_SSH_KEY"
ENV_TERMINATE_KEY = "CLOUDTUNE_LAMBDA_TERMINATE_KEY"
KEYS_FILE = Path("~/.lambda_cloud/lambda_keys")
AUTH_HINT = f"set {ENV_API_KEY} or write 'api_key = <key>' to {KEYS_FILE} (cloud.lambda.ai -> API keys)"

LAUNCH_INTERVAL_S = 12.0  # Lambda: launch is limited to 1 request per 12 s
BILLING_GRANULARITY_S = 60  # per minute, from the health check passing until terminate
TAG_KEY_RE = re.compile(r"^[a-z][a-z0-9-:]+$")
MAX_NAME_LEN = 64
MAX_TAG_KEY_LEN = 55
MAX_TAG_VALUE_LEN = 128
MAX_USER_DATA_BYTES = 1_000_000
DEFAULT_MAX_LIFETIME_S = 7 * 24 * 3600  # the VM's own hard cap when the request gives none
BOOT_DIR = "/etc/cloudtune"

_STATUS = {
    "booting": MachineState.PENDING,
    "active": MachineState.RUNNING,
    "unhealthy": MachineState.RUNNING,  # degraded, still billing: detail says so
    "terminating": MachineState.TERMINATING,
    "terminated": MachineState.TERMINATED,
    "preempted": MachineState.PREEMPTED,
}

# Instance-type suffix (after gpu_<n>x_) -> the catalog's normalised GPU name
# (/work/shared/catalog/README.md "Normalisation": Lambda's own catalog calls both H100s "H100").
_GPU_BY_SUFFIX = {
    "h100_sxm5": "H100-SXM",
    "h100_pcie": "H100-80GB",
    "a100": "A100-40GB",
    "a100_sxm4": "A100-40GB",
    "a100_80gb_sxm4": "A100-80GB",
    "a100_80gb_pcie": "A100-80GB",
    "a10": "A10",
    "a6000": "A6000",
    "b200_sxm6": "B200",
    "gh200": "GH200",
    "rtx6000": "RTX6000",
    "v100": "V100",
    "v100_n": "V100",
    "h200_sxm5": "H200",
    "a6000_ada": "RTX6000-Ada",
}
_TYPE_RE = re.compile(r"^gpu_(\d+)x_([a-z0-9_]+)$")
_VRAM_RE = re.compile(r"\((\d+(?:\.\d+)?)\s*GB", re.IGNORECASE)

# Launches are spaced across every LambdaProvider in this process (the limit is per account).
_launch_lock = threading.Lock()
_last_launch_at = 0.0


class LambdaConfigError(InvalidRequestError, UserError):
    """A request this adapter will not send (spot, store, env, sizes). Also a UserError, so
    `cloudtune run --dry-run` prints it as one line; the orchestrator sees an InvalidRequestError."""


def read_api_key(explicit: str | None = None) -> str | None:
    """The key from the argument, LAMBDA_API_KEY, or ~/.lambda_cloud/lambda_keys (SkyPilot's file)."""
    if explicit:
        return explicit
    if os.environ.get(ENV_API_KEY):
        return os.environ[ENV_API_KEY]
    path = KEYS_FILE.expanduser()
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line:
            key, _, value = line.partition("=")
            if key.strip() == "api_key" and value.strip():
                return value.strip()
        else:
            return line
    return None


def normalise_gpu(instance_type_name: str, gpu_description: str = "") -> str:
    """The catalog's GPU name for a Lambda instance type (falls back to the description's model).

    Lambda adds suffixes to known types (the spec's own example is `gpu_8x_h100_sxm5gdr`): the
    longest known suffix the type's suffix starts with wins, so `h100_sxm5gdr` is an H100-SXM."""
    m = _TYPE_RE.match(instance_type_name)
    if m:
        suffix = m.group(2)
        known = [k for k in _GPU_BY_SUFFIX if suffix == k or suffix.startswith(k)]
        if known:
            return _GPU_BY_SUFFIX[max(known, key=len)]
    head = gpu_description.split("(")[0].strip().replace(" ", "")
    return head or instance_type_name


def gpu_count_of(instance_type: dict[str, Any]) -> int:
    specs = instance_type.get("specs") or {}
    if isinstance(specs.get("gpus"), int) and specs["gpus"] > 0:
        return specs["gpus"]
    m = _TYPE_RE.match(instance_type.get("name", ""))
    return int(m.group(1)) if m else 1


def vram_of(gpu_description: str, gpu: str) -> float:
    """VRAM per GPU from Lambda's description ("H100 (80 GB SXM5)"), else the catalog's gpus.csv."""
    m = _VRAM_RE.search(gpu_description or "")
    if m:
        return float(m.group(1))
    return _catalog_vram(gpu)


def _catalog_vram(gpu: str) -> float:
    import csv
    from importlib import resources

    with resources.files("cloudtune").joinpath("data/gpus.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["gpu"] == gpu:
                return float(row["vram_gb"])
    return 0.0


def lambda_tags(job_id: str, attempt: int) -> list[dict[str, str]]:
    """The protocol's tags in Lambda's [{key, value}] shape, checked against Lambda's key rules."""
    tags = [{"key": k, "value": v} for k, v in machine_tags(job_id, attempt).items()]
    for tag in tags:
        if not TAG_KEY_RE.match(tag["key"]) or len(tag["key"]) > MAX_TAG_KEY_LEN:
            raise LambdaConfigError(f"lambda: tag key {tag['key']!r} breaks Lambda's rule {TAG_KEY_RE.pattern}")
        if len(tag["value"]) > MAX_TAG_VALUE_LEN:
            raise LambdaConfigError(f"lambda: tag value for {tag['key']!r} is over {MAX_TAG_VALUE_LEN} characters")
    return tags


def _classify(resp: Any, body: Any) -> ProviderError | None:
    """Lambda's `{"error": {"code", "message", "suggestion"}}` onto the protocol's errors.

    By `code` first (the spec's ApiError* schemas; `message` is free text and never parsed), then by
    HTTP status for codes this adapter does not know. A code wins over its status: a
    `global/rate-limited` answer is a rate limit whatever status carries it."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None
    code = str(err.get("code", ""))
    message = str(err.get("message", "")).strip()
    suggestion = str(err.get("suggestion") or "").strip()
    text = f"lambda: {code}: {message}" + (f" ({suggestion})" if suggestion else "")
    status = resp.status_code
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    if code == "global/invalid-api-key":
        return AuthError(f"lambda rejected the API key ({code}); {AUTH_HINT}", provider=PROVIDER)
    if code == "global/account-inactive":
        return QuotaError(text + "; activate billing on cloud.lambda.ai", provider=PROVIDER)
    if code.endswith("insufficient-capacity"):
        return CapacityError(text, provider=PROVIDER)
    if code == "global/quota-exceeded":
        return QuotaError(text, provider=PROVIDER)
    if code == "global/rate-limited":
        return RateLimitedError(text, provider=PROVIDER, retry_after_s=retry_after)
    if code in ("global/object-does-not-exist", "global/not-found"):
        return NotFoundError(text, provider=PROVIDER)
    if code == "global/internal-error" or code.startswith("provider/"):
        exc = TransientError(text, provider=PROVIDER)
        exc.status = status  # type: ignore[attr-defined]
        return exc
    if code == "global/invalid-parameters":
        return InvalidRequestError(text, provider=PROVIDER)
    if code == "global/forbidden":
        return AuthError(f"lambda refused the request ({code}: {message}); {AUTH_HINT}", provider=PROVIDER)
    # a code this adapter does not know: the status decides
    if status == 401:
        return AuthError(f"lambda rejected the API key ({code or status}); {AUTH_HINT}", provider=PROVIDER)
    if status == 404:
        return NotFoundError(text, provider=PROVIDER)
    if status == 429:
        return RateLimitedError(text, provider=PROVIDER, retry_after_s=retry_after)
    if status >= 500:
        exc = TransientError(text, provider=PROVIDER)
        exc.status = status  # type: ignore[attr-defined]
        return exc
    if status == 400:
        return InvalidRequestError(text, provider=PROVIDER)
    if status == 403:
        return AuthError(f"lambda refused the request ({code}: {message}); {AUTH_HINT}", provider=PROVIDER)
    return None


# ---------------------------------------------------------------- bootstrap (cloud-init user data)


def _heredoc(tag: str, text: str) -> str:
    if any(line == tag for line in text.splitlines()):
        raise LambdaConfigError(f"lambda: the bootstrap payload contains the line {tag!r}")
    return f"<<'{tag}'\n{text}\n{tag}"


def _env_file(env: dict[str, str]) -> str:
    """Docker's --env-file format: KEY=VALUE per line, taken literally (no quoting, no newlines)."""
    lines = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LambdaConfigError(f"lambda: environment variable name {key!r} is not valid")
        if "\n" in value or "\r" in value:
            raise LambdaConfigError(
                f"lambda: environment variable {key} contains a newline; pass it base64-encoded"
            )
        lines.append(f"{key}={value}")
    return "\n".join(lines)


def bootstrap_script(
    req: LaunchRequest,
    *,
    api_url: str,
    terminate_key: str,
    env: dict[str, str],
    max_lifetime_s: float,
) -> str:
    """The cloud-init shell script that runs one attempt on a fresh Lambda VM.

    Steps: make sure docker + the NVIDIA container toolkit exist (installing them if the image
    lacks them), arm a hard lifetime cap, run the trainer container with the job's environment,
    then terminate this VM through the API whatever the trainer's exit. `CLOUDTUNE_BOOT_DIR`
    relocates the state directory (tests run the script unprivileged).
    """
    cmd = " ".join(shlex.quote(c) for c in req.command)
    image = shlex.quote(req.image)
    workdir = f"-w {shlex.quote(req.workdir)} " if req.workdir else ""
    cap = max(60, int(max_lifetime_s))
    terminate_sh = """#!/bin/bash
# Terminate this VM through Lambda's API (Lambda has no metadata service: find our id by name).
KEY=$(cat "$CT_DIR/lambda_key")
for try in 1 2 3 4 5 6; do
  ID=$(curl -fsS -H "Authorization: Bearer $KEY" "$CT_API/instances" | python3 -c '
import json, sys
name = sys.argv[1]
for inst in json.load(sys.stdin).get("data", []):
    if inst.get("name") == name and inst.get("status") not in ("terminated", "terminating"):
        print(inst["id"]); break
' "$CT_NAME")
  if [ -z "$ID" ]; then echo "cloudtune: no live instance named $CT_NAME (already terminating)"; exit 0; fi
  if curl -fsS -X POST -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
       -d "{\\"instance_ids\\":[\\"$ID\\"]}" "$CT_API/instance-operations/terminate" >/dev/null; then
    echo "cloudtune: terminate requested for $ID ($1)"; exit 0
  fi
  sleep $((try * 5))
done
echo "cloudtune: could not terminate $CT_NAME; the controller's watchdog will" >&2
exit 1"""
    return f"""#!/bin/bash
# cloudtune bootstrap: job {req.job_id} attempt {req.attempt} on Lambda (generated; docs/providers/lambda.md)
set -u
export CT_DIR="${{CLOUDTUNE_BOOT_DIR:-{BOOT_DIR}}}"
export CT_NAME={shlex.quote(req.name)}
export CT_API={shlex.quote(api_url.rstrip('/'))}
umask 077
mkdir -p "$CT_DIR"
exec >>"$CT_DIR/bootstrap.log" 2>&1
cat >"$CT_DIR/env" {_heredoc("CLOUDTUNE_ENV_EOF", _env_file(env))}
cat >"$CT_DIR/lambda_key" {_heredoc("CLOUDTUNE_KEY_EOF", terminate_key)}
cat >"$CT_DIR/terminate.sh" {_heredoc("CLOUDTUNE_TERMINATE_EOF", terminate_sh)}
chmod 700 "$CT_DIR/terminate.sh"
# hard lifetime cap, enforced on the VM itself
( sleep {cap}; "$CT_DIR/terminate.sh" "lifetime cap {cap}s" ) &
if ! command -v docker >/dev/null 2>&1; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
fi
if ! docker info 2>/dev/null | grep -qi nvidia; then
  if ! command -v nvidia-ctk >/dev/null 2>&1; then
    curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --dearmor -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
    curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \\
      | sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g' \\
      > /etc/apt/sources.list.d/nvidia-container-toolkit.list
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-container-toolkit
  fi
  nvidia-ctk runtime configure --runtime=docker && systemctl restart docker
fi
for try in 1 2 3; do docker pull {image} && break; sleep $((try * 10)); done
echo "cloudtune: starting the trainer"
docker run --rm --gpus all --ipc=host --env-file "$CT_DIR/env" --name cloudtune-trainer {workdir}{image} {cmd}
rc=$?
echo "cloudtune: trainer exited with $rc"
"$CT_DIR/terminate.sh" "trainer exit $rc"
"""


# ---------------------------------------------------------------- the adapter


class LambdaProvider:
    """Lambda Cloud through its REST API (https://cloud.lambda.ai/api/v1)."""

    name = PROVIDER

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        base_url: str | None = None,
        ssh_key_name: str | None = None,
        terminate_key: str | None = None,
        launch_interval_s: float = LAUNCH_INTERVAL_S,
        precheck_capacity: bool = True,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # base_url: the name providers.yaml uses for every REST adapter
        self.api_url = (api_url or base_url or os.environ.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/")
        self._api_key = read_api_key(api_key)
        self._terminate_key = terminate_key or os.environ.get(ENV_TERMINATE_KEY) or None
        self.ssh_key_name = ssh_key_name or os.environ.get(ENV_SSH_KEY) or None
        self.launch_interval_s = launch_interval_s
        self.precheck_capacity = precheck_capacity
        self._sleep = sleep
        self.http = HttpClient(
            PROVIDER,
            self.api_url,
            self._api_key,
            auth_hint=AUTH_HINT,
            timeout_s=timeout_s,
            retry=retry,
            classify=_classify,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return f"LambdaProvider(api_url={self.api_url!r}, api_key={REDACTED})"

    # ------------------------------------------------------------ offers

    def instance_types(self) -> dict[str, Any]:
        data = self.http.get_json("/instance-types")
        return (data or {}).get("data") or {}

    def offers(self) -> list[Offer]:
        """Live offers: one per (instance type, region with capacity now), at Lambda's list price.

        VRAM is what a process can use (catalog.usable_gib), like the bundled catalog rows, so the
        planner compares live and bundled offers on the same footing.
        """
        from cloudtune.catalog import usable_gib

        today = _dt.date.today().isoformat()
        offers: list[Offer] = []
        for type_name, entry in sorted(self.instance_types().items()):
            itype = entry.get("instance_type") or {}
            name = itype.get("name") or type_name
            if not name.startswith("gpu_"):
                continue  # CPU-only types cannot train
            desc = itype.get("gpu_description") or ""
            gpu = normalise_gpu(name, desc)
            specs = itype.get("specs") or {}
            cents = itype.get("price_cents_per_hour")
            for region in entry.get("regions_with_capacity_available") or []:
                offers.append(
                    Offer(
                        provider=PROVIDER,
                        offer_id=name,
                        gpu=gpu,
                        gpu_count=gpu_count_of(itype),
                        vram_gib_per_gpu=usable_gib(gpu, vram_of(desc, gpu)),
                        region=region.get("name", ""),
                        price_hr=None if cents is None else round(cents / 100.0, 4),
                        spot_price_hr=None,
                        as_of=today,
                        billing_granularity_s=BILLING_GRANULARITY_S,
                        vcpus=specs.get("vcpus"),
                        ram_gb=specs.get("memory_gib"),
                        fresh=True,
                    )
                )
        return offers

    # ------------------------------------------------------------ launch

    def _require_ssh_key(self) -> str:
        if not self.ssh_key_name:
            raise AuthError(
                f"lambda needs the name of an SSH key registered in your Lambda account; set {ENV_SSH_KEY} "
                "(cloud.lambda.ai -> SSH keys) or pass ssh_key_name",
                provider=PROVIDER,
            )
        return self.ssh_key_name

    def _launch_body(self, req: LaunchRequest, *, redacted: bool) -> dict[str, Any]:
        if req.spot:
            raise LambdaConfigError("lambda sells no spot instances; launch it on-demand", provider=PROVIDER)
        if len(req.name) > MAX_NAME_LEN:
            raise LambdaConfigError(f"lambda: instance name {req.name!r} is over {MAX_NAME_LEN} characters")
        store = req.env.get("CLOUDTUNE_STORE", "")
        if store and not store.startswith("s3://"):
            raise LambdaConfigError(
                f"lambda: the store {store} is not reachable from a Lambda VM; set store.url in the job spec "
                "to an s3:// URL (with store.endpoint_url for an S3-compatible service)",
                provider=PROVIDER,
            )
        env = req.redacted_env() if redacted else req.all_env()
        key = REDACTED if redacted else (self._terminate_key or self._api_key or "")
        if not redacted and not key:
            self.http._require_key()
        user_data = bootstrap_script(
            req,
            api_url=self.api_url,
            terminate_key=key,
            env=env,
            max_lifetime_s=req.max_lifetime_s or DEFAULT_MAX_LIFETIME_S,
        )
        if len(user_data.encode()) > MAX_USER_DATA_BYTES:
            raise LambdaConfigError(
                f"lambda: user_data is {len(user_data.encode())} bytes, over Lambda's 1 MB limit; "
                "pass the spec by store URL (CLOUDTUNE_SPEC_URL) instead of inline"
            )
        ssh_key = self.ssh_key_name or (f"<set {ENV_SSH_KEY}>" if redacted else self._require_ssh_key())
        return {
            "region_name": req.offer.region,
            "instance_type_name": req.offer.offer_id,
            "ssh_key_names": [ssh_key],
            "name": req.name,
            "tags": lambda_tags(req.job_id, req.attempt),
            "user_data": user_data,
        }

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        calls: list[dict] = []
        if self.precheck_capacity:
            calls.append({"method": "GET", "url": f"{self.api_url}/instance-types", "why": "capacity check"})
        calls.append(
            {
                "method": "POST",
                "url": f"{self.api_url}/instance-operations/launch",
                "body": self._launch_body(req, redacted=True),
                "note": (
                    f"Lambda allows one launch per {LAUNCH_INTERVAL_S:.0f} s; billed per minute at "
                    f"${req.offer.price_hr}/h until terminate. The VM carries an account API key to "
                    "terminate itself (Lambda has no scoped keys)."
                ),
            }
        )
        return calls

    def _check_capacity(self, req: LaunchRequest) -> None:
        entry = self.instance_types().get(req.offer.offer_id)
        if entry is None:
            raise CapacityError(
                f"lambda: instance type {req.offer.offer_id!r} is not offered now", provider=PROVIDER
            )
        regions = [r.get("name") for r in entry.get("regions_with_capacity_available") or []]
        if req.offer.region not in regions:
            where = ", ".join(regions) if regions else "no region"
            raise CapacityError(
                f"lambda: no capacity for {req.offer.offer_id} in {req.offer.region} (capacity now in: {where})",
                provider=PROVIDER,
            )

    def _missing_launch_resource(self, req: LaunchRequest, err: ProviderError) -> ProviderError:
        """Launch's 404 `global/object-does-not-exist`: a resource the request names is missing.

        The code does not say which (and `message` must not be parsed), so ask: if the SSH key is
        not in GET /ssh-keys, the setting is wrong and no other offer helps; else the instance type
        or region is gone, which another offer can avoid."""
        try:
            keys = {k.get("name") for k in (self.http.get_json("/ssh-keys") or {}).get("data") or []}
        except ProviderError:
            keys = None
        if keys is not None and self.ssh_key_name not in keys:
            return LambdaConfigError(
                f"lambda: the SSH key {self.ssh_key_name!r} ({ENV_SSH_KEY}) does not exist in this Lambda account; "
                "set it to the name of a key under cloud.lambda.ai -> SSH keys", provider=PROVIDER)
        return CapacityError(f"{err} [{req.offer.offer_id} in {req.offer.region}]", provider=PROVIDER)

    def _wait_launch_slot(self) -> None:
        global _last_launch_at
        with _launch_lock:
            wait = _last_launch_at + self.launch_interval_s - time.monotonic()
            if wait > 0:
                self._sleep(wait)
            _last_launch_at = time.monotonic()

    @staticmethod
    def _mark_launched() -> None:
        """Count the interval from the answer too: the server stamps the launch after we sent it."""
        global _last_launch_at
        with _launch_lock:
            _last_launch_at = max(_last_launch_at, time.monotonic())

    def launch(self, req: LaunchRequest) -> Machine:
        body = self._launch_body(req, redacted=False)
        if self.precheck_capacity:
            self._check_capacity(req)
        self._wait_launch_slot()
        try:
            data = self.http.post_json("/instance-operations/launch", body, idempotent=False)
        except CapacityError as err:
            raise CapacityError(f"{err} [region {req.offer.region}]", provider=PROVIDER) from None
        except NotFoundError as err:
            raise self._missing_launch_resource(req, err) from None
        finally:
            self._mark_launched()
        ids = ((data or {}).get("data") or {}).get("instance_ids") or []
        if not ids:
            raise TransientError(
                f"lambda: launch of {req.name} returned no instance id; look it up by name", provider=PROVIDER
            )
        return Machine(
            provider=PROVIDER,
            machine_id=ids[0],
            name=req.name,
            state=MachineState.PENDING,
            job_id=req.job_id,
            attempt=req.attempt,
            region=req.offer.region,
            price_hr=req.offer.price_hr,
            spot=False,
            detail="booting",
        )

    # ------------------------------------------------------------ status, list, terminate

    @staticmethod
    def _machine(inst: dict[str, Any]) -> Machine:
        status = str(inst.get("status", ""))
        name = inst.get("name") or ""
        tags = {t.get("key"): t.get("value") for t in inst.get("tags") or [] if isinstance(t, dict)}
        job_id, attempt = tags.get("cloudtune:job"), tags.get("cloudtune:attempt")
        parsed = parse_machine_name(name)
        if job_id is None and parsed:
            job_id, attempt = parsed[0], str(parsed[1])
        itype = inst.get("instance_type") or {}
        cents = itype.get("price_cents_per_hour")
        detail = status + (" (degraded: Lambda reports the instance unhealthy)" if status == "unhealthy" else "")
        return Machine(
            provider=PROVIDER,
            machine_id=str(inst.get("id", "")),
            name=name,
            state=_STATUS.get(status, MachineState.UNKNOWN),
            job_id=job_id,
            attempt=int(attempt) if attempt and str(attempt).isdigit() else None,
            region=(inst.get("region") or {}).get("name"),
            price_hr=None if cents is None else cents / 100.0,
            spot=False,
            detail=detail,
        )

    def status(self, machine_id: str) -> Machine:
        data = self.http.get_json(f"/instances/{machine_id}")
        return self._machine((data or {}).get("data") or {})

    def terminate(self, machine_id: str) -> None:
        try:
            self.http.post_json("/instance-operations/terminate", {"instance_ids": [machine_id]}, idempotent=True)
        except NotFoundError:
            return

    def _instances(self) -> list[dict[str, Any]]:
        data = self.http.get_json("/instances")
        return list((data or {}).get("data") or [])

    def list_machines(self) -> list[Machine]:
        out = []
        for inst in self._instances():
            tags = {t.get("key") for t in inst.get("tags") or [] if isinstance(t, dict)}
            if (inst.get("name") or "").startswith("cloudtune-") or "cloudtune:job" in tags:
                out.append(self._machine(inst))
        return out

    def find_by_name(self, name: str) -> Machine | None:
        found = [self._machine(i) for i in self._instances() if i.get("name") == name]
        live = [m for m in found if not m.state.is_gone]
        return (live or found or [None])[0]

    def self_terminate(self) -> SelfTerminate:
        return SelfTerminate(
            command=["/etc/cloudtune/terminate.sh", "trainer exit"],
            env=(),
            note=(
                "the user_data bootstrap finds the instance by name through GET /instances and calls "
                "POST /instance-operations/terminate with an account key stored root-only on the VM "
                f"(Lambda has no scoped keys; set {ENV_TERMINATE_KEY} to a separate key you can revoke)"
            ),
        )
