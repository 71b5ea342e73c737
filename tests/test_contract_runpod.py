"""RunPod adapter and fake against the published spec (../shared/apis/runpod/openapi-v2.json, 2.0.0).

Every exchange crossing the fake is validated against the spec at the end of each test (the
`checked` fixture); the spec's own examples are served back through the adapter; each finding of
issue #12 has a test here that failed before its fix.
"""

from __future__ import annotations

import time

import pytest
from cloudtune.providers.base import CapacityError, InvalidRequestError, LaunchRequest, MachineState, Offer
from cloudtune.providers.http import HttpClient, RetryPolicy
from cloudtune.providers.ratelimit import exhausted_delay, parse_ratelimit
from cloudtune.providers.runpod import MIN_CUDA_VERSION, RunPodProvider

from tests.fakes.contract import REPO, runpod_spec, validate_schema
from tests.fakes.runpod_fake import RunPodFake
from tests.fakes.server import FakeServer, Response, route

KEY = "rp-test-key"
FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02)


@pytest.fixture
def checked():
    """A RunPod fake whose every request and response must conform to the spec."""
    with RunPodFake(api_key=KEY) as fake:
        yield fake
        assert runpod_spec().check(fake.exchanges) == []


def provider(fake, **kw) -> RunPodProvider:
    return RunPodProvider(api_url=fake.url + "/v2", api_key=KEY, retry=kw.pop("retry", FAST), **kw)


def request(offer_id: str, gpu: str, count: int = 1, **kw) -> LaunchRequest:
    offer = Offer(provider="runpod", offer_id=offer_id, gpu=gpu, gpu_count=count, vram_gib_per_gpu=79.0,
                  region="global", price_hr=1.0)
    return LaunchRequest(job_id="jc", attempt=1, offer=offer, spot=False, image="ghcr.io/x/trainer:1",
                         command=["python", "-m", "cloudtune.trainer"], env={"CLOUDTUNE_JOB_ID": "jc"}, **kw)


def _example(op_path: str, method: str, status: str, media: str = "application/json"):
    op = runpod_spec().docs[0].doc["paths"][op_path][method]
    content = op["responses"][status]["content"][media]
    return next(iter(content["examples"].values()))["value"]


# ---------------------------------------------------------------- the fake serves the spec's shapes


def test_fake_canned_catalog_rows_are_spec_gpu_types():
    fake = RunPodFake()
    for g in fake.gpus:
        assert validate_schema(runpod_spec(), "GpuType", {k: v for k, v in g.items() if not k.startswith("_")}) == []


def test_whole_lifecycle_conforms(checked):
    p = provider(checked)
    assert p.offers()
    m = p.launch(request("1x_RTX4090_SECURE", "RTX4090"))
    for _ in range(3):
        p.status(m.machine_id)
    assert p.find_by_name(m.name) is not None
    p.terminate(m.machine_id)
    p.terminate(m.machine_id)
    assert checked.exchanges  # the fixture validates them all


def test_spec_example_catalog_with_maxcount_object_is_read():
    """The spec's own listGpuTypes example: maxCount {"secure": 8, "community": 4} (was int() -> TypeError)."""
    example = _example("/v2/catalog/gpus", "get", "200")

    class ExampleServer(FakeServer):
        @route("GET", r"/v2/catalog/gpus")
        def gpus(self, req):
            return Response(200, example)

    with ExampleServer(api_key=KEY) as srv:
        offers = {o.offer_id: o for o in provider(srv).offers()}
    assert offers["1x_RTX4090_SECURE"].price_hr == pytest.approx(0.44)
    assert offers["8x_RTX4090_SECURE"].price_hr == pytest.approx(0.44 * 8)
    assert "4x_RTX4090_COMMUNITY" in offers and "8x_RTX4090_COMMUNITY" not in offers  # maxCount.community 4


def test_spec_example_pod_is_read():
    pod = _example("/v2/pods/{id}", "get", "200")
    m = RunPodProvider(api_key=KEY, api_url="http://127.0.0.1:9/v2")._machine(pod)
    assert m.state is MachineState.RUNNING and m.price_hr == 0.44 and m.region == "US-KS-2"


# ---------------------------------------------------------------- findings of issue #12


def test_availability_is_asked_for_the_offers_gpu_count(checked):
    checked.stock[("NVIDIA H100 80GB HBM3", "SECURE")] = 2  # one machine has 2 free GPUs now
    ids = {o.offer_id for o in provider(checked).offers()}
    assert "2x_H100-SXM_SECURE" in ids and "4x_H100-SXM_SECURE" not in ids and "8x_H100-SXM_SECURE" not in ids
    counts = {c.arg("count") for c in checked.calls("GET", "/v2/catalog/gpus")}
    assert counts == {"1", "2", "4", "8"}


def test_catalog_stock_is_scoped_to_the_images_cuda(checked):
    checked.host_cuda = ["12.2"]  # only hosts too old for the trainer image
    assert provider(checked).offers() == []
    assert {c.arg("minCudaVersion") for c in checked.calls("GET", "/v2/catalog/gpus")} == {MIN_CUDA_VERSION}


def test_create_sends_min_cuda_version_of_the_image(checked):
    provider(checked).launch(request("1x_RTX4090_SECURE", "RTX4090"))
    body = checked.calls("POST", "/v2/pods")[-1].json
    assert body["gpu"]["minCudaVersion"] == MIN_CUDA_VERSION
    dockerfile = (REPO / "images" / "trainer" / "Dockerfile").read_text()
    assert f"cuda{MIN_CUDA_VERSION}" in dockerfile  # the floor is the image's CUDA


def test_a100_sxm_and_pcie_are_distinct_offers_launching_their_own_type(checked):
    checked.gpus[2]["_availability"] = "HIGH"  # the PCIe card in stock too
    ids = {o.offer_id for o in provider(checked).offers()}
    assert {"1x_A100-80GB_SECURE", "1x_A100-80GB-SXM_SECURE"} <= ids
    p = provider(checked)
    p.launch(request("1x_A100-80GB-SXM_SECURE", "A100-80GB"))
    p.launch(request("1x_A100-80GB_SECURE", "A100-80GB"))
    sent = [c.json["gpu"]["id"] for c in checked.calls("POST", "/v2/pods")]
    assert sent == ["NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"]


def test_bundled_catalog_h200_slug_launches(checked):
    checked.gpus.append({**checked.gpus[1], "id": "NVIDIA H200", "name": "H200"})
    provider(checked).launch(request("1x_H200-SXM_SECURE", "H200"))
    assert checked.calls("POST", "/v2/pods")[-1].json["gpu"]["id"] == "NVIDIA H200"


def test_capacity_400_with_detail_is_capacity_error(checked):
    with pytest.raises(CapacityError, match="no longer any instances"):
        provider(checked).launch(request("1x_A100-80GB_SECURE", "A100-80GB"))  # availability NONE
    assert checked.exchanges[-1][1].status == 400


def test_403_pool_not_for_this_account_tries_the_next_offer(checked):
    checked.forbidden_pools.add("NVIDIA GeForce RTX 4090")
    with pytest.raises(CapacityError, match="cannot use the requested pool"):
        provider(checked).launch(request("1x_RTX4090_SECURE", "RTX4090"))


def test_leftover_field_is_a_422_and_fails_the_job():
    """additionalProperties/unevaluatedProperties false: the fake refuses a field the schema lacks."""
    with RunPodFake(api_key=KEY) as fake:
        p = provider(fake)
        body = p._create_body(request("1x_RTX4090_SECURE", "RTX4090"))
        assert runpod_spec().check_request("POST", "/v2/pods", {}, body) == []
        with pytest.raises(InvalidRequestError, match="422.*bidPerGpu"):  # a v1 field, as the old path sent
            p.http.request("POST", "/pods", json={**body, "bidPerGpu": 0.3}, idempotent=False)


def test_spot_request_never_reaches_the_api(checked):
    req = request("1x_RTX4090_SECURE", "RTX4090")
    req.spot = True
    with pytest.raises(InvalidRequestError, match="no interruptible"):
        provider(checked).launch(req)
    assert checked.calls("POST", "/v2/pods") == []


# ---------------------------------------------------------------- rate limits


def test_ratelimit_header_parsing_per_the_spec_example():
    doc = runpod_spec().docs[0].doc["components"]["schemas"]
    windows = parse_ratelimit(doc["RateLimitHeader"]["examples"][0])
    assert [(w.name, w.remaining, w.reset_s) for w in windows] == [
        ("minute", 0, 12.0), ("hour", 2800, 1812.0), ("day", 49500, 45012.0)]
    assert exhausted_delay({"RateLimit": doc["RateLimitHeader"]["examples"][0]}) == 12.0
    assert exhausted_delay({"RateLimit": '"minute";r=5;t=12'}) is None


def test_spent_window_waits_before_the_next_request(checked):
    slept: list[float] = []
    checked.requests_left["minute"] = 0
    checked.reset_s = 7
    p = provider(checked)
    p.http = HttpClient("runpod", p.api_url, KEY, retry=FAST, sleep=slept.append, classify=p.http.classify)
    p.list_machines()
    assert slept == []
    p.list_machines()  # the previous answer said the minute window is spent: wait, then send
    assert slept and 6.0 < slept[0] <= 7.0


def test_429_without_retry_after_waits_for_the_ratelimit_reset(checked):
    checked.inject("GET", r"^/v2/pods$", status=429, headers={"RateLimit": '"minute";r=0;t=1'},
                   body={"title": "Too Many Requests", "status": 429, "detail": "rate limit exceeded for the minute window"},
                   content_type="application/problem+json")
    t0 = time.monotonic()
    provider(checked).list_machines()
    assert time.monotonic() - t0 >= 0.9
