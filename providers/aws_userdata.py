"""The user-data script an EC2 machine runs at boot: start the trainer container, then power off.

Why a shell script and not cloud-config: it is the one format every AMI runs, and the sequence is
short. The machine ends itself in every case: a `trap` on EXIT calls `shutdown -h now`, and with
`InstanceInitiatedShutdownBehavior=terminate` that terminates the instance (no credentials on the
machine). A hard lifetime cap is a `shutdown -h +N` scheduled before the container starts.

The job's environment goes into a root-only env file read by `docker run --env-file`, so values are
never on a command line (visible in `ps`). Secret values never travel in user-data (principals with
`ec2:DescribeInstanceAttribute` can read it): the adapter writes them to one SSM SecureString
parameter per machine and the script fetches it at boot with the instance profile, appending it to
the env file without echoing it; user-data carries only the parameter's name. Long-lived AWS keys go
nowhere (the instance profile gives the store access), see docs/providers/aws.md.
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
# One SecureString parameter per machine: /cloudtune/<machine name>/env. The prefix is what the IAM
# policies in docs/providers/aws.md grant and what `cloudtune gc` sweeps.
SECRETS_PREFIX = "/cloudtune/"
SSM_STANDARD_LIMIT = 4096  # a standard-tier parameter value holds at most 4 KB
_PARAMETER_NAME = re.compile(r"^/cloudtune/[A-Za-z0-9_.-]+/env$")

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
            "not passing %s to the EC2 machine: long-lived AWS keys never go to the machine; the "
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


def secrets_parameter_name(machine_name: str, *, validate: bool = True) -> str:
    """The SSM parameter holding a machine's secret env. Keyed by the deterministic machine name so
    terminate and gc can find it from the instance's Name tag, and so user-data can name it before
    the instance id exists. `validate=False` for --dry-run, whose job id is a placeholder."""
    name = f"{SECRETS_PREFIX}{machine_name}/env"
    if validate and not _PARAMETER_NAME.match(name):
        raise AWSConfigError(f"machine name {machine_name!r} cannot name an SSM parameter; "
                             "use letters, digits, '.', '-' and '_'", provider="aws")
    return name


def machine_name_of_parameter(parameter: str) -> str | None:
    """The machine name inside a name made by `secrets_parameter_name`, or None if it is not ours."""
    if not _PARAMETER_NAME.match(parameter):
        return None
    return parameter[len(SECRETS_PREFIX):-len("/env")]


def secrets_value(secret_env: dict[str, str]) -> str:
    """The parameter's value: env-file lines, so the boot script can append it to the env file as is
    (no JSON parser needed on the machine). Refused over SSM's 4 KB standard-tier limit."""
    value = "\n".join(env_file_lines(secret_env))
    size = len(value.encode())
    if size > SSM_STANDARD_LIMIT:
        raise AWSConfigError(
            f"the job's secret environment ({', '.join(sorted(secret_env))}) is {size} bytes, over the "
            f"{SSM_STANDARD_LIMIT}-byte limit of an SSM standard parameter; pass large values through the store",
            provider="aws",
        )
    return value


def secret_fetch_lines(parameter: str, region: str, *, env_file: str = ENV_FILE, attempts: int = 5,
                       delay_s: int = 5) -> list[str]:
    """Boot-script lines that append the parameter's decrypted value to `env_file`.

    Why this shape: the value goes from the AWS CLI's stdout straight into a root-only temp file
    (umask 077 is set before), never through a variable, an argument or the console log; the CLI's
    errors (stderr) name the parameter, never its value. Retried because the instance profile's
    credentials can lag the first seconds of boot. On failure the script exits (and powers off)
    rather than run the trainer without its secrets. `env_file`/`attempts`/`delay_s` exist so a
    test can run these exact lines without root.
    """
    tmp = f"{env_file}.secrets"
    q_param, q_region, q_tmp, q_env = (shlex.quote(x) for x in (parameter, region, tmp, env_file))
    return [
        "# the job's secrets: SSM SecureString, read with the instance profile (never echoed)",
        "command -v aws >/dev/null || { echo 'cloudtune: the AWS CLI is missing on this AMI; "
        "it is needed to read the job secrets from SSM' >&2; exit 1; }",
        "cloudtune_secrets_ok=0",
        f"for cloudtune_try in $(seq 1 {int(attempts)}); do",
        f"  if AWS_PAGER='' aws ssm get-parameter --region {q_region} --name {q_param} --with-decryption "
        f"--query Parameter.Value --output text > {q_tmp}; then cloudtune_secrets_ok=1; break; fi",
        f"  sleep $((cloudtune_try * {int(delay_s)}))",
        "done",
        f"if [ \"$cloudtune_secrets_ok\" != 1 ]; then rm -f {q_tmp}; "
        f"echo \"cloudtune: could not read SSM parameter {parameter} in {region}: the instance role needs "
        f"ssm:GetParameter on it and kms:Decrypt (docs/providers/aws.md)\" >&2; exit 1; fi",
        f"cat {q_tmp} >> {q_env} && rm -f {q_tmp}",
    ]


def build_user_data(
    *,
    job_id: str,
    attempt: int,
    image: str,
    command: list[str],
    env: dict[str, str],
    max_lifetime_s: float | None = None,
    workdir: str | None = None,
    secrets_parameter: str | None = None,
    region: str | None = None,
) -> str:
    """The boot script. `env` is the non-secret environment written into the env file; secrets come
    from `secrets_parameter` (an SSM parameter in `region`) at boot, so the script holds no secret
    value and --dry-run can print it as is."""
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
    ]
    if secrets_parameter:
        if not region:
            raise ValueError("build_user_data: secrets_parameter needs the region it lives in")
        lines += secret_fetch_lines(secrets_parameter, region)
    lines += [
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
