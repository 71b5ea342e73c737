"""A job's controller state in its store prefix; the local state.db is an index of it.

Why: whichever controller holds a job's lease (cloudtune.run.lease) must be able to act from the
store alone: the laptop that created the job may be closed. So the holder writes everything a
controller needs (the job row with its spec and plan, attempts, the cost ledger, decisions) to
`<job>/controller/state.json` after each tick that changed it, and a controller taking over
imports that snapshot into its own state.db before its first tick.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cloudtune.run import state as S

SNAPSHOT_VERSION = 1
EVENTS_KEPT = 500  # the newest decisions travel; older ones stay in the writer's own db
TABLES = ("jobs", "attempts", "ledger", "events")


def state_key(job_id: str) -> str:
    return f"{job_id}/controller/state.json"


def registry_key(job_id: str) -> str:
    """Jobs handed to a serverless controller are listed here (one object each)."""
    return f"_controller/jobs/{job_id}.json"


REGISTRY_PREFIX = "_controller/jobs/"


def export_job(db: S.StateDB, job_id: str) -> dict[str, Any]:
    conn = db.conn
    job = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if job is None:
        raise KeyError(job_id)
    events = conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY id DESC LIMIT ?",
                          (job_id, EVENTS_KEPT)).fetchall()
    return {
        "version": SNAPSHOT_VERSION,
        "job": dict(job),
        "attempts": [dict(r) for r in conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))],
        "ledger": [dict(r) for r in conn.execute("SELECT * FROM ledger WHERE job_id = ? ORDER BY attempt",
                                                 (job_id,))],
        "events": [dict(r) for r in reversed(events)],
    }


def digest(snapshot: dict[str, Any]) -> str:
    """What changed, ignoring nothing: the holder writes only when this differs from its last write."""
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True, default=str).encode()).hexdigest()


def _columns(conn, table: str) -> set[str]:
    return {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}


def import_job(db: S.StateDB, snapshot: dict[str, Any]) -> str:
    """Replace this db's rows of the job with the snapshot's. Returns the job id.

    Events are matched on (time, kind, message) rather than their local ids, which differ between
    databases; columns this db does not know (a newer writer) are dropped, missing ones default."""
    if snapshot.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"controller state version {snapshot.get('version')!r} is not {SNAPSHOT_VERSION}")
    job = snapshot["job"]
    job_id = job["id"]
    with db.tx() as c:
        for table, rows, key in (("jobs", [job], "id"), ("attempts", snapshot["attempts"], "job_id"),
                                 ("ledger", snapshot["ledger"], "job_id")):
            cols = _columns(c, table)
            c.execute(f"DELETE FROM {table} WHERE {key} = ?", (job_id,))
            for row in rows:
                keep = {k: v for k, v in row.items() if k in cols}
                c.execute(f"INSERT INTO {table} ({', '.join(keep)}) VALUES ({', '.join('?' for _ in keep)})",
                          tuple(keep.values()))
        have = {(r["time"], r["kind"], r["message"])
                for r in c.execute("SELECT time, kind, message FROM events WHERE job_id = ?", (job_id,))}
        for ev in snapshot["events"]:
            if (ev["time"], ev["kind"], ev["message"]) not in have:
                c.execute("INSERT INTO events (job_id, time, attempt, kind, message) VALUES (?, ?, ?, ?, ?)",
                          (job_id, ev["time"], ev.get("attempt"), ev["kind"], ev["message"]))
    return job_id


class StateMirror:
    """Writes a job's snapshot to its store after the ticks that changed it.

    A decision (state, attempts, ledger, a new event) is written at once; progress alone (step,
    loss from the heartbeat) at most every `progress_every_s`, so a healthy job costs a PUT every
    half minute, not every tick."""

    def __init__(self, db: S.StateDB, store: Any, job_id: str, progress_every_s: float = 30.0) -> None:
        self.db, self.store, self.job_id = db, store, job_id
        self.progress_every_s = progress_every_s
        self._last: str | None = None
        self._last_decisions: str | None = None
        self._last_at = 0.0

    def push(self, force: bool = False) -> bool:
        import time

        snap = export_job(self.db, self.job_id)
        d = digest(snap)
        if d == self._last and not force:
            return False
        job = snap["job"]
        decisions = digest({"state": job["state"], "target": job.get("target_state"),
                            "attempt": job.get("current_attempt"), "attempts": snap["attempts"],
                            "ledger": snap["ledger"], "events": len(snap["events"]),
                            "last_event": snap["events"][-1] if snap["events"] else None})
        now = time.time()
        if not force and decisions == self._last_decisions and now - self._last_at < self.progress_every_s:
            return False
        self.store.put_json(state_key(self.job_id), snap)
        self._last, self._last_decisions, self._last_at = d, decisions, now
        return True


def pull(db: S.StateDB, store: Any, job_id: str) -> bool:
    """Import the job's snapshot from the store, if it has one. True when imported."""
    snap = store.read_json(state_key(job_id))
    if not isinstance(snap, dict):
        return False
    import_job(db, snap)
    return True
