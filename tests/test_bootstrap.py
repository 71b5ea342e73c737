"""The public-image bootstrap (cloudtune/run/bootstrap.py): the staged wheel installs and imports, the
boot script is valid sh, holds no secret, and runs end to end against an S3 store (moto_server).

What cannot run here: a real GPU machine pulling pytorch/pytorch and installing from PyPI; the script
runs in a fresh venv whose only packages are this machine's (pip --no-index), with the wheel fetched
through a presigned URL from moto.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from cloudtune.providers.base import Offer

from cloudtune.run import bootstrap
from cloudtune.run.orchestrator import Option, build_request
from cloudtune.run.state import Job
from cloudtune.spec import parse_spec

SECRET = "wJalrXUtnFEMI-not-a-real-secret-key"


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def wheel(wheel_cache) -> Path:
    return bootstrap.build_wheel(wheel_cache)


def _spec(bucket: str, **resources):
    return parse_spec({"name": "boot", "model": "tiny:reverse", "data": {"train": "s3://x/train.jsonl"},
                       "store": {"url": f"s3://{bucket}/jobs"}, "resources": {"provider": "runpod", **resources}})


def _option(provider: str = "runpod") -> Option:
    offer = Offer(provider=provider, offer_id="1x_L40S_SECURE", gpu="L40S", gpu_count=1, vram_gib_per_gpu=45,
                  region="US", price_hr=0.99)
    return Option(offer=offer, spot=False, price_hr=0.99, est_hours=0.1, est_cost_usd=0.1)


def test_wheel_is_cached_by_source_digest_and_holds_the_package(wheel, wheel_cache):
    before = wheel.stat().st_mtime_ns
    again = bootstrap.build_wheel(wheel_cache)
    assert again == wheel and again.stat().st_mtime_ns == before  # same sources: the cached wheel, not rebuilt
    names = zipfile.ZipFile(wheel).namelist()
    assert "cloudtune/trainer/entrypoint.py" in names and "cloudtune/providers/runpod.py" in names
    assert "cloudtune/data/gpus.csv" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_pins_are_the_installed_versions_and_leave_torch_to_the_image():
    from importlib import metadata

    pins = dict(p.split("==") for p in bootstrap.pinned_requirements())
    assert pins["transformers"] == metadata.version("transformers")
    assert pins["peft"] == metadata.version("peft") and "trl" in pins and "boto3" in pins
    assert "torch" not in pins and "sympy" not in pins and not [n for n in pins if n.startswith("nvidia-")]


def test_public_image_is_the_default_and_an_own_image_is_the_fast_path():
    spec = parse_spec({"name": "x", "model": "tiny:reverse", "data": {"train": "a.jsonl"}})
    assert spec.resources.image == bootstrap.PUBLIC_IMAGE
    assert bootstrap.needs_bootstrap(spec.resources.image, "runpod")
    assert not bootstrap.needs_bootstrap(spec.resources.image, "local")  # the local provider runs in place
    assert not bootstrap.needs_bootstrap("ghcr.io/me/trainer:1", "runpod")


def test_own_image_request_keeps_the_trainer_command(aws_env):
    spec = _spec("boot-own", image="ghcr.io/me/trainer:1")
    job = Job({"id": "j-own", "store_url": "s3://boot-own/jobs", "store_endpoint": aws_env,
               "est_hours": 0.1, "created_at": time.time()})
    req = build_request(job, spec, _option(), 1)
    assert req.command == ["python", "-m", "cloudtune.trainer.launch"]
    assert bootstrap.ENV_WHEEL_URL not in req.secret_env


@pytest.mark.slow
def test_staged_bootstrap_runs_in_a_fresh_venv_from_s3(aws_env, monkeypatch, wheel_cache, wheel, tmp_path):
    """create_job's staging + build_request's command, then the script itself, against moto S3."""
    import boto3

    from cloudtune.store import open_store

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any; the script must not carry it
    boto3.client("s3", endpoint_url=aws_env, aws_access_key_id="testing", aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket="boot-run")
    store = open_store("s3://boot-run/jobs", endpoint_url=aws_env)
    keys = bootstrap.stage(store, "j-boot", cache_dir=wheel_cache)
    assert keys == ["j-boot/bootstrap/" + wheel.name, "j-boot/bootstrap/requirements.txt", "j-boot/bootstrap/boot.sh"]

    spec = _spec("boot-run")
    job = Job({"id": "j-boot", "store_url": "s3://boot-run/jobs", "store_endpoint": aws_env,
               "est_hours": 0.1, "created_at": time.time()})
    req = build_request(job, spec, _option(), 1)
    assert req.image == bootstrap.PUBLIC_IMAGE and req.command[:2] == ["sh", "-c"]
    text = req.command[2]  # the stub: fetch the staged boot script, run it
    assert len(text) < 2048 and bootstrap.ENV_SCRIPT_URL in text and "pip install" not in text
    staged = store.get_bytes(bootstrap.script_key("j-boot")).decode()
    assert "set -e" in staged and "cloudtune.trainer.entrypoint -- python -m cloudtune.trainer.launch" in staged
    assert SECRET not in " ".join(req.command) and "X-Amz" not in text + staged  # URLs travel as secret env vars
    assert SECRET not in "".join(req.env.values())
    url = req.secret_env[bootstrap.ENV_WHEEL_URL]
    from urllib.parse import parse_qs, urlparse

    q = {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    assert url.startswith(aws_env) and "Signature" in "".join(q) or "X-Amz-Signature" in q
    left = int(q["X-Amz-Expires"]) if "X-Amz-Expires" in q else int(q["Expires"]) - time.time()
    assert 3 * 3600 - 60 < left <= 3 * 3600  # short-lived: a relaunch gets a fresh URL
    assert subprocess.run(["sh", "-n", "-c", text]).returncode == 0
    assert subprocess.run(["sh", "-n", "-c", staged]).returncode == 0

    # a fresh venv that sees this machine's packages (as the image has its torch) but not cloudtune
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_image_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert subprocess.run([str(vpy), "-c", "import cloudtune"], capture_output=True, cwd=tmp_path).returncode != 0

    pins = bootstrap.staged_requirements(store, "j-boot")
    check = ["python", "-c", "import cloudtune, cloudtune.trainer.cli, cloudtune.trainer.entrypoint; "
             "print('TRAINER-OK', cloudtune.__file__)"]
    script = bootstrap.script(pins, extras=(), then=check)  # the same script; extras need PyPI, not here
    store.put_bytes(bootstrap.script_key("j-boot"), script.encode())  # what the stub fetches and runs
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "AWS_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", PIP_CONFIG_FILE=os.devnull, CLOUDTUNE_BOOT_DIR=str(tmp_path / "boot"),
               CLOUDTUNE_PIP_ARGS=f"--no-index --find-links {wheel.parent}", **{bootstrap.ENV_WHEEL_URL: url},
               **{bootstrap.ENV_SCRIPT_URL: req.secret_env[bootstrap.ENV_SCRIPT_URL]})
    proc = subprocess.run(req.command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TRAINER-OK " + site in proc.stdout  # imported from the venv the wheel went into
    assert (tmp_path / "boot" / wheel.name).read_bytes() == wheel.read_bytes()


def test_an_installed_cloudtune_is_never_installed_over(tmp_path):
    """A machine (or a fake provider running the command here) that already has cloudtune starts it."""
    script = bootstrap.script(["six==1.17.0"], then=["python", "-c", "print('STARTED')"])
    env = {"PATH": os.environ["PATH"], "CLOUDTUNE_BOOT_DIR": str(tmp_path / "boot"),
           bootstrap.ENV_WHEEL_URL: f"file://{tmp_path}/missing.whl"}
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "STARTED" in proc.stdout and "already installed" in proc.stdout


def test_a_failed_download_exits_for_a_relaunch_and_runs_the_self_terminate_hook(tmp_path):
    script = bootstrap.script(["six==1.17.0"], then=["true"])
    marker = tmp_path / "terminated"
    bare = tmp_path / "bare"  # a python without cloudtune, as on the public image
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {"PATH": f"{bare / 'bin'}:{os.environ['PATH']}", "CLOUDTUNE_BOOT_DIR": str(tmp_path / "boot"),
           bootstrap.ENV_WHEEL_URL: f"file://{tmp_path}/missing.whl",
           "CLOUDTUNE_SELF_TERMINATE": f"touch {marker}", "CLOUDTUNE_BOOT_TRIES": "1"}
    proc = subprocess.run(["sh", "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    assert marker.exists() and "could not download the wheel" in proc.stderr


def _fresh_venv(path: Path) -> tuple[Path, str]:
    """A venv that sees this machine's packages (as the public image has its torch) but not cloudtune."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    vpy = path / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_image_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return vpy, site


@pytest.fixture
def simple_index(tmp_path):
    """A PEP 503 index on loopback (http.server's directory pages are the simple API's HTML) with one
    package the machine's image lacks: ctprobe 1.0."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from tests.test_wheelhouse import make_wheel

    root = tmp_path / "index"
    (root / "simple" / "ctprobe").mkdir(parents=True)
    make_wheel(root / "simple" / "ctprobe")
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002 - keep pytest's output to the test's own
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/", server
    server.shutdown()


@pytest.mark.slow
def test_the_first_boot_publishes_a_wheelhouse_and_a_relaunch_installs_without_the_index(
        aws_env, wheel, simple_index, tmp_path):
    """Boot 1 installs from the index and publishes; boot 2 (the index unreachable) installs from the
    store alone; boot 3 finds the tar damaged, says so and still boots from the index."""
    import boto3

    from cloudtune.run import wheelhouse as WH
    from cloudtune.store import open_store

    index_url, server = simple_index
    s3 = boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1")
    s3.create_bucket(Bucket="boot-wh")
    store = open_store("s3://boot-wh/jobs", endpoint_url=aws_env)
    pins = ["ctprobe==1.0"]  # a tiny pin list: what a real boot installs, minus the 450 MB
    store.upload_file(wheel, bootstrap.wheel_key("j-wh"))
    store.put_bytes(bootstrap.requirements_key("j-wh"), ("\n".join(pins) + "\n").encode())
    spec = _spec("boot-wh")
    job = Job({"id": "j-wh", "store_url": "s3://boot-wh/jobs", "store_endpoint": aws_env,
               "est_hours": 0.1, "created_at": time.time()})
    check = ["python", "-c", "import cloudtune.trainer.entrypoint, ctprobe; print('TRAINER-OK', ctprobe.VERSION)"]
    script = bootstrap.script(pins, extras=(), then=check)

    def boot(attempt: int, index: str, **extra: str) -> subprocess.CompletedProcess:
        req = build_request(job, spec, _option(), attempt)
        vpy, _ = _fresh_venv(tmp_path / f"venv{attempt}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "AWS_", "VIRTUAL_ENV", "CLOUDTUNE_"))}
        env.update(PATH=f"{vpy.parent}:{env['PATH']}", PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index,
                   PIP_RETRIES="0", PIP_TIMEOUT="5", CLOUDTUNE_BOOT_DIR=str(tmp_path / f"boot{attempt}"),
                   **{k: v for k, v in req.env.items() if k.startswith("CLOUDTUNE_WHEELHOUSE")}, **req.secret_env,
                   **extra)
        for k in WH.SECRET_VARS:
            assert k not in req.env  # bearer URLs travel as secrets only
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)

    first = boot(1, index_url)
    assert first.returncode == 0 and "TRAINER-OK 1.0" in first.stdout, first.stderr[-2000:]
    key = WH.cache_key(pins, bootstrap._EXTRAS, spec.resources.image, "amd64")
    manifest = WH.read_manifest(store, key)  # the publish ran in the background; its output closed the pipe
    assert manifest is not None, first.stderr[-2000:]
    assert [f["name"] for f in manifest["files"]] == ["ctprobe-1.0-py3-none-any.whl"]  # cloudtune's own wheel is not cached
    assert manifest["tar"] == "wheels-j-wh-1.tar"

    server.shutdown()  # the index is gone, and pip is pointed at a port nothing listens on
    second = boot(2, "http://127.0.0.1:9/simple/")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "installed from the store's wheelhouse" in second.stdout and "TRAINER-OK 1.0" in second.stdout
    assert WH.ENV_PUT_TAR not in build_request(job, spec, _option(), 3).secret_env  # write-once

    # a damaged wheelhouse: the tar truncated in the store behind the manifest's back
    tar_key = f"jobs/{WH.tar_key(key, manifest['tar'])}"
    body = s3.get_object(Bucket="boot-wh", Key=tar_key)["Body"].read()
    s3.put_object(Bucket="boot-wh", Key=tar_key, Body=body[: len(body) // 2])
    third = boot(3, "http://127.0.0.1:9/simple/",  # "the index" is now a folder: the damaged cache must not be used
                 CLOUDTUNE_PIP_ARGS=f"--find-links {tmp_path / 'index' / 'simple' / 'ctprobe'}")
    assert "does not match its manifest" in third.stderr and "installing from the index" in third.stdout
    assert third.returncode == 0 and "TRAINER-OK 1.0" in third.stdout, third.stderr[-2000:]
