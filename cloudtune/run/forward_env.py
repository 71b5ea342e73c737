"""Which of the user's environment variables a machine gets, and which store credentials.

Why: a fixed list of the submitting shell's variables used to go to every machine, so long-lived AWS
keys landed in RunPod/Vast containers (marketplace hosts can read a container's environment) while
nothing the user wanted (a WANDB key, a custom flag) could be passed. Now the spec names them:

- `env:` plain variables forwarded as the launch's env (visible in `--dry-run`);
- `secrets:` variables forwarded as secret env (redacted in `--dry-run`, logs and state);
- HF_TOKEN (the model download needs it) and the store's credentials, nothing else.

Store credentials: this machine and AWS machines (same account) get the shell's AWS credentials as
before. A third-party machine (runpod, vast, lambda, modal) never gets long-lived keys unless the user
names them in `secrets:`; it gets an STS federation token (sts:GetFederationToken with a session
policy) that can only read and write `<store>/<job>/` (and read the job's own s3:// inputs), valid for
the attempt's lifetime. Credentials that are already temporary (with AWS_SESSION_TOKEN) travel as is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from cloudtune.errors import UserError

THIRD_PARTY = ("runpod", "vast", "lambda", "modal")
# Providers whose machines cannot carry an STS session token. Vast's 256 characters per variable once
# put it here; its adapter now splits long values in parts that the machine joins (providers/vast.py
# split_long), so every third-party provider gets scoped, short-lived keys.
NO_STS: tuple[str, ...] = ()
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STS_MIN_S, STS_MAX_S = 900, 129600  # GetFederationToken's DurationSeconds bounds
REDACTED_STS = "<sts:GetFederationToken for {scope}>"


def _split(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def job_policy(store_url: str, job_id: str, reads: list[str] = ()) -> dict[str, Any]:
    """An IAM session policy: read/write under `<store>/<job>/`, list that prefix, read the named s3:// inputs."""
    bucket, prefix = _split(store_url)
    job_prefix = f"{prefix}/{job_id}" if prefix else job_id
    statements: list[dict[str, Any]] = [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                                       "s3:ListMultipartUploadParts"],
         "Resource": f"arn:aws:s3:::{bucket}/{job_prefix}/*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": [f"{job_prefix}/*", job_prefix]}}},
    ]
    for url in reads:
        b, key = _split(url)
        statements.append({"Effect": "Allow", "Action": "s3:GetObject",
                           "Resource": f"arn:aws:s3:::{b}/{key}*" if key else f"arn:aws:s3:::{b}/*"})
    return {"Version": "2012-10-17", "Statement": statements}


def _s3_inputs(spec: Any) -> list[str]:
    urls = [spec.data.train, spec.data.validation, spec.dpo.base_adapter]
    return [u for u in urls if isinstance(u, str) and u.startswith("s3://")]


def federation_token(store_url: str, job_id: str, spec: Any, lifetime_s: float,
                     endpoint_url: str | None, region: str | None) -> dict[str, str]:
    """Short-lived credentials scoped to the job's prefix (boto3 imported here only)."""
    import boto3

    duration = int(min(max(lifetime_s + 1800, STS_MIN_S), STS_MAX_S))
    sts = boto3.client("sts", endpoint_url=endpoint_url or None, region_name=region or "us-east-1")
    try:
        out = sts.get_federation_token(Name=f"cloudtune-{job_id}"[:32], DurationSeconds=duration,
                                       Policy=json.dumps(job_policy(store_url, job_id, _s3_inputs(spec))))
    except Exception as err:  # noqa: BLE001 - one line with the fix, never the keys
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if hasattr(err, "response") else None
        raise UserError(f"could not mint short-lived store credentials (sts:GetFederationToken: "
                        f"{code or type(err).__name__}); allow sts:GetFederationToken for your IAM user, or name "
                        f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY under secrets: in the spec to send your own "
                        f"keys to the machine") from None
    c = out["Credentials"]
    return {"AWS_ACCESS_KEY_ID": c["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
            "AWS_SESSION_TOKEN": c["SessionToken"]}


def check_names(names: list[str], key: str) -> list[str]:
    bad = [n for n in names if not ENV_NAME_RE.match(n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not an environment variable name; use letters, digits and _ "
                         f"(e.g. WANDB_API_KEY)")
    return names


def missing_names(spec: Any, environ: Mapping[str, str] | None = None) -> list[str]:
    """The spec's env:/secrets: names that are not set in this shell (pre-flight reports them)."""
    environ = os.environ if environ is None else environ
    return [n for n in [*spec.env, *spec.secrets] if not environ.get(n)]


def forwarded_env(spec: Any, provider: str, store_url: str, job_id: str, *, lifetime_s: float,
                  endpoint_url: str | None = None, dry_run: bool = False,
                  environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(env, secret_env) of the user's variables for one launch on `provider`."""
    environ = os.environ if environ is None else environ
    env = {n: environ[n] for n in spec.env if environ.get(n)}
    secret = {n: environ[n] for n in spec.secrets if environ.get(n)}
    if environ.get("HF_TOKEN"):
        secret.setdefault("HF_TOKEN", environ["HF_TOKEN"])
    if store_url.startswith("s3://") and not any(k in secret for k in AWS_KEYS[:2]):
        keys = {k: environ[k] for k in AWS_KEYS if environ.get(k)}
        if provider not in THIRD_PARTY or "AWS_SESSION_TOKEN" in keys:
            secret.update(keys)  # this machine / the same AWS account, or already short-lived
        elif keys and provider not in NO_STS:
            bucket, prefix = _split(store_url)
            if dry_run:
                scope = f"s3://{bucket}/{prefix + '/' if prefix else ''}{job_id}/"
                secret.update({k: REDACTED_STS.format(scope=scope) for k in AWS_KEYS})
            else:
                secret.update(federation_token(store_url, job_id, spec, lifetime_s, endpoint_url,
                                               spec.store.region))
    return env, secret
