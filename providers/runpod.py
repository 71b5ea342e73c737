"""RunPod adapter: REST v2 (`https://api.runpod.io/v2`), GraphQL where v2 has no equivalent.

Why this shape (../shared/providers.md section 1):
- REST v1 retires on 2026-11-15 and v2 is the supported surface; v2 has the GPU catalog with
  secure/community prices and stock, pod create/list/get/delete. GraphQL still answers and is
  used only as a fallback for the price list (when the v2 catalog is unavailable) and for the
  legacy interruptible pods, which RunPod is removing: that path is off unless
  `interruptible=True` (or CLOUDTUNE_RUNPOD_INTERRUPTIBLE=1).
- RunPod has no labels, only a non-unique `name`: every pod is created with the deterministic
  `machine_name(job, attempt)`, and `find_by_name` filters the pod list by it.
- A create can fail with a 5xx *after* the pod exists: `launch` looks the name up before raising.
- Stop keeps billing the volume, so we only ever delete; DELETE answers 204 or 404 (both: done).
- A pod that reads TERMINATED but still lists as running (dstack saw one keep billing) is
  reported as TERMINATING with a loud warning, so the orchestrator keeps terminating it.
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
DEFAULT_GRAPHQL_URL = "https://api.runpod.io/graphql"
ENV_KEY = "RUNPOD_API_KEY"
ENV_API_URL = "CLOUDTUNE_RUNPOD_API_URL"
ENV_GRAPHQL_URL = "CLOUDTUNE_RUNPOD_GRAPHQL_URL"
ENV_INTERRUPTIBLE = "CLOUDTUNE_RUNPOD_INTERRUPTIBLE"
CONFIG_FILE = Path("~/.runpod/config.toml")
AUTH_HINT = f"set {ENV_KEY} or run `runpod config` (writes {CONFIG_FILE})"
ENV_SELF_TERMINATE = "CLOUDTUNE_SELF_TERMINATE"
ENV_MAX_LIFETIME = "CLOUDTUNE_MAX_LIFETIME_S"

GPU_COUNTS = (1, 2, 4, 8)
CLOUDS = ("SECURE", "COMMUNITY")

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
# The preferred RunPod id for each normalised name (first one listed wins: SXM before PCIe).
GPU_BY_NAME: dict[str, str] = {}
for _rid, _name in GPU_IDS.items():
    GPU_BY_NAME.setdefault(_name, _rid)

_CAPACITY = re.compile(
    r"no longer any instances available|not enough free gpus|no (gpu|instances?|machines?)s? (are )?available"
    r"|could not find any pods|out of stock|insufficient capacity|no capacity",
    re.I,
)
_FUNDS = re.compile(r"insufficient (funds|balance|credit)|not enough (credit|balance|funds)|balance is too low", re.I)
_GONE = re.compile(r"pod not found|not found to terminate|does not exist", re.I)
_DC_ID = re.compile(r"^[A-Z]{2}-[A-Z0-9]+-\d+$")


def normalise_gpu(runpod_id: str) -> str:
    """cloudtune's GPU name for a RunPod GPU type id ("NVIDIA GeForce RTX 4090" -> "RTX4090")."""
    if runpod_id in GPU_IDS:
        return GPU_IDS[runpod_id]
    name = re.sub(r"^(NVIDIA|AMD)\s+", "", runpod_id)
    name = re.sub(r"^(GeForce|Instinct)\s+", "", name)
    return name.replace(" ", "")


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
    """The human text of a v2 problem+json, a v1 {"message"} or a GraphQL {"errors"} body."""
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("title", "detail", "message", "error") if body.get(k)]
        for err in body.get("errors") or []:
            parts.append(str(err.get("message") if isinstance(err, dict) else err))
        return "; ".join(parts)
    return "" if body is None else str(body)


def _classify(resp: Any, body: Any) -> ProviderError | None:
    """RunPod-specific meanings hidden behind generic statuses (capacity, funds)."""
    text = _problem_text(body) or resp.text[:300]
    if resp.status_code in (400, 402, 403, 409, 422, 500) and _FUNDS.search(text):
        return QuotaError(f"runpod: insufficient funds: {text}", provider=PROVIDER)
    if resp.status_code in (400, 409, 422, 500, 503) and _CAPACITY.search(text):
        return CapacityError(f"runpod: no capacity: {text}", provider=PROVIDER)
    return None


_STATUS = {
    "PROVISIONING": MachineState.PENDING,
    "STARTING": MachineState.PENDING,
    "CREATED": MachineState.PENDING,
    "RUNNING": MachineState.RUNNING,
    "EXITED": MachineState.PREEMPTED,
    "ERROR": MachineState.FAILED,
    "TERMINATED": MachineState.TERMINATED,
}


class RunPodProvider:
    """RunPod pods as cloudtune machines (on-demand; interruptible only behind a flag)."""

    name = PROVIDER

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        base_url: str | None = None,  # alias of api_url (providers.yaml spelling)
        graphql_url: str | None = None,
        interruptible: bool | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        gpu_counts: tuple[int, ...] = GPU_COUNTS,
    ) -> None:
        self._api_key = load_api_key(api_key)
        self.api_url = (api_url or base_url or os.environ.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/")
        self.graphql_url = graphql_url or os.environ.get(ENV_GRAPHQL_URL) or DEFAULT_GRAPHQL_URL
        if interruptible is None:
            interruptible = os.environ.get(ENV_INTERRUPTIBLE, "").lower() in ("1", "true", "yes")
        self.interruptible = interruptible
        self.gpu_counts = gpu_counts
        self.http = HttpClient(
            PROVIDER, self.api_url, self._api_key, auth_hint=AUTH_HINT, timeout_s=timeout_s,
            retry=retry, classify=_classify,
        )

    def __repr__(self) -> str:
        return f"RunPodProvider(api_url={self.api_url!r}, api_key={REDACTED if self._api_key else None})"

    # ------------------------------------------------------------ GraphQL

    def _graphql(self, query: str, variables: dict[str, Any] | None = None, *, idempotent: bool = True) -> Any:
        """POST a GraphQL document. Errors arrive as HTTP 200 with `errors[]`: map them too."""
        body = self.http.post_json(
            self.graphql_url, {"query": query, "variables": variables or {}}, idempotent=idempotent
        )
        errors = (body or {}).get("errors") or []
        if errors:
            text = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)
            if _FUNDS.search(text):
                raise QuotaError(f"runpod: insufficient funds: {text}", provider=PROVIDER)
            if _CAPACITY.search(text):
                raise CapacityError(f"runpod: no capacity: {text}", provider=PROVIDER)
            if _GONE.search(text):
                raise NotFoundError(f"runpod: {text}", provider=PROVIDER)
            if re.search(r"unauthori[sz]ed|api key", text, re.I):
                raise AuthError(f"runpod rejected the API key: {text}; {AUTH_HINT}", provider=PROVIDER)
            raise InvalidRequestError(f"runpod GraphQL error: {text}", provider=PROVIDER)
        return (body or {}).get("data") or {}

    # ------------------------------------------------------------ offers

    def offers(self) -> list[Offer]:
        """Live GPU types with secure/community prices, skipping those with no stock now."""
        try:
            offers = self._offers_v2()
        except NotFoundError:
            log.info("runpod: v2 catalog unavailable, falling back to GraphQL gpuTypes")
            offers = self._offers_graphql()
        if self.interruptible:
            offers = self._with_spot_prices(offers)
        return offers

    def _offer(self, gpu_id: str, count: int, cloud: str, price: float, vram_gb: float | None, now: str,
               spot: float | None = None) -> Offer:
        from cloudtune.catalog import gpu_spec, usable_gib

        gpu = normalise_gpu(gpu_id)
        spec = gpu_spec(gpu)
        nominal = spec.vram_gb if spec else (vram_gb or 0.0)
        return Offer(
            provider=PROVIDER,
            offer_id=f"{count}x_{gpu}_{cloud}",
            gpu=gpu,
            gpu_count=count,
            vram_gib_per_gpu=usable_gib(gpu, float(nominal)),
            region="global",
            price_hr=round(price * count, 4),
            spot_price_hr=round(spot * count, 4) if spot else None,
            as_of=now,
            billing_granularity_s=1,
            fresh=True,
        )

    def _offers_v2(self) -> list[Offer]:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        out: list[Offer] = []
        for cloud in CLOUDS:
            body = self.http.get_json(
                "/catalog/gpus", params={"include": "AVAILABILITY", "product": "POD", "cloud": cloud}
            )
            for g in (body or {}).get("gpus", []):
                price = ((g.get("price") or {}).get(cloud.lower()))
                if not price or (g.get("availability") or "NONE") == "NONE":
                    continue
                max_count = int(g.get("maxGpuCount") or g.get("maxCount") or max(self.gpu_counts))
                for count in self.gpu_counts:
                    if count <= max_count:
                        out.append(self._offer(g["id"], count, cloud, float(price), g.get("memory"), now))
        return out

    _GPU_TYPES = """query GpuTypes($input: GpuLowestPriceInput) {
  gpuTypes { id displayName memoryInGb maxGpuCount securePrice communityPrice secureSpotPrice communitySpotPrice
    lowestPrice(input: $input) { uninterruptablePrice minimumBidPrice stockStatus } }
}"""

    def _offers_graphql(self) -> list[Offer]:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        out: list[Offer] = []
        for cloud in CLOUDS:
            data = self._graphql(self._GPU_TYPES, {"input": {"gpuCount": 1, "secureCloud": cloud == "SECURE"}})
            for g in data.get("gpuTypes") or []:
                price = g.get("securePrice" if cloud == "SECURE" else "communityPrice")
                stock = (g.get("lowestPrice") or {}).get("stockStatus")
                if not price or not stock or stock == "None":
                    continue
                max_count = int(g.get("maxGpuCount") or max(self.gpu_counts))
                for count in self.gpu_counts:
                    if count <= max_count:
                        out.append(self._offer(g["id"], count, cloud, float(price), g.get("memoryInGb"), now))
        return out

    def _with_spot_prices(self, offers: list[Offer]) -> list[Offer]:
        """Legacy interruptible prices (GraphQL only); RunPod is removing spot pods."""
        from dataclasses import replace

        data = self._graphql(self._GPU_TYPES, {"input": {"gpuCount": 1}})
        spot: dict[tuple[str, str], float] = {}
        for g in data.get("gpuTypes") or []:
            for cloud, key in (("SECURE", "secureSpotPrice"), ("COMMUNITY", "communitySpotPrice")):
                if g.get(key):
                    spot[(normalise_gpu(g["id"]), cloud)] = float(g[key])
        result = []
        for o in offers:
            per_gpu = spot.get((o.gpu, o.offer_id.rsplit("_", 1)[-1]))
            result.append(replace(o, spot_price_hr=round(per_gpu * o.gpu_count, 4)) if per_gpu else o)
        return result

    # ------------------------------------------------------------ launch

    @staticmethod
    def parse_offer_id(offer: Offer) -> tuple[str, int, str]:
        """(RunPod GPU type id, count, cloud) from an offer id like `2x_H100-SXM_SECURE`."""
        m = re.fullmatch(r"(\d+)x_(.+)_(SECURE|COMMUNITY)", offer.offer_id)
        gpu, count, cloud = offer.gpu, offer.gpu_count, "SECURE"
        if m:
            count, gpu, cloud = int(m.group(1)), m.group(2), m.group(3)
        gpu_id = GPU_BY_NAME.get(gpu) or (gpu if gpu in GPU_IDS else None)
        if gpu_id is None:
            raise InvalidRequestError(
                f"runpod: offer {offer.offer_id!r} names GPU {gpu!r}, which cloudtune cannot map to a RunPod GPU type; "
                "run `cloudtune catalog refresh --provider runpod`",
                provider=PROVIDER,
            )
        return gpu_id, count, cloud

    def _launch_env(self, req: LaunchRequest, *, redacted: bool) -> dict[str, str]:
        env = dict(req.redacted_env() if redacted else req.all_env())
        env[ENV_SELF_TERMINATE] = self.self_terminate().command[-1]
        if req.max_lifetime_s:
            env[ENV_MAX_LIFETIME] = str(int(req.max_lifetime_s))
        return env

    def _create_body(self, req: LaunchRequest, *, redacted: bool = False) -> dict[str, Any]:
        gpu_id, count, cloud = self.parse_offer_id(req.offer)
        body: dict[str, Any] = {
            "name": req.name,
            "image": req.image,
            "gpu": {"id": gpu_id, "count": count},
            "cloud": cloud,
            "disk": int(req.disk_gb),
            "env": self._launch_env(req, redacted=redacted),
        }
        if req.command:
            body["args"] = shlex.join(req.command)
        if _DC_ID.match(req.offer.region or ""):
            body["dataCenterIds"] = [req.offer.region]
        return body

    _RENT_INTERRUPTIBLE = """mutation Rent($input: PodRentInterruptableInput!) {
  podRentInterruptable(input: $input) { id name desiredStatus costPerHr }
}"""

    def _interruptible_input(self, req: LaunchRequest, *, redacted: bool = False) -> dict[str, Any]:
        gpu_id, count, cloud = self.parse_offer_id(req.offer)
        bid = req.offer.spot_price_hr or req.offer.price_hr or 0.0
        return {
            "name": req.name,
            "imageName": req.image,
            "gpuTypeId": gpu_id,
            "gpuCount": count,
            "cloudType": cloud,
            "bidPerGpu": round(bid / max(count, 1), 4),
            "containerDiskInGb": int(req.disk_gb),
            "volumeInGb": 0,
            "dockerArgs": shlex.join(req.command) if req.command else "",
            "env": [{"key": k, "value": v} for k, v in self._launch_env(req, redacted=redacted).items()],
        }

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        headers = {"Authorization": f"Bearer {REDACTED}", "Content-Type": "application/json"}
        if req.spot and self.interruptible:
            return [{
                "method": "POST", "url": self.graphql_url, "headers": headers,
                "json": {"query": self._RENT_INTERRUPTIBLE, "variables": {"input": self._interruptible_input(req, redacted=True)}},
            }]
        return [{"method": "POST", "url": self.http.url("/pods"), "headers": headers,
                 "json": self._create_body(req, redacted=True)}]

    def launch(self, req: LaunchRequest) -> Machine:
        if req.spot and not self.interruptible:
            raise InvalidRequestError(
                "runpod: interruptible pods are being removed by RunPod and are off in cloudtune; launch on-demand "
                f"(spot: false) or set {ENV_INTERRUPTIBLE}=1 to try the legacy path",
                provider=PROVIDER,
            )
        try:
            if req.spot:
                data = self._graphql(
                    self._RENT_INTERRUPTIBLE, {"input": self._interruptible_input(req)}, idempotent=False
                )
                pod = data.get("podRentInterruptable") or {}
                if not pod.get("id"):
                    raise CapacityError("runpod: no interruptible capacity for this bid", provider=PROVIDER)
                return self.status(pod["id"])
            pod = self.http.post_json("/pods", self._create_body(req), idempotent=False)
        except TransientError as err:
            # The pod may exist although the answer was lost: adopt it rather than leak it.
            found = self._find_quietly(req.name)
            if found is not None:
                log.warning("runpod: create of %s failed (%s) but the pod exists: adopting %s",
                            req.name, err, found.machine_id)
                return found
            raise
        return self._machine(pod, spot=req.spot)

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
        cmd = (f'curl -fsS --retry 5 --retry-all-errors --max-time 30 -X DELETE "{url}" '
               '-H "Authorization: Bearer $RUNPOD_API_KEY"')
        return SelfTerminate(
            command=["sh", "-c", cmd],
            env=("RUNPOD_POD_ID", "RUNPOD_API_KEY"),
            note="RunPod injects RUNPOD_POD_ID and a pod-scoped RUNPOD_API_KEY; RunPod restarts a container "
                 "whose command exits, so the entrypoint must delete the pod itself",
        )
