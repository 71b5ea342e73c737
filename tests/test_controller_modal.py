"""The serverless controller on Modal, built offline with the real `modal` SDK and deployed through a
fake client whose calls are checked against the SDK's signatures; and the one-line refusals of
`controller deploy` and `run --controller` before anything is written."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import modal
import pytest

from cloudtune.run import controller_modal as M
from tests._run_util import ROOT, quickstart_spec

SECRET = "AKIA-controller-secret-77"


@pytest.fixture(autouse=True)
def _no_modal_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "no-modal.toml"))


class FakeControllerClient:
    """Records what the SDK client would do; each method's SDK counterpart is signature-checked below."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, str]] = {}
        self.apps: dict[str, object] = {}

    def put_secret(self, name: str, env_dict: dict[str, str]) -> None:
        self.secrets[name] = dict(env_dict)

    def deploy(self, app: Any, name: str) -> str:
        self.apps[name] = app
        return f"ap-{name}"

    def deployed(self, name: str) -> bool:
        return name in self.apps

    def stop(self, name: str) -> None:
        self.apps.pop(name, None)


def _accepts(fn, *args, **kwargs) -> None:
    inspect.signature(fn).bind(*args, **kwargs)  # raises TypeError when the SDK would


def test_the_sdk_calls_the_real_client_makes_match_the_installed_sdk():
    app = modal.App("x")
    _accepts(modal.App.deploy, app, name="cloudtune-controller")
    _accepts(modal.App.lookup, "cloudtune-controller", create_if_missing=False)
    _accepts(modal.App.stop, app)
    # SecretManager's wrapped methods report `self` in their signature; the docs call them as
    # modal.Secret.objects.create("my-secret", contents), as SdkControllerClient does.
    _accepts(modal.Secret.objects.create, modal.Secret.objects, "cloudtune-controller", {"A": "b"})
    _accepts(modal.Secret.objects.delete, modal.Secret.objects, "cloudtune-controller", allow_missing=True)
    fake, real = FakeControllerClient, M.SdkControllerClient
    for name in ("put_secret", "deploy", "deployed", "stop"):
        assert inspect.signature(getattr(fake, name)) == inspect.signature(getattr(real, name)), name


def test_the_controller_app_is_a_real_scheduled_modal_function():
    dep = M.Deployment(store_url="s3://my-bucket/cloudtune", store_endpoint=None)
    app, fn = M.define_app(dep)
    assert isinstance(app, modal.App) and app.name == "cloudtune-controller"
    assert isinstance(fn, modal.Function)
    # The schedule and secret are passed to the real decorator (it validates types); the Secret is a
    # reference by name: its values never sit in the definition.
    assert SECRET not in repr(fn) and SECRET not in repr(app)


def test_deploy_puts_only_the_named_secrets_in_the_platform_store_and_deploys():
    client = FakeControllerClient()
    env = {"RUNPOD_API_KEY": "rp-1", "AWS_SECRET_ACCESS_KEY": SECRET, "UNRELATED": "x"}
    values = M.secret_values(M.DEFAULT_SECRET_VARS, env)
    app_id = M.deploy(M.Deployment(store_url="s3://my-bucket/cloudtune"), client, values)
    assert app_id == "ap-cloudtune-controller" and client.deployed("cloudtune-controller")
    assert client.secrets["cloudtune-controller"] == {"RUNPOD_API_KEY": "rp-1", "AWS_SECRET_ACCESS_KEY": SECRET}


def _cli(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLOUDTUNE_HOME": str(tmp_path / "home"), "AWS_SECRET_ACCESS_KEY": SECRET,
           "MODAL_CONFIG_PATH": str(tmp_path / "no-modal.toml"), **extra}
    env.pop("MODAL_TOKEN_ID", None)
    env.pop("MODAL_TOKEN_SECRET", None)
    return subprocess.run([sys.executable, "-m", "cloudtune", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args, words", [
    (["controller", "deploy", "--store", "file:///tmp/jobs"], "cannot be reached from Modal"),
    (["controller", "deploy", "--store", "s3://my-bucket/jobs"], "no Modal credentials"),
    (["controller", "deploy", "--on", "lambda", "--store", "s3://my-bucket/jobs"], "is not available"),
    (["controller", "remove"], "no controller deployed"),
    (["controller", "tick", "--store", "file:///tmp/x", "--seconds", "0"], "--seconds and --poll must be > 0"),
    (["controller", "hand-over", "nosuchjob", "--to", "cron"], "not found"),
])
def test_controller_refusals_are_one_line_exit_2(tmp_path, args, words):
    proc = _cli(tmp_path, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_run_with_a_modal_controller_but_none_deployed_writes_nothing(tmp_path):
    spec = quickstart_spec(tmp_path, "job", store={"url": "s3://my-bucket/jobs"})
    proc = _cli(tmp_path, "run", str(spec), "--yes", "--controller", "modal")
    assert proc.returncode == 2, proc.stderr
    assert "no controller is deployed for the store s3://my-bucket/jobs" in proc.stderr
    assert not (tmp_path / "home" / "state.db").exists()  # no job row: refused before create_job


def test_run_with_an_unknown_controller_is_refused(tmp_path):
    spec = quickstart_spec(tmp_path, "job")
    proc = _cli(tmp_path, "run", str(spec), "--yes", "--controller", "lambda-fn")
    assert proc.returncode == 2 and "--controller 'lambda-fn' is not known" in proc.stderr


def test_run_handed_to_cron_registers_the_job_with_its_state_and_starts_no_watchdog(tmp_path):
    from cloudtune.run.job_state import registry_key, state_key
    from cloudtune.store import open_store

    spec = quickstart_spec(tmp_path, "job")
    proc = _cli(tmp_path, "run", str(spec), "--yes", "--controller", "cron", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    job_id = out["job_id"]
    assert out["controller"] == "cron"
    store = open_store(f"file://{tmp_path / 'store'}")
    assert store.read_json(registry_key(job_id))["controller"] == "cron"
    snap = store.read_json(state_key(job_id))
    assert snap["job"]["id"] == job_id and snap["job"]["state"] == "pending"
    assert not (tmp_path / "home" / "locks" / f"watchdog-{job_id}.lock").exists()
    status = _cli(tmp_path, "controller", "status", "--store", f"file://{tmp_path / 'store'}", "--json")
    rows = json.loads(status.stdout)["jobs"]
    assert rows == [{"store": f"file://{tmp_path / 'store'}", "job_id": job_id, "state": "pending",
                     "holder": None, "lease_expires_in_s": None}]


def test_hand_over_of_a_job_a_live_controller_already_holds_is_refused(tmp_path):
    from cloudtune.run.lease import Lease
    from cloudtune.store import open_store

    spec = quickstart_spec(tmp_path, "job")
    proc = _cli(tmp_path, "run", str(spec), "--yes", "--controller", "cron", "--json")
    job_id = json.loads(proc.stdout.strip().splitlines()[-1])["job_id"]
    assert Lease(open_store(f"file://{tmp_path / 'store'}"), job_id, "controller:elsewhere:1:x", ttl_s=300).acquire()
    again = _cli(tmp_path, "controller", "hand-over", job_id, "--to", "cron")
    assert again.returncode == 2, again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "already controlled by controller:elsewhere:1:x" in lines[0]
