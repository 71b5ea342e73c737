"""`resources.image` read from its registry (cloudtune/registry.py) and checked by preflight: exists,
offers the machine's CPU architecture, private images with `docker login`'s credentials, offline is a
warning. Against tests/fakes/registry_fake.py (OCI Distribution Spec + Docker token auth) over HTTP.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from cloudtune.providers.base import Offer

from cloudtune import registry
from cloudtune.preflight import bootable, check_image
from cloudtune.run.orchestrator import Option
from tests.fakes.registry_fake import DOCKER_LIST, RegistryFake

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-registry-pass"


@pytest.fixture
def reg(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.ENV_SWITCH, "on")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))  # no user's credentials unless a test writes them
    registry.lookup.cache_clear()
    with RegistryFake(password=PASSWORD) as fake:
        fake.add("team/trainer", "multi", ["linux/amd64", "linux/arm64/v8"])
        fake.add("team/trainer", "amd", ["linux/amd64"])
        fake.add("team/legacy", "multi", ["linux/amd64", "linux/arm64"], index_type=DOCKER_LIST)
        fake.add("team/private", "1", ["linux/amd64"], private=True)
        yield fake
    registry.lookup.cache_clear()


def image(fake: RegistryFake, rest: str) -> str:
    return f"{fake.url.removeprefix('http://')}/{rest}"


def opt(gpu: str, provider: str = "lambda") -> Option:
    offer = Offer(provider=provider, offer_id=f"1x_{gpu}", gpu=gpu, gpu_count=1, vram_gib_per_gpu=80, region="us",
                  price_hr=2.0)
    return Option(offer=offer, spot=False, price_hr=2.0, est_hours=1, est_cost_usd=2)


def login(tmp_path: Path, fake: RegistryFake, password: str = PASSWORD) -> None:
    host = fake.url.removeprefix("http://")
    auth = base64.b64encode(f"robot:{password}".encode()).decode()
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


@pytest.mark.parametrize("ref,expected", [
    ("pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime", ("registry-1.docker.io", "pytorch/pytorch",
                                                       "2.6.0-cuda12.4-cudnn9-runtime")),
    ("ubuntu", ("registry-1.docker.io", "library/ubuntu", "latest")),
    ("docker.io/library/python:3.11", ("registry-1.docker.io", "library/python", "3.11")),
    ("ghcr.io/me/trainer:0.1.0", ("ghcr.io", "me/trainer", "0.1.0")),
    ("nvcr.io/nvidia/pytorch:24.08-py3", ("nvcr.io", "nvidia/pytorch", "24.08-py3")),
    ("localhost:5000/a/b@sha256:" + "0" * 64, ("localhost:5000", "a/b", "sha256:" + "0" * 64)),
])
def test_references_parse_as_docker_parses_them(ref, expected):
    r = registry.parse_image(ref)
    assert (r.registry, r.name, r.reference) == expected


def test_an_index_lists_its_platforms_and_skips_attestations(reg):
    assert registry.platforms(image(reg, "team/trainer:multi")) == ["linux/amd64", "linux/arm64/v8"]
    assert registry.platforms(image(reg, "team/legacy:multi")) == ["linux/amd64", "linux/arm64"]  # Docker list
    assert registry.platforms(image(reg, "team/trainer:amd")) == ["linux/amd64"]  # one image: its config blob
    # the anonymous token flow was followed: a 401 challenge, a token, then the manifest with it
    assert reg.calls("GET", "^/token$") and reg.calls("GET", "/manifests/multi")[-1].bearer


def test_not_found_says_which_and_how_to_fix(reg):
    with pytest.raises(registry.NotFound, match="MANIFEST_UNKNOWN"):
        registry.platforms(image(reg, "team/trainer:nope"))
    with pytest.raises(registry.NotFound, match="NAME_UNKNOWN"):
        registry.platforms(image(reg, "team/absent:1"))
    (problem,) = check_image(image(reg, "team/trainer:nope"), ["runpod"], [opt("L40S", "runpod")])
    assert problem.startswith(f"image {image(reg, 'team/trainer:nope')}: not found") and "resources.image" in problem


def test_docker_hub_style_unknown_repository_reads_as_absent_or_private(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.ENV_SWITCH, "on")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    with RegistryFake(hub_style=True) as hub:
        with pytest.raises(registry.NotFound, match="does not exist or is private.*docker login"):
            registry.platforms(image(hub, "nobody/nothing:1"))


def test_a_private_image_uses_the_docker_login_and_never_shows_it(reg, tmp_path):
    with pytest.raises(registry.NotFound, match="private"):
        registry.platforms(image(reg, "team/private:1"))
    login(tmp_path, reg)
    assert registry.platforms(image(reg, "team/private:1")) == ["linux/amd64"]
    token_calls = reg.calls("GET", "^/token$")
    assert token_calls[-1].headers["authorization"].startswith("Basic ")
    for req in reg.calls("GET", "^/v2/"):  # the password went to the token endpoint only
        assert not req.headers.get("authorization", "").startswith("Basic ")

    login(tmp_path, reg, password="wrong-password-value")
    registry.lookup.cache_clear()
    status, (reason,) = registry.lookup(image(reg, "team/private:1"))
    assert status == "not_found" and "private" in reason
    assert "wrong-password-value" not in reason and PASSWORD not in reason


def test_unreachable_or_slow_or_failing_registries_are_a_warning_not_a_problem(reg, capsys):
    nothing = "127.0.0.1:9/team/trainer:1"  # nothing listens on port 9
    assert check_image(nothing, ["runpod"], [opt("L40S", "runpod")]) == []
    assert "warning: image 127.0.0.1:9/team/trainer:1: could not read its registry" in capsys.readouterr().err
    reg.inject("GET", "/manifests/", status=0, delay_s=2.0)
    with pytest.raises(registry.Unreachable):
        registry.platforms(image(reg, "team/trainer:multi"), timeout=0.5)
    reg.inject("GET", "/manifests/", status=503, body={"errors": [{"code": "UNAVAILABLE"}]})
    with pytest.raises(registry.Unreachable, match="503"):
        registry.platforms(image(reg, "team/trainer:multi"))


def test_the_machine_arch_is_checked_against_what_the_image_offers(reg):
    gh200, l40s = opt("GH200"), opt("L40S")
    amd = image(reg, "team/trainer:amd")
    (problem,) = check_image(amd, ["lambda"], [gh200])
    assert problem.startswith(f"image {amd} is built for amd64 but every planned machine is arm64: lambda/GH200")
    assert "--platform linux/arm64" in problem
    assert check_image(image(reg, "team/trainer:multi"), ["lambda"], [gh200]) == []  # arm64 offered
    assert bootable(amd, [gh200, l40s]) == [l40s]  # ARM fallbacks dropped from the failover order
    assert bootable(image(reg, "team/trainer:multi"), [gh200, l40s]) == [gh200, l40s]
    assert check_image(image(reg, "team/trainer:multi"), ["local"], []) == []  # the local provider pulls nothing


def _spec_file(tmp_path: Path, img: str, endpoint: str) -> Path:
    bucket = f"ct-img-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    spec["data"]["train"] = str(REPO / "examples" / "data" / "reverse.jsonl")
    spec["resources"] = {"image": img}
    spec["store"] = {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_check_cli_refuses_a_missing_image_in_one_line(reg, tmp_path, aws_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "HF_TOKEN"))}
    env.update(HOME=str(tmp_path), RUNPOD_API_KEY="rp-key", CLOUDTUNE_IMAGE_CHECK="on",
               DOCKER_CONFIG=str(tmp_path / "docker"), CLOUDTUNE_HOME=str(tmp_path / "home"))
    login(tmp_path, reg)

    def check(img: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cloudtune", "check", str(_spec_file(tmp_path, img, aws_env)),
                               "-p", "runpod"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)

    missing = check(image(reg, "team/private:2"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    lines = [ln for ln in missing.stderr.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 1 and "team/private:2: not found (MANIFEST_UNKNOWN)" in lines[0]
    assert PASSWORD not in missing.stdout + missing.stderr
