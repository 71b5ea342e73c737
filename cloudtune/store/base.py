"""The Store interface: a flat key space of bytes under one root URL."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class StoreNotFound(KeyError):
    """The key does not exist in the store."""


class Store(ABC):
    """Keys are '/'-separated paths relative to the store root (e.g. 'abc123/heartbeat.json').

    Writes of one key are atomic: a reader sees the old bytes or the new bytes, never a mix
    (FileStore writes a temp file and renames; S3 PUT is atomic per object). Multi-file atomicity
    (a whole checkpoint) is built on top with a manifest written last.
    """

    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise StoreNotFound when the key does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys that start with prefix, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key; a missing key is not an error."""

    @abstractmethod
    def upload_file(self, local_path: Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local_path: Path) -> None: ...

    def url_for(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def read_json(self, key: str) -> Any | None:
        """The JSON at key, or None when it does not exist."""
        try:
            return self.get_json(key)
        except StoreNotFound:
            return None
