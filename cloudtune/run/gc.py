"""Garbage collection: find machines that carry our name or tags but that no live job owns.

Why: every other teardown layer can fail (a crash between create and record, a watchdog killed with
its laptop, an API error on terminate). gc asks every provider that has credentials for the
machines carrying `cloudtune-` names or `cloudtune:job` tags, and compares them with the state db.
gc acts only on machines whose job it can prove dead: the job is in this state.db and ended (or the
machine is not its current attempt), or the job's store says it ended (DONE.json/FAILED.json in a
store this installation uses). A machine whose job id this db does not know is *foreign*: a
colleague's live job on a shared key, or a job of a lost db. It is listed, and terminated only with
`--foreign`, never by default: killing someone's live job is worse than a leak gc reports.

Each provider is scanned in its own thread with a deadline (CLOUDTUNE_GC_TIMEOUT_S, default 30 s):
one unreachable API is reported as skipped and the sweep goes on for the others.

Providers that keep a machine's secrets outside the machine (AWS: an SSM SecureString parameter per
machine) also list the secrets whose machine is gone (`orphan_secrets`): those do not bill, but
they are live credentials, so `gc --yes` deletes them too.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from cloudtune.providers.base import Machine, MachineState, ProviderError, RateLimitedError
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
    foreign: list[Orphan] = field(default_factory=list)  # job unknown here and not proven ended


def provider_timeout_s() -> float:
    return float(os.environ.get("CLOUDTUNE_GC_TIMEOUT_S", "30"))


def _ended_in_a_store(db: S.StateDB, job_ids: set[str]) -> dict[str, str]:
    """job id -> which store says it ended, for job ids this db does not know (DONE/FAILED markers)."""
    from cloudtune.home import default_store_url
    from cloudtune.store import layout, open_store

    if not job_ids:
        return {}
    stores = {default_store_url(): None}
    for j in db.list_jobs():
        stores.setdefault(j.store_url, j.store_endpoint)
    found: dict[str, str] = {}
    for url, endpoint in stores.items():
        try:
            store = open_store(url, endpoint_url=endpoint)
            for jid in job_ids - set(found):
                if store.exists(layout.done_key(jid)) or store.exists(layout.failed_key(jid)):
                    found[jid] = url
        except Exception:  # noqa: BLE001 - an unreadable store proves nothing; the machine stays foreign
            continue
    return found


def _bounded(fn, timeout_s: float) -> tuple[bool, Any, BaseException | None]:
    """Run fn in a daemon thread; (finished, result, error). A hung API cannot hold the sweep."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller
            box["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


def _providers_to_scan(only: list[str] | None) -> list[str]:
    from cloudtune.providers import KNOWN_PROVIDERS

    return list(only) if only else list(KNOWN_PROVIDERS)


def scan(db: S.StateDB, only: list[str] | None = None) -> Scan:
    from cloudtune.errors import UserError
    from cloudtune.run.providers_config import make_provider

    live = {(a["job_id"], a["n"]): a for a in db.live_attempts()}
    names = _providers_to_scan(only)
    timeout = provider_timeout_s()
    results: dict[str, tuple[bool, Any, BaseException | None]] = {}

    def listing(name: str):
        from cloudtune.run.polling import PollBudget

        provider = make_provider(name)
        PollBudget(name).wait(max_wait_s=timeout / 2)  # the provider's request budget, shared with watchdogs
        return provider, provider.list_machines()

    # All providers at once, each with its own deadline: the sweep takes the slowest answer, not the sum.
    threads = {n: threading.Thread(target=lambda n=n: results.__setitem__(n, _bounded(lambda: listing(n), timeout)),
                                   daemon=True) for n in names}
    for t in threads.values():
        t.start()
    for t in threads.values():
        t.join(timeout + 5)

    orphans: list[Orphan] = []
    foreign: list[Orphan] = []
    owned: list[Machine] = []
    skipped: dict[str, str] = {}
    secrets: list[OrphanSecret] = []
    scanned: list[tuple[str, Any, list[Machine]]] = []
    for name in names:
        finished, result, err = results.get(name, (False, None, None))
        if not finished:
            skipped[name] = f"no answer within {timeout:g}s (unreachable?); not scanned"
            continue
        if isinstance(err, UserError):
            skipped[name] = str(err)
            continue
        if isinstance(err, ProviderError):
            skipped[name] = f"{type(err).__name__}: {err}"
            continue
        if err is not None:
            skipped[name] = f"{type(err).__name__}: {err}"
            continue
        scanned.append((name, result[0], result[1]))

    unknown = {m.job_id for _, _, ms in scanned for m in ms
               if m.job_id and m.state is not MachineState.TERMINATED and db.get_job(m.job_id) is None}
    ended_elsewhere = _ended_in_a_store(db, unknown)
    for name, provider, machines in scanned:
        for m in machines:
            if m.state is MachineState.TERMINATED:
                continue
            job = db.get_job(m.job_id) if m.job_id else None
            att = live.get((m.job_id, m.attempt))
            if job is None:
                if m.job_id and m.job_id in ended_elsewhere:
                    orphans.append(Orphan(m, f"job {m.job_id} is not in this state db, but its store "
                                             f"{ended_elsewhere[m.job_id]} says it ended"))
                else:
                    foreign.append(Orphan(m, f"job {m.job_id or '?'} is not in this state db (another installation's "
                                             f"job, or a lost db): not proven dead; `gc --foreign --yes` ends it"))
            elif job.is_terminal:
                orphans.append(Orphan(m, f"job {job.id} is {job.state}"))
            elif att is None or (att.get("machine_id") and att["machine_id"] != m.machine_id):
                orphans.append(Orphan(m, f"not the current machine of job {job.id} (attempt {m.attempt})"))
            else:
                owned.append(m)
        lister = getattr(provider, "orphan_secrets", None)
        if lister is not None:
            finished, found, err = _bounded(lister, timeout)
            if not finished:
                skipped[f"{name} secrets"] = f"no answer within {timeout:g}s; not scanned"
                continue
            if err is not None:
                if not isinstance(err, (UserError, ProviderError)):
                    raise err
                skipped[f"{name} secrets"] = f"{type(err).__name__}: {err}"
                continue
            secrets.extend(OrphanSecret(provider=name, region=s.region, name=s.name, why=s.why, handle=s)
                           for s in found)
    return Scan(orphans=orphans, owned=owned, skipped=skipped, orphan_secrets=secrets, foreign=foreign)


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
        from cloudtune.run.polling import PollBudget

        budget = PollBudget(o.machine.provider)
        while not gone:
            budget.wait(cost=2.0, max_wait_s=max(0.0, deadline - time.time()))  # terminate + status
            try:
                provider.terminate(o.machine.machine_id)
                gone = provider.status(o.machine.machine_id).state is MachineState.TERMINATED
            except NotFoundError:
                gone = True
            except RateLimitedError as err:
                budget.penalize(err.retry_after_s)  # every process backs off, watchdogs included
            except ProviderError:
                pass
            if gone or time.time() >= deadline:
                break
            time.sleep(1.0)
        results.append((o, gone))
    return results
