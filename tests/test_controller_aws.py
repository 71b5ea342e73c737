"""The serverless controller on AWS Lambda + EventBridge, over real HTTP against moto_server: deploy
creates exactly the function, schedule, permission and secret (every call's parameters valid against
botocore's service models), a second deploy updates in place, remove deletes all; the code zip holds
cloudtune's own source; the handler, invoked in-process over a file:// store, does one control()
pass; and the CLI's refusals are one line, exit 2, before anything is created."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.validate import ParamValidator

from cloudtune.run import controller_aws as A
from tests._run_util import ROOT, quickstart_spec

SECRET = "rp-controller-secret-4242"
TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                                                  "Action": "sts:AssumeRole"}]}


@pytest.fixture
def aws(aws_env, monkeypatch):
    """A boto3 Session on moto_server (AWS_ENDPOINT_URL), recording every call and its parameters."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env)
    session = boto3.Session()
    calls: list[tuple[str, str, dict, object]] = []

    def record(params, model, **_):
        calls.append((model.service_model.service_name, model.name, json.loads(json.dumps(params, default=str)),
                      model))

    session.events.register("before-parameter-build.*.*", record)
    role = session.client("iam").create_role(RoleName=f"ctl-{uuid.uuid4().hex[:8]}",
                                             AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]["Arn"]
    return SimpleNamespace(session=session, calls=calls, role=role, endpoint=aws_env)


def _dep(role: str, **over) -> A.Deployment:
    tag = uuid.uuid4().hex[:8]  # moto_server is shared by the session
    return A.Deployment(store_url="s3://ctl-bucket/jobs", role_arn=role, function_name=f"ctl-fn-{tag}",
                        rule_name=f"ctl-rule-{tag}", secret_name=f"ctl-secret-{tag}", **over)


def test_code_zip_holds_cloudtune_and_its_providers_and_imports_from_the_zip_alone(tmp_path):
    code = A.build_zip()
    names = zipfile.ZipFile(io.BytesIO(code)).namelist()
    assert "cloudtune/run/controller_aws.py" in names and "cloudtune/run/controller.py" in names
    assert "cloudtune/providers/__init__.py" in names and "cloudtune/providers/local.py" in names
    assert any(n.startswith("cloudtune/data/") and n.endswith(".csv") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert A.build_zip() == code  # stable bytes: an unchanged redeploy keeps its CodeSha256
    zipfile.ZipFile(io.BytesIO(code)).extractall(tmp_path / "fn")
    # Lambda puts the zip's root first on sys.path; the handler and the providers resolve from there.
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "import cloudtune.run.controller_aws as m, cloudtune.providers.local as p; "
                           "print(m.__file__); print(p.__file__); print(callable(m.handler))", str(tmp_path / "fn")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert all(line.startswith(str(tmp_path / "fn")) for line in lines[:2]) and lines[2] == "True"


def test_bundle_deps_is_a_pip_install_for_lambdas_platform_and_its_files_go_to_the_zip_root(tmp_path):
    cmd = A.bundle_command(tmp_path / "deps")
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--") and "=" not in cmd[i]}
    assert flags["--target"] == str(tmp_path / "deps") and flags["--platform"] == "manylinux2014_x86_64"
    assert flags["--python-version"] == "3.11" and "--only-binary=:all:" in cmd
    assert {d.split(">")[0].split("<")[0] for d in A.RUNTIME_DEPS} >= {"typer", "pydantic", "boto3", "httpx"}
    deps = tmp_path / "deps"
    (deps / "yaml").mkdir(parents=True)
    (deps / "yaml" / "__init__.py").write_text("X = 1\n")
    names = zipfile.ZipFile(io.BytesIO(A.build_zip(deps))).namelist()
    assert "yaml/__init__.py" in names and "cloudtune/run/controller_aws.py" in names


def test_deploy_creates_exactly_these_resources_and_every_call_matches_botocores_models(aws):
    dep = _dep(aws.role)
    code = A.build_zip()
    arns = A.deploy(dep, aws.session, {"RUNPOD_API_KEY": SECRET}, code)
    lam, events, sm = (aws.session.client(s) for s in ("lambda", "events", "secretsmanager"))

    fn = lam.get_function(FunctionName=dep.function_name)
    cfg = fn["Configuration"]
    assert cfg["FunctionArn"] == arns["function_arn"] and cfg["Role"] == aws.role
    assert (cfg["Runtime"], cfg["Handler"], cfg["Timeout"]) == ("python3.11", A.HANDLER, 120)
    env = cfg["Environment"]["Variables"]
    assert env["CLOUDTUNE_STORE_URL"] == "s3://ctl-bucket/jobs" and env["CLOUDTUNE_SECRET_ID"] == arns["secret_arn"]
    assert SECRET not in json.dumps(fn, default=str)  # the function's configuration never holds a key
    assert fn["Concurrency"]["ReservedConcurrentExecutions"] == 1

    rule = events.describe_rule(Name=dep.rule_name)
    assert (rule["ScheduleExpression"], rule["State"], rule["Arn"]) == ("rate(1 minute)", "ENABLED", arns["rule_arn"])
    targets = events.list_targets_by_rule(Rule=dep.rule_name)["Targets"]
    assert [(t["Id"], t["Arn"]) for t in targets] == [(A.TARGET_ID, arns["function_arn"])]
    [stmt] = json.loads(lam.get_policy(FunctionName=dep.function_name)["Policy"])["Statement"]
    assert stmt["Action"] == "lambda:InvokeFunction" and stmt["Principal"] == {"Service": "events.amazonaws.com"}
    assert stmt["Condition"]["ArnLike"]["AWS:SourceArn"] == arns["rule_arn"]
    assert json.loads(sm.get_secret_value(SecretId=arns["secret_arn"])["SecretString"]) == {"RUNPOD_API_KEY": SECRET}
    assert A.status(dep, aws.session) == dict.fromkeys(("function", "rule", "target", "permission", "secret"), True)

    ops = {(svc, op) for svc, op, _, _ in aws.calls}
    assert {("lambda", "CreateFunction"), ("lambda", "PutFunctionConcurrency"), ("lambda", "AddPermission"),
            ("events", "PutRule"), ("events", "PutTargets"), ("secretsmanager", "CreateSecret")} <= ops
    for svc, op, params, model in aws.calls:
        if op == "CreateFunction":
            params["Code"]["ZipFile"] = b"zip"  # bytes did not survive the JSON copy; the shape is what counts
        if op == "UpdateFunctionCode":
            params["ZipFile"] = b"zip"
        report = ParamValidator().validate(params, model.input_shape)
        assert not report.has_errors(), (svc, op, report.generate_report())
    A.remove(dep, aws.session)


def test_deploy_goes_on_when_the_account_refuses_any_reserved_concurrency(aws, capsys):
    """New accounts have a concurrency limit of 10 and AWS keeps 10 unreserved: PutFunctionConcurrency
    answers 400 InvalidParameterValueException (the message AWS sends, below). The deploy must still
    complete: the invocation lease, not the reservation, keeps invocations apart."""
    from botocore.awsrequest import AWSResponse

    refused = []

    def refuse(model, **_):
        refused.append(model.name)
        body = {"Error": {"Code": "InvalidParameterValueException", "Message": (
            "Specified ReservedConcurrentExecutions for function decreases account's "
            "UnreservedConcurrentExecution below its minimum value of [10].")},
            "ResponseMetadata": {"HTTPStatusCode": 400}}
        return AWSResponse("https://lambda.invalid", 400, {}, None), body

    aws.session.events.register("before-call.lambda.PutFunctionConcurrency", refuse)
    dep = _dep(aws.role)
    A.deploy(dep, aws.session, {"RUNPOD_API_KEY": SECRET}, A.build_zip())
    assert refused == ["PutFunctionConcurrency"]
    assert A.status(dep, aws.session) == dict.fromkeys(("function", "rule", "target", "permission", "secret"), True)
    assert "reserved concurrency not set" in capsys.readouterr().err
    A.remove(dep, aws.session)


def test_a_second_invocation_while_one_runs_does_nothing(aws, tmp_path, monkeypatch):
    """What reserved concurrency 1 gave, without it: an invocation whose predecessor still runs (its
    invocation lease live in the store) returns at once and touches no job; once the lease is
    released the next invocation ticks."""
    from cloudtune.run.job_state import REGISTRY_PREFIX
    from cloudtune.store import open_store

    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    store.put_json(f"{REGISTRY_PREFIX}job-x.json", {"job_id": "job-x", "controller": "aws-lambda", "time": 0})
    monkeypatch.setenv("CLOUDTUNE_STORE_URL", store_url)
    monkeypatch.delenv("CLOUDTUNE_SECRET_ID", raising=False)
    monkeypatch.setenv("CLOUDTUNE_CONTROLLER_SECONDS", "1")
    context = SimpleNamespace(function_name="ctl-fn", aws_request_id="req-2",
                              get_remaining_time_in_millis=lambda: 120_000)

    running = A.invocation_lease(store, "ctl-fn", "req-1")
    assert running.acquire()
    assert A.handler({}, context) == []
    assert store.list("job-x/") == []  # no lease taken on the job, nothing written
    running.release()
    out = A.handler({}, context)
    assert [r["job_id"] for r in out] == ["job-x"]  # ticked (no state in the store: reported, not skipped)
    info, _ = A.invocation_lease(store, "ctl-fn", "observer").read()
    assert info.holder == "lambda-invocation:ctl-fn:req-2" and info.expires_at == 0.0  # released at the end


def test_deploy_twice_updates_in_place_then_remove_deletes_everything(aws, tmp_path):
    dep = _dep(aws.role)
    first = A.deploy(dep, aws.session, {"RUNPOD_API_KEY": "old"}, A.build_zip())
    extra = tmp_path / "deps"
    (extra / "pkg").mkdir(parents=True)
    (extra / "pkg" / "__init__.py").write_text("")
    code2 = A.build_zip(extra)
    again = A.deploy(A.Deployment(**{**dep.__dict__, "store_endpoint": "https://s3.example"}), aws.session,
                     {"RUNPOD_API_KEY": "new"}, code2)
    assert again == first  # same function, rule and secret: updated, not recreated
    lam, events, sm = (aws.session.client(s) for s in ("lambda", "events", "secretsmanager"))
    cfg = lam.get_function(FunctionName=dep.function_name)["Configuration"]
    assert cfg["Environment"]["Variables"]["CLOUDTUNE_STORE_ENDPOINT"] == "https://s3.example"
    import base64
    import hashlib

    assert cfg["CodeSha256"] == base64.b64encode(hashlib.sha256(code2).digest()).decode()
    assert len(events.list_targets_by_rule(Rule=dep.rule_name)["Targets"]) == 1
    assert len(json.loads(lam.get_policy(FunctionName=dep.function_name)["Policy"])["Statement"]) == 1
    assert json.loads(sm.get_secret_value(SecretId=dep.secret_name)["SecretString"]) == {"RUNPOD_API_KEY": "new"}
    assert not [op for _, op, _, _ in aws.calls[len(aws.calls) // 2:] if op.startswith("Create")]

    assert A.remove(dep, aws.session) == ["target", "rule", "permission", "function", "secret"]
    assert A.status(dep, aws.session) == dict.fromkeys(("function", "rule", "target", "permission", "secret"), False)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName=dep.function_name)
    assert A.remove(dep, aws.session) == []  # idempotent: nothing left to delete


def test_a_first_deploy_that_fails_part_way_leaves_nothing(aws):
    dep = _dep("arn:aws:iam::123456789012:role/no-such-role")  # Lambda refuses a role it cannot assume
    with pytest.raises(Exception, match="role"):
        A.deploy(dep, aws.session, {"RUNPOD_API_KEY": SECRET}, A.build_zip())
    ops = [o for _, o, _, _ in aws.calls]
    assert "CreateSecret" in ops and "CreateFunction" in ops  # it got that far
    assert not any(A.status(dep, aws.session).values())  # and the secret it made is gone again


def test_the_handler_loads_its_secret_and_does_one_control_pass_over_a_file_store(aws, tmp_path, monkeypatch):
    from cloudtune.run.job_state import registry_key, state_key
    from cloudtune.run.lease import Lease
    from cloudtune.store import open_store

    spec = quickstart_spec(tmp_path, "job")
    env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "cloudtune", "run", str(spec), "--yes", "--controller", "cron",
                           "--json"], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout.strip().splitlines()[-1])["job_id"]
    store = open_store(f"file://{tmp_path / 'store'}")
    snap = store.read_json(state_key(job_id))
    snap["job"]["stop_requested"] = "test: stop before launch"  # a registered job the pass can end without a GPU
    store.put_json(state_key(job_id), snap)

    name = f"ctl-secret-{uuid.uuid4().hex[:8]}"
    arn = aws.session.client("secretsmanager").create_secret(
        Name=name, SecretString=json.dumps({"VAST_API_KEY": SECRET}))["ARN"]
    monkeypatch.setenv("CLOUDTUNE_STORE_URL", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("CLOUDTUNE_SECRET_ID", arn)
    monkeypatch.setenv("CLOUDTUNE_HOME", str(tmp_path / "lambda-home"))
    monkeypatch.setenv("VAST_API_KEY", "placeholder")  # restored after the test; the handler overwrites it
    context = SimpleNamespace(function_name="cloudtune-controller", get_remaining_time_in_millis=lambda: 120_000)

    out = A.handler({"source": "aws.events"}, context)
    assert out == [{"job_id": job_id, "action": "finished", "state": "stopped", "detail": ""}]
    assert os.environ["VAST_API_KEY"] == SECRET
    assert store.read_json(state_key(job_id))["job"]["state"] == "stopped"
    assert not store.exists(registry_key(job_id))
    info, _ = Lease(store, job_id, "observer").read()
    assert info.holder == "controller:aws-lambda/cloudtune-controller:0:scheduled" and info.expires_at == 0.0


def _cli(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"CLOUDTUNE_HOME": str(tmp_path / "home"), "RUNPOD_API_KEY": SECRET, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                **extra})
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


ROLE = "arn:aws:iam::123456789012:role/ctl"


@pytest.mark.parametrize("args, words", [
    (["--store", "file:///tmp/jobs", "--role-arn", ROLE], "cannot be reached from AWS Lambda"),
    (["--store", "s3://b/jobs"], "needs --role-arn"),
    (["--store", "s3://b/jobs", "--role-arn", "ctl"], "is not an IAM role ARN"),
    (["--store", "s3://b/jobs", "--role-arn", ROLE], "no AWS credentials"),
])
def test_lambda_deploy_refusals_are_one_line_exit_2(tmp_path, args, words):
    proc = _cli(tmp_path, "controller", "deploy", "--on", "aws-lambda", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not (tmp_path / "home" / "controller.json").exists()


def test_cli_deploy_status_handover_check_and_remove_over_moto(aws, tmp_path):
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": aws.endpoint}
    aws.session.client("s3").create_bucket(Bucket="ctl-cli")  # `run` probes its store first
    spec = quickstart_spec(tmp_path, "job", store={"url": "s3://ctl-cli/jobs"})
    refused = _cli(tmp_path, "run", str(spec), "--yes", "--controller", "aws-lambda", **creds)
    assert refused.returncode == 2 and "on aws-lambda" in refused.stderr and len(refused.stderr.splitlines()) == 1

    got = _cli(tmp_path, "controller", "deploy", "--on", "aws-lambda", "--store", "s3://ctl-cli/jobs",
               "--role-arn", aws.role, "--secret-env", "RUNPOD_API_KEY", "--json", **creds)
    assert got.returncode == 0, got.stderr
    row = json.loads(got.stdout.strip().splitlines()[-1])
    assert row["on"] == "aws-lambda" and row["secret_vars"] == ["RUNPOD_API_KEY"] and row["bundled_deps"] is False
    assert SECRET not in got.stdout + got.stderr
    status = _cli(tmp_path, "controller", "status", "--json", **creds)
    assert status.returncode == 0, status.stderr
    [d] = json.loads(status.stdout)["deployments"]
    assert d["resources"] == dict.fromkeys(("function", "rule", "target", "permission", "secret"), True)
    text = _cli(tmp_path, "controller", "status", **creds)
    assert "aws-lambda: cloudtune-controller for s3://ctl-cli/jobs in us-east-1: all 5 resources exist" in text.stdout

    gone = _cli(tmp_path, "controller", "remove", "--on", "aws-lambda", **creds)
    assert gone.returncode == 0, gone.stderr
    assert "deleted target, rule, permission, function, secret" in gone.stdout
    assert json.loads((tmp_path / "home" / "controller.json").read_text()) == []
