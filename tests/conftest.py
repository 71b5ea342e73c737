"""Shared fixtures. Every test runs with its own $CLOUDTUNE_HOME so no test sees another's state."""

from __future__ import annotations

import os

import pytest

from tests._kernel_fs import mounts  # noqa: F401 - the real tmpfs fixture of the fault tests
from tests._order import pytest_addoption, pytest_collection_modifyitems, pytest_configure  # noqa: F401

# One OpenMP/BLAS thread in this process and every process the tests start (CLI, watchdog, local
# machines, fake providers' "containers" and their trainers all inherit os.environ). The suite often
# runs two trainers, or a trainer beside pytest and a watchdog, on two cores: torch's default pool of
# one thread per core then spin-waits against the other processes and a 60-step run costs ~3x the CPU
# (measured: 46 s vs 15 s user time, same adapter bytes). Set before anything imports torch, which
# reads it once. An explicit value from the caller (CI) wins.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# No registry reads from the suite (cloudtune/registry.py would ask Docker Hub about the default image);
# tests/test_image_registry.py turns them on against its local fake registry.
os.environ.setdefault("CLOUDTUNE_IMAGE_CHECK", "off")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "cloudtune-home"
    monkeypatch.setenv("CLOUDTUNE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("CLOUDTUNE_SPOT_POLL_S", "0.2")  # a trainer sees a fake's spot notice in 0.2 s, not 5
    yield home
    _reap_leftovers(tmp_path)


# Module names whose processes a test may start (the CLI, watchdogs, local machines, trainers).
_OURS = ("-m cloudtune", "cloudtune.trainer", "cloudtune.run.watchdog", "cloudtune.providers.local")


def _reap_leftovers(tmp_path) -> None:
    """Kill what a test left running under its tmp_path: its watchdogs, local machines and trainers.

    Why: a test that fails before its `stop` (an assert mid-run) leaves a 20,000-step trainer and its
    watchdog training on the 2 cores for as long as the suite runs; every later test then runs slower
    and may time out. A passing test leaves nothing (assert_nothing_left); if something is reaped
    after a pass, a warning names it."""
    import warnings

    import psutil

    mark, me = str(tmp_path), os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid == me or not any(o in cmd for o in _OURS):
                continue
            if mark in cmd or p.environ().get("CLOUDTUNE_HOME", "").startswith(mark):
                found.append(p)
        except psutil.Error:
            continue
    doomed = {q.pid: q for p in found for q in [p, *_children(p)]}
    for q in doomed.values():
        try:
            q.kill()
        except psutil.Error:
            pass
    if doomed:
        warnings.warn(f"reaped {len(doomed)} process(es) left under {tmp_path.name}: "
                      f"{sorted(' '.join((q.info.get('cmdline') or [])[1:3]) for q in found)[:4]}",
                      pytest.PytestWarning, stacklevel=1)


def _children(p):
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real S3/EC2/SSM endpoint on loopback (moto_server), shared by the whole session.

    Yields the endpoint URL. Tests talk to it over real HTTP with boto3(endpoint_url=...). Use a
    unique bucket name / tag value per test, since the server is shared.
    """
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws_env(monkeypatch, moto_server):
    """Fake AWS credentials for boto3 talking to moto_server (never real ones)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server
