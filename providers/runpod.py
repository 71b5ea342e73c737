"""RunPod adapter: REST v2 (`https://api.runpod.io/v2`), checked against runpod/openapi-v2.json.

Why this shape (../shared/apis/runpod: openapi-v2.json 2.0.0, migrate-from-v1.mdx):
- v1 retired on 2026-11-15; v2 is the only surface used. v2 has no interruptible (spot) pods and
  no bid price (the v1/GraphQL `podRentInterruptable` path is gone), so every RunPod offer is
  on-demand, secure or community cloud, and a spot request is refused as a bad request.
- The catalog (`GET /v2/catalog/gpus?include=AVAILABILITY&product=POD`) is read once per
  (cloud, GPU count): stock depends on the count, `maxCount` is an object per cloud, `price` is
  per GPU, and `minCudaVersion` scopes stock to hosts the trainer image can use.
- Pod create (`POST /v2/pods`) errors follow createPod's documented table: 400 = rule broken *or*
  no capacity (free-text detail only) and 403 = pool not open to this account -> try the next
  offer; 402 = no balance -> QuotaError; 422 = our body breaks the contract -> fail.
- RunPod has no labels, only a non-unique `name`: every pod is created with the deterministic
  `machine_name(job, attempt)`, and `find_by_name` filters the pod list by it.
- A create can fail with a 5xx *after* the pod exists: `launch` looks the name up before raising.
- Stop keeps billing the volume, so we only ever delete; DELETE answers 204 or 404 (both: done).
- A pod that reads TERMINATED but still lists as running (dstack saw one keep billing) is
  reported as TERMINATING with a loud warning, so the orchestrator keeps terminating it.
- Rate limits (60/min, 3000/h, 50000/day per user) come back in RateLimit/RateLimit-Policy
  headers; the shared client waits when a window is spent (providers/ratelimit.py).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudtune.providers.base import (
    NAME_PREFIX,
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
from cloudtune.providers.http import REDACTED, HttpClient, RetryPolicy

log = logging.getLogger("cloudtune.providers.runpod")

PROVIDER = "runpod"
DEFAULT_API_URL = "https://api.runpod.io/v2"
ENV_KEY = "RUNPOD_API_KEY"
ENV_API_URL = "CLOUDTUNE_RUNPOD_API_URL"
CONFIG_FILE = Path("~/.runpod/config.toml")
AUTH_HINT = f"set {ENV_KEY} or run `runpod config` (writes {CONFIG_FILE})"
ENV_SELF_TERMINATE = "CLOUDTUNE_SELF_TERMINATE"
ENV_MAX_LIFETIME = "CLOUDTUNE_MAX_LIFETIME_S"

GPU_COUNTS = (1, 2, 4, 8)
CLOUDS = ("SECURE", "COMMUNITY")
# The trainer image (images/trainer/Dockerfile, BASE pytorch/pytorch:2.5.1-cuda12.4-...) needs a host
# driver for CUDA >= 12.4: sent as gpu.minCudaVersion on create and used to scope catalog stock.
MIN_CUDA_VERSION = "12.4"

# RunPod GPU type id (what create takes) -> cloudtune's normalised name (cloudtune/data/gpus.csv).
GPU_IDS: dict[str, str] = {
    "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 PCIe": "H100-80GB",
    "NVIDIA H100 NVL": "H100-NVL",
    "NVIDIA H200": "H200",
    "NVIDIA B200": "B200",
    "NVIDIA B300": "B300",
    "NVIDIA A100 80GB PCIe": "A100-80GB",
    "NVIDIA A100-SXM4-80GB": "A100-80GB",
    "NVIDIA L40S": "L40S",
    "NVIDIA L40": "L40",
    "NVIDIA L4": "L4",
    "NVIDIA RTX A6000": "A6000",
    "NVIDIA RTX A5000": "A5000",
    "NVIDIA RTX 6000 Ada Generation": "RTX6000-Ada",
    "NVIDIA RTX 5880 Ada Generation": "RTX5880-Ada",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": "RTXPRO6000",
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": "RTXPRO6000",
    "NVIDIA GeForce RTX 4090": "RTX4090",
    "NVIDIA GeForce RTX 3090": "RTX3090",
    "NVIDIA GeForce RTX 5090": "RTX5090",
    "AMD Instinct MI300X OAM": "MI300X",
}
# Where two RunPod GPU types share a normalised name, the offer id needs its own slug so the offer
# launches the GPU type it was priced for (A100 SXM vs PCIe; skypilot's catalog spells them the same
# way: `A100-80GB` is the PCIe card, `A100-80GB-SXM` the SXM4 one).
OFFER_SLUGS: dict[str, str] = {
    "NVIDIA A100-SXM4-80GB": "A100-80GB-SXM",
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": "RTXPRO6000-WS",
}
# Slugs of the bundled catalog that name a GPU type differently.
SLUG_ALIASES: dict[str, str] = {"H200-SXM": "NVIDIA H200"}


def offer_slug(runpod_id: str) -> str:
    """The GPU part of an offer id: unique per RunPod GPU type."""
    return OFFER_SLUGS.get(runpod_id) or normalise_gpu(runpod_id)


_BY_SLUG: dict[str, str] = {**SLUG_ALIASES}
_DC_ID = re.compile(r"^[A-Z]{2}-[A-Z0-9]+-\d+$")


def normalise_gpu(runpod_id: str) -> str:
    """cloudtune's GPU name for a RunPod GPU type id ("NVIDIA GeForce RTX 4090" -> "RTX4090")."""
    if runpod_id in GPU_IDS:
        return GPU_IDS[runpod_id]
    name = re.sub(r"^(NVIDIA|AMD)\s+", "", runpod_id)
    name = re.sub(r"^(GeForce|Instinct)\s+", "", name)
    return name.replace(" ", "")


def _slug_table() -> dict[str, str]:
    if len(_BY_SLUG) == len(SLUG_ALIASES):
        for rid in GPU_IDS:
            _BY_SLUG.setdefault(offer_slug(rid), rid)
    return _BY_SLUG


def load_api_key(explicit: str | None = None) -> str | None:
    """RUNPOD_API_KEY, else the `api_key` of ~/.runpod/config.toml (as the runpod SDK writes it)."""
    if explicit:
        return explicit
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY]
    path = CONFIG_FILE.expanduser()
    if not path.is_file():
        return None
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        raise AuthError(f"cannot read {path}: not valid TOML; fix it or set {ENV_KEY}", provider=PROVIDER) from None
    for section in (data.get("default"), data):
        if isinstance(section, dict) and isinstance(section.get("api_key"), str) and section["api_key"]:
            return section["api_key"]
    return None


def _problem_text(body: Any) -> str:
    """The human text of a v2 problem+json body (RFC 9457: title, detail, errors[])."""
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("title", "detail") if body.get(k)]
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            parts.append("; ".join(str(e) for e in errors))
        return ": ".join(parts)
    return "" if body is None else str(body)


def _is_create(resp: Any) -> bool:
    req = getattr(resp, "request", None)
    return req is not None and req.method == "POST" and str(req.url.path).rstrip("/").endswith("/pods")


def _classify(resp: Any, body: Any) -> ProviderError | None:
    """createPod's documented table (openapi-v2.json): which failures another offer could avoid."""
    status = resp.status_code
    text = _problem_text(body) or resp.text[:300]
    if status == 402:
        return QuotaError(f"runpod: insufficient balance (HTTP 402: {text}); add credit to the RunPod account",
                          provider=PROVIDER)
    if _is_create(resp) and status == 400:
        # "400 covers both 'your request breaks a rule' and 'no capacity'": try the next candidate.
        return CapacityError(f"runpod: pod create rejected (HTTP 400, no capacity or a placement rule): {text}",
                             provider=PROVIDER)
    if _is_create(resp) and status == 403:
        return CapacityError(f"runpod: this account cannot use the requested pool (HTTP 403: {text}); "
                             "skipping this offer", provider=PROVIDER)
    if status == 422:
        return InvalidRequestError(f"runpod: the request does not match RunPod's API contract (HTTP 422): {text}",
                                   provider=PROVIDER)
    return None


_STATUS = {
    "PROVISIONING": MachineState.PENDING,
    "STARTING": MachineState.PENDING,
    "RUNNING": MachineState.RUNNING,
    "EXITED": MachineState.PREEMPTED,
    "ERROR": MachineState.FAILED,
    "TERMINATED": MachineState.TERMINATED,
}


def max_count(gpu: dict[str, Any], cloud: str) -> int:
    """`maxCount` of a catalog row for one cloud: an object per cloud in v2 (0 when absent or unreadable)."""
    value = gpu.get("maxCount")
    if isinstance(value, dict):
        value = value.get(cloud.lower())
    try:
        return int(value) if value is not None and not isinstance(value, bool) else 0
    except (TypeError, ValueError):
        return 0


class RunPodProvider:
    """RunPod pods as cloudtune machines (on-demand only: v2 has no interruptible pods)."""

    name = PROVIDER

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        base_url: str | None = None,  # alias of api_url (providers.yaml spelling)
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        gpu_counts: tuple[int, ...] = GPU_COUNTS,
        min_cuda_version: str = MIN_CUDA_VERSION,
    ) -> None:
        self._api_key = load_api_key(api_key)
        self.api_url = (api_url or base_url or os.environ.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/")
        self.gpu_counts = gpu_counts
        self.min_cuda_version = min_cuda_version
        self.http = HttpClient(
            PROVIDER, self.api_url, self._api_key, auth_hint=AUTH_HINT, timeout_s=timeout_s,
            retry=retry, classify=_classify,
        )

    def __repr__(self) -> str:
        return f"RunPodProvider(api_url={self.api_url!r}, api_key={REDACTED if self._api_key else None})"

    # ------------------------------------------------------------ offers

    def offers(self) -> list[Offer]:
        """Live GPU types per cloud and GPU count, with stock for that count on CUDA >= the image's."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        out: list[Offer] = []
        for cloud in CLOUDS:
            ceiling = max(self.gpu_counts)
            for count in sorted(self.gpu_counts):
                if count > ceiling:
                    break
                body = self.http.get_json("/catalog/gpus", params={
                    "include": "AVAILABILITY", "product": "POD", "cloud": cloud, "count": count,
                    "minCudaVersion": self.min_cuda_version,
                })
                rows = [g for g in (body or {}).get("gpus", []) if isinstance(g, dict) and g.get("id")]
                if count == min(self.gpu_counts):
                    ceiling = max([max_count(g, cloud) for g in rows] or [0])
                for g in rows:
                    offer = self._row_offer(g, cloud, count, now)
                    if offer is not None:
                        out.append(offer)
        return out

    def _row_offer(self, g: dict[str, Any], cloud: str, count: int, now: str) -> Offer | None:
        """One catalog row as an offer of `count` GPUs, or None (not on this cloud, too many, no stock)."""
        if g.get(cloud.lower()) is False or count > max_count(g, cloud):
            return None
        if (g.get("availability") or "NONE") == "NONE":
            return None
        try:
            price = float((g.get("price") or {}).get(cloud.lower()) or 0)
        except (TypeError, ValueError):
            log.warning("runpod: catalog row %s has an unreadable price; skipped", g.get("id"))
            return None
        if price <= 0:
            return None
        return self._offer(str(g["id"]), count, cloud, price, g.get("memory"), now)

    def _offer(self, gpu_id: str, count: int, cloud: str, price: float, vram_gb: Any, now: str) -> Offer:
        from cloudtune.catalog import gpu_spec, usable_gib

        gpu = normalise_gpu(gpu_id)
        spec = gpu_spec(gpu)
        try:
            nominal = spec.vram_gb if spec else float(vram_gb or 0.0)
        except (TypeError, ValueError):
            nominal = 0.0
        return Offer(
            provider=PROVIDER,
            offer_id=f"{count}x_{offer_slug(gpu_id)}_{cloud}",
            gpu=gpu,
            gpu_count=count,
            vram_gib_per_gpu=usable_gib(gpu, float(nominal)),
            region="global",
            price_hr=round(price * count, 4),  # `price` is per GPU (GpuType.price)
            spot_price_hr=None,  # v2 has no interruptible pods
            as_of=now,
            billing_granularity_s=1,
            fresh=True,
        )

    # ------------------------------------------------------------ launch

    @staticmethod
    def parse_offer_id(offer: Offer) -> tuple[str, int, str]:
        """(RunPod GPU type id, count, cloud) from an offer id like `2x_A100-80GB-SXM_SECURE`."""
        m = re.fullmatch(r"(\d+)x_(.+)_(SECURE|COMMUNITY)", offer.offer_id)
        slug, count, cloud = offer.gpu, offer.gpu_count, "SECURE"
        if m:
            count, slug, cloud = int(m.group(1)), m.group(2), m.group(3)
        table = _slug_table()
        gpu_id = table.get(slug) or (slug if slug in GPU_IDS else None) or table.get(offer.gpu)
        if gpu_id is None:
            raise InvalidRequestError(
                f"runpod: offer {offer.offer_id!r} names GPU {slug!r}, which cloudtune cannot map to a RunPod GPU type; "
                "run `cloudtune catalog refresh --provider runpod`",
                provider=PROVIDER,
            )
        return gpu_id, count, cloud

    def _launch_env(self, req: LaunchRequest, *, redacted: bool) -> dict[str, str]:
        env = {k: str(v) for k, v in (req.redacted_env() if redacted else req.all_env()).items()}
        env[ENV_SELF_TERMINATE] = self.self_terminate().command[-1]
        if req.max_lifetime_s:
            env[ENV_MAX_LIFETIME] = str(int(req.max_lifetime_s))
        return env

    def _create_body(self, req: LaunchRequest, *, redacted: bool = False) -> dict[str, Any]:
        """A CreatePodRequest (unevaluatedProperties: false: only fields the schema has)."""
        gpu_id, count, cloud = self.parse_offer_id(req.offer)
        body: dict[str, Any] = {
            "name": req.name,
            "image": req.image,
            "gpu": {"id": gpu_id, "count": count, "minCudaVersion": self.min_cuda_version},
            "cloud": cloud,
            "disk": int(req.disk_gb),
            "env": self._launch_env(req, redacted=redacted),
        }
        if req.command:
            body["args"] = shlex.join(req.command)
        if _DC_ID.match(req.offer.region or ""):
            body["dataCenterIds"] = [req.offer.region]
        return body

    def _refuse_spot(self, req: LaunchRequest) -> None:
        if req.spot:
            raise InvalidRequestError(
                "runpod: RunPod's v2 API has no interruptible (spot) pods; every RunPod offer is on-demand. "
                "Set resources.spot: false or choose another provider",
                provider=PROVIDER,
            )

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        self._refuse_spot(req)
        headers = {"Authorization": f"Bearer {REDACTED}", "Content-Type": "application/json"}
        return [{"method": "POST", "url": self.http.url("/pods"), "headers": headers,
                 "json": self._create_body(req, redacted=True)}]

    def launch(self, req: LaunchRequest) -> Machine:
        self._refuse_spot(req)
        try:
            pod = self.http.post_json("/pods", self._create_body(req), idempotent=False)
        except TransientError as err:
            # The pod may exist although the answer was lost: adopt it rather than leak it.
            found = self._find_quietly(req.name)
            if found is not None:
                log.warning("runpod: create of %s failed (%s) but the pod exists: adopting %s",
                            req.name, err, found.machine_id)
                return found
            raise
        return self._machine(pod, spot=False)

    def _find_quietly(self, name: str) -> Machine | None:
        try:
            return self.find_by_name(name)
        except ProviderError as err:
            log.warning("runpod: lookup of %s after a failed create also failed: %s", name, err)
            return None

    # ------------------------------------------------------------ status / list

    def _machine(self, pod: dict[str, Any], *, spot: bool | None = None) -> Machine:
        raw = str(pod.get("status") or pod.get("desiredStatus") or "").upper()
        state = _STATUS.get(raw, MachineState.UNKNOWN)
        detail = raw
        if raw == "EXITED":
            detail = ("EXITED: not requested by cloudtune (interruption, $0 balance or host problem); "
                      "the pod still bills its disk until deleted")
        parsed = parse_machine_name(str(pod.get("name") or ""))
        return Machine(
            provider=PROVIDER,
            machine_id=str(pod.get("id")),
            name=str(pod.get("name") or ""),
            state=state,
            job_id=parsed[0] if parsed else None,
            attempt=parsed[1] if parsed else None,
            region=pod.get("dataCenterId"),
            price_hr=pod.get("cost") if pod.get("cost") is not None else pod.get("costPerHr"),
            spot=spot,
            detail=detail,
        )

    def _list_pods(self) -> list[dict[str, Any]]:
        body = self.http.get_json("/pods")
        if isinstance(body, list):  # v1 shape, tolerated
            return body
        return list((body or {}).get("pods") or [])

    def status(self, machine_id: str) -> Machine:
        pod = self.http.get_json(f"/pods/{machine_id}")
        machine = self._machine(pod or {})
        if machine.state is MachineState.TERMINATED:
            listed = next((p for p in self._list_pods() if str(p.get("id")) == machine_id), None)
            if listed is not None and str(listed.get("status", "")).upper() not in ("TERMINATED", ""):
                log.warning(
                    "runpod: pod %s reads TERMINATED but still lists as %s (cost %s/h): it may still bill; "
                    "keep terminating it and check the RunPod console",
                    machine_id, listed.get("status"), listed.get("cost"),
                )
                machine.state = MachineState.TERMINATING
                machine.detail = (f"INCONSISTENT: pod reads TERMINATED but lists as {listed.get('status')} "
                                  f"(cost {listed.get('cost')}/h)")
        return machine

    def list_machines(self) -> list[Machine]:
        return [
            self._machine(p) for p in self._list_pods()
            if str(p.get("name") or "").startswith(NAME_PREFIX) and str(p.get("status", "")).upper() != "TERMINATED"
        ]

    def find_by_name(self, name: str) -> Machine | None:
        matches = [m for m in self.list_machines() if m.name == name]
        if len(matches) > 1:
            log.warning("runpod: %d pods are named %s (%s); adopting the first, gc removes the rest",
                        len(matches), name, ", ".join(m.machine_id for m in matches))
        return matches[0] if matches else None

    # ------------------------------------------------------------ terminate

    def terminate(self, machine_id: str) -> None:
        try:
            self.http.request("DELETE", f"/pods/{machine_id}")
        except NotFoundError:
            return
        try:
            after = self.status(machine_id)
        except NotFoundError:
            return
        if after.state.is_alive or after.state is MachineState.UNKNOWN:
            log.warning("runpod: pod %s still reads %s right after DELETE; the caller will verify and retry",
                        machine_id, after.detail or after.state.value)

    def self_terminate(self) -> SelfTerminate:
        url = f"{self.api_url}/pods/$RUNPOD_POD_ID"
        # --retry covers timeouts, 408, 429 and 5xx; a 404 (the controller deleted it first) ends at once
        cmd = (f'curl -fsS --retry 5 --retry-connrefused --max-time 30 -X DELETE "{url}" '
               '-H "Authorization: Bearer $RUNPOD_API_KEY"')
        return SelfTerminate(
            command=["sh", "-c", cmd],
            env=("RUNPOD_POD_ID", "RUNPOD_API_KEY"),
            note="RunPod injects RUNPOD_POD_ID and a pod-scoped RUNPOD_API_KEY; RunPod restarts a container "
                 "whose command exits, so the entrypoint must delete the pod itself",
        )
