"""Job ids: short enough to type, unique enough to put in every machine name, tag and store path."""

from __future__ import annotations

import base64
import re
import secrets

_ID_RE = re.compile(r"^[a-z2-7]{8}$")


def new_job_id() -> str:
    """8 lowercase base32 characters (40 random bits): valid in DNS-style names and S3 keys."""
    return base64.b32encode(secrets.token_bytes(5)).decode().lower()


def looks_like_job_id(value: str) -> bool:
    return bool(_ID_RE.match(value))
