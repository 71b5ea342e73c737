"""The serverless controller on AWS: a Lambda function on an EventBridge `rate(1 minute)` rule.

Why Lambda: for users who want no Modal account, the same per-minute `controller.control()` runs as
a Lambda invocation that bills only while it runs (~50 s of its 120 s timeout); nothing idles.

What `deploy` creates (and `remove` deletes, `status` reports):
- a Secrets Manager secret `cloudtune-controller` holding the provider keys as a JSON object. The
  function's environment holds only the secret's ARN, never its values: anyone allowed
  lambda:GetFunctionConfiguration can read a function's environment. The handler loads the secret
  at start.
- the function `cloudtune-controller` (python3.11, handler `cloudtune.run.controller_aws.handler`),
  its code a zip of cloudtune's own source (cloudtune/ and cloudtune/providers/) plus, with
  `bundle_deps`, its dependencies installed by pip for Lambda's platform. Two invocations must never
  tick at once under the one holder name (Modal's `max_containers=1`): each invocation first takes an
  invocation lease in the store (`_controller/invocations/<function>.json`, compare-and-swap, TTL the
  function's timeout) and returns at once when another live invocation holds it. Reserved concurrency
  1 is asked for as well, but only as a cost backstop: accounts whose concurrency limit is 10 (new
  accounts) refuse any reservation, and deploy goes on without it.
- the rule `cloudtune-controller` with the function as its target, and the lambda:InvokeFunction
  permission for events.amazonaws.com from that rule.

The execution role is the user's (`role_arn`): it needs S3 on the store, secretsmanager:GetSecretValue
on the secret, CloudWatch Logs, and whatever the jobs' providers need (EC2 for aws jobs).

boto3 is imported lazily (the CLI stays fast); every client comes from the caller's boto3 Session, so
tests point it at moto_server with AWS_ENDPOINT_URL, and botocore validates every call's parameters
against its service model before sending.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FUNCTION_NAME = "cloudtune-controller"
RULE_NAME = "cloudtune-controller"
SECRET_NAME = "cloudtune-controller"
STATEMENT_ID = "cloudtune-controller-events"
TARGET_ID = "cloudtune-controller"
HANDLER = "cloudtune.run.controller_aws.handler"
RUNTIME = "python3.11"
SCHEDULE = "rate(1 minute)"
TICK_SECONDS = 50.0  # of each per-minute invocation
FUNCTION_TIMEOUT_S = 120
MEMORY_MB = 512
ZIP_LIMIT = 50 * 1024 * 1024  # Lambda's limit for a zip sent inline (CreateFunction ZipFile)
ROLE_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
# The execution role gives the function its own AWS credentials; the secret holds the others' keys.
DEFAULT_SECRET_VARS = ("RUNPOD_API_KEY", "VAST_API_KEY", "LAMBDA_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")
# What the controller imports at run time (pyproject's core dependencies, plus boto3 for the s3:// store:
# the runtime's own boto3 may predate S3 conditional writes).
RUNTIME_DEPS = ("typer>=0.26,<0.29", "rich>=13.7", "pydantic>=2.6", "pyyaml>=6.0", "httpx>=0.27",
                "tenacity>=8.2", "psutil>=5.9", "boto3>=1.35.50")


@dataclass(frozen=True)
class Deployment:
    store_url: str
    role_arn: str
    store_endpoint: str | None = None
    function_name: str = FUNCTION_NAME
    rule_name: str = RULE_NAME
    secret_name: str = SECRET_NAME

    def to_dict(self) -> dict[str, Any]:
        # app_name: what `controller status` prints for every deployment, Modal's or this.
        return {"on": "aws-lambda", "store_url": self.store_url, "store_endpoint": self.store_endpoint,
                "role_arn": self.role_arn, "app_name": self.function_name, "function_name": self.function_name,
                "rule_name": self.rule_name, "secret_name": self.secret_name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Deployment:
        return cls(store_url=d["store_url"], role_arn=d.get("role_arn", ""), store_endpoint=d.get("store_endpoint"),
                   function_name=d.get("function_name", FUNCTION_NAME), rule_name=d.get("rule_name", RULE_NAME),
                   secret_name=d.get("secret_name", SECRET_NAME))


def check(dep: Deployment, session: Any) -> None:
    """Everything that can be refused before anything is created. One line (UserError), exit 2."""
    from cloudtune.errors import UserError

    if not dep.store_url.startswith("s3://"):
        raise UserError(f"controller store {dep.store_url!r} cannot be reached from AWS Lambda; use the s3:// store "
                        f"your jobs use (store.url in the job spec)")
    if not dep.role_arn:
        raise UserError("controller deploy --on aws-lambda needs --role-arn: the ARN of an IAM role Lambda may "
                        "assume (S3 on the store, secretsmanager:GetSecretValue, CloudWatch Logs)")
    if not ROLE_RE.match(dep.role_arn):
        raise UserError(f"--role-arn {dep.role_arn!r} is not an IAM role ARN; expected "
                        f"arn:aws:iam::<12-digit account>:role/<name>")
    if session.get_credentials() is None:
        raise UserError("controller deploy --on aws-lambda: no AWS credentials; set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run `aws configure`")
    if not session.region_name:
        raise UserError("controller deploy --on aws-lambda: no AWS region; set AWS_DEFAULT_REGION or pass --region")


# ---------------------------------------------------------------------------------------------- code


def _add_tree(zf: zipfile.ZipFile, src: Path, arc_root: str) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo"):
            continue
        info = zipfile.ZipInfo(f"{arc_root}/{rel.as_posix()}" if arc_root else rel.as_posix(),
                               date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16  # Lambda must read every file; stable bytes for stable CodeSha256
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, path.read_bytes())


def build_zip(deps_dir: Path | None = None) -> bytes:
    """The function's code: cloudtune's own source (cloudtune/, with cloudtune/providers/ where an
    editable install keeps it beside the package), plus the files of `deps_dir` at the zip's root."""
    from cloudtune.run.controller_modal import _providers_dir

    pkg, providers = _providers_dir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _add_tree(zf, pkg, "cloudtune")
        if providers.parent != pkg:
            _add_tree(zf, providers, "cloudtune/providers")
        if deps_dir is not None:
            _add_tree(zf, deps_dir, "")
    return buf.getvalue()


def bundle_command(target: Path, deps: tuple[str, ...] = RUNTIME_DEPS) -> list[str]:
    """pip installing the dependencies as Lambda's python3.11 on x86_64 needs them: binary wheels only,
    for manylinux2014, whatever this machine is."""
    return [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
            "--platform", "manylinux2014_x86_64", "--implementation", "cp", "--python-version", "3.11",
            "--only-binary=:all:", "--upgrade", *deps]


def bundle_deps(target: Path, deps: tuple[str, ...] = RUNTIME_DEPS) -> None:
    """Runs `bundle_command` (downloads from PyPI). Only when the user asks for it (--bundle-deps)."""
    import subprocess

    from cloudtune.errors import UserError

    proc = subprocess.run(bundle_command(target, deps), capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"--bundle-deps: pip could not install the controller's dependencies for Lambda: {last}")


# -------------------------------------------------------------------------------------------- deploy


def _missing(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in ("ResourceNotFoundException", "NotFoundException")


def _environment(dep: Deployment, secret_arn: str) -> dict[str, dict[str, str]]:
    env = {"CLOUDTUNE_STORE_URL": dep.store_url, "CLOUDTUNE_SECRET_ID": secret_arn,
           "CLOUDTUNE_HOME": "/tmp/cloudtune"}
    if dep.store_endpoint:
        env["CLOUDTUNE_STORE_ENDPOINT"] = dep.store_endpoint
    return {"Variables": env}


def _put_secret(sm: Any, dep: Deployment, secret_env: dict[str, str]) -> str:
    body = json.dumps(secret_env, sort_keys=True)
    try:
        return sm.put_secret_value(SecretId=dep.secret_name, SecretString=body)["ARN"]
    except sm.exceptions.ResourceNotFoundException:
        return sm.create_secret(Name=dep.secret_name, SecretString=body,
                                Description="cloudtune controller: provider keys, loaded by the Lambda at start",
                                Tags=[{"Key": "cloudtune", "Value": "controller"}])["ARN"]


def _put_function(lam: Any, dep: Deployment, code: bytes, secret_arn: str) -> str:
    config = {"Role": dep.role_arn, "Handler": HANDLER, "Runtime": RUNTIME, "Timeout": FUNCTION_TIMEOUT_S,
              "MemorySize": MEMORY_MB, "Environment": _environment(dep, secret_arn),
              "Description": f"cloudtune controller for {dep.store_url}"}
    try:
        lam.get_function(FunctionName=dep.function_name)
    except lam.exceptions.ResourceNotFoundException:
        arn = lam.create_function(FunctionName=dep.function_name, Code={"ZipFile": code}, Publish=False,
                                  Architectures=["x86_64"], Tags={"cloudtune": "controller"}, **config)["FunctionArn"]
        lam.get_waiter("function_active_v2").wait(FunctionName=dep.function_name)
    else:  # deployed before: update in place (code, then configuration; each waits for the last)
        lam.update_function_code(FunctionName=dep.function_name, ZipFile=code, Publish=False)
        lam.get_waiter("function_updated_v2").wait(FunctionName=dep.function_name)
        arn = lam.update_function_configuration(FunctionName=dep.function_name, **config)["FunctionArn"]
        lam.get_waiter("function_updated_v2").wait(FunctionName=dep.function_name)
    _reserve_one(lam, dep.function_name)
    return arn


def _reserve_one(lam: Any, function_name: str) -> bool:
    """Reserved concurrency 1, where the account allows it (a backstop; the invocation lease is the guard).

    AWS keeps at least 10 unreserved executions per account, so an account whose limit is 10 refuses
    every reservation with InvalidParameterValueException; that must not fail the deploy."""
    from botocore.exceptions import ClientError

    try:
        lam.put_function_concurrency(FunctionName=function_name, ReservedConcurrentExecutions=1)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("InvalidParameterValueException", "LimitExceededException"):
            raise
        print(f"note: reserved concurrency not set on {function_name} ({err.response['Error'].get('Message', '')[:160]});"
              f" the controller's invocation lease keeps invocations apart", file=sys.stderr)
        return False


def _put_schedule(lam: Any, events: Any, dep: Deployment, function_arn: str) -> str:
    rule_arn = events.put_rule(Name=dep.rule_name, ScheduleExpression=SCHEDULE, State="ENABLED",
                               Description=f"cloudtune controller tick for {dep.store_url}")["RuleArn"]
    try:
        lam.remove_permission(FunctionName=dep.function_name, StatementId=STATEMENT_ID)
    except lam.exceptions.ResourceNotFoundException:
        pass
    lam.add_permission(FunctionName=dep.function_name, StatementId=STATEMENT_ID, Action="lambda:InvokeFunction",
                       Principal="events.amazonaws.com", SourceArn=rule_arn)
    failed = events.put_targets(Rule=dep.rule_name, Targets=[{"Id": TARGET_ID, "Arn": function_arn}])
    if failed.get("FailedEntryCount"):
        raise RuntimeError(f"EventBridge refused the target: {failed.get('FailedEntries')}")
    return rule_arn


def deploy(dep: Deployment, session: Any, secret_env: dict[str, str], code: bytes) -> dict[str, str]:
    """Create or update the secret, the function, the rule, its permission and target. A first deploy
    that fails part-way removes what it made: nothing is left half-deployed."""
    from cloudtune.errors import UserError

    check(dep, session)
    if len(code) > ZIP_LIMIT:
        raise UserError(f"the controller's code zip is {len(code) / 2**20:.1f} MiB, over Lambda's "
                        f"{ZIP_LIMIT // 2**20} MiB limit for an inline upload; bundle fewer dependencies")
    lam, events, sm = session.client("lambda"), session.client("events"), session.client("secretsmanager")
    first = not status(dep, session)["function"]
    try:
        secret_arn = _put_secret(sm, dep, secret_env)
        function_arn = _put_function(lam, dep, code, secret_arn)
        rule_arn = _put_schedule(lam, events, dep, function_arn)
    except Exception:
        if first:
            remove(dep, session)
        raise
    return {"function_arn": function_arn, "rule_arn": rule_arn, "secret_arn": secret_arn}


def remove(dep: Deployment, session: Any) -> list[str]:
    """Delete targets, rule, permission, function and secret, in that order (nothing invokes a function
    being deleted); what is already gone is skipped. Returns what was deleted."""
    lam, events, sm = session.client("lambda"), session.client("events"), session.client("secretsmanager")
    have = status(dep, session)
    steps = [
        ("target", lambda: events.remove_targets(Rule=dep.rule_name, Ids=[TARGET_ID])),
        ("rule", lambda: events.delete_rule(Name=dep.rule_name)),
        ("permission", lambda: lam.remove_permission(FunctionName=dep.function_name, StatementId=STATEMENT_ID)),
        ("function", lambda: lam.delete_function(FunctionName=dep.function_name)),
        ("secret", lambda: sm.delete_secret(SecretId=dep.secret_name, ForceDeleteWithoutRecovery=True)),
    ]
    done = []
    for what, call in steps:
        if not have[what]:
            continue
        try:
            call()
            done.append(what)
        except Exception as err:  # noqa: BLE001 - only "not there" is skipped; anything else is raised
            if not _missing(err):
                raise
    return done


def status(dep: Deployment, session: Any) -> dict[str, bool]:
    """Which of the deployment's resources exist."""
    lam, events, sm = session.client("lambda"), session.client("events"), session.client("secretsmanager")

    def exists(call: Any) -> Any:
        try:
            return call() or True
        except Exception as err:  # noqa: BLE001
            if _missing(err):
                return False
            raise

    targets = exists(lambda: events.list_targets_by_rule(Rule=dep.rule_name))
    policy = exists(lambda: lam.get_policy(FunctionName=dep.function_name))
    return {
        "function": bool(exists(lambda: lam.get_function(FunctionName=dep.function_name))),
        "rule": bool(exists(lambda: events.describe_rule(Name=dep.rule_name))),
        "target": bool(targets) and any(t["Id"] == TARGET_ID for t in targets.get("Targets", [])),
        "permission": bool(policy) and STATEMENT_ID in policy.get("Policy", ""),
        "secret": bool(exists(lambda: sm.describe_secret(SecretId=dep.secret_name))),
    }


# ------------------------------------------------------------------------------------------- handler


def load_secrets(secret_id: str, client: Any = None) -> list[str]:
    """Put the secret's keys into os.environ (the providers read their keys there). Returns the names."""
    if client is None:
        import boto3

        client = boto3.client("secretsmanager")
    values = json.loads(client.get_secret_value(SecretId=secret_id)["SecretString"] or "{}")
    os.environ.update({str(k): str(v) for k, v in values.items()})
    return sorted(values)


def invocation_lease(store: Any, function_name: str, request_id: str | None) -> Any:
    """The lease that keeps two invocations of one function apart (see the module docstring).

    Its TTL is the function's timeout: Lambda kills an invocation by then, so a lease left behind by
    a killed one lapses no later than the next-but-one tick."""
    import uuid

    from cloudtune.run.lease import Lease

    return Lease(store, function_name, f"lambda-invocation:{function_name}:{request_id or uuid.uuid4().hex}",
                 ttl_s=float(FUNCTION_TIMEOUT_S), key=f"_controller/invocations/{function_name}.json")


def handler(event: dict[str, Any] | None, context: Any) -> list[dict[str, Any]]:
    """One invocation: load the secret, then `control()` the store's handed-over jobs for ~50 s.

    The holder name is fixed per function (the invocation lease: one invocation at a time), so the
    lease taken in one minute is renewed in the next; the state.db is fresh each time, in a temporary
    directory, so every invocation imports the jobs' state from the store, which is the truth
    (a warm container's old db may predate another controller's decisions)."""
    from cloudtune.run.controller import control
    from cloudtune.run.state import StateDB
    from cloudtune.store import open_store

    secret_id = os.environ.get("CLOUDTUNE_SECRET_ID")
    if secret_id:
        load_secrets(secret_id)
    seconds = float(os.environ.get("CLOUDTUNE_CONTROLLER_SECONDS", TICK_SECONDS))
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        seconds = max(1.0, min(seconds, context.get_remaining_time_in_millis() / 1000 - 30))  # room to write back
    name = getattr(context, "function_name", None) or os.environ.get("AWS_LAMBDA_FUNCTION_NAME") or FUNCTION_NAME
    store = open_store(os.environ["CLOUDTUNE_STORE_URL"], endpoint_url=os.environ.get("CLOUDTUNE_STORE_ENDPOINT"))
    invocation = invocation_lease(store, name, getattr(context, "aws_request_id", None))
    if not invocation.acquire():  # a slow invocation is still ticking under our one holder name
        info, _ = invocation.read()
        print(json.dumps({"skipped": "another invocation is running", "holder": info.holder if info else None}))
        return []
    try:
        with tempfile.TemporaryDirectory(prefix="cloudtune-controller-") as tmp:
            db = StateDB(Path(tmp) / "state.db")
            started = time.time()
            reports = control(store, holder=f"controller:aws-lambda/{name}:0:scheduled", db=db, seconds=seconds)
            out = [r.to_dict() for r in reports]
    finally:
        invocation.release()
    print(json.dumps({"ticked_s": round(time.time() - started, 1), "jobs": out}))  # CloudWatch Logs
    return out
