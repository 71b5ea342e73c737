"""docs/first-cloud-job.md, run as written (#14 item 7): every command in it, in order, against the fakes.

The doc marks its fenced blocks with `<!-- doc-test: KIND ... -->`:
  skip REASON       not run (pip install)
  run               each line is a command (a `# comment` tail is dropped): `cloudtune ...` is the real
                    CLI (a subprocess of this venv), `aws s3 mb|cp` the same S3 calls through boto3;
                    every one must exit 0. `<job-id>` is the job the last real run created.
  run rents         the same, for a command that rents: it runs for real through the RunPod fake to `done`,
                    with the spec's model swapped for tiny:reverse and 5 steps (a CPU cannot train 8B),
                    stdin a terminal on which the confirmation is answered "y".
  spec FILE         a YAML fragment merged into FILE (a copy of the repo's examples/ file in a scratch cwd)
  env               `export VAR=...` lines: VAR is set (to a fake value) for every later command
  sees              lines (`...` = anything) each of which must appear in the output of the previous run block
  sees-when CHANGES : COMMAND   run COMMAND with CHANGES (`VAR=` unsets, `VAR=...` sets, `store.url=U`
                    edits the spec for this command only) and match the block; an `error:` block means exit 2
  python            run in the scratch cwd (after the pulls: it loads the pulled adapter)
A block without a marker, or a marker this file does not know, fails the test: the doc cannot name
a command nobody runs. The fakes: RunPod's API (tests/fakes/runpod_fake.py, it starts the trainer as
the pod's container), S3 on a moto_server of this module's own (the doc's bucket names are shared
words like `my-bucket`; other tests rely on them not existing), `AWS_ENDPOINT_URL` pointing at it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._fake_run_util import machine_env
from tests._run_util import QUICKSTART, ROOT, assert_nothing_left, cli_env, deep_update, jobs_rows
from tests.conftest import _free_port
from tests.fakes.runpod_fake import RunPodFake

DOC = ROOT / "docs" / "first-cloud-job.md"
KEY = "rp-doc-test-key-5512"
KINDS = ("skip", "run", "spec", "env", "sees", "sees-when", "python")


@dataclass
class Block:
    kind: str
    arg: str
    lang: str
    body: str
    line: int  # of the fence, for messages
    extra: dict[str, Any] = field(default_factory=dict)


def parse(text: str) -> list[Block]:
    """Every fenced block with the doc-test marker right above it (blank lines allowed between)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    marker: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^<!-- doc-test: (\S+)\s*(.*?)\s*-->$", line)
        if m:
            marker = (m.group(1), m.group(2))
        elif line.startswith("```"):
            lang, start = line[3:].strip(), i + 1
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            assert marker is not None, f"{DOC.name}:{start}: a fenced block without a <!-- doc-test: ... --> marker"
            assert marker[0] in KINDS, f"{DOC.name}:{start}: unknown doc-test kind {marker[0]!r}"
            blocks.append(Block(marker[0], marker[1], lang, "\n".join(lines[start:i]), start))
            marker = None
        elif line.strip() and marker is not None and not line.startswith("<!--"):
            raise AssertionError(f"{DOC.name}:{i + 1}: a doc-test marker not followed by a fenced block")
        i += 1
    return blocks


def commands(body: str) -> list[str]:
    out = []
    for raw in body.splitlines():
        cmd = re.sub(r"\s+#\s.*$", "", raw).strip()
        if cmd and not cmd.startswith("#"):
            out.append(cmd)
    return out


def pattern(expected: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(p) for p in expected.rstrip().split("...")) + r"\s*$")


def assert_sees(block: Block, output: str) -> None:
    got = [ln.rstrip() for ln in output.splitlines()]
    for want in block.body.splitlines():
        if want.strip():
            pat = pattern(want)
            assert any(pat.match(g) for g in got), (f"{DOC.name}:{block.line}: the doc says you see\n  {want}\n"
                                                     f"but the commands printed:\n" + "\n".join(got[-80:]))


# ------------------------------------------------------------------------------------ the world


@pytest.fixture(scope="module")
def own_moto():
    """A moto_server for this module alone (its bucket names are the doc's, which other tests use as absent)."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class World:
    """The scratch cwd, the env the doc has set so far, the spec copies, and what ran."""

    def __init__(self, tmp: Path, moto: str, fake: RunPodFake) -> None:
        self.tmp, self.moto, self.fake = tmp, moto, fake
        self.home = tmp / "home"
        self.cwd = tmp / "work"
        (self.cwd / "examples").mkdir(parents=True)
        shutil.copy(ROOT / "examples" / "data" / "reverse.jsonl", self.cwd / "alpaca_cleaned.jsonl")  # alpaca rows
        self.specs: dict[str, dict[str, Any]] = {}
        self.exported: dict[str, str] = {}
        self.job_id: str | None = None
        self.last_output = ""
        self.ran: list[str] = []

    def env(self, **over: str | None) -> dict[str, str]:
        env = cli_env(self.home, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.moto, COLUMNS="300",
                      CLOUDTUNE_RUNPOD_API_URL=self.fake.url + "/v2",
                      CLOUDTUNE_PROVIDER_CONFIG=json.dumps({"runpod": {"base_url": self.fake.url + "/v2"}}))
        for k in ("RUNPOD_API_KEY", "VAST_API_KEY", "LAMBDA_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET",
                  "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_PROFILE", "CLOUDTUNE_LAMBDA_SSH_KEY"):
            env.pop(k, None)
        env["HF_HOME"] = str(self.tmp / "hf")  # no token file from this machine's login
        env.update(self.exported)
        for k, v in over.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def spec_file(self, name: str, raw: dict[str, Any] | None = None) -> None:
        path = self.cwd / name
        if name not in self.specs:
            self.specs[name] = yaml.safe_load((ROOT / name).read_text())
        path.write_text(yaml.safe_dump(raw if raw is not None else self.specs[name]))

    def run(self, cmd: str, *, env: dict[str, str] | None = None, tty_answer: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
        if self.job_id:
            cmd = cmd.replace("<job-id>", self.job_id)
        assert "<" not in cmd, f"a placeholder left in {cmd!r} (no job ran yet?)"
        argv = shlex.split(cmd)
        env = env or self.env()
        self.ran.append(cmd)
        print(f"[{time.strftime('%X')}] {cmd}", flush=True)
        if argv[0] == "cloudtune":
            argv = [sys.executable, "-m", "cloudtune", *argv[1:]]
        elif argv[0] == "aws":  # the same S3 calls through boto3 (the AWS CLI costs ~6 s a start here)
            return self._aws_via_boto3(argv)
        if tty_answer is None:
            return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=self.cwd, timeout=timeout)
        import pty

        leader, follower = pty.openpty()
        os.write(leader, tty_answer.encode())
        try:
            proc = subprocess.run(argv, stdin=follower, capture_output=True, text=True, env=env, cwd=self.cwd,
                                  timeout=timeout)
        finally:
            os.close(follower)
            os.close(leader)
        # a terminal echoes the answer after the prompt; the captured stdout has only the prompt
        proc.stdout = re.sub(r"(\[y/N\]: )", lambda m: m.group(1) + tty_answer, proc.stdout, count=1)
        return proc

    def _aws_via_boto3(self, argv: list[str]) -> subprocess.CompletedProcess:
        """`aws s3 mb` / `aws s3 cp`: the calls the AWS CLI makes (CreateBucket, PutObject), through boto3."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.moto, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        if argv[1:3] == ["s3", "mb"]:
            s3.create_bucket(Bucket=argv[3][len("s3://"):])
        elif argv[1:3] == ["s3", "cp"]:
            bucket, _, key = argv[4][len("s3://"):].partition("/")
            s3.upload_file(str(self.cwd / argv[3]), bucket, key)
        else:
            raise AssertionError(f"the doc runs an aws command this test cannot stand in for: {argv}")
        return subprocess.CompletedProcess(argv, 0, "", "")


def _tiny(spec: dict[str, Any]) -> dict[str, Any]:
    """The doc's spec with the quickstart's model and training, 5 steps: what a CPU can train."""
    quick = yaml.safe_load(QUICKSTART.read_text())
    raw = json.loads(json.dumps(spec))
    raw.pop("quant_bits", None)
    raw.update(model=quick["model"], method=quick["method"], lora=quick["lora"])
    raw["training"] = {**quick["training"], "max_steps": 5, "logging_steps": 1}
    raw["data"]["max_seq_len"] = quick["data"]["max_seq_len"]
    raw["checkpoint"] = {"every_steps": 100, "every_minutes": None, "keep": 2}
    deep_update(raw, {"limits": {"heartbeat_timeout_s": 120}})
    return raw


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_command_of_first_cloud_job_runs_as_the_doc_says(tmp_path, own_moto, monkeypatch):
    blocks = parse(DOC.read_text())
    kinds = [b.kind for b in blocks]
    assert "run" in kinds and "sees" in kinds and "python" in kinds
    machine_env(monkeypatch)  # what the fake's "container" inherits: this venv's python, fast heartbeats
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION":
                 "us-east-1", "AWS_ENDPOINT_URL": own_moto, "CLOUDTUNE_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(k, v)
    with RunPodFake(api_key=KEY, run_commands=True, cwd=str(tmp_path), log_dir=str(tmp_path)) as fake:
        w = World(tmp_path, own_moto, fake)
        w.spec_file("examples/llama8b-qlora.yaml")
        for b in blocks:
            if b.kind == "skip":
                assert b.arg, f"{DOC.name}:{b.line}: say why a block is skipped"
            elif b.kind == "spec":
                deep_update(w.specs.setdefault(b.arg, yaml.safe_load((ROOT / b.arg).read_text())),
                            yaml.safe_load(b.body))
                w.spec_file(b.arg)
            elif b.kind == "env":
                for cmd in commands(b.body):
                    m = re.fullmatch(r"export (\w+)=(\S+)", cmd)
                    assert m, f"{DOC.name}:{b.line}: an env block holds `export VAR=value` lines, not {cmd!r}"
                    w.exported[m.group(1)] = KEY if m.group(1) == "RUNPOD_API_KEY" else \
                        (m.group(2) if m.group(2) != "..." else f"fake-{m.group(1).lower()}")
            elif b.kind == "run":
                w.last_output = ""
                rents = b.arg.startswith("rents")
                for cmd in commands(b.body):
                    if rents:
                        name = shlex.split(cmd)[2]
                        w.spec_file(name, _tiny(w.specs[name]))
                        proc = w.run(cmd, tty_answer="y\n", timeout=300)
                        w.spec_file(name)
                        rows = jobs_rows(w.home)
                        assert rows, proc.stderr[-3000:]
                        w.job_id = sorted(rows, key=lambda r: r["created_at"])[-1]["id"]
                    else:
                        proc = w.run(cmd)
                    out = proc.stdout + proc.stderr
                    assert proc.returncode == 0, f"{DOC.name}:{b.line}: `{cmd}` exited {proc.returncode}:\n{out[-4000:]}"
                    for secret in (KEY, "fake-hf_token", "fake-wandb_api_key"):
                        assert secret not in out, f"`{cmd}` printed a secret"
                    w.last_output += out
            elif b.kind == "sees":
                assert w.last_output, f"{DOC.name}:{b.line}: a sees block without a run block before it"
                assert_sees(b, w.last_output)
            elif b.kind == "sees-when":
                changes, _, cmd = b.arg.partition(" : ")
                over: dict[str, str | None] = {}
                spec_over: dict[str, Any] = {}
                for ch in changes.split():
                    k, _, v = ch.partition("=")
                    if "." in k:
                        head, _, tail = k.partition(".")
                        spec_over.setdefault(head, {})[tail] = v
                    else:
                        over[k] = None if v == "" else (f"fake-{k.lower()}" if v == "..." else v)
                name = shlex.split(cmd)[2]
                raw = json.loads(json.dumps(w.specs[name]))
                deep_update(raw, spec_over)
                w.spec_file(name, raw)
                proc = w.run(cmd, env=w.env(**over))
                w.spec_file(name)
                if b.body.lstrip().startswith("error:"):
                    assert proc.returncode == 2, proc.stdout + proc.stderr
                assert_sees(b, proc.stdout + proc.stderr)
            elif b.kind == "python":
                proc = subprocess.run([sys.executable, "-c", b.body], capture_output=True, text=True, cwd=w.cwd,
                                      env=w.env(), timeout=180)
                assert proc.returncode == 0, f"{DOC.name}:{b.line}: the snippet failed:\n{proc.stderr[-3000:]}"
        assert w.job_id, "the doc never rents: no job ran to done"
        assert fake.alive() == []  # the pod is gone
    # what the real run and the pulls left: the adapter, the lean copy without merged/, nothing running
    assert (w.cwd / "my-adapter" / "adapter_config.json").is_file()
    assert (w.cwd / "my-adapter-lean" / "adapter_model.safetensors").is_file()
    assert not list(w.cwd.glob("*.partial"))
    assert_nothing_left(w.job_id)
    assert any(c.startswith("cloudtune run ") and "--dry-run" not in c for c in w.ran)
