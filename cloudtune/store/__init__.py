"""Object stores for checkpoints, heartbeats and results: `file://` and `s3://` behind one interface.

The store is the truth about a job (design principle 2): machines are disposable, so everything a
job needs to resume or to be reported lives under `<store>/<job_id>/`. See docs/architecture.md for
the layout; `cloudtune.store.layout` names every key so no module spells a path by hand.
"""

from __future__ import annotations

from cloudtune.store.base import Store, StoreNotFound


def open_store(url: str, *, endpoint_url: str | None = None, region: str | None = None,
               retry_s: float | None = None) -> Store:
    """Open the store behind a URL. boto3 is imported only for s3:// URLs.

    Every call is retried for up to `retry_s` seconds (default $CLOUDTUNE_STORE_RETRY_S, else 0: one
    try) and then raises StoreUnavailable, one line naming the store, the key and the OS's reason.
    """
    from cloudtune.store.retry import RetryingStore, retry_budget_s

    budget = retry_budget_s() if retry_s is None else retry_s
    if url.startswith("file://") or url.startswith("/"):
        from cloudtune.store.file import FileStore

        return RetryingStore(FileStore(url), budget)
    if url.startswith("s3://"):
        from cloudtune.store.s3 import S3Store

        return RetryingStore(S3Store(url, endpoint_url=endpoint_url, region=region), budget)
    from cloudtune.errors import UserError

    raise UserError(f"store url {url!r} is not supported; use file:///path or s3://bucket/prefix")


__all__ = ["Store", "StoreNotFound", "open_store"]
