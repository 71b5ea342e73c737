"""The user-data script an EC2 machine runs at boot: start the trainer container, then power off.

Why a shell script and not cloud-config: it is the one format every AMI runs, and the sequence is
short. The machine ends itself in every case: a `trap` on EXIT calls `shutdown -h now`, and with
`InstanceInitiatedShutdownBehavior=terminate` that terminates the instance (no credentials on the
machine). A hard lifetime cap is a `shutdown -h +N` scheduled before the container starts.

The job's environment goes into a root-only env file read by `docker run --env-file`, so values are
never on a command line (visible in `ps`). Secrets still travel in user-data, which principals with
`ec2:DescribeInstanceAttribute` can read: AWS credentials are therefore never put there (the
instance profile gives the store access), see docs/providers/aws.md.
"""

from __future__ import annotations

import logging
import math
import re
import shlex

from cloudtune.providers.aws_errors import AWSConfigError

log = logging.getLogger("cloudtune.providers.aws")

ENV_FILE = "/run/cloudtune/job.env"
LOG_FILE = "/var/log/cloudtune-trainer.log"
USER_DATA_LIMIT = 16 * 1024  # EC2 rejects user-data over 16 KB (before base64)
REDACTED = "***"

# Long-lived AWS keys must never ride in user-data; the instance profile replaces them.
AWS_CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                 "AWS_SECURITY_TOKEN", "AWS_PROFILE"})

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ECR = re.compile(r"^(?P<registry>\d{12}\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com)/")
_HEREDOC = "CLOUDTUNE_ENV_EOF"


def strip_aws_credentials(secret_env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(secret_env without AWS credential variables, the names dropped). Logged by name only."""
    dropped = sorted(k for k in secret_env if k in AWS_CREDENTIAL_VARS)
    if dropped:
        log.warning(
            "not passing %s to the EC2 machine: long-lived AWS keys never go into user-data; the "
            "machine reaches the store through its instance profile (CLOUDTUNE_AWS_INSTANCE_PROFILE)",
            ", ".join(dropped),
        )
    return {k: v for k, v in secret_env.items() if k not in AWS_CREDENTIAL_VARS}, dropped


def _check_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise AWSConfigError(
                f"environment variable name {key!r} is not valid for docker --env-file; use letters, digits and _",
                provider="aws",
            )
        if any(ch in str(value) for ch in "\n\r\0"):
            raise AWSConfigError(
                f"environment variable {key} has a multi-line value, which docker --env-file cannot carry; "
                "encode it (e.g. base64) or pass it through the store",
                provider="aws",
            )


def env_file_lines(env: dict[str, str]) -> list[str]:
    _check_env(env)
    return [f"{k}={v}" for k, v in sorted(env.items())]


def build_user_data(
    *,
    job_id: str,
    attempt: int,
    image: str,
    command: list[str],
    env: dict[str, str],
    max_lifetime_s: float | None = None,
    workdir: str | None = None,
) -> str:
    """The boot script. `env` is what lands in the env file: pass redacted values for --dry-run."""
    lines = [
        "#!/bin/bash",
        f"# cloudtune job {job_id} attempt {attempt}: run the trainer container, then power off",
        "# (InstanceInitiatedShutdownBehavior=terminate turns the power-off into a terminate).",
        "set -uo pipefail",
        "trap 'echo \"cloudtune: powering off\"; shutdown -h now' EXIT",
    ]
    if max_lifetime_s:
        minutes = max(1, math.ceil(max_lifetime_s / 60))
        lines.append(f"shutdown -h +{minutes} 'cloudtune: lifetime cap reached'  # hard cap, whatever happens below")
    lines += [
        "umask 077",
        f"mkdir -p {shlex.quote(ENV_FILE.rsplit('/', 1)[0])}",
        f"cat > {ENV_FILE} <<'{_HEREDOC}'",
        *env_file_lines(env),
        _HEREDOC,
        "command -v docker >/dev/null || { echo 'cloudtune: docker is missing on this AMI' >&2; exit 1; }",
    ]
    ecr = _ECR.match(image)
    if ecr:
        # A private ECR image: log in with the instance profile (no keys on the machine).
        lines.append(
            f"aws ecr get-login-password --region {ecr['region']} | "
            f"docker login --username AWS --password-stdin {ecr['registry']}"
        )
    run = ["docker", "run", "--rm", "--name", "cloudtune-trainer", "--gpus", "all", "--ipc=host",
           "--network", "host", "--env-file", ENV_FILE]
    if workdir:
        run += ["--workdir", workdir]
    run += [image, *command]
    lines += [
        f"{shlex.join(run)} 2>&1 | tee -a {LOG_FILE}",
        "rc=${PIPESTATUS[0]}",
        f"echo \"cloudtune: trainer exited with $rc\" | tee -a {LOG_FILE}",
        f"rm -f {ENV_FILE}",
        "exit $rc",
    ]
    script = "\n".join(lines) + "\n"
    if len(script.encode()) > USER_DATA_LIMIT:
        raise AWSConfigError(
            f"the EC2 user-data for job {job_id} is {len(script.encode())} bytes, over EC2's 16 KB limit; "
            "pass the spec through the store (CLOUDTUNE_SPEC_URL) instead of CLOUDTUNE_SPEC",
            provider="aws",
        )
    return script
