"""Store I/O that survives a spell: retries with backoff, then one clear error.

Why: a store that is read-only for 30 s, a full disk that is cleaned up, an S3 endpoint that drops
connections for a minute are faults of the moment, not of the job. The trainer opens its store with a
retry budget (CLOUDTUNE_STORE_RETRY_S, default 300 s on the machine) so such a spell costs a pause;
when the budget is spent it raises StoreUnavailable, which the trainer maps to "stopped, resumable"
(exit 75: the watchdog relaunches from the last good checkpoint) instead of a permanent failure. The
CLI opens stores with no budget: a read-only or unreachable store is one line, at once.

What is retried: OSError from the file system (EROFS, ENOSPC, EACCES, EIO, ...) and the S3 errors that
are not the user's to fix (connection drops, 5xx, throttling). Not retried: StoreNotFound (an answer),
a key that escapes the store (a bug or an attack), and UserError (credentials, a missing bucket).
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.store.base import Store, StoreNotFound

log = logging.getLogger("cloudtune.store")


class StoreUnavailable(UserError):
    """The store could not be read or written within the retry budget (named, with the OS's reason)."""


def retry_budget_s(default: float = 0.0) -> float:
    raw = os.environ.get("CLOUDTUNE_STORE_RETRY_S")
    if not raw:
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise UserError(f"CLOUDTUNE_STORE_RETRY_S={raw[:40]!r} is not a number of seconds; unset it or use e.g. 300") \
            from None


def _retryable(err: BaseException) -> bool:
    if isinstance(err, (StoreNotFound, UserError, ValueError)):
        return False
    return isinstance(err, Exception)


class RetryingStore(Store):
    """Wraps a Store; every call is retried with exponential backoff and jitter within `budget_s`."""

    def __init__(self, inner: Store, budget_s: float, *, initial_s: float = 0.2, max_s: float = 10.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.budget_s = budget_s
        self.initial_s = initial_s
        self.max_s = max_s

    def __getattr__(self, name: str) -> Any:  # bucket, root, client, create_bucket ... of the inner store
        return getattr(self.inner, name)

    def _call(self, what: str, key: str, fn, *args: Any) -> Any:
        deadline = time.monotonic() + self.budget_s
        delay = self.initial_s
        tries = 0
        while True:
            tries += 1
            try:
                return fn(*args)
            except BaseException as err:
                if not _retryable(err):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else (
                        f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
                    spent = f" after {tries} tries in {self.budget_s:g}s" if self.budget_s else ""
                    raise StoreUnavailable(
                        f"store {self.url}: could not {what} {key!r}{spent}: {reason}; check that the store is "
                        f"writable, has free space and is reachable"
                    ) from None
                if tries == 1 or tries % 10 == 0:
                    log.warning("store %s: %s %s failed (%s); retrying for up to %.0fs", self.url, what, key, err, left)
                time.sleep(min(left, random.uniform(delay / 2, delay)))
                delay = min(self.max_s, delay * 2)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.inner.put_bytes, key, data)

    def get_bytes(self, key: str) -> bytes:
        return self._call("read", key, self.inner.get_bytes, key)

    def exists(self, key: str) -> bool:
        return self._call("check", key, self.inner.exists, key)

    def list(self, prefix: str) -> list[str]:
        return self._call("list", prefix, self.inner.list, prefix)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.inner.delete, key)

    def delete_prefix(self, prefix: str) -> None:
        self._call("delete", prefix, self.inner.delete_prefix, prefix)

    def upload_file(self, local_path: Path, key: str) -> None:
        self._call("upload", key, self.inner.upload_file, local_path, key)

    def download_file(self, key: str, local_path: Path) -> None:
        self._call("download", key, self.inner.download_file, key, local_path)

    def url_for(self, key: str) -> str:
        return self.inner.url_for(key)
