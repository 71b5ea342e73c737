"""RunPodProvider over real HTTP against tests/fakes/runpod_fake.py."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
from cloudtune.providers import get_provider
from cloudtune.providers.base import (
    AuthError,
    CapacityError,
    InvalidRequestError,
    LaunchRequest,
    MachineState,
    NotFoundError,
    Offer,
    Provider,
    QuotaError,
    RateLimitedError,
    TransientError,
    machine_name,
)
from cloudtune.providers.http import RetryPolicy
from cloudtune.providers.runpod import RunPodProvider, load_api_key, normalise_gpu

from tests.fakes.runpod_fake import RunPodFake

KEY = "rp-test-key"
SECRET = "hf_supersecret_token_value"
FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02)


@pytest.fixture
def fake():
    with RunPodFake(api_key=KEY) as f:
        yield f


def provider(fake, **kw) -> RunPodProvider:
    kw.setdefault("api_key", KEY)
    kw.setdefault("retry", FAST)
    return RunPodProvider(api_url=fake.url + "/v2", **kw)


def offer(gpu="RTX4090", count=1, cloud="SECURE", price=0.69) -> Offer:
    return Offer(provider="runpod", offer_id=f"{count}x_{gpu}_{cloud}", gpu=gpu, gpu_count=count,
                 vram_gib_per_gpu=23.99, region="global", price_hr=price * count)


def request(job="j1", attempt=1, **kw) -> LaunchRequest:
    kw.setdefault("offer", offer())
    return LaunchRequest(job_id=job, attempt=attempt, spot=kw.pop("spot", False), image="ghcr.io/x/trainer:1",
                         command=["python", "-m", "cloudtune.trainer"], env={"CLOUDTUNE_JOB_ID": job},
                         secret_env={"HF_TOKEN": SECRET}, disk_gb=80, **kw)


def test_registered_and_protocol(monkeypatch, fake):
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.setenv("CLOUDTUNE_RUNPOD_API_URL", fake.url + "/v2")
    p = get_provider("runpod")
    assert isinstance(p, Provider) and p.api_url == fake.url + "/v2"
    assert KEY not in repr(p)


def test_offers_live_prices_and_stock(fake):
    offers = provider(fake).offers()
    by_id = {o.offer_id: o for o in offers}
    assert by_id["1x_RTX4090_SECURE"].price_hr == 0.69
    assert by_id["1x_RTX4090_COMMUNITY"].price_hr == 0.34
    assert by_id["8x_H100-SXM_SECURE"].price_hr == pytest.approx(2.69 * 8)
    assert "1x_A100-80GB_SECURE" not in by_id  # availability NONE
    assert "1x_L40S_COMMUNITY" not in by_id  # not on community cloud
    assert "4x_L40S_SECURE" not in by_id and "2x_L40S_SECURE" in by_id  # maxCount.secure 2
    o = by_id["1x_RTX4090_SECURE"]
    assert o.fresh and o.spot_price_hr is None and o.as_of.startswith("20") and 23 < o.vram_gib_per_gpu < 24
    req = fake.calls("GET", "/v2/catalog/gpus")[0]
    assert req.arg("include") == "AVAILABILITY" and req.arg("product") == "POD"


def test_launch_status_transitions_terminate_twice(fake):
    p = provider(fake)
    m = p.launch(request())
    assert m.name == machine_name("j1", 1) and m.state is MachineState.PENDING and (m.job_id, m.attempt) == ("j1", 1)
    body = fake.calls("POST", "/v2/pods")[0].json
    assert body["gpu"] == {"id": "NVIDIA GeForce RTX 4090", "count": 1, "minCudaVersion": "12.4"}
    assert body["cloud"] == "SECURE"
    assert body["env"]["HF_TOKEN"] == SECRET and body["args"] == "python -m cloudtune.trainer"
    assert "curl" in body["env"]["CLOUDTUNE_SELF_TERMINATE"] and body["disk"] == 80
    states = [p.status(m.machine_id).state for _ in range(3)]
    assert states == [MachineState.PENDING, MachineState.RUNNING, MachineState.RUNNING]
    fake.interrupt(m.machine_id)
    st = p.status(m.machine_id)
    assert st.state is MachineState.PREEMPTED and "not requested by cloudtune" in st.detail
    p.terminate(m.machine_id)
    p.terminate(m.machine_id)  # idempotent: 404 is done
    with pytest.raises(NotFoundError):
        p.status(m.machine_id)
    assert fake.alive() == []
    assert len(fake.calls("DELETE", "/v2/pods/")) == 2


def test_list_and_find_by_name(fake):
    p = provider(fake)
    a = p.launch(request("ja", 1))
    p.launch(request("jb", 2))
    with fake.lock:  # someone else's pod in the same account
        fake.pods["other"] = {**fake.pods[a.machine_id], "id": "other", "name": "my-notebook"}
    names = sorted(m.name for m in p.list_machines())
    assert names == ["cloudtune-ja-1", "cloudtune-jb-2"]
    assert p.find_by_name("cloudtune-jb-2").job_id == "jb"
    assert p.find_by_name("cloudtune-zz-1") is None


def test_5xx_after_create_adopts_the_pod(fake):
    fake.inject("POST", r"^/v2/pods$", status=500, body={"title": "Internal Server Error", "status": 500,
                                                           "detail": "upstream timeout"}, after_handler=True)
    p = provider(fake)
    m = p.launch(request("j5", 1))
    assert m.name == "cloudtune-j5-1" and len(fake.alive()) == 1 and m.machine_id == fake.alive()[0]["id"]
    assert len(fake.calls("POST", "/v2/pods")) == 1  # never re-sent: no duplicate pod
    assert p.find_by_name("cloudtune-j5-1").machine_id == m.machine_id


def test_timeout_on_create_then_adopt(fake):
    fake.inject("POST", r"^/v2/pods$", status=0, delay_s=0.6)
    p = provider(fake, timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(TransientError):  # the lookup ran before the slow create landed
        p.launch(request("jt", 1))
    assert time.monotonic() - t0 < 2
    time.sleep(0.6)
    assert p.find_by_name("cloudtune-jt-1") is not None  # the orchestrator's adopt-or-terminate finds it


def test_capacity_and_funds_and_auth(fake):
    p = provider(fake)
    with pytest.raises(CapacityError, match="no longer any instances"):
        p.launch(request(offer=offer("A100-80GB", price=1.39)))
    fake.balance = 0.1
    with pytest.raises(QuotaError, match="insufficient balance"):
        p.launch(request())
    with pytest.raises(AuthError, match="RUNPOD_API_KEY") as info:
        provider(fake, api_key="rp-wrong-key-0000").offers()
    assert "rp-wrong-key-0000" not in str(info.value)
    assert fake.alive() == []


def test_429_retry_after_and_500_retries(fake):
    fake.inject("GET", r"^/v2/pods/", status=429, headers={"Retry-After": "1"},
                body={"title": "Too Many Requests", "status": 429, "detail": "rate limit exceeded for the minute window"})
    p = provider(fake)
    m = p.launch(request())
    t0 = time.monotonic()
    assert p.status(m.machine_id).state is MachineState.PENDING
    assert time.monotonic() - t0 >= 0.95
    fake.inject("GET", r"^/v2/pods$", status=500, times=2)
    assert len(p.list_machines()) == 1
    fake.inject("GET", r"^/v2/pods$", status=429, times=5, body={"title": "Too Many Requests"})
    with pytest.raises(RateLimitedError):
        p.list_machines()


def test_slow_endpoint_times_out(fake):
    fake.inject("GET", "/v2/catalog/gpus", status=0, delay_s=1.0, times=5)
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        provider(fake, timeout_s=0.15, retry=RetryPolicy(max_attempts=2, backoff_initial_s=0.01)).offers()
    assert time.monotonic() - t0 < 1.5


def test_terminated_but_still_listed_is_loud(fake, caplog):
    p = provider(fake)
    m = p.launch(request())
    fake.ghost_terminated = True
    with caplog.at_level(logging.WARNING, logger="cloudtune.providers.runpod"):
        p.terminate(m.machine_id)
        st = p.status(m.machine_id)
    assert st.state is MachineState.TERMINATING and "INCONSISTENT" in st.detail
    assert any("still lists as RUNNING" in r.message for r in caplog.records)


def test_spot_is_refused_v2_has_no_interruptible_pods(fake):
    """migrate-from-v1.mdx + openapi-v2.json: no interruptible pods, no bid: spot is a bad request."""
    with pytest.raises(InvalidRequestError, match="no interruptible"):
        provider(fake).launch(request(spot=True))
    with pytest.raises(InvalidRequestError, match="no interruptible"):
        provider(fake).describe_launch(request(spot=True))
    assert fake.calls("POST", "/v2/pods") == []


def test_describe_launch_redacts(fake):
    p = provider(fake)
    reqs = p.describe_launch(request())
    text = json.dumps(reqs)
    assert SECRET not in text and KEY not in text
    assert reqs[0]["method"] == "POST" and reqs[0]["url"] == fake.url + "/v2/pods"
    assert reqs[0]["json"]["env"]["HF_TOKEN"] == "***" and reqs[0]["json"]["name"] == "cloudtune-j1-1"
    assert fake.log == []  # describing sends nothing


def test_unknown_gpu_offer_is_clear(fake):
    with pytest.raises(InvalidRequestError, match="cannot map"):
        provider(fake).launch(request(offer=offer("TPUv9")))


def test_key_from_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_api_key() is None
    (tmp_path / ".runpod").mkdir()
    (tmp_path / ".runpod" / "config.toml").write_text('[default]\napi_key = "from-file-key"\n')
    assert load_api_key() == "from-file-key"
    monkeypatch.setenv("RUNPOD_API_KEY", "from-env")
    assert load_api_key() == "from-env"


def test_no_key_is_auth_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AuthError, match="RUNPOD_API_KEY"):
        RunPodProvider(api_url="http://127.0.0.1:9/v2").offers()


def test_normalise_gpu():
    assert normalise_gpu("NVIDIA GeForce RTX 4090") == "RTX4090"
    assert normalise_gpu("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert normalise_gpu("NVIDIA A40") == "A40"


def test_self_terminate_from_inside_deletes_the_pod(tmp_path):
    with RunPodFake(api_key=KEY, run_commands=True) as fake:
        p = provider(fake)
        script = tmp_path / "work.py"
        script.write_text("import os, subprocess\nsubprocess.run(['sh', '-c', os.environ['CLOUDTUNE_SELF_TERMINATE']])\n")
        req = request(offer=offer())
        req.command = [sys.executable, str(script)]
        m = p.launch(req)
        deadline = time.monotonic() + 15
        while fake.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fake.alive() == []
        delete = fake.calls("DELETE", "/v2/pods/")[0]
        assert delete.bearer == fake.pod_key(m.machine_id)  # the pod-scoped key, not the account key
