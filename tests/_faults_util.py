"""Helpers for the fault tests: a job whose machine is a local sleeper, so a real watchdog can watch
it for as long as a test needs without training anything (cheap on two cores); and, for the HTTP
fault matrix (tests/test_faults_http.py), one fault-plan format every provider fake understands and
one rig per provider (fake + adapter + a job on it) so the matrix is one parametrized file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.providers import get_provider
from cloudtune.providers.base import LaunchRequest, Offer

from cloudtune.run import state as S
from cloudtune.spec import parse_spec
from tests._run_util import ROOT, cli_env, wait_for


def sleeper_job(tmp: Path, job_id: str, *, seconds: int = 120, **limits) -> tuple[S.StateDB, str]:
    """A running job (attempt 1 = a local machine running `sleep`) recorded in this $CLOUDTUNE_HOME."""
    db = S.StateDB()
    spec = parse_spec({"name": "sleeper", "model": "tiny:reverse", "data": {"train": str(tmp / "x.jsonl")},
                       "store": {"url": f"file://{tmp / 'store'}"},
                       "limits": {"heartbeat_timeout_s": 3600, **limits}})
    db.insert_job(id=job_id, name="sleeper", provider="local", store_url=f"file://{tmp / 'store'}",
                  spec_json=spec.to_json(), plan_json="[]", state=S.RUNNING)
    p = get_provider("local")
    req = LaunchRequest(job_id=job_id, attempt=1, offer=p.offers()[0], spot=False, image="-",
                        command=[sys.executable, "-c", f"import time; time.sleep({seconds})"])
    m = p.launch(req)
    db.insert_attempt(job_id, 1, m.name, "local", "local")
    db.update_attempt(job_id, 1, machine_id=m.machine_id, state=S.A_RUNNING)
    db.open_ledger(job_id, 1, provider="local", offer_id="local", gpu="CPU", gpu_count=1, spot=0, price_hr=0.0,
                   on_demand_price_hr=0.0, billing_granularity_s=1, started_at=time.time())
    db.set_state(job_id, S.RUNNING)
    return db, m.machine_id


def start_watchdog(home: Path, job_id: str, **extra: str) -> subprocess.Popen:
    env = cli_env(home, **extra)
    log = open(home / f"watchdog-{job_id}.test.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "cloudtune.run.watchdog", job_id], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def wait_beat(db: S.StateDB, job_id: str, after: float, timeout: float = 30.0) -> dict:
    return wait_for(lambda: (r := db.watchdog_row(job_id)) and r["beat_at"] > after and r, timeout,
                    f"a watchdog beat of {job_id} after {after:.1f}")


def end(proc: subprocess.Popen | None, machine_id: str | None = None) -> None:
    """Stop what a test started: its watchdog process (by pid) and its local machine."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if machine_id:
        get_provider("local").terminate(machine_id)


# ---------------------------------------------------------------- HTTP faults per provider (#16)
#
# One fault-plan format, understood by every provider fake (tests/fakes/server.py `FakeServer.fault`,
# the EC2 proxy in front of moto, the Modal fake client):
#
#     {"op": "create", "status": 500, "after_effect": True, "times": 1}
#
# op           create | status | list (find by name, gc's listing) | terminate | search (offers)
# status       the HTTP status answered (0: none, only `delay_s`); each fake shapes its provider's
#              own error body for it (RunPod problem+json, Vast {"success": false}, Lambda
#              {"error": {"code"}}, EC2 XML, Modal the SDK's exception for the gRPC status)
# after_effect the real handler runs first (the machine is created/destroyed), then the failure
# times        how many matching requests fail
# delay_s      seconds before answering (over the adapter's timeout: a timeout)
# reset        drop the connection (TCP RST) instead of answering
# code         the provider's error code (Lambda `error.code`, EC2 `Code`)
# retry_after  a Retry-After header, seconds

FAST_RETRY = dict(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02)
CLIENT_TIMEOUT_S = 0.6  # the adapters' HTTP timeout in these rigs; a fault with delay_s above it is a timeout


@dataclass
class Rig:
    """One provider's fake + adapter, and what a job on it needs (an offer, a store)."""

    provider: str
    fake: Any  # has apply / clear_faults
    adapter: Any
    offers: list[Offer]
    store: dict[str, Any]
    alive: Callable[[], list[str]]  # ids of this provider's machines that bill now
    gc_env: dict[str, str] | None = None  # env under which `make_provider` (gc, status) reaches this fake

    def apply(self, plan: list[dict[str, Any]]) -> None:
        self.fake.apply(plan)

    def job(self, job_id: str, *, options: int = 1) -> S.StateDB:
        """A job whose plan is this rig's first `options` offers (state PENDING: the first tick launches)."""
        from cloudtune.run.orchestrator import Option

        db = S.StateDB()
        spec = parse_spec({"name": "faults", "model": "tiny:reverse",
                           "data": {"train": "s3://faults-data/x.jsonl"}, "store": self.store,
                           "resources": {"image": "ghcr.io/example/cloudtune-trainer:1"},
                           "limits": {"heartbeat_timeout_s": 3600}})
        plan = [Option(o, False, o.price_hr or 1.0, 0.1, 0.1).to_dict() for o in self.offers[:options]]
        db.insert_job(id=job_id, name="faults", provider=self.provider, store_url=self.store["url"],
                      store_endpoint=self.store.get("endpoint_url"), spec_json=spec.to_json(),
                      plan_json=json.dumps(plan))
        return db

    def orchestrator(self, db: S.StateDB, job_id: str) -> Any:
        """The real Orchestrator with this rig's adapter, polling status on every tick (no cache)."""
        from cloudtune.run.orchestrator import Orchestrator
        from cloudtune.run.polling import PollBudget, StatusPoller

        orch = Orchestrator(db, job_id)
        orch._providers[self.provider] = self.adapter
        orch.__dict__["_pollers"] = {self.provider: StatusPoller(PollBudget(self.provider), healthy_interval_s=0,
                                                                 active_interval_s=0)}
        return orch


def _gc_env(provider: str, config: dict[str, Any], **keys: str) -> dict[str, str]:
    return {"CLOUDTUNE_PROVIDER_CONFIG": json.dumps({provider: config}), **keys}


def _s3_store(endpoint: str) -> dict[str, Any]:
    import uuid

    import boto3

    bucket = "faults-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    return {"url": f"s3://{bucket}/jobs", "endpoint_url": endpoint}


@contextmanager
def runpod_rig(tmp: Path, moto: str | None = None) -> Iterator[Rig]:
    from cloudtune.providers.http import RetryPolicy
    from cloudtune.providers.runpod import RunPodProvider

    from tests.fakes.runpod_fake import RunPodFake

    with RunPodFake(api_key="rp-test-key") as fake:
        adapter = RunPodProvider(api_url=fake.url + "/v2", api_key="rp-test-key", retry=RetryPolicy(**FAST_RETRY),
                                 timeout_s=CLIENT_TIMEOUT_S)
        offers = [Offer(provider="runpod", offer_id="1x_RTX4090_SECURE", gpu="RTX4090", gpu_count=1,
                        vram_gib_per_gpu=23.99, region="global", price_hr=0.69),
                  Offer(provider="runpod", offer_id="1x_L40S_SECURE", gpu="L40S", gpu_count=1,
                        vram_gib_per_gpu=44.5, region="global", price_hr=0.86)]
        yield Rig("runpod", fake, adapter, offers, {"url": f"file://{tmp / 'store'}"},
                  lambda: [p["id"] for p in fake.alive()],
                  _gc_env("runpod", {"base_url": fake.url + "/v2"}, RUNPOD_API_KEY="rp-test-key"))


@contextmanager
def vast_rig(tmp: Path, moto: str | None = None) -> Iterator[Rig]:
    from cloudtune.providers.http import RetryPolicy
    from cloudtune.providers.vast import VastProvider

    from tests.fakes.vast_fake import VastFake

    with VastFake(api_key="vast-test-key") as fake:
        adapter = VastProvider(api_url=fake.url, api_key="vast-test-key", retry=RetryPolicy(**FAST_RETRY),
                               timeout_s=CLIENT_TIMEOUT_S)
        offers = [Offer(provider="vast", offer_id="101", gpu="RTX4090", gpu_count=1, vram_gib_per_gpu=23.99,
                        region="Texas, US", price_hr=0.41),
                  Offer(provider="vast", offer_id="104", gpu="H100-SXM", gpu_count=1, vram_gib_per_gpu=79.0,
                        region="Texas, US", price_hr=1.85)]
        yield Rig("vast", fake, adapter, offers, {"url": f"file://{tmp / 'store'}"},
                  lambda: [str(i["id"]) for i in fake.alive()],
                  _gc_env("vast", {"base_url": fake.url}, VAST_API_KEY="vast-test-key"))


@contextmanager
def lambda_rig(tmp: Path, moto: str | None = None) -> Iterator[Rig]:
    from cloudtune.providers.http import RetryPolicy
    from cloudtune.providers.lambdalabs import LambdaProvider

    from tests.fakes.lambda_fake import LambdaFake

    assert moto, "a Lambda VM reaches only an s3:// store"
    with LambdaFake(api_key="lambda-test-key") as fake:
        adapter = LambdaProvider(api_url=fake.url + "/api/v1", api_key="lambda-test-key", ssh_key_name="my-key",
                                 launch_interval_s=0.0, retry=RetryPolicy(**FAST_RETRY), timeout_s=CLIENT_TIMEOUT_S)
        offers = [Offer(provider="lambda", offer_id="gpu_1x_a10", gpu="A10", gpu_count=1, vram_gib_per_gpu=22.0,
                        region="us-east-1", price_hr=1.29, billing_granularity_s=60),
                  Offer(provider="lambda", offer_id="gpu_1x_a10", gpu="A10", gpu_count=1, vram_gib_per_gpu=22.0,
                        region="us-west-1", price_hr=1.29, billing_granularity_s=60)]
        yield Rig("lambda", fake, adapter, offers, _s3_store(moto),
                  lambda: [i.id for i in fake.instances.values() if i.status not in ("terminated", "terminating")],
                  _gc_env("lambda", {"base_url": fake.url + "/api/v1"}, LAMBDA_API_KEY="lambda-test-key"))


@contextmanager
def modal_rig(tmp: Path, moto: str | None = None) -> Iterator[Rig]:
    from cloudtune.providers.modal import ModalProvider

    from tests.fakes.modal_fake import FakeModalClient

    assert moto, "a Modal sandbox reaches only an s3:// store"
    client = FakeModalClient(workload=[sys.executable, "-c", "import time; time.sleep(120)"])
    adapter = ModalProvider(client=client, max_attempts=2, backoff_initial_s=0.001, sleep=lambda s: None)
    offers = [Offer(provider="modal", offer_id="modal-l4-1x", gpu="L4", gpu_count=1, vram_gib_per_gpu=22.0,
                    region="auto", price_hr=0.7992),
              Offer(provider="modal", offer_id="modal-a10-1x", gpu="A10", gpu_count=1, vram_gib_per_gpu=22.0,
                    region="auto", price_hr=1.10)]
    try:
        yield Rig("modal", client, adapter, offers, _s3_store(moto), lambda: [sb.sandbox_id for sb in client.alive()])
    finally:
        client.close()


@contextmanager
def aws_rig(tmp: Path, moto: str | None = None) -> Iterator[Rig]:
    from tests.fakes.aws_setup import AMI_PARAMETER, INSTANCE_PROFILE, offer, provider_via, proxy_in_front
    from tests.fakes.ec2_proxy import EC2CapacityProxy

    assert moto, "the EC2 fake is moto_server behind a fault proxy"
    with proxy_in_front(EC2CapacityProxy, moto) as proxy:
        adapter = provider_via(proxy.url)
        adapter.not_found_grace_s = 0.0  # moto is consistent; a NotFound here is a real one
        before = set(proxy.live_instances())  # the moto server is shared by the session
        yield Rig("aws", proxy, adapter, [offer("g5.xlarge"), offer("g6.xlarge", gpu="L4")], _s3_store(moto),
                  lambda: [i for i in proxy.live_instances() if i not in before],
                  _gc_env("aws", {"regions": ["us-east-1"], "endpoint_url": proxy.url,
                                  "ami_parameter": AMI_PARAMETER, "instance_profile": INSTANCE_PROFILE}))


RIGS = {"runpod": runpod_rig, "vast": vast_rig, "lambda": lambda_rig, "modal": modal_rig, "aws": aws_rig}
