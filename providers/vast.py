"""Vast.ai adapter: the marketplace's offers, instances by label, interruptible bids.

Why this shape (../shared/providers.md section 3; vast-ai/vast-cli `vastai/api/{offers,instances}.py`):
- Offers are individual hosts' asks, so the search keeps unreliable hosts out by default
  (reliability >= 0.98, verified, rentable, not external; see `VastFilters`).
- An offer id is the ask id to rent. Rows of the bundled catalog are buckets, not asks: launching
  one searches the live market for the cheapest equivalent ask first.
- Every instance carries `label = machine_name(job, attempt)`; `find_by_name` filters on it.
- A failed create can still carry `new_contract` (a billing instance): we destroy it.
- An interruptible instance that is outbid is *paused* without notice while its disk keeps
  billing: status reports PREEMPTED and the orchestrator destroys and relaunches.
- Checked against vast-ai/docs `api-reference/openapi/yaml/` @ c624622 (../shared/apis/vast/endpoints):
  create's `env` is a string of Docker flags (`-e K=V ...`) with `x-input-validation` limits (256
  characters per variable, 32768 in all), so the spec travels by its store URL, never inline;
  search's 404 means a bad key; offers carry `duration` (seconds the host still offers the machine)
  and `min_bid` excludes storage, so the spot price adds the disk's storage cost.
- 429s come without Retry-After. Per-endpoint limits (x-rate-limit): search 10 per minute, create
  4.5 s between requests (penalty 12 s), show 2 s, destroy 3 s, list 1 s. A 429 carries the wait its
  endpoint documents (`RATE_WAIT_S`) so the shared client's retries outlast the window: backoff alone
  (about 7 s over five tries) gave up inside search's minute and failed the launch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
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
    RateLimitedError,
    SelfTerminate,
    TransientError,
    parse_machine_name,
)
from cloudtune.providers.http import REDACTED, HttpClient, RetryPolicy

from cloudtune.catalog import tidy_region

log = logging.getLogger("cloudtune.providers.vast")

PROVIDER = "vast"
DEFAULT_API_URL = "https://console.vast.ai"
ENV_KEY = "VAST_API_KEY"
ENV_API_URL = "CLOUDTUNE_VAST_API_URL"
KEY_FILES = (Path("~/.config/vastai/vast_api_key"), Path("~/.vast_api_key"))
AUTH_HINT = f"set {ENV_KEY} or run `vastai set api-key KEY` (writes {KEY_FILES[0]})"
ENV_SELF_TERMINATE = "CLOUDTUNE_SELF_TERMINATE"
ENV_MAX_LIFETIME = "CLOUDTUNE_MAX_LIFETIME_S"
PAGE = 25  # the v1 instance list caps a page at 25 rows
ENV_MAX_LENGTH = 256  # endpoints/create_instance.yaml x-input-validation env.max_length
ENV_MAX_TOTAL = 32768  # ... env.max_total_length
ARGS_MAX_LENGTH = 4096  # ... args.max_length: "Combined length of args, args_str and onstart"
ENV_SPEC = "CLOUDTUNE_SPEC"
ENV_SPEC_URL = "CLOUDTUNE_SPEC_URL"
HOURS_PER_MONTH = 730.0  # storage_cost is $/GB/month
DURATION_MARGIN_S = 3600.0  # an offer must outlast the machine's lifetime cap by this much

# Vast gpu_name spellings -> cloudtune's normalised name (../shared/catalog/README.md "Normalisation").
VAST_GPU_NAMES: dict[str, str] = {
    "H100 SXM": "H100-SXM", "H100 PCIE": "H100-80GB", "H100 NVL": "H100-NVL", "H200": "H200",
    "H200 NVL": "H200", "GH200": "GH200", "B200": "B200", "L40S": "L40S", "L40": "L40", "L4": "L4",
    "A10": "A10", "A10G": "A10G", "Tesla T4": "T4", "Tesla V100": "V100", "RTX A6000": "A6000",
    "RTX A5000": "A5000", "RTX 6000Ada": "RTX6000-Ada", "RTX 5880Ada": "RTX5880-Ada",
    "RTX PRO 6000 WS": "RTXPRO6000", "RTX PRO 6000 S": "RTXPRO6000", "Q RTX 6000": "RTX6000",
    "MI300X": "MI300X",
}
_BY_UPPER = {k.upper(): v for k, v in VAST_GPU_NAMES.items()}
_REVERSE: dict[str, list[str]] = {}
for _v, _n in VAST_GPU_NAMES.items():
    _REVERSE.setdefault(_n, []).append(_v)

# Seconds to wait after a 429, per endpoint (../shared/apis/vast/endpoints/*.yaml x-rate-limit). Search's
# 10 per minute gets a quarter of the minute, so the default 5 tries span the whole window.
RATE_WAIT_S = {"search": 15.0, "create": 12.0, "show": 2.0, "destroy": 3.0, "list": 1.0}

_FUNDS = re.compile(r"insufficient[_ ](credit|funds|balance)|not enough (credit|funds|balance)|balance", re.I)
_ASK_GONE = re.compile(r"no_such_ask|no longer available|not available|already rented|unavailable", re.I)
_INSTANCE_GONE = re.compile(r"no_such_instance|not_found", re.I)


def normalise_gpu(gpu_name: str, gpu_ram_mb: float | None = None) -> str:
    """cloudtune's GPU name for Vast's `gpu_name` ("RTX_4090" -> "RTX4090", A100 split by memory)."""
    key = gpu_name.replace("_", " ").strip().upper()
    if key in _BY_UPPER:
        return _BY_UPPER[key]
    if key.startswith("A100"):
        return "A100-80GB" if (gpu_ram_mb or 0) >= 60000 else "A100-40GB"
    m = re.fullmatch(r"(?:GEFORCE )?RTX ?(\d{4})(?: TI)?", key)
    if m and "TI" not in key:
        return f"RTX{m.group(1)}"
    return key.replace(" ", "")


def vast_gpu_names(gpu: str) -> list[str]:
    """Vast `gpu_name` spellings for a normalised name (for searching the market)."""
    if gpu in _REVERSE:
        return list(_REVERSE[gpu])
    if gpu.startswith("A100"):
        return ["A100 SXM4", "A100 PCIE", "A100X"]
    m = re.fullmatch(r"RTX(\d{4})", gpu)
    if m:
        return [f"RTX {m.group(1)}"]
    return [gpu]


def load_api_key(explicit: str | None = None) -> str | None:
    """VAST_API_KEY, else ~/.config/vastai/vast_api_key (the vastai CLI's file), else ~/.vast_api_key."""
    if explicit:
        return explicit
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY]
    for path in KEY_FILES:
        p = path.expanduser()
        if p.is_file():
            key = p.read_text().strip()
            if key:
                return key
    return None


@dataclass(frozen=True)
class VastFilters:
    """Which hosts we are willing to rent. Defaults keep unreliable hosts out."""

    min_reliability: float = 0.98
    verified: bool = True  # only hosts Vast has verified
    external: bool = False  # True also admits external (non-Vast-managed) listings
    min_cuda: float | None = 12.1
    gpu_counts: tuple[int, ...] = (1, 2, 4, 8)
    limit: int = 1000

    def query(self, *, disk_gb: float = 100.0, offer_type: str = "ondemand") -> dict[str, Any]:
        q: dict[str, Any] = {
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "reliability": {"gte": self.min_reliability},
            "num_gpus": {"in": list(self.gpu_counts)},
        }
        if self.verified:
            q["verified"] = {"eq": True}
        if not self.external:
            q["external"] = {"eq": False}
        if self.min_cuda is not None:
            q["cuda_max_good"] = {"gte": self.min_cuda}
        # search_offers.yaml: `type` is ondemand|bid|reserved; `order` has exactly two [field, dir] entries
        q.update({"order": [["dph_total", "asc"], ["reliability", "desc"]], "type": offer_type, "limit": self.limit,
                  "allocated_storage": disk_gb})
        return q


def _text(body: Any) -> str:
    if isinstance(body, dict):
        return " ".join(str(body.get(k)) for k in ("error", "msg", "detail", "message") if body.get(k))
    return "" if body is None else str(body)


ENV_JOIN = "CLOUDTUNE_ENV_JOIN"  # "KEY:n KEY2:m": the variables split into KEY__P1..KEY__Pn (docker_env)
# Run before the machine's command (runtype args): joins every split variable back, then execs the
# command. POSIX sh, as every image has it; the names were checked against [A-Za-z_][A-Za-z0-9_]* and
# `eval` expands each part's value once, as a parameter, never as code.
JOIN_SCRIPT = (
    'for kv in ${CLOUDTUNE_ENV_JOIN-}; do k=${kv%:*}; n=${kv#*:}; v=; i=1; '
    'while [ "$i" -le "$n" ]; do eval "v=\"\\$v\\${${k}__P$i}\""; unset "${k}__P$i"; i=$((i+1)); done; '
    'export "$k=$v"; done; unset CLOUDTUNE_ENV_JOIN; exec "$@"'
)


def split_long(env: dict[str, str]) -> dict[str, str]:
    """Variables over Vast's 256 characters per `-e` entry become KEY__P1..KEY__Pn of at most 256 each.

    Why: presigned URLs (~400-600 characters) and STS session tokens (350-1000+) are what a Vast machine
    needs to reach the store without the user's own long-lived keys; the limit is per variable and the
    total allows 32768, so the value travels in parts and JOIN_SCRIPT joins it before the command runs."""
    out: dict[str, str] = {}
    joined = []
    for key, value in env.items():
        value = str(value)
        if len(f"{key}={value}") <= ENV_MAX_LENGTH:
            out[key] = value
            continue
        room = ENV_MAX_LENGTH - len(f"{key}__P999=")
        chunks = [value[i:i + room] for i in range(0, len(value), room)]
        for n, chunk in enumerate(chunks, 1):
            out[f"{key}__P{n}"] = chunk
        joined.append(f"{key}:{len(chunks)}")
    if joined:
        out[ENV_JOIN] = " ".join(joined)
        if len(f"{ENV_JOIN}={out[ENV_JOIN]}") > ENV_MAX_LENGTH:
            raise InvalidRequestError(f"vast: too many long environment variables ({', '.join(joined)}) for "
                                      f"Vast's {ENV_MAX_LENGTH} characters per variable", provider=PROVIDER)
    return out


def docker_env(env: dict[str, str]) -> str:
    """`env` as create_instance documents it: Docker flags, `-e KEY=VALUE`, double-quoted when needed.

    Checked against the spec's limits before anything is rented: a variable over 256 characters is
    split in parts (split_long; the machine's command joins them), one Docker-flag parsing cannot carry
    (quotes, newlines) is a one-line InvalidRequestError."""
    parts = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InvalidRequestError(f"vast: environment variable name {key!r} is not valid", provider=PROVIDER)
        value = str(value)
        if any(c in value for c in "\"'\n\r"):
            raise InvalidRequestError(
                f"vast: environment variable {key} contains a quote or newline, which Vast's Docker-flag env "
                "cannot carry; pass it another way (e.g. in the store)", provider=PROVIDER)
    for key, value in split_long({k: str(v) for k, v in env.items()}).items():
        entry = f"{key}={value}"
        parts.append(f'-e {key}="{value}"' if re.search(r"\s", value) else f"-e {entry}")
    text = " ".join(parts)
    if len(text) > ENV_MAX_TOTAL:
        raise InvalidRequestError(f"vast: the environment is {len(text)} characters, over Vast's {ENV_MAX_TOTAL}",
                                  provider=PROVIDER)
    return text


def _classify(resp: Any, body: Any) -> ProviderError | None:
    text = _text(body) or resp.text[:300]
    status = resp.status_code
    req = getattr(resp, "request", None)
    search = req is not None and req.method == "POST" and "/bundles" in str(req.url.path)
    if status in (401, 403) or "auth_error" in text or (search and status == 404):  # search: 404 = bad key
        return AuthError(f"vast rejected the API key (HTTP {status}); {AUTH_HINT}", provider=PROVIDER)
    if status == 429:
        return RateLimitedError(f"vast: rate limited (HTTP 429): {text}", provider=PROVIDER,
                                retry_after_s=_rate_wait(resp, search))
    if _FUNDS.search(text) and status in (400, 402, 403, 409):
        return QuotaError(f"vast: insufficient credit: {text}", provider=PROVIDER)
    if status == 410 or (status in (400, 404) and _ASK_GONE.search(text)):
        return CapacityError(f"vast: the offer is no longer available: {text}", provider=PROVIDER)
    if status == 404 and _INSTANCE_GONE.search(text):
        return NotFoundError(f"vast: {text}", provider=PROVIDER)
    return None


def _rate_wait(resp: Any, search: bool) -> float:
    """How long to wait after a 429: Retry-After if Vast ever sends one, else the documented wait of the
    endpoint it came from (RATE_WAIT_S)."""
    from cloudtune.providers.http import parse_retry_after

    hinted = parse_retry_after(resp.headers.get("Retry-After")) if hasattr(resp, "headers") else None
    if hinted is not None:
        return hinted
    req = getattr(resp, "request", None)
    path = str(req.url.path) if req is not None else ""
    method = req.method if req is not None else ""
    if search or req is None:
        kind = "search"
    elif method == "PUT" and "/asks/" in path:
        kind = "create"
    elif method == "DELETE":
        kind = "destroy"
    elif "/api/v1/instances" in path:
        kind = "list"
    else:
        kind = "show"
    return RATE_WAIT_S[kind]


def _map_state(inst: dict[str, Any]) -> tuple[MachineState, str]:
    """Vast's actual/intended/cur status words -> protocol state, with the words as detail."""
    actual = (inst.get("actual_status") or "").lower() or None
    intended = (inst.get("intended_status") or "").lower()
    cur = (inst.get("cur_state") or "").lower()
    nxt = (inst.get("next_state") or "").lower()
    msg = (inst.get("status_msg") or "").strip()
    words = f"actual_status={actual} intended_status={intended or None} cur_state={cur or None}"
    if msg:
        words += f" status_msg={msg[:200]!r}"
    is_bid = bool(inst.get("is_bid"))
    if actual in ("destroyed", "terminated") or cur in ("destroyed", "terminated"):
        return MachineState.TERMINATED, words
    if actual == "unknown":  # openapi.yaml "poll trap": exited/unknown/offline never reach running
        return MachineState.FAILED, f"Vast reports the container state unknown (never reaches running); {words}"
    stopped = actual in ("stopped", "exited") or cur == "stopped"
    if is_bid and (stopped or (cur == intended == nxt == "stopped")):
        return MachineState.PREEMPTED, f"outbid: interruptible instance paused by Vast (disk still bills); {words}"
    if actual == "offline":
        return MachineState.PREEMPTED, f"host offline; {words}"
    if actual == "running":
        return MachineState.RUNNING, words
    if actual in (None, "loading", "created", "rebooting") and intended in ("", "running"):
        if re.search(r"error|failed", msg, re.I) and actual in (None, "loading", "created"):
            return MachineState.FAILED, words
        return MachineState.PENDING, words
    if actual == "exited":
        return MachineState.EXITED, words
    if actual in ("stopped", "frozen") or cur == "stopped":
        return MachineState.STOPPED, f"stopped, not by cloudtune (balance or host); {words}"
    return MachineState.UNKNOWN, words


class VastProvider:
    """Vast.ai instances as cloudtune machines (on-demand or interruptible bids)."""

    name = PROVIDER

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        base_url: str | None = None,  # alias of api_url (providers.yaml spelling)
        filters: VastFilters | None = None,
        min_reliability: float | None = None,  # shortcut for providers.yaml: vast: {min_reliability: 0.95}
        bid_markup: float = 1.05,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Any = None,  # how the client waits out 429s (time.sleep); a test records the waits instead
    ) -> None:
        self._api_key = load_api_key(api_key)
        self.api_url = (api_url or base_url or os.environ.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/")
        self.filters = filters or VastFilters()
        if min_reliability is not None:
            from dataclasses import replace

            self.filters = replace(self.filters, min_reliability=float(min_reliability))
        self.bid_markup = bid_markup
        self._rows: dict[str, dict[str, Any]] = {}  # raw asks seen by the last searches (min_bid, duration)
        self.http = HttpClient(
            PROVIDER, self.api_url, self._api_key, auth_hint=AUTH_HINT, timeout_s=timeout_s,
            retry=retry, classify=_classify, **({"sleep": sleep} if sleep is not None else {}),
        )

    def __repr__(self) -> str:
        return f"VastProvider(api_url={self.api_url!r}, api_key={REDACTED if self._api_key else None})"

    # ------------------------------------------------------------ offers

    def _search(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        body = self.http.post_json("/api/v0/bundles/", query, idempotent=True)
        rows = [o for o in (body or {}).get("offers") or [] if isinstance(o, dict)]
        for o in rows:
            if o.get("id") is not None:
                self._rows[str(o["id"])] = o
        return rows

    @staticmethod
    def _storage_hr(o: dict[str, Any], disk_gb: float) -> float:
        try:
            return float(o.get("storage_cost") or 0.0) * float(disk_gb) / HOURS_PER_MONTH
        except (TypeError, ValueError):
            return 0.0

    def _offer(self, o: dict[str, Any], now: str, disk_gb: float = 100.0) -> Offer:
        from cloudtune.catalog import gpu_spec, usable_gib

        gpu_ram = float(o.get("gpu_ram") or 0)
        gpu = normalise_gpu(str(o.get("gpu_name") or ""), gpu_ram)
        spec = gpu_spec(gpu)
        nominal = spec.vram_gb if spec else gpu_ram / 1000.0
        min_bid = o.get("min_bid")
        spot = None
        if min_bid:  # min_bid excludes storage; dph_total includes it: make them comparable
            spot = float(min_bid) + self._storage_hr(o, disk_gb)
        cores = o.get("cpu_cores_effective") or o.get("cpu_cores")
        return Offer(
            provider=PROVIDER,
            offer_id=str(o["id"]),
            gpu=gpu,
            gpu_count=int(o.get("num_gpus") or 1),
            vram_gib_per_gpu=usable_gib(gpu, float(nominal)),
            region=tidy_region(str(o.get("geolocation") or "")),
            price_hr=round(float(o["dph_total"]), 4) if o.get("dph_total") is not None else None,
            spot_price_hr=round(spot, 4) if spot is not None else None,
            as_of=now,
            billing_granularity_s=1,
            vcpus=int(cores) if cores else None,
            ram_gb=round(float(o["cpu_ram"]) / 1000.0, 1) if o.get("cpu_ram") else None,
            fresh=True,
        )

    def offers(self) -> list[Offer]:
        """Live asks from reliable, verified hosts, cheapest first, with the interruptible minimum bid."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        out = []
        for o in self._search(self.filters.query()):
            if o.get("id") is None or not o.get("gpu_name"):
                continue
            out.append(self._offer(o, now))
        return out

    def _resolve_ask(self, req: LaunchRequest, exclude: set[str] = frozenset()) -> Offer:  # type: ignore[assignment]
        """A live ask equivalent to `req.offer` (same GPU and count, reliable host, cheapest)."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        q = self._launch_query(req)
        q["gpu_name"] = {"in": vast_gpu_names(req.offer.gpu)}
        q["num_gpus"] = {"eq": req.offer.gpu_count}
        q["limit"] = 20
        for o in self._search(q):
            cand = self._offer(o, now, req.disk_gb)
            if cand.offer_id not in exclude and cand.gpu == req.offer.gpu:
                return cand
        raise CapacityError(
            f"vast: no reliable host offers {req.offer.gpu_count}x {req.offer.gpu} now", provider=PROVIDER
        )

    @staticmethod
    def needed_duration_s(req: LaunchRequest) -> float | None:
        """How long the host must still offer the machine: the lifetime cap plus a margin."""
        return req.max_lifetime_s + DURATION_MARGIN_S if req.max_lifetime_s else None

    def _launch_query(self, req: LaunchRequest) -> dict[str, Any]:
        q = self.filters.query(disk_gb=req.disk_gb, offer_type="bid" if req.spot else "ondemand")
        need = self.needed_duration_s(req)
        if need:
            q["duration"] = {"gte": need}  # search_offers: seconds the offer must still be available
        return q

    def _live_ask(self, req: LaunchRequest) -> Offer | None:
        """The planned ask itself, if it is still rentable and lasts long enough (else None)."""
        q = self._launch_query(req)
        q.update(id={"eq": int(req.offer.offer_id)}, limit=1)
        rows = self._search(q)
        return self._offer(rows[0], datetime.now(UTC).isoformat(timespec="seconds"), req.disk_gb) if rows else None

    # ------------------------------------------------------------ launch

    def _bid(self, offer: Offer) -> float:
        """The bid (`price`, $/h per machine): the host's min_bid (no storage) with our markup."""
        row = self._rows.get(offer.offer_id) or {}
        base = row.get("min_bid") or offer.spot_price_hr or offer.price_hr
        if not base:
            raise InvalidRequestError(f"vast: offer {offer.offer_id} has no price to bid from", provider=PROVIDER)
        return round(base * self.bid_markup, 4)

    def _create_body(self, req: LaunchRequest, offer: Offer, *, redacted: bool = False) -> dict[str, Any]:
        env = dict(req.redacted_env() if redacted else req.all_env())
        if env.get(ENV_SPEC_URL):
            env.pop(ENV_SPEC, None)  # the inline spec (KBs) is over Vast's env limit; the trainer reads the URL
        env[ENV_SELF_TERMINATE] = self.self_terminate().command[-1]
        if req.max_lifetime_s:
            env[ENV_MAX_LIFETIME] = str(int(req.max_lifetime_s))
        env_text = docker_env(env)
        body: dict[str, Any] = {
            "client_id": "me",  # what vast-cli sends; the schema allows extra fields
            "image": req.image,
            "disk": int(req.disk_gb),
            "label": req.name,
            "env": env_text,
            "runtype": "args",
            # split variables are joined first (JOIN_SCRIPT); without any, the command runs as it is
            "args": ["sh", "-c", JOIN_SCRIPT, "cloudtune-env", *req.command]
            if f"-e {ENV_JOIN}=" in env_text else list(req.command),
            "cancel_unavail": True,
        }
        args_len = sum(len(a) for a in body["args"])
        if args_len > ARGS_MAX_LENGTH:  # refused here, before anything is searched or rented
            raise InvalidRequestError(f"vast: the machine's command is {args_len} characters; Vast allows "
                                      f"{ARGS_MAX_LENGTH} for args + onstart (create_instance x-input-validation)",
                                      provider=PROVIDER)
        if req.spot:
            body["price"] = self._bid(offer)
        return body

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        headers = {"Authorization": f"Bearer {REDACTED}", "Content-Type": "application/json"}
        out: list[dict] = []
        offer = req.offer
        if not offer.offer_id.isdigit():
            q = self._launch_query(req)
            q.update(gpu_name={"in": vast_gpu_names(offer.gpu)}, num_gpus={"eq": offer.gpu_count}, limit=20)
            out.append({"method": "POST", "url": self.http.url("/api/v0/bundles/"), "headers": headers, "json": q})
        ask = offer.offer_id if offer.offer_id.isdigit() else "<ask id from the search above>"
        out.append({"method": "PUT", "url": self.http.url(f"/api/v0/asks/{ask}/"), "headers": headers,
                    "json": self._create_body(req, offer, redacted=True)})
        return out

    def launch(self, req: LaunchRequest) -> Machine:
        self._create_body(req, req.offer)  # bad env is refused before anything is searched or rented
        offer = (self._live_ask(req) if req.offer.offer_id.isdigit() else None) or self._resolve_ask(
            req, exclude={req.offer.offer_id})
        try:
            return self._accept(req, offer)
        except CapacityError:
            if not req.offer.offer_id.isdigit():
                raise
            # The ask was taken between search and rent: one try on the cheapest equivalent ask.
            log.info("vast: ask %s is gone; searching for an equivalent one", offer.offer_id)
            return self._accept(req, self._resolve_ask(req, exclude={offer.offer_id}))

    def _accept(self, req: LaunchRequest, offer: Offer) -> Machine:
        try:
            resp = self.http.request("PUT", f"/api/v0/asks/{offer.offer_id}/",
                                     json=self._create_body(req, offer), idempotent=False)
        except ProviderError as err:
            if self._destroy_orphan(getattr(err, "body", None)):
                raise  # Vast said it failed and named the contract: destroyed, nothing to adopt
            if isinstance(err, TransientError):
                found = self._find_quietly(req.name)
                if found is not None:
                    log.warning("vast: create of %s failed (%s) but instance %s exists: adopting it",
                                req.name, err, found.machine_id)
                    return found
            raise
        body = resp.json() if resp.content else {}
        contract = body.get("new_contract")
        if not body.get("success") or not contract:
            self._destroy_orphan(body)
            raise InvalidRequestError(f"vast: create refused: {_text(body) or body}", provider=PROVIDER)
        return Machine(provider=PROVIDER, machine_id=str(contract), name=req.name, state=MachineState.PENDING,
                       job_id=req.job_id, attempt=req.attempt, region=offer.region,
                       price_hr=self._bid(offer) if req.spot else offer.price_hr, spot=req.spot,
                       detail=f"new_contract from ask {offer.offer_id}")

    def _destroy_orphan(self, body: Any) -> bool:
        """Destroy the `new_contract` a failed create still names. True if there was one."""
        contract = body.get("new_contract") if isinstance(body, dict) else None
        if not contract:
            return False
        log.warning("vast: failed create still returned new_contract %s; destroying it", contract)
        try:
            self.terminate(str(contract))
        except ProviderError as err:
            log.warning("vast: could not destroy orphan %s (%s); `cloudtune gc` will retry", contract, err)
        return True

    def _find_quietly(self, name: str) -> Machine | None:
        try:
            return self.find_by_name(name)
        except ProviderError as err:
            log.warning("vast: lookup of %s after a failed create also failed: %s", name, err)
            return None

    # ------------------------------------------------------------ status / list

    def _machine(self, inst: dict[str, Any]) -> Machine:
        state, detail = _map_state(inst)
        label = str(inst.get("label") or "")
        parsed = parse_machine_name(label)
        return Machine(
            provider=PROVIDER, machine_id=str(inst.get("id")), name=label, state=state,
            job_id=parsed[0] if parsed else None, attempt=parsed[1] if parsed else None,
            region=inst.get("geolocation"), price_hr=inst.get("dph_total"), spot=bool(inst.get("is_bid")),
            detail=detail,
        )

    def status(self, machine_id: str) -> Machine:
        try:
            body = self.http.get_json(f"/api/v0/instances/{machine_id}/")
        except InvalidRequestError as err:  # show_instance.yaml: 400 = invalid instance id
            raise NotFoundError(f"vast: instance {machine_id} does not exist ({err})", provider=PROVIDER) from None
        inst = (body or {}).get("instances")  # observed: null for an id this account does not have
        if not inst:
            raise NotFoundError(f"vast: instance {machine_id} does not exist", provider=PROVIDER)
        return self._machine(inst)

    def _instances(self, select_filters: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {
            "select_filters": json.dumps(select_filters),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "limit": PAGE,
        }
        for _ in range(1000):  # a hard stop against a server that never ends its pages
            body = self.http.get_json("/api/v1/instances/", params=params) or {}
            rows.extend(body.get("instances") or [])
            token = body.get("next_token")
            if not token:
                break
            params["after_token"] = token
        return rows

    def list_machines(self) -> list[Machine]:
        return [self._machine(i) for i in self._instances({}) if str(i.get("label") or "").startswith(NAME_PREFIX)]

    def find_by_name(self, name: str) -> Machine | None:
        matches = [self._machine(i) for i in self._instances({"label": {"eq": name}}) if i.get("label") == name]
        if len(matches) > 1:
            log.warning("vast: %d instances are labelled %s (%s); adopting the first, gc removes the rest",
                        len(matches), name, ", ".join(m.machine_id for m in matches))
        return matches[0] if matches else None

    # ------------------------------------------------------------ terminate

    def terminate(self, machine_id: str) -> None:
        try:
            self.http.request("DELETE", f"/api/v0/instances/{machine_id}/")
        except NotFoundError:
            return
        try:
            after = self.status(machine_id)
        except NotFoundError:
            return
        if after.state is MachineState.TERMINATED:
            return
        log.warning("vast: instance %s still reads %s right after destroy; the caller will verify and retry",
                    machine_id, after.detail)

    def self_terminate(self) -> SelfTerminate:
        url = f"{self.api_url}/api/v0/instances/$CONTAINER_ID/"
        # no quotes: it travels in Vast's Docker-flag env string (docker_env)
        # --retry covers timeouts, 408, 429 and 5xx; a 404 (the controller deleted it first) ends at once
        cmd = f"curl -fsS --retry 5 --retry-connrefused --max-time 30 -X DELETE --oauth2-bearer $CONTAINER_API_KEY {url}"
        return SelfTerminate(
            command=["sh", "-c", cmd],
            env=("CONTAINER_ID", "CONTAINER_API_KEY"),
            note="Vast injects CONTAINER_ID and CONTAINER_API_KEY (may only start/stop/destroy this instance)",
        )
