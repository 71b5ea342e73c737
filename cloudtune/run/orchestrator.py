"""The orchestrator: turns a planned job into machines, and machines back into a finished job.

One owner: the detached watchdog (cloudtune.run.watchdog) calls `Orchestrator.tick()` in a loop and
is the only process that launches, relaunches or terminates. The CLI creates the job, starts the
watchdog and renders progress; `stop` only writes a request into the state database. So a killed
terminal, a closed laptop lid or a second `status` never races a relaunch.

Every tick reads three sources of truth and acts on the first rule that applies:
  the state db (stop requests, limits, attempts), the store (DONE/FAILED markers, heartbeat), and
  the provider (machine state). Each decision is written as an event with its reason.

Rules (docs/operations.md has the long form):
  DONE.json in the store           -> terminate, job done
  FAILED.json / trainer exit 1, 2   -> terminate, job failed (no retry: the input or the code is bad)
  trainer exit 76 (stopped)         -> terminate, job stopped
  preempted / lost / exit 75 / crash -> terminate what is left, relaunch (same offer; on a capacity
                                        or quota error the next option), up to limits.max_restarts
  heartbeat older than heartbeat_timeout_s -> terminate, relaunch (a hung machine still bills)
  max_hours or max_cost_usd reached, or `cloudtune stop` -> control.json {"action": "stop"} (the
        trainer checkpoints and exits 76), wait up to STOP_GRACE_S, terminate, job stopped
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
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
    TransientError,
    machine_name,
)
from cloudtune.run import bootstrap
from cloudtune.run import state as S
from cloudtune.run.cost import job_cost_usd
from cloudtune.run.forward_env import forwarded_env
from cloudtune.run.launch_shape import launch_env
from cloudtune.run.machine_limits import machine_limits
from cloudtune.spec import JobSpec
from cloudtune.store import layout
from cloudtune.trainer import contract as C
from cloudtune.trainer import trackers

log = logging.getLogger("cloudtune.orchestrator")

STOP_GRACE_S = float(os.environ.get("CLOUDTUNE_STOP_GRACE_S", "60"))
DISK_FULL = "the machine's disk filled up"  # an attempt's end reason on exit 73, with the step it reached
STORE_WAIT = "waiting for the store"  # a job's reason while its trainer could not write the store (exit 74)
TERMINATE_VERIFY_S = 120.0
LAUNCH_RETRIES = 3
# _after_failed_create's answer when the lookup after a failed create failed too: nothing is proven.
AMBIGUOUS: Any = object()


# ---------------------------------------------------------------- planning a job


@dataclass
class Option:
    """One planned way to run the job: an offer, spot or not, its price and estimate."""

    offer: Offer  # per machine; a multi-node option's offer is a `skypilot` offer ("<cloud>:<offer id>")
    spot: bool
    price_hr: float  # the whole option (all nodes)
    est_hours: float | None
    est_cost_usd: float | None
    nodes: int = 1
    gpu_count: int | None = None  # GPUs in total (nodes x offer.gpu_count); None: offer.gpu_count
    launcher: str = "single"  # plan.launch_route: single | ddp | accelerate-fsdp | skypilot+<launcher>
    sharding: str | None = None  # the planner's sharding for this GPU count (none, ddp, fsdp)
    headroom_gib: float | None = None  # the planner's spare memory per GPU (shown by --dry-run and the confirmation)

    @property
    def total_gpus(self) -> int:
        return self.gpu_count if self.gpu_count is not None else self.offer.gpu_count * self.nodes

    def to_dict(self) -> dict[str, Any]:
        return {
            "offer": dataclasses.asdict(self.offer),
            "spot": self.spot,
            "price_hr": self.price_hr,
            "est_hours": self.est_hours,
            "est_cost_usd": self.est_cost_usd,
            "nodes": self.nodes,
            "gpu_count": self.total_gpus,
            "launcher": self.launcher,
            "sharding": self.sharding,
            "headroom_gib": self.headroom_gib,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Option:
        fields = {f.name for f in dataclasses.fields(Offer)}
        return cls(
            offer=Offer(**{k: v for k, v in d["offer"].items() if k in fields}),
            spot=bool(d["spot"]),
            price_hr=float(d["price_hr"]),
            est_hours=d.get("est_hours"),
            est_cost_usd=d.get("est_cost_usd"),
            nodes=int(d.get("nodes") or 1),
            gpu_count=d.get("gpu_count"),
            launcher=d.get("launcher") or "single",
            sharding=d.get("sharding"),
            headroom_gib=d.get("headroom_gib"),
        )

    @classmethod
    def from_plan(cls, o: Any) -> Option:
        """The launchable form of a planner option: multi-node offers are launched through SkyPilot."""
        from cloudtune.providers.skypilot import PROVIDER as SKYPILOT
        from cloudtune.providers.skypilot import wrap_offer

        offer = wrap_offer(o.offer) if o.launch_via == SKYPILOT else o.offer
        return cls(offer, bool(o.spot), float(o.price_hr), o.est_hours, o.est_cost_usd, nodes=int(o.nodes),
                   gpu_count=int(o.gpu_count) if o.gpu_count else None, launcher=o.launcher,
                   sharding=o.memory.sharding if o.memory is not None else None, headroom_gib=o.headroom_gib)


@dataclass
class Draft:
    """A validated, planned job that has not been written anywhere yet."""

    spec: JobSpec
    provider: str
    options: list[Option] = field(default_factory=list)
    plan: Any = None  # the planner's Plan (memory, assumptions) behind `options`, for the human summary

    @property
    def choice(self) -> Option:
        return self.options[0]


def provider_names(spec: JobSpec, override: str | None) -> list[str]:
    from cloudtune.providers import check_provider_name

    if override:
        names = [p.strip() for p in override.split(",") if p.strip()]
    elif isinstance(spec.resources.provider, list):
        names = list(spec.resources.provider)
    else:
        names = [spec.resources.provider or "local"]
    return [check_provider_name(n) for n in names]


def plan_job(spec: JobSpec, providers: list[str]) -> Draft:
    """The planner's ranked options, as `cloudtune plan` shows them: its choice is the first option
    and the one launched; the rest are the failover order. The planner ranks only options that can
    be launched (plan.launch_route), so `plan` and `run` agree on provider, GPU, count and nodes."""
    from cloudtune.errors import NothingFits
    from cloudtune.planner.plan import plan_for_spec
    from cloudtune.run.launch_shape import check_shape

    check_shape(spec, providers)  # gpus/sharding the launcher or the provider cannot run: one line, exit 2
    plan = plan_for_spec(spec, providers=providers, spot=spec.resources.spot)
    if not plan.options:
        raise NothingFits(plan.nothing_fits or f"no offer of {', '.join(providers)} fits this job; "
                          f"run `cloudtune plan` to see why")
    options = [Option.from_plan(o) for o in plan.options]
    return Draft(spec=spec, provider=options[0].offer.provider, options=options, plan=plan)


def check_budget(draft: Draft) -> None:
    """Refuse before spending anything when the estimate already exceeds the job's limits."""
    from cloudtune.errors import UserError

    lim = draft.spec.limits
    est = draft.choice.est_cost_usd
    if lim.max_cost_usd is not None:
        if lim.max_cost_usd <= 0 and draft.choice.price_hr > 0:
            raise UserError(
                f"limits.max_cost_usd is {lim.max_cost_usd:g}: the budget is already exhausted; raise it above 0"
            )
        if est is not None and est > lim.max_cost_usd:
            raise UserError(
                f"estimated cost ${est:.2f} on {draft.choice.offer.provider}/{draft.choice.offer.offer_id} exceeds "
                f"limits.max_cost_usd ${lim.max_cost_usd:.2f}; raise the limit or reduce training.max_steps/epochs"
            )
    if lim.max_hours is not None and draft.choice.est_hours is not None and draft.choice.est_hours > lim.max_hours:
        raise UserError(
            f"estimated time {draft.choice.est_hours:.2f} h exceeds limits.max_hours {lim.max_hours:g}; "
            f"raise the limit or reduce training.max_steps/epochs"
        )


def store_for(spec: JobSpec):
    from cloudtune.home import default_store_url
    from cloudtune.store import open_store

    return open_store(spec.store.url or default_store_url(), endpoint_url=spec.store.endpoint_url,
                      region=spec.store.region)


# ---------------------------------------------------------------- inputs a cloud machine can read


@dataclass
class Staged:
    """The spec a machine is given, and the local files that must be in the store first."""

    spec: JobSpec
    uploads: list[tuple[Path, str]] = field(default_factory=list)  # (local file, store key)
    urls: dict[str, str] = field(default_factory=dict)  # spec field -> staged URL (for --dry-run)


def remote_providers(draft: Draft) -> list[str]:
    """Providers of the plan whose machines do not share this machine's disk, in plan order."""
    seen: list[str] = []
    for o in draft.options:
        if o.offer.provider != "local" and o.offer.provider not in seen:
            seen.append(o.offer.provider)
    return seen


def _is_local_model(model: str) -> bool:
    if model.startswith("tiny:") or ("://" in model and not model.startswith("file://")):
        return False
    if model.startswith(("file://", "/", "./", "../", "~")):
        return True
    return Path(model).expanduser().exists()


def check_remote(draft: Draft) -> None:
    """Refuse, before anything is written or spent, a job a cloud machine could not read.

    One generic check for every cloud provider: the store must be s3:// (a file:// store lives on
    this disk), and the model must come from the hub (a local model folder is not shipped: it can
    be tens of GB and the hub caches it near the machine). Local data and adapters are fine: they
    are staged into the store by `create_job`.
    """
    from cloudtune.errors import UserError
    from cloudtune.home import default_store_url

    remote = remote_providers(draft)
    if not remote:
        return
    p, spec = remote[0], draft.spec
    from cloudtune.planner.disk import check_disk

    plan = draft.plan
    raised = check_disk(spec, getattr(plan, "model", None), getattr(plan, "config", None), remote)
    if raised:  # the default disk cannot hold model + 2 checkpoints: ask for what does (planner/disk.py)
        spec.resources.disk_gb = raised
    url = spec.store.url or default_store_url()
    if not url.startswith("s3://"):
        raise UserError(
            f"{p}: the store {url} is on this machine and a {p} machine cannot reach it; set store.url in the "
            f"job spec to an s3:// URL such as s3://bucket/prefix (with store.endpoint_url for an S3-compatible "
            f"service), or use --provider local"
        )
    if _is_local_model(spec.model):
        raise UserError(
            f"model {spec.model!r} is a local folder that a {p} machine cannot read; push it to the Hugging Face "
            f"hub (`huggingface-cli upload <user>/<name> {spec.model}`) and set model to that hub id, "
            f"or use --provider local"
        )


def _local_input(ref: str | None) -> Path | None:
    """The local file or folder behind a data/adapter reference; None for URLs, hub ids and job ids."""
    if not ref:
        return None
    if ref.startswith("file://"):
        return Path(ref[len("file://"):])
    if "://" in ref:
        return None
    p = Path(ref).expanduser()
    return p if p.exists() else None


def stage_inputs(spec: JobSpec, store_url: str, job_id: str) -> Staged:
    """Point the spec's local data and dpo.base_adapter at `<store>/<job>/inputs/...` (pure: uploads nothing).

    A file keeps its name; a data folder becomes a prefix URL ending in '/' (the trainer reads every
    .jsonl/.json/.parquet under it); an adapter folder's top-level files (adapter_config.json,
    weights) become a prefix the trainer's adapter fetch lists.
    """
    from cloudtune.errors import UserError
    from cloudtune.trainer.data import SUFFIXES

    out = Staged(spec=spec.model_copy(deep=True))
    root = store_url.rstrip("/")
    for role in ("train", "validation"):
        local = _local_input(getattr(spec.data, role))
        if local is None:
            continue
        if local.is_dir():
            files = sorted(f for f in local.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
            url = f"{root}/{layout.inputs_prefix(job_id, role)}"
        else:
            files = [local]
            url = f"{root}/{layout.input_key(job_id, role, local.name)}"
        out.uploads += [(f, layout.input_key(job_id, role, f.name)) for f in files]
        setattr(out.spec.data, role, url)
        out.urls[f"data.{role}"] = url
    ref = spec.dpo.base_adapter
    local = _local_input(ref)
    if local is None and ref and ref.startswith(("/", "./", "../", "~", "file://")):
        raise UserError(f"dpo.base_adapter {ref!r} does not exist; point it at a finished job's final/ folder, "
                        f"a store URL or a job id")
    if local is not None:
        if not (local / "adapter_config.json").is_file():
            raise UserError(f"dpo.base_adapter {ref!r} has no adapter_config.json; point it at a final/ folder")
        files = sorted(f for f in local.iterdir() if f.is_file())
        out.uploads += [(f, layout.input_key(job_id, "base_adapter", f.name)) for f in files]
        url = f"{root}/{layout.inputs_prefix(job_id, 'base_adapter').rstrip('/')}"
        out.spec.dpo.base_adapter = url
        out.urls["dpo.base_adapter"] = url
    return out


def create_job(db: S.StateDB, draft: Draft) -> str:
    """Write the job: staged inputs and spec.json to the store, then the job row. Nothing is written before this.

    For a plan with cloud options, local data files (and a local dpo.base_adapter) are uploaded to
    `<store>/<job>/inputs/` first and the stored spec names those URLs; if any upload fails the job
    prefix is removed again, so nothing is left half-written.
    """
    from cloudtune.errors import UserError
    from cloudtune.run.ids import new_job_id

    check_remote(draft)
    job_id = new_job_id()
    while db.job_exists(job_id):
        job_id = new_job_id()
    store = store_for(draft.spec)
    staged = stage_inputs(draft.spec, store.url, job_id) if remote_providers(draft) else Staged(draft.spec)
    spec = staged.spec
    try:
        for local, key in staged.uploads:
            try:
                store.upload_file(local, key)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - any store failure: one clear line, after cleaning up
                raise UserError(f"could not upload {local} to {store.url_for(key)}: {err}; check the bucket, "
                                f"store.endpoint_url and your credentials") from None
        if any(bootstrap.needs_bootstrap(spec.resources.image, o.offer.provider) for o in draft.options):
            bootstrap.stage(store, job_id)  # the wheel + pins a public-image machine installs (run/bootstrap.py)
        store.put_bytes(layout.spec_key(job_id), spec.to_json().encode())
        db.insert_job(
            id=job_id,
            name=spec.name,
            provider=draft.provider,
            store_url=store.url,
            store_endpoint=spec.store.endpoint_url,
            spec_json=spec.to_json(),
            plan_json=json.dumps([o.to_dict() for o in draft.options]),
            est_hours=draft.choice.est_hours,
            est_cost_usd=draft.choice.est_cost_usd,
            total_steps=spec.training.max_steps,
        )
    except BaseException:
        try:
            store.delete_prefix(layout.job_prefix(job_id))
        except Exception as err:  # noqa: BLE001 - report the first failure, not the cleanup's
            log.warning("could not clean %s after a failed create: %s", store.url_for(layout.job_prefix(job_id)), err)
        raise
    if staged.uploads:
        db.event(job_id, "staged", f"{len(staged.uploads)} local input file(s) uploaded: "
                 + ", ".join(f"{k}={v}" for k, v in staged.urls.items()))
    db.event(job_id, "created", f"job created: plan {draft.choice.offer.provider}/{draft.choice.offer.offer_id}"
             f"{' spot' if draft.choice.spot else ''} at ${draft.choice.price_hr:.4f}/h")
    return job_id


def build_request(
    job: S.Job, spec: JobSpec, option: Option, attempt: int, spent_usd: float = 0.0, *, dry_run: bool = False
) -> LaunchRequest:
    """The launch request of one attempt: the trainer command, its environment and lifetime cap.

    A cloud machine gets the staged spec (local inputs replaced by their `<job>/inputs/` URLs); for a
    job made by `create_job` that is already the stored spec, and `--dry-run` shows the same URLs.
    """
    if option.offer.provider != "local":
        spec = stage_inputs(spec, job.store_url, job.id).spec
    spec_b64 = "b64:" + base64.b64encode(spec.to_json().encode()).decode()
    env = {
        C.ENV_SPEC: spec_b64,
        C.ENV_SPEC_URL: f"{job.store_url.rstrip('/')}/{layout.spec_key(job.id)}",
        C.ENV_JOB_ID: job.id,
        C.ENV_ATTEMPT: str(attempt),
        C.ENV_STORE: job.store_url,
    }
    if job.store_endpoint:
        env[C.ENV_STORE_ENDPOINT] = job.store_endpoint
    if option.offer.provider != "local":  # the trainer names the disk_gb that would hold it (trainer/disk.py)
        env[C.ENV_DISK_GB] = str(spec.resources.disk_gb or 100)
    limits = machine_limits(
        max_hours=spec.limits.max_hours, max_cost_usd=spec.limits.max_cost_usd,
        heartbeat_timeout_s=spec.limits.heartbeat_timeout_s, job_created_at=job.created_at,
        est_hours=job.est_hours, price_hr=option.price_hr, spent_usd=spent_usd,
    )
    # spec env:/secrets:, HF_TOKEN and the store's credentials (STS-scoped on third-party machines), nothing else
    user_env, secret_env = forwarded_env(spec, option.offer.provider, job.store_url, job.id,
                                         lifetime_s=limits.lifetime_s, endpoint_url=job.store_endpoint,
                                         dry_run=dry_run)
    env.update({k: v for k, v in user_env.items() if k not in env})
    secret_env.update(trackers.secret_env(spec.training.report_to, spec.training.tracker_env, os.environ))
    env.update(limits.env)  # the machine enforces these itself (cloudtune/trainer/guards.py)
    env.update(launch_env(spec, option))  # processes per node, nodes, ddp/fsdp (cloudtune/run/launch_shape.py)
    lifetime = limits.lifetime_s
    command = list(C.LAUNCH_COMMAND)  # the trainer itself for one process, accelerate launch for more
    if bootstrap.needs_bootstrap(spec.resources.image, option.offer.provider):
        # a public PyTorch image: install the wheel `create_job` staged, then the same command (run/bootstrap.py)
        if dry_run:
            secret_env[bootstrap.ENV_WHEEL_URL] = "<presigned GET URL of the staged wheel>"
            secret_env[bootstrap.ENV_SCRIPT_URL] = "<presigned GET URL of the staged boot script>"
        else:
            from cloudtune.store import open_store

            store = open_store(job.store_url, endpoint_url=job.store_endpoint, region=spec.store.region)
            pins = bootstrap.staged_requirements(store, job.id)
            boot_env, boot_secret = bootstrap.attempt_env(store, job.id, attempt, pins, spec.resources.image,
                                                          option.offer.gpu)  # wheel + wheelhouse URLs
            env.update(boot_env)
            secret_env.update(boot_secret)
        command = bootstrap.command()  # a stub that fetches the staged boot script (pins inside) and runs it
    return LaunchRequest(
        job_id=job.id,
        attempt=attempt,
        offer=option.offer,
        spot=option.spot,
        image=spec.resources.image,
        command=command,
        env=env,
        secret_env=secret_env,
        disk_gb=spec.resources.disk_gb or 100,
        max_lifetime_s=lifetime,
        nodes=option.nodes,
    )


# ---------------------------------------------------------------- the control loop


class Orchestrator:
    def __init__(self, db: S.StateDB, job_id: str) -> None:
        self.db = db
        self.job_id = job_id
        job = db.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        self.spec = job.spec
        self.options = [Option.from_dict(d) for d in job.plan]
        self.store = store_for(self.spec)
        self._providers: dict[str, Any] = {}
        self._last_beat: tuple[int, float] | None = None

    # -- helpers

    def provider(self, name: str):
        if name not in self._providers:
            from cloudtune.run.providers_config import make_provider

            self._providers[name] = make_provider(name)
        return self._providers[name]

    def event(self, kind: str, message: str, attempt: int | None = None) -> None:
        log.info("%s %s: %s", self.job_id, kind, message)
        self.db.event(self.job_id, kind, message, attempt)

    def job(self) -> S.Job:
        job = self.db.get_job(self.job_id)
        assert job is not None
        return job

    def heartbeat(self) -> dict[str, Any] | None:
        try:
            hb = self.store.read_json(layout.heartbeat_key(self.job_id))
        except Exception:  # noqa: BLE001 - a torn or unreachable heartbeat is "no news"
            return None
        return hb if isinstance(hb, dict) else None

    def _sync_heartbeat(self, job: S.Job) -> dict[str, Any] | None:
        hb = self.heartbeat()
        if hb and hb.get("time") != job.heartbeat_at:
            self.db.update_job(
                self.job_id,
                step=hb.get("step"),
                total_steps=hb.get("total_steps") or job.total_steps,
                loss=hb.get("loss"),
                tokens_per_s=hb.get("tokens_per_s"),
                eta_s=hb.get("eta_s"),
                heartbeat_at=hb.get("time"),
            )
        return hb

    # -- machines

    def _status(self, att: dict[str, Any]) -> Machine | None:
        """The attempt's machine, or None when the provider no longer knows it.

        Polled within the provider's shared budget (cloudtune/run/polling.py): slowly while the
        machine runs and the trainer's heartbeat is fresh, faster otherwise; a 429 slows everyone.
        NotFound within the provider's `not_found_grace_s` of the launch (EC2's eventual
        consistency) is PENDING, not lost: relaunching then would put two trainers on one store."""
        if not att.get("machine_id"):
            return None
        from cloudtune.run.polling import PollBudget, StatusPoller

        name = att["provider"]
        provider = self.provider(name)
        pollers = self.__dict__.setdefault("_pollers", {})
        if name not in pollers:
            pollers[name] = StatusPoller(PollBudget(name))
        try:
            age: float | None = time.time() - float(self.job().heartbeat_at or "nan")
        except (TypeError, ValueError):
            age = None
        if age is not None and age != age:  # NaN: no heartbeat yet
            age = None
        try:
            return pollers[name].status(att["machine_id"], lambda: provider.status(att["machine_id"]),
                                        heartbeat_age_s=age)
        except NotFoundError:
            grace = float(getattr(provider, "not_found_grace_s", 0) or 0)
            if grace and time.time() - float(att.get("created_at") or 0) < grace:
                return Machine(provider=name, machine_id=att["machine_id"], name=att.get("name") or "",
                               state=MachineState.PENDING,
                               detail=f"not visible to the provider yet (within {grace:.0f}s of the launch)")
            return None

    def terminate_verified(self, provider_name: str, machine_id: str, timeout_s: float = TERMINATE_VERIFY_S) -> bool:
        """Terminate, then re-read the status until the provider says gone. Idempotent."""
        provider = self.provider(provider_name)
        deadline = time.time() + timeout_s
        delay = 0.5
        while True:
            try:
                provider.terminate(machine_id)
            except NotFoundError:
                return True
            except ProviderError as err:
                log.warning("terminate %s failed: %s", machine_id, err)
            try:
                m = provider.status(machine_id)
            except NotFoundError:
                return True
            except ProviderError as err:
                log.warning("status %s failed: %s", machine_id, err)
                m = None
            if m is not None and m.state is MachineState.TERMINATED:
                return True
            if time.time() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _end_attempt(self, att: dict[str, Any], reason: str, machine: Machine | None = None) -> None:
        """Terminate the attempt's machine (verified), close its ledger row and the attempt."""
        if att["state"] in (S.A_ENDED, S.A_LAUNCH_FAILED):
            return
        if not att.get("machine_id") and att["state"] == S.A_PROVISIONING:
            # An ambiguous create: the machine may exist under its name. Only a lookup proves it absent
            # (a ProviderError here propagates: the watchdog retries, the attempt stays owned).
            found = self.provider(att["provider"]).find_by_name(att["name"])
            if found is not None and found.state is not MachineState.TERMINATED:
                self.db.update_attempt(self.job_id, att["n"], machine_id=found.machine_id)
                att = {**att, "machine_id": found.machine_id}
        if att.get("machine_id"):
            gone = self.terminate_verified(att["provider"], att["machine_id"])
            if not gone:
                self.event("terminate_unverified",
                           f"machine {att['machine_id']} still not gone after {TERMINATE_VERIFY_S:.0f}s; "
                           f"will retry (run `cloudtune gc` if this persists)", att["n"])
                raise ProviderError(f"could not verify termination of {att['machine_id']}")
            self.event("terminated", f"machine {att['machine_id']} terminated and verified gone ({reason})", att["n"])
        now = time.time()
        ended_at, estimated = now, True
        final = None
        if att.get("machine_id"):
            try:
                final = self.provider(att["provider"]).status(att["machine_id"])
            except ProviderError:
                final = None
        for m in (machine, final):
            t = getattr(m, "ended_at", None)
            if t:
                # The provider's own end time: billing stops there, not when this watchdog noticed.
                ended_at, estimated = min(float(t), now), False
                break
        self.db.close_ledger(self.job_id, att["n"], ended_at, reason, estimated=estimated)
        self.db.update_attempt(
            self.job_id, att["n"], state=S.A_ENDED, end_reason=reason, ended_at=now,
            exit_code=machine.exit_code if machine else att.get("exit_code"),
        )

    def _finish(self, state: str, reason: str, att: dict[str, Any] | None, machine: Machine | None = None) -> None:
        if att is not None:
            self._end_attempt(att, reason, machine)
        self.db.set_state(self.job_id, state, reason)
        self.event(state, f"job {state}: {reason}")
        self._clean_local_work(done=state == S.DONE)

    def _clean_local_work(self, done: bool) -> None:
        """A local job's attempts worked in $CLOUDTUNE_HOME/work/<job>/ on this disk: once it ends, remove
        each attempt's dir whose every checkpoint (and final/, when done) is verified in the store."""
        if not any(a["provider"] == "local" for a in self.db.attempts(self.job_id)):
            return
        from cloudtune.home import home
        from cloudtune.trainer.checkpoint import CheckpointStore
        from cloudtune.trainer.disk import clean_attempt_dirs

        try:
            clean_attempt_dirs(home() / "work" / self.job_id, CheckpointStore(self.store, self.job_id), before=None,
                               done=done, remove_root=True)
        except Exception as err:  # noqa: BLE001 - a cleanup never changes how a job ended
            log.warning("%s: could not clean the local work dirs: %s", self.job_id, err)

    # -- launching

    def _launched_count(self) -> int:
        return sum(1 for a in self.db.attempts(self.job_id) if a["state"] != S.A_LAUNCH_FAILED)

    def launch_next(self, reason: str) -> None:
        """Launch a new attempt: the current option first, then the next ones on capacity/quota errors."""
        job = self.job()
        idx = job.option_index
        transient = 0
        while idx < len(self.options):
            option = self.options[idx]
            n = max((a["n"] for a in self.db.attempts(self.job_id)), default=0) + 1
            name = machine_name(self.job_id, n)
            pname = option.offer.provider
            self.db.insert_attempt(self.job_id, n, name, pname, option.offer.offer_id)
            self.db.set_state(self.job_id, S.PROVISIONING)
            self.db.update_job(self.job_id, option_index=idx)
            self.event("launch", f"launching attempt {n} ({name}) on {pname}/{option.offer.offer_id}"
                       f"{' spot' if option.spot else ''} at ${option.price_hr:.4f}/h: {reason}", n)
            req = build_request(job, self.spec, option, n, spent_usd=job_cost_usd(self.db, self.job_id))
            try:
                machine = self.provider(pname).launch(req)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the create's outcome unknown
                err = exc if isinstance(exc, ProviderError) else TransientError(f"{type(exc).__name__}: {exc}")
                adopted = self._after_failed_create(req, err, n)
                if adopted is AMBIGUOUS:
                    # The create may have made a machine and the lookup cannot say: the attempt keeps
                    # owning the name, and no successor is launched until a lookup proves it absent.
                    self.db.update_attempt(self.job_id, n, end_reason=f"create ambiguous: {err}")
                    self.event("create_ambiguous", f"create of {req.name} failed ({type(err).__name__}: {err}) and "
                               f"the lookup failed too; attempt {n} keeps the name, looking again each tick", n)
                    return
                if adopted is not None:
                    self._record_launch(n, option, adopted)
                    return
                self.db.update_attempt(self.job_id, n, state=S.A_LAUNCH_FAILED, end_reason=str(err),
                                       ended_at=time.time())
                if isinstance(err, (CapacityError, QuotaError)):
                    self.event("launch_failed", f"{type(err).__name__} on {pname}/{option.offer.offer_id}: {err}; "
                               f"trying the next option", n)
                    idx += 1
                    continue
                if err.retryable and transient < LAUNCH_RETRIES:
                    transient += 1
                    wait = getattr(err, "retry_after_s", None) or 2.0 * transient
                    self.event("launch_retry", f"{type(err).__name__}: {err}; retrying in {wait:.0f}s", n)
                    time.sleep(wait)
                    continue
                kind = "credentials" if isinstance(err, AuthError) else "request"
                if isinstance(err, (AuthError, InvalidRequestError)):
                    self._finish(S.FAILED, f"launch on {pname} failed ({kind}): {err}", None)
                    return
                self.event("launch_failed", f"{type(err).__name__} on {pname}: {err}; trying the next option", n)
                idx += 1
                continue
            self._record_launch(n, option, machine)
            return
        self._finish(S.FAILED, "no planned option could be launched (capacity, quota or errors on every offer)", None)

    def _after_failed_create(self, req: LaunchRequest, err: Exception, n: int) -> Any:
        """A failed create may still have made a billing machine: find it by name, adopt or terminate.

        Returns the adopted Machine, None when the lookup proves no machine is left, or AMBIGUOUS
        when the lookup itself failed (then nothing is proven and the attempt keeps the name).
        """
        try:
            found = self.provider(req.offer.provider).find_by_name(req.name)
        except ProviderError as lookup_err:
            self.event("lookup_failed", f"could not look up {req.name} after a failed create: {lookup_err}", n)
            return AMBIGUOUS
        if found is None or found.state is MachineState.TERMINATED:
            return None
        if isinstance(err, (TransientError, RateLimitedError)) and found.state.is_alive:
            self.event("adopted", f"create of {req.name} reported {type(err).__name__} but the machine "
                       f"{found.machine_id} exists ({found.state.value}): adopting it", n)
            return found
        self.event("orphan_terminated", f"create of {req.name} failed ({err}) but left machine "
                   f"{found.machine_id}: terminating it", n)
        self.terminate_verified(req.offer.provider, found.machine_id)
        return None

    def _resolve_ambiguous(self, job: S.Job, att: dict[str, Any]) -> bool:
        """An attempt whose create was ambiguous: look it up again; adopt, or prove it absent and go on.

        Until a lookup answers, the attempt owns its name (gc counts it as owned) and no successor is
        launched: two machines training on one store, one of them unseen, is the leak to avoid.
        """
        try:
            found = self.provider(att["provider"]).find_by_name(att["name"])
        except ProviderError as err:
            self.event("lookup_failed", f"still cannot look up {att['name']}: {err}; not launching a successor "
                       f"while it may exist", att["n"])
            return True
        option = self.options[min(job.option_index, len(self.options) - 1)] if self.options else None
        if found is not None and found.state.is_alive and option is not None:
            self.event("adopted", f"the ambiguous create of {att['name']} made machine {found.machine_id} "
                       f"({found.state.value}): adopting it", att["n"])
            self._record_launch(att["n"], option, found)
            return True
        if found is not None and found.state is not MachineState.TERMINATED:
            self.event("orphan_terminated", f"the ambiguous create of {att['name']} left machine "
                       f"{found.machine_id} ({found.state.value}): terminating it", att["n"])
            if not self.terminate_verified(att["provider"], found.machine_id):
                return True
        self.db.update_attempt(self.job_id, att["n"], state=S.A_LAUNCH_FAILED, ended_at=time.time(),
                               end_reason=f"{att.get('end_reason') or 'create ambiguous'}; lookup: no machine")
        self.event("launch_failed", f"lookup proves {att['name']} absent; launching a successor", att["n"])
        self.launch_next("the previous create made no machine")
        return True

    def _record_launch(self, n: int, option: Option, machine: Machine) -> None:

        now = time.time()
        price = machine.price_hr if machine.price_hr is not None else option.price_hr
        self.db.update_attempt(self.job_id, n, machine_id=machine.machine_id, state=S.A_RUNNING)
        self.db.open_ledger(
            self.job_id, n,
            provider=option.offer.provider, offer_id=option.offer.offer_id, gpu=option.offer.gpu,
            gpu_count=option.offer.gpu_count, region=machine.region or option.offer.region,
            spot=int(option.spot), price_hr=price, on_demand_price_hr=option.offer.price_hr,
            billing_granularity_s=option.offer.billing_granularity_s, price_as_of=option.offer.as_of,
            started_at=now,
        )
        self.db.set_state(self.job_id, S.RUNNING if machine.state is MachineState.RUNNING else S.PROVISIONING)
        self.event("launched", f"attempt {n} is machine {machine.machine_id} ({machine.state.value}) "
                   f"at ${price:.4f}/h", n)

    # -- recovery and stopping

    def _recover(self, att: dict[str, Any], reason: str, machine: Machine | None) -> None:
        self._end_attempt(att, reason, machine)
        restarts = self._launched_count() - 1
        limit = self.spec.limits.max_restarts
        if restarts >= limit:
            self._finish(S.FAILED, f"gave up after {restarts} restarts (limits.max_restarts={limit}); last: {reason}",
                         None)
            return
        self.db.set_state(self.job_id, S.RECOVERING, reason)
        self.event("recovering", f"attempt {att['n']} ended ({reason}); relaunching, restart {restarts + 1}/{limit}",
                   att["n"])
        self.launch_next(f"resume after: {reason}")

    def _begin_stop(self, att: dict[str, Any] | None, reason: str, machine: Machine | None) -> None:
        self.db.update_job(self.job_id, target_state=S.STOPPED, stop_deadline=time.time() + STOP_GRACE_S)
        self.db.set_state(self.job_id, S.STOPPING, reason)
        if machine is not None and machine.state.is_alive:
            self.store.put_json(layout.control_key(self.job_id), {"action": "stop", "reason": reason,
                                                                 "time": time.time()})
            self.event("stopping", f"{reason}: asked the trainer to checkpoint and stop (control.json), "
                       f"terminating in at most {STOP_GRACE_S:.0f}s", att["n"] if att else None)
        else:
            self._finish(S.STOPPED, reason, att, machine)

    def _limit_reason(self, job: S.Job) -> str | None:
        lim = self.spec.limits
        if lim.max_cost_usd is not None:
            spent = job_cost_usd(self.db, self.job_id)
            if spent >= lim.max_cost_usd:
                return f"budget reached: ${spent:.4f} >= limits.max_cost_usd ${lim.max_cost_usd:.2f}"
        if lim.max_hours is not None:
            hours = (time.time() - job.created_at) / 3600.0
            if hours >= lim.max_hours:
                return f"deadline reached: {hours:.2f} h >= limits.max_hours {lim.max_hours:g}"
        return None

    def _stale(self, att: dict[str, Any], hb: dict[str, Any] | None) -> str | None:
        timeout = self.spec.limits.heartbeat_timeout_s
        ledger = {r["attempt"]: r for r in self.db.ledger(self.job_id)}
        started = ledger.get(att["n"], {}).get("started_at") or att["created_at"]
        if hb and int(hb.get("attempt", -1)) == att["n"]:
            last = float(hb.get("time", started))
            what = "last heartbeat"
        else:
            last = started
            what = "launch, and no heartbeat since"
        age = time.time() - last
        if age > timeout:
            return f"heartbeat stale: {age:.0f}s since {what} (limits.heartbeat_timeout_s={timeout:g})"
        return None

    # -- the tick

    def tick(self) -> bool:
        """Advance the job by one decision. Returns False when there is nothing left to do."""
        job = self.job()
        hb = self._sync_heartbeat(job)
        att = self.db.attempt(self.job_id, job.current_attempt) if job.current_attempt else None
        if job.is_terminal:
            if att is not None and att["state"] in (S.A_RUNNING, S.A_PROVISIONING):
                self._end_attempt(att, att.get("end_reason") or f"job {job.state}")
            return False
        if job.state == S.PENDING or att is None:
            if job.stop_requested:
                self._finish(S.STOPPED, f"stopped before launch: {job.stop_requested}", None)
                return False
            self.launch_next("start")
            return True

        if self.store.exists(layout.done_key(self.job_id)):
            self._finish(S.DONE, "the trainer wrote DONE.json; final adapter in the store", att, self._status(att))
            return False
        failed = self.store.read_json(layout.failed_key(self.job_id)) if self.store.exists(
            layout.failed_key(self.job_id)) else None
        if failed is not None:
            why = failed.get("reason") or failed.get("error") or "see `cloudtune logs`"
            self._finish(S.FAILED, f"the trainer wrote FAILED.json: {why}", att, self._status(att))
            return False

        if att["state"] == S.A_LAUNCH_FAILED:
            self.launch_next("previous launch failed")
            return True
        if att["state"] == S.A_ENDED and (job.reason or "").startswith(STORE_WAIT):
            return self._store_wait()
        if att["state"] == S.A_PROVISIONING and not att.get("machine_id"):
            return self._resolve_ambiguous(job, att)

        try:
            machine = self._status(att)
        except ProviderError as err:
            self.event("status_error", f"could not read machine state: {err}", att["n"])
            return True
        alive = machine is not None and machine.state.is_alive

        if job.state == S.STOPPING:
            if not alive or time.time() >= (job.stop_deadline or 0):
                code = machine.exit_code if machine else None
                how = "trainer checkpointed and stopped" if code == C.EXIT_STOPPED else "grace period over"
                self._finish(job.target_state or S.STOPPED, f"{job.reason} ({how})", att, machine)
                return False
            return True

        if job.stop_requested:
            self._begin_stop(att, f"stop requested: {job.stop_requested}", machine)
            return True
        limit = self._limit_reason(job)
        if limit:
            self._begin_stop(att, limit, machine)
            return True

        if alive:
            assert machine is not None
            if machine.state is MachineState.RUNNING and job.state != S.RUNNING:
                self.db.set_state(self.job_id, S.RUNNING)
                self.event("running", f"machine {machine.machine_id} is running", att["n"])
            stale = self._stale(att, hb)
            if stale:
                self.event("stale", stale, att["n"])
                self._recover(att, stale, machine)
            return True

        if machine is not None and machine.state is MachineState.EXITED:
            code = machine.exit_code
            if code == C.EXIT_DONE:
                # DONE.json may land a moment after the exit on eventually consistent stores.
                if self._wait_marker(layout.done_key(self.job_id)):
                    self._finish(S.DONE, "the trainer wrote DONE.json; final adapter in the store", att, machine)
                else:
                    self._finish(S.FAILED, "the trainer exited 0 without writing DONE.json", att, machine)
                return False
            if code in (C.EXIT_FAILED, C.EXIT_BAD_INPUT):
                self._finish(S.FAILED, f"the trainer exited with {code} ({'bad input' if code == 2 else 'error'}); "
                             f"see `cloudtune logs {self.job_id}`", att, machine)
                return False
            if code == C.EXIT_STOPPED:
                self._finish(S.STOPPED, "the trainer stopped on a controller request", att, machine)
                return False
            if code == C.EXIT_STORE_UNAVAILABLE:  # resumable, but a relaunch now would meet the same store
                self._end_attempt(att, "the trainer could not write the store (exit 74)", machine)
                self.db.set_state(self.job_id, S.RECOVERING, f"{STORE_WAIT}: the trainer of attempt {att['n']} could "
                                  f"not write it (full, read-only or unreachable; `cloudtune logs {self.job_id}` "
                                  f"says which); relaunching once it takes writes again")
                self.event("store_wait", self.job().reason, att["n"])
                return True
            if code == C.EXIT_DISK_FULL:
                return self._disk_full(att, machine)
            reason = ("the trainer checkpointed on a signal and exited (75)" if code == C.EXIT_PREEMPTED
                      else f"the trainer exited with {code}")
            self._recover(att, reason, machine)
            return True
        if machine is not None and machine.state is MachineState.PREEMPTED:
            self._recover(att, f"preempted: {machine.detail or 'spot interruption'}", machine)
            return True
        detail = machine.detail if machine is not None else "the provider no longer knows the machine"
        self._recover(att, f"machine lost ({machine.state.value if machine else 'not found'}): {detail}", machine)
        return True

    def _disk_full(self, att: dict[str, Any], machine: Machine | None) -> bool:
        """Exit 73: the machine's own disk filled up. A new machine has a fresh disk, so relaunch; but two
        attempts in a row full at the same step will not get further: stop (resumable) with the fix."""
        hb = self.heartbeat() or {}
        mine = int(hb.get("attempt", -1)) == att["n"] and hb.get("phase") == "disk_full"
        step = hb.get("step") if mine else None
        why = str(hb.get("disk_full") or "") if mine else ""
        reason = f"{DISK_FULL} at step {step if step is not None else '?'}: {why or 'the trainer exited 73'}"
        prev = [a for a in self.db.attempts(self.job_id) if a["n"] < att["n"] and a["state"] == S.A_ENDED]
        again = bool(prev) and (prev[-1].get("end_reason") or "").startswith(f"{DISK_FULL} at step {step}:")
        if again and step is not None:
            self._finish(S.STOPPED, f"{why or reason} (twice in a row at step {step}: a relaunch would fill its "
                         f"disk again; the last committed checkpoint stays in the store)", att, machine)
            return False
        self._recover(att, reason, machine)
        return True

    def _store_wait(self) -> bool:
        """Nothing runs (the machine is gone) until a probe write to the store succeeds; then relaunch.
        Limits still apply meanwhile (a stop, max_hours); no restart is spent on waiting."""
        job = self.job()
        if job.stop_requested:
            self._finish(S.STOPPED, f"stopped while waiting for the store: {job.stop_requested}", None)
            return False
        limit = self._limit_reason(job)
        if limit:
            self._finish(S.STOPPED, f"{limit} (while waiting for the store)", None)
            return False
        probe = f"{self.job_id}/controller/probe"
        try:
            self.store.put_bytes(probe, b"%d" % int(time.time()))
            self.store.delete(probe)
        except Exception as err:  # noqa: BLE001 - still unwritable: keep waiting
            log.info("%s: store still unwritable: %s", self.job_id, err)
            return True
        self.event("store_back", "the store takes writes again; relaunching from the last committed checkpoint")
        self.launch_next("resume: the store takes writes again")
        return True

    def _wait_marker(self, key: str, timeout_s: float = 10.0) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.store.exists(key):
                return True
            time.sleep(0.5)
        return self.store.exists(key)

