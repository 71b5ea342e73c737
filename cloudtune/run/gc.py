"""Garbage collection: find machines that carry our name or tags but that no live job owns.

Why: every other teardown layer can fail (a crash between create and record, a watchdog killed with
its laptop, an API error on terminate). gc asks every provider that has credentials for the
machines carrying `cloudtune-` names or `cloudtune:job` tags, and compares them with the state db:
a machine is owned only when its job is unfinished and the machine is that job's current,
recorded attempt. Everything else is an orphan and still bills.

Providers that keep a machine's secrets outside the machine (AWS: an SSM SecureString parameter per
machine) also list the secrets whose machine is gone (`orphan_secrets`): those do not bill, but
they are live credentials, so `gc --yes` deletes them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudtune.providers.base import Machine, MachineState, ProviderError
from cloudtune.run import state as S


@dataclass
class Orphan:
    machine: Machine
    why: str


@dataclass
class OrphanSecret:
    """A provider-side copy of a machine's secrets whose machine no longer exists."""

    provider: str
    region: str
    name: str  # e.g. the SSM parameter name
    why: str
    handle: Any = None  # the provider's own record, passed back to its delete_secret


@dataclass
class Scan:
    orphans: list[Orphan]
    owned: list[Machine]
    skipped: dict[str, str]  # provider -> why it was not scanned ("<provider> secrets" for the secrets sweep)
    orphan_secrets: list[OrphanSecret] = field(default_factory=list)


def _providers_to_scan(only: list[str] | None) -> list[str]:
    from cloudtune.providers import KNOWN_PROVIDERS

    return list(only) if only else list(KNOWN_PROVIDERS)


def scan(db: S.StateDB, only: list[str] | None = None) -> Scan:
    from cloudtune.errors import UserError
    from cloudtune.run.providers_config import make_provider

    live = {(a["job_id"], a["n"]): a for a in db.live_attempts()}
    orphans: list[Orphan] = []
    owned: list[Machine] = []
    skipped: dict[str, str] = {}
    secrets: list[OrphanSecret] = []
    for name in _providers_to_scan(only):
        try:
            provider = make_provider(name)
            machines = provider.list_machines()
        except UserError as err:
            skipped[name] = str(err)
            continue
        except ProviderError as err:
            skipped[name] = f"{type(err).__name__}: {err}"
            continue
        for m in machines:
            if m.state is MachineState.TERMINATED:
                continue
            job = db.get_job(m.job_id) if m.job_id else None
            att = live.get((m.job_id, m.attempt))
            if job is None:
                orphans.append(Orphan(m, "no job with this id in the state db"))
            elif job.is_terminal:
                orphans.append(Orphan(m, f"job {job.id} is {job.state}"))
            elif att is None or (att.get("machine_id") and att["machine_id"] != m.machine_id):
                orphans.append(Orphan(m, f"not the current machine of job {job.id} (attempt {m.attempt})"))
            else:
                owned.append(m)
        lister = getattr(provider, "orphan_secrets", None)
        if lister is not None:
            try:
                found = lister()
            except (UserError, ProviderError) as err:
                skipped[f"{name} secrets"] = f"{type(err).__name__}: {err}"
                continue
            secrets.extend(OrphanSecret(provider=name, region=s.region, name=s.name, why=s.why, handle=s)
                           for s in found)
    return Scan(orphans=orphans, owned=owned, skipped=skipped, orphan_secrets=secrets)


def delete_orphan_secrets(secrets: list[OrphanSecret]) -> list[tuple[OrphanSecret, str | None]]:
    """Delete each orphaned secret. Returns (secret, None) when deleted or already gone, else
    (secret, the error) so the CLI can say which one is left and why."""
    from cloudtune.run.providers_config import make_provider

    results: list[tuple[OrphanSecret, str | None]] = []
    providers: dict[str, Any] = {}
    for s in secrets:
        try:
            if s.provider not in providers:
                providers[s.provider] = make_provider(s.provider)
            providers[s.provider].delete_secret(s.handle)
            results.append((s, None))
        except ProviderError as err:
            results.append((s, f"{type(err).__name__}: {err}"))
    return results


def terminate_orphans(orphans: list[Orphan], timeout_s: float = 120.0) -> list[tuple[Orphan, bool]]:
    """Terminate each orphan and re-read its status until gone. Returns (orphan, verified_gone)."""
    import time

    from cloudtune.providers.base import NotFoundError
    from cloudtune.run.providers_config import make_provider

    results = []
    for o in orphans:
        provider = make_provider(o.machine.provider)
        deadline = time.time() + timeout_s
        gone = False
        while not gone:
            try:
                provider.terminate(o.machine.machine_id)
                gone = provider.status(o.machine.machine_id).state is MachineState.TERMINATED
            except NotFoundError:
                gone = True
            except ProviderError:
                pass
            if gone or time.time() >= deadline:
                break
            time.sleep(1.0)
        results.append((o, gone))
    return results
