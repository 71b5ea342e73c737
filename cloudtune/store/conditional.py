"""Compare-and-swap on one store object: the primitive behind a controller's lease.

Why here and not in the Store interface: only the controller's lease and its state snapshot need
it, and the two stores do it very differently. S3 has conditional writes (PutObject with
`If-None-Match: *` to create, `If-Match: <etag>` to replace; a failed condition is 412
PreconditionFailed, a concurrent one 409 ConditionalRequestConflict). A `file://` store gets the
same contract from an flock'd side file and an atomic rename, with the content's SHA-256 as its
etag. Either way exactly one of several racing writers wins.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any


class PreconditionFailed(Exception):
    """Somebody else wrote the object since we read it (or created it first)."""


def read_versioned(store: Any, key: str) -> tuple[bytes, str] | None:
    """(content, etag) of the object, or None when it does not exist."""
    from cloudtune.store.file import FileStore
    from cloudtune.store.s3 import S3Store

    store = getattr(store, "inner", store)  # open_store wraps stores in a RetryingStore
    if isinstance(store, FileStore):
        path = store._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data, _sha(data)
    if isinstance(store, S3Store):
        from botocore.exceptions import ClientError

        try:
            got = store.client.get_object(Bucket=store.bucket, Key=store._key(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]
    raise TypeError(f"conditional writes are not supported on {type(store).__name__}")


def put_versioned(store: Any, key: str, data: bytes, *, expect: str | None) -> str:
    """Write `data` only if the object's etag is still `expect` (None: only if it does not exist).

    Returns the new etag; raises PreconditionFailed when the condition does not hold."""
    from cloudtune.store.file import FileStore
    from cloudtune.store.s3 import S3Store

    store = getattr(store, "inner", store)  # open_store wraps stores in a RetryingStore
    if isinstance(store, FileStore):
        return _file_put(store._path(key), data, expect)
    if isinstance(store, S3Store):
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        try:
            put = store.client.put_object(Bucket=store.bucket, Key=store._key(key), Body=data, **cond)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the condition failed; 409: a concurrent conditional write won; 404: If-Match on
            # an object somebody deleted.
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                raise PreconditionFailed(f"{key}: {code}") from None
            raise
        return put["ETag"]
    raise TypeError(f"conditional writes are not supported on {type(store).__name__}")


def _sha(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest() + '"'


def _file_put(path: Path, data: bytes, expect: str | None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".tmp-lock-{path.name}")  # FileStore.list skips .tmp-* names
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = _sha(path.read_bytes())
        except FileNotFoundError:
            current = None
        if current != expect:
            raise PreconditionFailed(f"{path.name}: etag {current} != expected {expect}")
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:  # ENOSPC/EROFS mid-write: no partial temp file left in the store
            tmp.unlink(missing_ok=True)
            raise
        return _sha(data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
