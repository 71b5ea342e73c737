"""A store in S3 or any S3-compatible service (Cloudflare R2, MinIO, Backblaze B2, moto).

Why boto3 and not a hand-written client: SigV4, retries with backoff, the credential chain (env,
profile, SSO, instance role) and parallel multipart transfers all come for free. Credentials are
never read, stored or printed by cloudtune itself; boto3 finds them.

Large files (checkpoint shards, optimizer state) go through boto3's transfer manager: above
`multipart_threshold` they are split into `multipart_chunksize` parts uploaded by `max_concurrency`
threads. A single PUT/complete-multipart is atomic per object, which is what the checkpoint
manifest protocol builds on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cloudtune.errors import UserError
from cloudtune.store.base import Store, StoreNotFound

MiB = 1024 * 1024


def _env_mib(name: str, default: int) -> int:
    try:
        return int(float(os.environ.get(name, "")) * MiB) if os.environ.get(name) else default * MiB
    except ValueError:
        raise UserError(f"{name}={os.environ[name]!r} is not a number of MiB; unset it or use e.g. 64") from None


class S3Store(Store):
    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
        max_concurrency: int = 8,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise UserError(f"store url {url!r} is not an S3 URL; use s3://bucket or s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("CLOUDTUNE_STORE_ENDPOINT") or None
        self.region = region
        # S3 needs parts of >= 5 MiB (except the last); the env knobs exist for tuning on fat pipes.
        self.multipart_threshold = multipart_threshold or _env_mib("CLOUDTUNE_S3_MULTIPART_MB", 64)
        self.multipart_chunksize = multipart_chunksize or _env_mib("CLOUDTUNE_S3_CHUNK_MB", 64)
        self.max_concurrency = max_concurrency
        self._client: Any = None

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg
            )
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"store key {key!r} escapes the store root")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _wrap(self, err: Exception, key: str) -> Exception:
        """Turn boto errors a user can fix into one clear line (never including credentials)."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(err, NoCredentialsError):
            return UserError(
                f"no AWS credentials found for {where}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run on an instance with a role"
            )
        if isinstance(err, EndpointConnectionError):
            return UserError(f"cannot reach the S3 endpoint for {where} ({self.endpoint_url or 'AWS'}); check endpoint_url")
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StoreNotFound(key)
            if code == "NoSuchBucket":
                return UserError(f"bucket {self.bucket!r} does not exist ({where}); create it or fix store.url")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return UserError(f"access denied to {where} ({code}); check the credentials' permissions")
        return err

    # ------------------------------------------------------------------ Store API

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as err:  # noqa: BLE001 - re-raised, translated
            raise self._wrap(err, key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, key) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:  # noqa: BLE001
            wrapped = self._wrap(err, key)
            if isinstance(wrapped, StoreNotFound):
                return False
            raise wrapped from None

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
            )
            for page in pages:
                keys.extend(self._rel(obj["Key"]) for obj in page.get("Contents", []))
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, prefix) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:  # noqa: BLE001
            wrapped = self._wrap(err, key)
            if not isinstance(wrapped, StoreNotFound):
                raise wrapped from None

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as err:  # noqa: BLE001
                raise self._wrap(err, prefix) from None

    def upload_file(self, local_path: Path, key: str) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=self._transfer_config())
        except Exception as err:  # noqa: BLE001
            raise self._wrap(getattr(err, "last_exception", None) or err, key) from None

    def download_file(self, key: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local_path), Config=self._transfer_config())
        except Exception as err:  # noqa: BLE001
            raise self._wrap(err, key) from None

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (used by tests and `cloudtune` setup helpers)."""
        try:
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region and self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            self.client.create_bucket(**kwargs)
        except Exception as err:  # noqa: BLE001
            code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._wrap(err, "") from None
