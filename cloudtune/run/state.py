"""The local state database: jobs, attempts, events, the cost ledger and watchdog liveness.

Why SQLite: the CLI, the detached watchdog and `cloudtune status` in another terminal read and
write the same rows at the same time. WAL mode lets readers run beside one writer, a busy timeout
makes writers queue instead of failing, and every write is one short `BEGIN IMMEDIATE`
transaction. The schema carries a version and a list of migrations so old databases keep working.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.home import home

# Job states (the `status --json` contract).
PENDING = "pending"
PROVISIONING = "provisioning"
RUNNING = "running"
RECOVERING = "recovering"
STOPPING = "stopping"
DONE = "done"
FAILED = "failed"
STOPPED = "stopped"
JOB_STATES = (PENDING, PROVISIONING, RUNNING, RECOVERING, STOPPING, DONE, FAILED, STOPPED)
TERMINAL_STATES = frozenset({DONE, FAILED, STOPPED})

# Attempt states.
A_PROVISIONING = "provisioning"  # name reserved, create call in flight
A_RUNNING = "running"  # the machine exists (billing)
A_ENDED = "ended"  # terminated and verified gone
A_LAUNCH_FAILED = "launch_failed"  # the create call failed and no machine exists

# Each entry migrates from version i to i+1. Append only; never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        provider TEXT NOT NULL,
        store_url TEXT NOT NULL,
        store_endpoint TEXT,
        spec_json TEXT NOT NULL,
        plan_json TEXT NOT NULL,
        option_index INTEGER NOT NULL DEFAULT 0,
        current_attempt INTEGER NOT NULL DEFAULT 0,
        est_hours REAL,
        est_cost_usd REAL,
        step INTEGER,
        total_steps INTEGER,
        loss REAL,
        tokens_per_s REAL,
        eta_s REAL,
        heartbeat_at REAL,
        stop_requested TEXT,
        target_state TEXT,
        stop_deadline REAL,
        reason TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE TABLE attempts (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        n INTEGER NOT NULL,
        name TEXT NOT NULL,
        provider TEXT NOT NULL,
        offer_id TEXT NOT NULL,
        machine_id TEXT,
        state TEXT NOT NULL,
        exit_code INTEGER,
        end_reason TEXT,
        created_at REAL NOT NULL,
        ended_at REAL,
        PRIMARY KEY (job_id, n)
    );
    CREATE TABLE ledger (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        attempt INTEGER NOT NULL,
        provider TEXT NOT NULL,
        offer_id TEXT NOT NULL,
        gpu TEXT NOT NULL,
        gpu_count INTEGER NOT NULL,
        region TEXT,
        spot INTEGER NOT NULL,
        price_hr REAL NOT NULL,
        on_demand_price_hr REAL,
        billing_granularity_s INTEGER NOT NULL,
        price_as_of TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        end_reason TEXT,
        PRIMARY KEY (job_id, attempt)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        time REAL NOT NULL,
        attempt INTEGER,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_job ON events(job_id, id);
    CREATE TABLE watchdogs (
        job_id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        beat_at REAL NOT NULL
    );
    """,
    # 2: the ledger says whether ended_at is the provider's termination time or our estimate (the
    # moment the watchdog noticed the machine gone), and the watchdog row carries a lease.
    """
    ALTER TABLE ledger ADD COLUMN end_estimated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE watchdogs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
# How long a writer waits for another one's lock before the call fails (and is retried by its caller).
BUSY_TIMEOUT_S = float(os.environ.get("CLOUDTUNE_DB_BUSY_S", "30"))
# A watchdog's lease on its job: renewed every tick; another watchdog may take over only after it lapses.
LEASE_S = float(os.environ.get("CLOUDTUNE_WATCHDOG_LEASE_S", "30"))


class StateDBError(UserError):
    """The state database cannot be used as it is (empty, corrupt, unreadable): never silently recreated."""


class StateDBWriteError(StateDBError):
    """A write failed because the db's disk is full or read-only (the db itself is fine)."""


def db_path() -> Path:
    return home() / "state.db"


def _fs_fault(path: Path) -> str | None:
    """'full' or 'read-only' when the file system holding `path` is, else None (from statvfs: the kernel's
    answer, whatever sqlite's error message says; a full disk reads as 'disk I/O error' at open)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return "read-only"
        if st.f_bavail == 0 or (st.f_favail == 0 and st.f_files > 0):
            return "full"
        return None
    return None


def _fs_hint(path: Path) -> str:
    fault = _fs_fault(path)
    if fault == "full":
        return "free some space on that disk (nothing is lost: the db is intact) and try again"
    if fault == "read-only":
        return "make it writable again (remount read-write; nothing is lost) or set CLOUDTUNE_HOME elsewhere"
    return "check the folder's permissions, or set CLOUDTUNE_HOME to a writable folder"


def _watchdog_pid(pid: int, job_id: str) -> bool | None:
    """Whether pid is a running watchdog of job_id: True/False from /proc, None where /proc is absent."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False if Path("/proc/self").exists() else None
    except OSError:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is dead, whatever its cmdline says
            return False
    except (OSError, IndexError):
        pass
    return b"cloudtune.run.watchdog" in cmd and job_id.encode() in cmd


@dataclass
class Job:
    row: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.row[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def spec(self):
        from cloudtune.spec import parse_spec

        return parse_spec(json.loads(self.row["spec_json"]), source=f"job {self.row['id']} spec")

    @property
    def plan(self) -> list[dict[str, Any]]:
        return json.loads(self.row["plan_json"])

    @property
    def is_terminal(self) -> bool:
        return self.row["state"] in TERMINAL_STATES


class StateDB:
    """One connection per process. Methods are small transactions; nothing is held open between them."""

    def __init__(self, path: Path | None = None, *, read_only_ok: bool = False) -> None:
        """`read_only_ok`: a reader (`status`, `logs`, `cost`) that finds the db's file system full or
        read-only opens the db as it is, read-only (`self.read_only`), instead of failing: the jobs are
        all there, only nothing can be written until space or write access returns."""
        self.path = path or db_path()
        self.read_only = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateDBError(f"state database folder {self.path.parent}: {err.strerror or err}; "
                               f"{_fs_hint(self.path.parent)}") from None
        self._refuse_empty()
        try:
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                        check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise
            fault = _fs_fault(self.path)
            if fault and read_only_ok and self.path.exists():
                self._open_read_only()
                return
            if fault:  # the disk, not the db: nothing is damaged, nothing to restore
                raise StateDBError(f"state database {self.path}: its file system is {fault} ({err}); "
                                   f"{_fs_hint(self.path)}") from None
            raise StateDBError(
                f"state database {self.path} is unreadable ({err}); it holds every job and machine this "
                f"installation owns, so it is never recreated: restore it from a backup, or move it away to "
                f"start empty (then `cloudtune gc` will not touch machines it cannot prove dead)"
            ) from None

    def _open_read_only(self) -> None:
        """The db as it is on a full or read-only disk: `immutable` needs no -wal/-shm file to be created
        (which is what fails there). Reads see the last checkpointed state; writes raise."""
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        from urllib.parse import quote

        self.conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro&immutable=1", uri=True,
                                    isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.read_only = True

    def _refuse_empty(self) -> None:
        """A zero-byte state.db is damage, not a new install: recreating it would forget every live job.

        Another process may be creating it this instant (sqlite makes the file before its first
        write), so an empty file is re-checked for a moment before it is refused.
        """
        deadline = time.time() + 2.0
        while True:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                return
            if size > 0:
                return
            if time.time() >= deadline:
                raise StateDBError(
                    f"state database {self.path} is empty (0 bytes): it was truncated, not created; restore it "
                    f"from a backup, or delete it to start with no jobs (machines of the lost jobs keep running "
                    f"until `cloudtune gc --foreign` is asked to end them)"
                )
            time.sleep(0.1)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. A full or read-only disk is one line naming the db and the fix
        (StateDBWriteError; the watchdog retries it like any failed tick), never a traceback."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            text = str(err)
            if not any(k in text for k in ("readonly", "disk is full", "disk I/O error")):
                raise
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            fault = _fs_fault(self.path) or ("read-only" if self.read_only or "readonly" in text else "full")
            raise StateDBWriteError(f"state database {self.path}: cannot write, its file system is {fault} "
                                    f"({text}); {_fs_hint(self.path)}") from None

    def _migrate(self) -> None:
        with self.tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            version = row["version"] if row else 0
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"state database {self.path} has schema version {version}, newer than this cloudtune "
                    f"({SCHEMA_VERSION}); upgrade cloudtune"
                )
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        c.execute(stmt)
            if row is None:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    # ------------------------------------------------------------ jobs

    def job_exists(self, job_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def insert_job(self, **fields: Any) -> None:
        now = time.time()
        fields.setdefault("state", PENDING)
        fields.setdefault("created_at", now)
        fields.setdefault("updated_at", now)
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.tx() as c:
            c.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(fields.values()))

    def get_job(self, job_id: str) -> Job | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(dict(row)) if row else None

    def list_jobs(self, limit: int | None = None) -> list[Job]:
        sql = "SELECT * FROM jobs ORDER BY created_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [Job(dict(r)) for r in self.conn.execute(sql).fetchall()]

    def update_job(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def set_state(self, job_id: str, state: str, reason: str | None = None) -> None:
        assert state in JOB_STATES, state
        fields: dict[str, Any] = {"state": state}
        if reason is not None:
            fields["reason"] = reason
        if state in TERMINAL_STATES:
            fields["ended_at"] = time.time()
        self.update_job(job_id, **fields)

    def request_stop(self, job_id: str, reason: str) -> bool:
        """Mark a stop request; False when the job is already terminal. The watchdog acts on it."""
        with self.tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] in TERMINAL_STATES:
                return False
            c.execute(
                "UPDATE jobs SET stop_requested = ?, updated_at = ? WHERE id = ?", (reason, time.time(), job_id)
            )
            return True

    # ------------------------------------------------------------ attempts

    def insert_attempt(self, job_id: str, n: int, name: str, provider: str, offer_id: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO attempts (job_id, n, name, provider, offer_id, state, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, n, name, provider, offer_id, A_PROVISIONING, time.time()),
            )
            c.execute("UPDATE jobs SET current_attempt = ?, updated_at = ? WHERE id = ?", (n, time.time(), job_id))

    def update_attempt(self, job_id: str, n: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE attempts SET {sets} WHERE job_id = ? AND n = ?", (*fields.values(), job_id, n))

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def attempt(self, job_id: str, n: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM attempts WHERE job_id = ? AND n = ?", (job_id, n)).fetchone()
        return dict(row) if row else None

    def live_attempts(self) -> list[dict[str, Any]]:
        """Attempts whose machine may still exist (used by gc to decide what is owned)."""
        rows = self.conn.execute(
            "SELECT a.* FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.state IN (?, ?)",
            (A_PROVISIONING, A_RUNNING),
        ).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ ledger

    def open_ledger(self, job_id: str, attempt: int, **fields: Any) -> None:
        fields = {"job_id": job_id, "attempt": attempt, **fields}
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.tx() as c:
            c.execute(f"INSERT OR REPLACE INTO ledger ({cols}) VALUES ({marks})", tuple(fields.values()))

    def close_ledger(self, job_id: str, attempt: int, ended_at: float, end_reason: str,
                     estimated: bool = False) -> None:
        """End an attempt's billing. `estimated`: ended_at is when we noticed, not the provider's time."""
        with self.tx() as c:
            c.execute(
                "UPDATE ledger SET ended_at = MAX(started_at, ?), end_reason = ?, end_estimated = ? "
                "WHERE job_id = ? AND attempt = ? AND ended_at IS NULL",
                (ended_at, end_reason, int(estimated), job_id, attempt),
            )

    def ledger(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM ledger WHERE job_id = ? ORDER BY attempt", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ events

    def event(self, job_id: str, kind: str, message: str, attempt: int | None = None) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO events (job_id, time, attempt, kind, message) VALUES (?, ?, ?, ?, ?)",
                (job_id, time.time(), attempt, kind, message),
            )

    def events(self, job_id: str, after_id: int = 0) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after_id)
        ).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ watchdogs

    def watchdog_beat(self, job_id: str, pid: int, started_at: float) -> bool:
        """Renew this watchdog's lease. False when another watchdog holds it (this one must exit)."""
        now = time.time()
        with self.tx() as c:
            row = c.execute("SELECT pid FROM watchdogs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None and row["pid"] != pid and _watchdog_pid(row["pid"], job_id):
                return False
            c.execute(
                "INSERT INTO watchdogs (job_id, pid, started_at, beat_at, lease_until) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(job_id) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at, "
                "beat_at = excluded.beat_at, lease_until = excluded.lease_until",
                (job_id, pid, started_at, now, now + LEASE_S),
            )
        return True

    def lease_holder(self, job_id: str) -> int | None:
        """The pid of a live watchdog of this job according to its lease row, else None.

        The flock on locks/watchdog-JOB.lock is one guard; a deleted lock file defeats it (a new
        file has no holder), so the row is the second: a live process that is this job's watchdog,
        or (where /proc cannot tell) a lease that has not lapsed.
        """
        row = self.watchdog_row(job_id)
        if row is None:
            return None
        alive = _watchdog_pid(row["pid"], job_id)
        if alive is None:
            alive = row.get("lease_until", 0) > time.time()
        return row["pid"] if alive else None
    def watchdog_row(self, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM watchdogs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None
