"""HTTP faults per provider (#16): the same campaign against every provider's fake, table-driven.

Each case is a fault plan (tests/_faults_util.py: `{"op", "status", "after_effect", "times", ...}`)
installed in one provider's fake (RunPod, Vast, Lambda over real HTTP; AWS through the EC2 proxy in
front of moto_server; Modal through the fake client behind the real SDK's exception types), then the
real Orchestrator ticks against the real adapter. The invariants, for every provider:
- a machine whose create was ambiguous is owned by its attempt until a lookup proves it absent; no
  successor is launched while it may exist;
- a create whose answer was lost (5xx after the effect, a timeout, a reset) is adopted, never doubled;
- status and terminate failing for a while change no decision and lose nothing;
- at the end the fake lists zero live machines.
No training: the machines are the fakes' own (a sleeper in Modal's case).
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest
from cloudtune.providers.base import MachineState, RateLimitedError

from cloudtune.run import state as S
from tests._faults_util import CLIENT_TIMEOUT_S, RIGS, Rig

PROVIDERS = list(RIGS)
HTTP = ["runpod", "vast", "lambda"]
LOOKUP_DOWN = {"op": "list", "status": 503, "times": 10_000}
# EC2: a lookup refused (an IAM change mid-job). botocore retries a 5xx or a throttle five times with
# backoff inside each call (~4 s a lookup); the throttled DescribeInstances is the status case below.
LOOKUP_DOWN_AWS = {"op": "list", "status": 403, "code": "UnauthorizedOperation", "times": 10_000}


def _lookup_down(rig: Rig) -> dict:
    return LOOKUP_DOWN_AWS if rig.provider == "aws" else LOOKUP_DOWN


@pytest.fixture
def rig(request, tmp_path, monkeypatch):
    name = request.param
    moto = None
    if name in ("lambda", "modal", "aws"):
        moto = request.getfixturevalue("aws_env")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")  # temporary keys travel as is (no STS round trip)
    monkeypatch.setenv("HF_TOKEN", "hf_faults_secret_12345")  # a secret: on AWS, an SSM parameter per machine
    with RIGS[name](tmp_path, moto) as r:
        yield r


def _states(db: S.StateDB, job_id: str) -> list[tuple[int, str]]:
    return [(a["n"], a["state"]) for a in db.attempts(job_id)]


def _end(rig: Rig, orch, db: S.StateDB, job_id: str) -> None:
    """End the job as the watchdog would, then check nothing is left billing."""
    job = db.get_job(job_id)
    att = db.attempt(job_id, job.current_attempt) if job.current_attempt else None
    orch._finish(S.STOPPED, "test over", att)
    _nothing_left(rig, db, job_id)


def _nothing_left(rig: Rig, db: S.StateDB, job_id: str) -> None:
    assert rig.alive() == [], f"{rig.provider}: machines left after the job ended: {rig.alive()}"
    assert all(r["ended_at"] is not None for r in db.ledger(job_id))
    if rig.provider == "aws":  # the machines' secrets (SSM parameters) went with them
        assert rig.fake.secret_parameters(f"/cloudtune/cloudtune-{job_id}-") == []


def _all_fired(rig: Rig) -> bool:
    """Every planned fault was used up (so a passing case really went through its fault)."""
    pending = getattr(rig.fake, "action_faults", None)
    if pending is not None:
        return all(f.times <= 0 for f in pending)
    return all((f.times if hasattr(f, "times") else f[3]) <= 0 for f in rig.fake._faults)


def _job_id(rig: Rig, tag: str) -> str:
    return f"{tag}{rig.provider[:3]}"


# ---------------------------------------------------------------- ambiguous creates


def _create_plan(rig: Rig, *, after_effect: bool) -> list[dict]:
    # AWS retries RunInstances once itself with the same ClientToken, and the Modal adapter retries a create
    # (the name is unique in the app): both tries must fail for the create to stay ambiguous.
    return [{"op": "create", "status": 500, "after_effect": after_effect,
             "times": 2 if rig.provider in ("aws", "modal") else 1}]


@pytest.mark.parametrize("rig", PROVIDERS, indirect=True)
def test_ambiguous_create_is_owned_until_a_lookup_answers(rig, monkeypatch):
    job_id = _job_id(rig, "amb1")
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    rig.apply(_create_plan(rig, after_effect=True) + [_lookup_down(rig)])
    for _ in range(2):
        assert orch.tick() is True
    assert _states(db, job_id) == [(1, S.A_PROVISIONING)], "a successor was launched while machine 1 may exist"
    assert len(rig.alive()) == 1
    assert db.live_attempts()[0]["name"] == f"cloudtune-{job_id}-1"  # gc counts the name as owned
    db.request_stop(job_id, "test")  # a stop while ambiguous must not forget the machine either
    orch.tick()
    assert _states(db, job_id) == [(1, S.A_PROVISIONING)] and len(rig.alive()) == 1

    rig.fake.clear_faults()  # the API recovers
    if rig.gc_env:  # gc, before the watchdog's next look: the machine is its attempt's, not an orphan
        from cloudtune.run.gc import scan

        for k, v in rig.gc_env.items():
            monkeypatch.setenv(k, v)
        result = scan(db, [rig.provider])
        assert result.orphans == [] and result.foreign == [], (result.orphans, result.foreign)
        assert [m.name for m in result.owned] == [f"cloudtune-{job_id}-1"], result
    orch.tick()  # the lookup finds machine 1 and adopts it
    att = db.attempt(job_id, 1)
    assert att["state"] == S.A_RUNNING and [att["machine_id"].rpartition(":")[2]] == rig.alive()
    assert _states(db, job_id) == [(1, S.A_RUNNING)]
    orch.tick()  # now the stop: control.json, then the machine ends after the grace
    db.update_job(job_id, stop_deadline=time.time() - 1)
    assert orch.tick() is False and db.get_job(job_id).state == S.STOPPED
    _nothing_left(rig, db, job_id)


@pytest.mark.parametrize("rig", PROVIDERS, indirect=True)
def test_ambiguous_create_that_made_nothing_launches_one_successor(rig):
    job_id = _job_id(rig, "amb2")
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    rig.apply(_create_plan(rig, after_effect=False) + [_lookup_down(rig)])
    orch.tick()
    orch.tick()
    assert _states(db, job_id) == [(1, S.A_PROVISIONING)] and rig.alive() == []
    rig.fake.clear_faults()
    orch.tick()  # the lookup proves attempt 1 absent: one successor
    assert _states(db, job_id) == [(1, S.A_LAUNCH_FAILED), (2, S.A_RUNNING)]
    assert len(rig.alive()) == 1
    _end(rig, orch, db, job_id)


# How a create's answer is lost after the provider acted on it: the connection reset (every provider;
# Modal's SDK raises ConnectionError), or a client-side timeout where the adapter's timeout is ours to
# set (the REST adapters; botocore's 60 s read timeout is fixed).
RESET = {"op": "create", "reset": True, "after_effect": True}
TIMEOUT = {"op": "create", "status": 0, "after_effect": True, "delay_s": CLIENT_TIMEOUT_S * 3}
LOST_ANSWER = [pytest.param(p, RESET, id=f"{p}-reset") for p in PROVIDERS] + [
    pytest.param(p, TIMEOUT, id=f"{p}-timeout") for p in HTTP]


@pytest.mark.parametrize(("rig", "plan"), LOST_ANSWER, indirect=["rig"])
def test_create_whose_answer_is_lost_is_adopted_not_doubled(rig, plan):
    job_id = _job_id(rig, "lost" + ("t" if plan is TIMEOUT else "r"))
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    rig.apply([plan])
    orch.tick()
    orch.tick()
    assert len(rig.alive()) == 1, f"{rig.provider}: {rig.alive()}"
    att = db.attempt(job_id, 1)
    assert _states(db, job_id) == [(1, S.A_RUNNING)]
    assert att["machine_id"].rpartition(":")[2] == rig.alive()[0]
    assert _all_fired(rig), "the planned fault never fired"
    if rig.provider == "aws":  # the adapter's own retry with the same ClientToken got the first instance
        assert len(rig.fake.run_instances_calls) == 2
        assert len({c["ClientToken"] for c in rig.fake.run_instances_calls}) == 1
    _end(rig, orch, db, job_id)


# ---------------------------------------------------------------- status, terminate, rate limits

# EC2 throttles with RequestLimitExceeded (HTTP 503); botocore's standard mode retries it with backoff
# inside one call, so two throttles there already cost ~1.5 s: keep AWS's count small.
STATUS_DOWN = {
    "aws": {"op": "status", "status": 503, "code": "RequestLimitExceeded", "times": 2},
}


@pytest.mark.parametrize("rig", PROVIDERS, indirect=True)
def test_status_failing_for_a_while_changes_nothing(rig):
    job_id = _job_id(rig, "stat")
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    orch.tick()
    machine_id = db.attempt(job_id, 1)["machine_id"]
    assert machine_id
    rig.apply([STATUS_DOWN.get(rig.provider, {"op": "status", "status": 503, "times": 6})])
    for _ in range(3):
        assert orch.tick() is True
    assert _states(db, job_id) == [(1, S.A_RUNNING)] and db.attempt(job_id, 1)["machine_id"] == machine_id
    assert len(rig.alive()) == 1 and _all_fired(rig)
    rig.fake.clear_faults()
    assert orch.tick() is True and _states(db, job_id) == [(1, S.A_RUNNING)]
    _end(rig, orch, db, job_id)


def _terminate_plan(rig: Rig, after_effect: bool) -> dict:
    # refused: more failures than one call's retries (the adapter's, or botocore's own for EC2);
    # done-then-5xx: one, the retry then reads "not found", which counts as done
    times = 1 if after_effect or rig.provider == "aws" else 3
    return {"op": "terminate", "status": 503, "times": times, "after_effect": after_effect}


@pytest.mark.parametrize("after_effect", [False, True], ids=["refused", "done-then-5xx"])
@pytest.mark.parametrize("rig", PROVIDERS, indirect=True)
def test_terminate_failing_still_ends_with_nothing_left(rig, after_effect):
    job_id = _job_id(rig, "term" + ("a" if after_effect else "r"))
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    orch.tick()
    assert len(rig.alive()) == 1
    rig.apply([_terminate_plan(rig, after_effect)])
    t0 = time.monotonic()
    _end(rig, orch, db, job_id)
    assert time.monotonic() - t0 < 30
    assert db.attempt(job_id, 1)["state"] == S.A_ENDED and _all_fired(rig)


RATE_LIMITED = {
    "runpod": {"op": "create", "status": 429, "retry_after": 0.3},
    "lambda": {"op": "create", "status": 429, "code": "global/rate-limited", "retry_after": 0.3},
    "modal": {"op": "create", "status": 429},  # RESOURCE_EXHAUSTED -> ResourceExhaustedError
}


@pytest.mark.parametrize("rig", list(RATE_LIMITED), indirect=True)
def test_a_429_on_create_is_waited_out_and_launches_once(rig):
    job_id = _job_id(rig, "rate")
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    plan = RATE_LIMITED[rig.provider]
    rig.apply([plan])
    t0 = time.monotonic()
    orch.tick()
    took = time.monotonic() - t0
    assert _states(db, job_id) == [(1, S.A_RUNNING)] and len(rig.alive()) == 1 and _all_fired(rig)
    if plan.get("retry_after"):
        assert took >= plan["retry_after"], "Retry-After was not honoured"
    _end(rig, orch, db, job_id)


# ---------------------------------------------------------------- provider-specific rules


@pytest.mark.parametrize("rig", ["lambda"], indirect=True)
def test_lambda_branches_on_error_code_never_on_message(rig):
    """Lambda's spec: clients branch on `error.code`. The fake's messages say "capacity" whatever the code."""
    job_id = "lamcode1"
    db = rig.job(job_id, options=2)
    orch = rig.orchestrator(db, job_id)
    rig.apply([{"op": "create", "status": 400, "code": "instance-operations/launch/insufficient-capacity"}])
    orch.tick()  # capacity by code: the next option (the other region) is launched
    assert _states(db, job_id) == [(1, S.A_LAUNCH_FAILED), (2, S.A_RUNNING)]
    assert [i.region for i in rig.fake.instances.values()] == ["us-west-1"]
    _end(rig, orch, db, job_id)

    job_id = "lamcode2"
    db = rig.job(job_id, options=2)
    orch = rig.orchestrator(db, job_id)
    rig.apply([{"op": "create", "status": 400, "code": "global/invalid-parameters"}])
    orch.tick()  # the message mentions capacity, the code says the request is wrong: fail, no failover
    assert db.get_job(job_id).state == S.FAILED and len(db.attempts(job_id)) == 1
    assert rig.alive() == []


@pytest.mark.parametrize("rig", ["lambda"], indirect=True)
def test_lambda_rate_limited_code_is_a_rate_limit_whatever_the_status(rig):
    rig.apply([{"op": "list", "status": 400, "code": "global/rate-limited", "retry_after": 0.2, "times": 10}])
    with pytest.raises(RateLimitedError) as err:
        rig.adapter.list_machines()
    assert err.value.retry_after_s == pytest.approx(0.2)


@pytest.mark.parametrize("rig", ["vast"], indirect=True)
def test_vast_429_carries_the_documented_wait(rig):
    """Vast's 429s have no Retry-After; search allows 10 per minute. The wait the adapter derives from
    the documented limit must let the shared client's default retries outlast the window, or one busy
    minute fails the launch (and, after the orchestrator's retries, the job)."""
    from cloudtune.providers.http import RetryPolicy

    rig.fake.enforce_rate_limits(scale=1.0)
    rig.adapter.http.retry = RetryPolicy(max_attempts=1)
    for _ in range(10):
        rig.adapter.offers()
    with pytest.raises(RateLimitedError) as err:
        rig.adapter.offers()
    waits = (err.value.retry_after_s or 0.0) * (RetryPolicy().max_attempts - 1)
    assert waits >= 60.0, f"retries cover {waits:.0f}s of a 60 s window"
    assert len(rig.fake.calls("POST", r"^/api/v0/bundles/$")) == 11


@pytest.mark.parametrize("rig", ["aws"], indirect=True)
def test_aws_ambiguous_create_not_yet_listed_is_not_doubled(rig):
    """EC2's describe calls are eventually consistent, filtered ones too: the instance an ambiguous
    RunInstances made may be missing from the tag lookup for a while. Within the consistency grace that
    proves nothing; a successor then would be a second trainer on the same store."""
    rig.adapter.not_found_grace_s = 60.0
    job_id = "awsvis01"
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    rig.fake.hide_new_instances(2)
    rig.apply([{"op": "create", "status": 500, "after_effect": True, "times": 2}])
    orch.tick()
    orch.tick()
    assert _states(db, job_id) == [(1, S.A_PROVISIONING)] and len(rig.alive()) == 1
    orch.tick()  # listed now: adopted
    assert _states(db, job_id) == [(1, S.A_RUNNING)] and len(rig.alive()) == 1
    _end(rig, orch, db, job_id)


@pytest.mark.parametrize("rig", ["aws"], indirect=True)
def test_aws_ambiguous_create_that_made_nothing_waits_the_grace_then_drops_its_secrets(rig):
    rig.adapter.not_found_grace_s = 60.0
    job_id = "awsvis02"
    db = rig.job(job_id)
    orch = rig.orchestrator(db, job_id)
    rig.apply([{"op": "create", "status": 500, "times": 2}])
    orch.tick()
    orch.tick()
    assert _states(db, job_id) == [(1, S.A_PROVISIONING)] and rig.alive() == []
    assert rig.fake.secret_parameters(f"/cloudtune/cloudtune-{job_id}-1/") != []  # kept for an adoption
    rig.adapter.not_found_grace_s = 0.0  # the grace has passed
    orch.tick()
    assert _states(db, job_id) == [(1, S.A_LAUNCH_FAILED), (2, S.A_RUNNING)] and len(rig.alive()) == 1
    assert rig.fake.secret_parameters(f"/cloudtune/cloudtune-{job_id}-1/") == []
    _end(rig, orch, db, job_id)


# ---------------------------------------------------------------- gc with providers unreachable


def test_gc_with_every_cloud_unreachable_returns_promptly_and_sweeps_the_rest(tmp_path, _isolated_home):
    """Vast, Lambda, Modal (the real SDK, gRPC) and AWS (boto3) all pointed at a socket that accepts and
    never answers: gc costs one deadline, reports each as skipped, and still ends the local orphan."""
    from cloudtune.providers import get_provider
    from cloudtune.providers.base import LaunchRequest

    from tests._run_util import cli, cli_env

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    url = f"http://127.0.0.1:{hole.getsockname()[1]}"
    p = get_provider("local")
    req = LaunchRequest(job_id="gcdone01", attempt=1, offer=p.offers()[0], spot=False, image="-",
                        command=[sys.executable, "-c", "import time; time.sleep(120)"])
    stray = p.launch(req)
    try:
        db = S.StateDB()
        db.insert_job(id="gcdone01", name="d", provider="local", store_url="file:///s", spec_json="{}",
                      plan_json="[]", state=S.DONE)
        env = cli_env(_isolated_home, CLOUDTUNE_GC_TIMEOUT_S="3", VAST_API_KEY="vast-test-key",
                      LAMBDA_API_KEY="lambda-test-key", MODAL_TOKEN_ID="ak-test", MODAL_TOKEN_SECRET="as-test",
                      MODAL_SERVER_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", CLOUDTUNE_AWS_REGIONS="us-east-1,us-west-2",
                      CLOUDTUNE_AWS_ENDPOINT_URL=url,
                      CLOUDTUNE_PROVIDER_CONFIG=json.dumps({"vast": {"base_url": url},
                                                            "lambda": {"base_url": url + "/api/v1"}}))
        t0 = time.time()
        out = cli(env, "gc", "--yes", "--provider", "vast,lambda,modal,aws,local", "--json", timeout=120)
        took = time.time() - t0
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and "ClientClosed" not in out.stderr, out.stderr[-2000:]
        rep = json.loads(out.stdout)
        for name in ("vast", "lambda", "modal", "aws"):
            assert name in rep["skipped"], (name, rep["skipped"])
        assert [o["machine_id"] for o in rep["orphans"]] == [stray.machine_id]
        assert p.status(stray.machine_id).state is MachineState.TERMINATED
        assert took < 25, f"gc took {took:.1f}s with four providers unreachable"
    finally:
        p.terminate(stray.machine_id)
        hole.close()
