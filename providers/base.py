"""The provider protocol: the few things every GPU cloud adapter does, and nothing more.

Why so small: retries across offers, preemption recovery, budgets and teardown live once in the
orchestrator (cloudtune.run). An adapter only translates these calls into one provider's API and
its errors into the typed errors below.

Two rules every adapter and the orchestrator keep:
1. A machine gets its deterministic name and tags (job id + attempt, see `machine_name` and
   `machine_tags`) *before* the create call. After a failed or timed-out create, the orchestrator
   calls `find_by_name` and adopts or terminates what it finds: a 5xx can still leave a machine
   that bills.
2. Teardown always terminates, never stops (a stopped machine still bills its disk), and
   `NotFoundError` on terminate counts as done.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

TAG_JOB = "cloudtune:job"
TAG_ATTEMPT = "cloudtune:attempt"
NAME_PREFIX = "cloudtune-"


def machine_name(job_id: str, attempt: int) -> str:
    """The deterministic name of attempt N of a job: what `find_by_name` searches for."""
    return f"{NAME_PREFIX}{job_id}-{attempt}"


def machine_tags(job_id: str, attempt: int) -> dict[str, str]:
    return {TAG_JOB: job_id, TAG_ATTEMPT: str(attempt)}


def parse_machine_name(name: str) -> tuple[str, int] | None:
    """(job_id, attempt) from a name made by `machine_name`, or None for machines that are not ours."""
    if not name.startswith(NAME_PREFIX):
        return None
    job, _, attempt = name[len(NAME_PREFIX):].rpartition("-")
    if not job or not attempt.isdigit():
        return None
    return job, int(attempt)


# ---------------------------------------------------------------- errors


class ProviderError(Exception):
    """Base of every error an adapter raises. Messages must never contain secrets."""

    retryable: bool = False

    def __init__(self, message: str, *, provider: str = "") -> None:
        super().__init__(message)
        self.provider = provider


class AuthError(ProviderError):
    """Missing or rejected credentials. Not retryable; the message says which variable to set."""


class CapacityError(ProviderError):
    """No machine of this kind is available now: fail over to the next zone/offer."""


class QuotaError(ProviderError):
    """An account limit (vCPU quota, spend limit, balance). Fail over to another provider."""


class RateLimitedError(ProviderError):
    retryable = True

    def __init__(self, message: str, *, provider: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message, provider=provider)
        self.retry_after_s = retry_after_s


class TransientError(ProviderError):
    """A 5xx, timeout or connection error: the state of the request is unknown; retry or look up."""

    retryable = True


class NotFoundError(ProviderError):
    """The machine (or offer) does not exist. On terminate this means done."""


class InvalidRequestError(ProviderError):
    """The provider rejected the request as malformed (a bug or a bad option, not capacity)."""


# ---------------------------------------------------------------- data


class MachineState(str, enum.Enum):  # noqa: UP042 - keep str() as today; code uses .value
    PENDING = "pending"  # requested, booting, pulling the image
    RUNNING = "running"
    PREEMPTED = "preempted"  # taken back by the provider (spot interruption, outbid, host lost)
    STOPPED = "stopped"  # stopped but still exists (bills disk): must be terminated
    EXITED = "exited"  # the workload ended by itself; the machine may still exist
    TERMINATING = "terminating"
    TERMINATED = "terminated"  # gone: no longer bills
    FAILED = "failed"  # the provider reports an error state
    UNKNOWN = "unknown"

    @property
    def is_gone(self) -> bool:
        return self is MachineState.TERMINATED

    @property
    def is_alive(self) -> bool:
        return self in (MachineState.PENDING, MachineState.RUNNING)


@dataclass(frozen=True)
class Offer:
    """One way to rent GPUs: a provider's instance type / GPU type in a region, at a price."""

    provider: str
    offer_id: str
    gpu: str
    gpu_count: int
    vram_gib_per_gpu: float
    region: str
    price_hr: float | None  # on-demand $/h for the whole offer (None: no on-demand price)
    spot_price_hr: float | None = None  # interruptible $/h for the whole offer (None: no spot)
    as_of: str = "unknown"
    billing_granularity_s: int = 1
    vcpus: int | None = None
    ram_gb: float | None = None
    fresh: bool = False  # True when its price came from the provider's live API (`catalog refresh`)
    source: str = ""  # where the price came from, for `catalog show` (cloudtune.catalog.offer_source)


@dataclass
class LaunchRequest:
    """Everything an adapter needs to start one attempt of a job on one offer."""

    job_id: str
    attempt: int
    offer: Offer
    spot: bool
    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)  # passed to the machine, never printed
    disk_gb: int = 100
    max_lifetime_s: float | None = None  # hard cap enforced on the machine itself
    workdir: str | None = None
    nodes: int = 1  # machines of `offer` in this attempt (> 1 only through the skypilot adapter)

    @property
    def name(self) -> str:
        return machine_name(self.job_id, self.attempt)

    @property
    def tags(self) -> dict[str, str]:
        return machine_tags(self.job_id, self.attempt)

    def all_env(self) -> dict[str, str]:
        return {**self.env, **self.secret_env}

    def redacted_env(self) -> dict[str, str]:
        return {**self.env, **{k: "***" for k in self.secret_env}}


@dataclass
class Machine:
    provider: str
    machine_id: str
    name: str
    state: MachineState
    job_id: str | None = None
    attempt: int | None = None
    region: str | None = None
    price_hr: float | None = None
    spot: bool | None = None
    detail: str = ""  # provider's own status words, for events and errors
    exit_code: int | None = None  # when the workload's exit code is known (local, modal)
    ended_at: float | None = None  # when the provider says the machine stopped (billing ends), if it says


@dataclass(frozen=True)
class SelfTerminate:
    """How the machine ends itself when the trainer exits (teardown layer (a) of the design).

    `command` runs inside the machine after the trainer; `env` names the variables it needs,
    which the adapter injects (e.g. a pod-scoped key) at launch.
    """

    command: list[str]
    env: tuple[str, ...] = ()
    note: str = ""


# ---------------------------------------------------------------- protocol


@runtime_checkable
class Provider(Protocol):
    name: str

    def offers(self) -> list[Offer]:
        """Offers this provider can launch now (live where the API allows, else the catalog)."""
        ...

    def launch(self, req: LaunchRequest) -> Machine:
        """Create the machine named `req.name` with `req.tags`. Raise typed errors."""
        ...

    def status(self, machine_id: str) -> Machine:
        """Current state; raise NotFoundError when the provider no longer knows the machine."""
        ...

    def terminate(self, machine_id: str) -> None:
        """Idempotent: NotFoundError inside counts as done. Does not wait; the caller verifies."""
        ...

    def list_machines(self) -> list[Machine]:
        """Every machine of this account that carries our name prefix or tags (for gc)."""
        ...

    def find_by_name(self, name: str) -> Machine | None:
        """The machine created with this deterministic name, if any (for adopt-or-terminate)."""
        ...

    def self_terminate(self) -> SelfTerminate:
        ...

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        """The requests `launch` would send, with secrets redacted (for --dry-run)."""
        ...
