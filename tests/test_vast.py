"""VastProvider over real HTTP against tests/fakes/vast_fake.py."""

from __future__ import annotations

import json
import sys
import time

import pytest
from cloudtune.providers import get_provider
from cloudtune.providers.base import (
    AuthError,
    CapacityError,
    LaunchRequest,
    MachineState,
    NotFoundError,
    Offer,
    Provider,
    QuotaError,
    RateLimitedError,
    TransientError,
)
from cloudtune.providers.http import RetryPolicy
from cloudtune.providers.vast import VastFilters, VastProvider, load_api_key, normalise_gpu, vast_gpu_names

from tests.fakes.contract import parse_docker_env
from tests.fakes.vast_fake import VastFake

KEY = "vast-test-key"
SECRET = "hf_vast_secret_token_value"
FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02)


@pytest.fixture
def fake():
    with VastFake(api_key=KEY) as f:
        yield f


def provider(fake, **kw) -> VastProvider:
    kw.setdefault("api_key", KEY)
    kw.setdefault("retry", FAST)
    return VastProvider(api_url=fake.url, **kw)


def live_offer(p: VastProvider, offer_id: str) -> Offer:
    return next(o for o in p.offers() if o.offer_id == offer_id)


def request(offer: Offer, job="v1", attempt=1, spot=False, command=None) -> LaunchRequest:
    return LaunchRequest(job_id=job, attempt=attempt, offer=offer, spot=spot, image="ghcr.io/x/trainer:1",
                         command=command or ["python", "-m", "cloudtune.trainer"], env={"CLOUDTUNE_JOB_ID": job},
                         secret_env={"HF_TOKEN": SECRET}, disk_gb=60, max_lifetime_s=3600)


def test_registered_and_protocol(monkeypatch, fake):
    monkeypatch.setenv("VAST_API_KEY", KEY)
    monkeypatch.setenv("CLOUDTUNE_VAST_API_URL", fake.url)
    p = get_provider("vast")
    assert isinstance(p, Provider) and p.api_url == fake.url and KEY not in repr(p)


def test_offers_filter_unreliable_hosts(fake):
    offers = provider(fake).offers()
    ids = [o.offer_id for o in offers]
    assert "102" not in ids and "106" not in ids and "107" not in ids  # unreliable, unverified, external
    assert ids == sorted(ids, key=lambda i: next(o.price_hr for o in offers if o.offer_id == i))
    by_id = {o.offer_id: o for o in offers}
    o = by_id["101"]
    assert (o.gpu, o.gpu_count, o.price_hr, o.spot_price_hr, o.region) == ("RTX4090", 1, 0.41, 0.205, "Texas, US")  # min_bid + storage
    assert o.fresh and 23 < o.vram_gib_per_gpu < 24 and o.vcpus == 16 and o.ram_gb == 64.0
    assert by_id["104"].gpu == "H100-SXM" and by_id["105"].gpu == "A100-80GB"
    q = fake.queries[0]
    assert q["reliability"] == {"gte": 0.98} and q["verified"] == {"eq": True} and q["external"] == {"eq": False}
    loose = provider(fake, filters=VastFilters(min_reliability=0.5, verified=False)).offers()
    assert {"102", "106"} <= {o.offer_id for o in loose}


def test_launch_status_outbid_terminate_twice(fake):
    p = provider(fake)
    m = p.launch(request(live_offer(p, "101"), spot=True))
    assert m.state is MachineState.PENDING and m.name == "cloudtune-v1-1" and m.spot
    put = fake.calls("PUT", "/api/v0/asks/101/")[0].json
    assert put["label"] == "cloudtune-v1-1" and put["runtype"] == "args"
    assert put["args"] == ["python", "-m", "cloudtune.trainer"] and parse_docker_env(put["env"])["HF_TOKEN"] == SECRET
    assert put["price"] == pytest.approx(0.1845 * 1.05, abs=1e-4) and put["disk"] == 60
    env = parse_docker_env(put["env"])
    assert env["CLOUDTUNE_MAX_LIFETIME_S"] == "3600" and "$CONTAINER_ID" in env["CLOUDTUNE_SELF_TERMINATE"]
    assert [p.status(m.machine_id).state for _ in range(3)] == [
        MachineState.PENDING, MachineState.RUNNING, MachineState.RUNNING]
    fake.outbid(m.machine_id)
    st = p.status(m.machine_id)
    assert st.state is MachineState.PREEMPTED and "outbid" in st.detail
    p.terminate(m.machine_id)
    p.terminate(m.machine_id)  # 404 no_such_instance: done
    assert p.status(m.machine_id).state is MachineState.TERMINATED  # still readable, as destroyed
    with pytest.raises(NotFoundError):  # show_instance.yaml: 400 for an id the account never had
        p.status("424242")
    assert fake.alive() == []


def test_on_demand_has_no_bid_and_host_offline_is_preemption(fake):
    p = provider(fake)
    m = p.launch(request(live_offer(p, "104")))
    assert "price" not in fake.calls("PUT", "/api/v0/asks/")[0].json
    fake.host_offline(m.machine_id)
    st = p.status(m.machine_id)
    assert st.state is MachineState.PREEMPTED and "offline" in st.detail


def test_bundled_catalog_offer_resolves_to_a_live_ask(fake):
    p = provider(fake)
    bucket = Offer(provider="vast", offer_id="1x_RTX4090_bucket", gpu="RTX4090", gpu_count=1, vram_gib_per_gpu=23.99,
                   region="Texas, US, NA", price_hr=0.5)
    m = p.launch(request(bucket))
    assert fake.calls("PUT", "/api/v0/asks/101/")  # the cheapest reliable RTX 4090 ask
    assert fake.queries[-1]["gpu_name"] == {"in": ["RTX 4090"]} and fake.queries[-1]["num_gpus"] == {"eq": 1}
    assert m.machine_id == str(fake.alive()[0]["id"])


def test_taken_ask_retries_an_equivalent_once_then_capacity(fake):
    p = provider(fake)
    offer = live_offer(p, "101")
    with fake.lock:
        fake.offers[0]["rented"] = True  # someone rented it between search and launch
    m = p.launch(request(offer))
    assert fake.alive()[0]["_ask"] == 108 and m.name == "cloudtune-v1-1"
    h100 = live_offer(p, "104")
    with fake.lock:
        next(o for o in fake.offers if o["id"] == 104)["rented"] = True
    with pytest.raises(CapacityError):
        p.launch(request(h100, job="v2"))


def test_failed_create_with_new_contract_is_destroyed(fake):
    p = provider(fake)
    fake.contract_on_failure = True  # 500 {"success": false, ..., "new_contract": N}: N exists and bills
    with pytest.raises(TransientError):
        p.launch(request(live_offer(p, "101")))
    assert fake.alive() == [] and fake.calls("DELETE", "/api/v0/instances/9001/")
    assert p.find_by_name("cloudtune-v1-1") is None  # nothing left for the orchestrator to adopt


def test_5xx_after_create_adopts_by_label(fake):
    fake.inject("PUT", "/api/v0/asks/", status=502, body="Bad Gateway", content_type="text/plain",
                after_handler=True)
    p = provider(fake)
    m = p.launch(request(live_offer(p, "104"), job="v5"))
    assert m.name == "cloudtune-v5-1" and len(fake.alive()) == 1 and len(fake.calls("PUT", "/api/v0/asks/")) == 1
    assert p.find_by_name("cloudtune-v5-1").machine_id == m.machine_id


def test_error_body_with_new_contract_destroys_it(fake):
    p = provider(fake)
    offer = live_offer(p, "104")
    fake.inject("PUT", "/api/v0/asks/", status=400, after_handler=True,
                body={"success": False, "error": "invalid_args", "msg": "bad image", "new_contract": 9001})
    with pytest.raises(Exception, match="bad image"):
        p.launch(request(offer))
    assert fake.alive() == [] and fake.calls("DELETE", "/api/v0/instances/9001/")


def test_list_pages_and_find_by_name(fake):
    p = provider(fake)
    with fake.lock:
        fake.offers.extend(dict(fake.offers[0], id=200 + i, rented=False) for i in range(30))
    live = {o.offer_id: o for o in p.offers()}
    for i in range(27):
        p.launch(request(live[str(200 + i)], job=f"l{i}"))
    with fake.lock:
        fake.instances[next(iter(fake.instances))]["label"] = "someone-else"
    machines = p.list_machines()
    assert len(machines) == 26 and all(m.name.startswith("cloudtune-") for m in machines)
    assert len(fake.calls("GET", "/api/v1/instances/")) == 2  # 25 + 2 rows: two pages
    assert p.find_by_name("cloudtune-l5-1").job_id == "l5" and p.find_by_name("cloudtune-nope-1") is None


def test_auth_capacity_funds_ratelimit(fake):
    with pytest.raises(AuthError, match="VAST_API_KEY") as info:
        provider(fake, api_key="wrong-vast-key").offers()
    assert "wrong-vast-key" not in str(info.value)
    p = provider(fake)
    offer = live_offer(p, "104")
    fake.credit = 0.5
    with pytest.raises(QuotaError, match="credit"):
        p.launch(request(offer))
    fake.credit = 100
    waits: list[float] = []  # the waits the client would sleep, recorded instead of slept (60 s of them)
    p = provider(fake, sleep=waits.append)
    fake.inject("POST", "/api/v0/bundles/", status=429, times=2, content_type="text/plain",
                body="API requests too frequent endpoint threshold=2.0")
    assert p.offers()  # backed off (no Retry-After) and got through
    assert waits and all(w >= 15 for w in waits[:2])  # search's documented wait, not a short backoff
    fake.inject("POST", "/api/v0/bundles/", status=429, times=9, content_type="text/plain",
                body="API requests too frequent endpoint threshold=2.0")
    with pytest.raises(RateLimitedError):
        p.offers()


def test_500_and_timeout(fake):
    fake.inject("GET", "/api/v0/instances/", status=503, times=2)
    p = provider(fake)
    m = p.launch(request(live_offer(p, "101")))
    assert p.status(m.machine_id).state is MachineState.PENDING
    fake.inject("GET", "/api/v0/instances/", status=0, delay_s=1.0, times=5)
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        provider(fake, timeout_s=0.15, retry=RetryPolicy(max_attempts=2, backoff_initial_s=0.01)).status(m.machine_id)
    assert time.monotonic() - t0 < 1.5


def test_describe_launch_redacts(fake):
    p = provider(fake)
    bucket = Offer(provider="vast", offer_id="1x_H100-SXM_bucket", gpu="H100-SXM", gpu_count=1,
                   vram_gib_per_gpu=79.6, region="US", price_hr=2.0)
    reqs = p.describe_launch(request(bucket))
    text = json.dumps(reqs)
    assert SECRET not in text and KEY not in text and fake.log == []
    assert [r["method"] for r in reqs] == ["POST", "PUT"] and parse_docker_env(reqs[1]["json"]["env"])["HF_TOKEN"] == "***"


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_api_key() is None
    with pytest.raises(AuthError, match="VAST_API_KEY"):
        VastProvider(api_url="http://127.0.0.1:9").offers()
    (tmp_path / ".config" / "vastai").mkdir(parents=True)
    (tmp_path / ".config" / "vastai" / "vast_api_key").write_text("file-key\n")
    assert load_api_key() == "file-key"
    monkeypatch.setenv("VAST_API_KEY", "env-key")
    assert load_api_key() == "env-key"


def test_normalise_gpu_names():
    assert normalise_gpu("RTX_4090") == "RTX4090" and normalise_gpu("H100 NVL") == "H100-NVL"
    assert normalise_gpu("A100 PCIE", 40960) == "A100-40GB" and normalise_gpu("A100 SXM4", 81920) == "A100-80GB"
    assert normalise_gpu("RTX PRO 6000 WS") == "RTXPRO6000" and "RTX A6000" in vast_gpu_names("A6000")


def test_self_terminate_from_inside(tmp_path):
    with VastFake(api_key=KEY, run_commands=True) as fake:
        p = provider(fake)
        script = tmp_path / "work.py"
        script.write_text("import os, subprocess\nsubprocess.run(['sh', '-c', os.environ['CLOUDTUNE_SELF_TERMINATE']])\n")
        m = p.launch(request(live_offer(p, "101"), command=[sys.executable, str(script)]))
        deadline = time.monotonic() + 15
        while fake.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fake.alive() == []
        assert fake.calls("DELETE", "/api/v0/instances/")[0].bearer == fake.container_key(m.machine_id)
