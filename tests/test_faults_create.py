"""Ambiguous creates (#16 finding 2), through the RunPod fake over real HTTP: a create that made a pod
but answered 5xx, followed by lookups that fail for a while, must not launch a successor while the
first pod may exist; the attempt owns the name until a lookup answers, then adopts (or proves it gone)."""

from __future__ import annotations

import json
import time

from cloudtune.providers.base import Offer
from cloudtune.providers.http import RetryPolicy
from cloudtune.providers.runpod import RunPodProvider

from cloudtune.run import state as S
from cloudtune.run.gc import scan
from cloudtune.run.orchestrator import Option, Orchestrator
from cloudtune.spec import parse_spec
from tests.fakes.runpod_fake import RunPodFake

KEY = "rp-test-key"
FAST = RetryPolicy(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02)


def _job(tmp_path, job_id: str) -> S.StateDB:
    db = S.StateDB()
    spec = parse_spec({"name": "amb", "model": "tiny:reverse", "data": {"train": "s3://bkt-amb/x.jsonl"},
                       "store": {"url": f"file://{tmp_path / 'store'}"}, "limits": {"heartbeat_timeout_s": 3600}})
    offer = Offer(provider="runpod", offer_id="1x_RTX4090_SECURE", gpu="RTX4090", gpu_count=1,
                  vram_gib_per_gpu=23.99, region="global", price_hr=0.69)
    plan = [Option(offer, False, 0.69, 0.1, 0.07).to_dict()]
    db.insert_job(id=job_id, name="amb", provider="runpod", store_url=f"file://{tmp_path / 'store'}",
                  spec_json=spec.to_json(), plan_json=json.dumps(plan))
    return db


def _orch(db: S.StateDB, job_id: str, fake: RunPodFake) -> Orchestrator:
    orch = Orchestrator(db, job_id)
    orch._providers["runpod"] = RunPodProvider(api_url=fake.url + "/v2", api_key=KEY, retry=FAST)
    return orch


def test_ambiguous_create_is_owned_until_a_lookup_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    with RunPodFake(api_key=KEY) as fake:
        monkeypatch.setenv("CLOUDTUNE_PROVIDER_CONFIG", json.dumps({"runpod": {"base_url": fake.url + "/v2"}}))
        db = _job(tmp_path, "ambjob01")
        orch = _orch(db, "ambjob01", fake)
        fake.inject("POST", r"^/v2/pods$", status=500, body={"title": "Internal Server Error"}, after_handler=True)
        fake.inject("GET", r"^/v2/pods$", status=503, body={"title": "Service Unavailable"}, times=10_000)
        for _ in range(5):
            assert orch.tick() is True
        assert len(fake.calls("POST", r"^/v2/pods$")) == 1, "a successor was launched while pod 1 may exist"
        assert len(fake.alive()) == 1
        atts = db.attempts("ambjob01")
        assert [(a["n"], a["state"]) for a in atts] == [(1, S.A_PROVISIONING)]
        # gc, meanwhile, counts the name as owned (its lookup works on another path in real life: here the
        # attempt row is what protects it).
        assert db.live_attempts()[0]["name"] == "cloudtune-ambjob01-1"
        db.request_stop("ambjob01", "test")  # a stop while ambiguous must not forget the pod either
        orch.tick()
        assert [a["state"] for a in db.attempts("ambjob01")] == [S.A_PROVISIONING] and len(fake.alive()) == 1

        with fake.lock:
            fake._faults.clear()  # the API recovers
        orch.tick()  # adopt
        att = db.attempt("ambjob01", 1)
        assert att["state"] == S.A_RUNNING and att["machine_id"] == fake.alive()[0]["id"]
        assert len(fake.calls("POST", r"^/v2/pods$")) == 1
        orch.tick()  # the stop request: control.json, then terminate after the grace
        db.update_job("ambjob01", stop_deadline=time.time() - 1)
        assert orch.tick() is False
        assert fake.alive() == [] and db.get_job("ambjob01").state == S.STOPPED
        assert db.ledger("ambjob01")[0]["ended_at"] is not None


def test_ambiguous_create_that_made_nothing_launches_the_successor(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    with RunPodFake(api_key=KEY) as fake:
        db = _job(tmp_path, "ambjob02")
        orch = _orch(db, "ambjob02", fake)
        fake.inject("POST", r"^/v2/pods$", status=500, body={"title": "Internal Server Error"})  # no pod made
        fake.inject("GET", r"^/v2/pods$", status=503, body={"title": "Service Unavailable"}, times=10_000)
        orch.tick()
        orch.tick()
        assert len(fake.calls("POST", r"^/v2/pods$")) == 1
        with fake.lock:
            fake._faults.clear()
        orch.tick()  # the lookup proves attempt 1 absent: attempt 2 is launched
        states = [(a["n"], a["state"]) for a in db.attempts("ambjob02")]
        assert states == [(1, S.A_LAUNCH_FAILED), (2, S.A_RUNNING)], states
        assert len(fake.alive()) == 1
        orch._finish(S.STOPPED, "test over", db.attempt("ambjob02", 2))
        assert fake.alive() == []


def test_gc_counts_an_ambiguous_attempts_machine_as_owned(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    with RunPodFake(api_key=KEY) as fake:
        monkeypatch.setenv("CLOUDTUNE_PROVIDER_CONFIG", json.dumps({"runpod": {"base_url": fake.url + "/v2"}}))
        db = _job(tmp_path, "ambjob03")
        orch = _orch(db, "ambjob03", fake)
        fake.inject("POST", r"^/v2/pods$", status=500, body={"title": "Internal Server Error"}, after_handler=True)
        fake.inject("GET", r"^/v2/pods$", status=503, body={"title": "Service Unavailable"}, times=4)
        orch.tick()
        assert db.attempt("ambjob03", 1)["state"] == S.A_PROVISIONING
        with fake.lock:
            fake._faults.clear()
        result = scan(db, ["runpod"])
        assert result.orphans == [] and [m.name for m in result.owned] == ["cloudtune-ambjob03-1"]
        orch._finish(S.STOPPED, "test over", db.attempt("ambjob03", 1))
        assert fake.alive() == []
