"""A wheelhouse in the store, so a relaunch (or the next job with the same pins) does not pay pip twice.

Why: a machine on the public PyTorch image pip-installs the staged cloudtune wheel and ~60 pinned
training dependencies on every boot (run/bootstrap.py); after a spot preemption the successor paid
the same download and unpacking again. The first machine to install from the index now also turns
what it installed into wheels and publishes them under a content-addressed key; later boots fetch
that one object and install with `pip install --no-index --find-links`.

Layout (store keys, beside the job prefixes):

  _cache/wheelhouse/<key>/wheels-<job>-<attempt>.tar   the wheels, one tar (wheels are already compressed)
  _cache/wheelhouse/<key>/MANIFEST.json               written LAST: tar name, its sha256, python/platform/torch

`<key>` hashes what decides which wheels fit: the pin list, the extras, the image (its Python, torch
and CUDA) and the machine's CPU architecture. A wheelhouse without a manifest does not exist, as
with checkpoints. Each publisher writes its own tar name, so two first boots racing leave a
manifest that names a tar it describes, whichever manifest lands last.

Who may write: the machine has no long-lived credentials, so the controller hands it presigned URLs
for one attempt: PUTs for the tar and the manifest only while no valid manifest exists (write-once:
once published, no later machine, marketplace hosts included, gets a URL that could replace it);
otherwise a GET for the tar plus the digest and tags the manifest records, which the machine checks
before unpacking (wheelhouse_boot.py). A damaged wheelhouse (digest mismatch, truncated wheel,
other tags) is ignored and the boot installs from the index; it is never fatal.

Residual trust: the first machine to publish is trusted with what it publishes, as it is trusted with
the checkpoints the next attempt loads. A marketplace host (Vast, RunPod community) that publishes
first could plant a wheel for later jobs on the same pins; `CLOUDTUNE_WHEELHOUSE=off` disables the
cache, and deleting `_cache/wheelhouse/` resets it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "_cache/wheelhouse"
FORMAT = 1
ENV_SWITCH = "CLOUDTUNE_WHEELHOUSE"  # "off": no cache (every boot installs from the index)
# what the machine reads (wheelhouse_boot.py); the URLs are bearer grants and travel as secret env vars
ENV_GET = "CLOUDTUNE_WHEELHOUSE_URL"
ENV_EXPECT = "CLOUDTUNE_WHEELHOUSE_EXPECT"
ENV_PUT_TAR = "CLOUDTUNE_WHEELHOUSE_PUT_TAR"
ENV_PUT_MANIFEST = "CLOUDTUNE_WHEELHOUSE_PUT_MANIFEST"
ENV_NAME = "CLOUDTUNE_WHEELHOUSE_NAME"
ENV_KEY = "CLOUDTUNE_WHEELHOUSE_KEY"
SECRET_VARS = (ENV_GET, ENV_PUT_TAR, ENV_PUT_MANIFEST)
_TOKEN = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_TAR = re.compile(r"wheels-[A-Za-z0-9_-]{1,64}-\d{1,6}\.tar")
_SHA = re.compile(r"[0-9a-f]{64}")


def cache_key(pins: list[str], extras: tuple[str, ...], image: str, arch: str) -> str:
    """Content address of a wheelhouse: same pins + extras on the same image and CPU arch -> same wheels."""
    doc = json.dumps({"format": FORMAT, "pins": sorted(pins), "extras": sorted(extras), "image": image,
                      "arch": arch}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def manifest_key(key: str) -> str:
    return f"{PREFIX}/{key}/MANIFEST.json"


def tar_key(key: str, name: str) -> str:
    return f"{PREFIX}/{key}/{name}"


def tar_name(job_id: str, attempt: int) -> str:
    return f"wheels-{job_id}-{attempt}.tar"


def read_manifest(store: Any, key: str) -> dict | None:
    """The wheelhouse's manifest if it exists and is well-formed for `key`; None otherwise (with a reason logged)."""
    from cloudtune.store import StoreNotFound

    try:
        raw = store.get_bytes(manifest_key(key))
    except StoreNotFound:
        return None
    try:
        doc = json.loads(raw)
        ok = (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("key") == key
              and _TAR.fullmatch(str(doc.get("tar", ""))) and _SHA.fullmatch(str(doc.get("tar_sha256", "")))
              and all(_TOKEN.fullmatch(str(doc.get(f, ""))) for f in ("python", "platform", "torch")))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        log.warning("wheelhouse %s: MANIFEST.json is not valid; it is ignored (and may be rebuilt)", key)
        return None
    return doc


def presign(store: Any, key: str, method: str, expiry_s: int) -> str:
    """A URL for one object that needs no credentials: presigned for s3://, file:// for a local store."""
    inner = getattr(store, "inner", store)
    if hasattr(inner, "bucket"):
        op = {"GET": "get_object", "PUT": "put_object"}[method]
        return inner.client.generate_presigned_url(
            op, Params={"Bucket": inner.bucket, "Key": inner._key(key)}, ExpiresIn=int(expiry_s))
    return store.url_for(key)


def attempt_env(store: Any, key: str, job_id: str, attempt: int, expiry_s: int) -> tuple[dict[str, str], dict[str, str]]:
    """(env, secret env) for one attempt: fetch an existing wheelhouse, or publish one (write-once)."""
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "false", "no"):
        return {}, {}
    try:
        doc = read_manifest(store, key)
    except Exception as err:  # noqa: BLE001 - the cache is an optimisation: a store hiccup means a cold boot
        log.warning("wheelhouse %s: could not read its manifest (%s); this boot installs from the index", key, err)
        return {}, {}
    if doc is not None:
        expect = " ".join([doc["tar_sha256"], doc["python"], doc["platform"], doc["torch"]])
        return {ENV_EXPECT: expect}, {ENV_GET: presign(store, tar_key(key, doc["tar"]), "GET", expiry_s)}
    name = tar_name(job_id, attempt)
    return ({ENV_NAME: name, ENV_KEY: key},
            {ENV_PUT_TAR: presign(store, tar_key(key, name), "PUT", expiry_s),
             ENV_PUT_MANIFEST: presign(store, manifest_key(key), "PUT", expiry_s)})
