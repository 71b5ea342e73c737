"""Vast adapter and fake against the published spec (../shared/apis/vast/endpoints/*.yaml @ c624622).

The `checked` fixture validates every exchange crossing the fake (request bodies, query shapes,
documented statuses and bodies, `x-input-validation`). Each finding of issue #12 has a test that
failed before its fix.
"""

from __future__ import annotations

import pytest
from cloudtune.providers.base import AuthError, InvalidRequestError, LaunchRequest, MachineState, Offer
from cloudtune.providers.http import RetryPolicy
from cloudtune.providers.vast import ENV_MAX_LENGTH, VastProvider, _map_state, docker_env

from tests.fakes.contract import parse_docker_env, split_docker_env, vast_spec
from tests.fakes.vast_fake import VastFake, _offer

KEY = "vast-test-key"
FAST = RetryPolicy(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02)
SPEC_B64 = "b64:" + "eyJtb2RlbCI6ICJ0aW55OmNvcHkifQ==" * 75  # ~2.4 KB, like a real inline spec


@pytest.fixture
def checked():
    with VastFake(api_key=KEY) as fake:
        yield fake
        assert vast_spec().check(fake.exchanges) == []


def provider(fake, **kw) -> VastProvider:
    return VastProvider(api_url=fake.url, api_key=kw.pop("api_key", KEY), retry=FAST, **kw)


def request(offer_id="101", gpu="RTX4090", spot=False, lifetime=3600.0, **env) -> LaunchRequest:
    offer = Offer(provider="vast", offer_id=offer_id, gpu=gpu, gpu_count=1, vram_gib_per_gpu=23.5,
                  region="Texas, US", price_hr=0.41, spot_price_hr=0.205)
    return LaunchRequest(job_id="jv", attempt=1, offer=offer, spot=spot, image="ghcr.io/x/trainer:1",
                         command=["python", "-m", "cloudtune.trainer"], disk_gb=60, max_lifetime_s=lifetime,
                         env={"CLOUDTUNE_SPEC": SPEC_B64, "CLOUDTUNE_SPEC_URL": "s3://b/jv/spec.json", **env})


def test_whole_lifecycle_conforms(checked):
    p = provider(checked)
    assert p.offers()
    m = p.launch(request())
    assert p.status(m.machine_id).state in (MachineState.PENDING, MachineState.RUNNING)
    assert p.find_by_name(m.name) is not None
    p.terminate(m.machine_id)
    p.terminate(m.machine_id)


def test_spec_example_offer_is_read():
    op = vast_spec().operation("POST", "/api/v0/bundles/")
    example = op.op["responses"]["200"]["content"]["application/json"]["example"]["offers"]
    o = VastProvider(api_key=KEY, api_url="http://127.0.0.1:9")._offer(example, "now", 100)
    assert o.offer_id == "12345678" and o.gpu_count == 4 and o.price_hr == pytest.approx(0.2346, abs=1e-4)
    assert o.spot_price_hr == pytest.approx(0.111111 + 0.987654 * 100 / 730, abs=1e-4)


def test_env_is_a_docker_flag_string_within_the_documented_limits(checked):
    provider(checked).launch(request(HF_TOKEN="hf_abc"))
    body = checked.calls("PUT", "/api/v0/asks/")[-1].json
    assert isinstance(body["env"], str)
    entries = split_docker_env(body["env"])
    assert entries and all(len(e) <= ENV_MAX_LENGTH for e in entries)
    env = parse_docker_env(body["env"])
    assert "CLOUDTUNE_SPEC" not in env and env["CLOUDTUNE_SPEC_URL"] == "s3://b/jv/spec.json"
    assert env["HF_TOKEN"] == "hf_abc" and "--oauth2-bearer $CONTAINER_API_KEY" in env["CLOUDTUNE_SELF_TERMINATE"]


def test_over_long_variables_travel_in_parts_the_machine_joins(checked, tmp_path):
    """An STS session token (~900 characters) and a presigned URL (~500) are over Vast's 256 per
    variable: each `-e` entry the fake accepts stays within the documented limit, and the machine's
    command (run here, with exactly the env the fake parsed from the Docker flags) sees the values whole."""
    import json
    import os
    import subprocess
    import sys

    token = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ" + "Ab+/=" * 170
    url = ("https://b.s3.amazonaws.com/jv/bootstrap/cloudtune-0.1.0-py3-none-any.whl?X-Amz-Algorithm=AWS4-HMAC-"
           "SHA256&X-Amz-Credential=ASIA%2F20261202%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=" + "f0" * 200)
    p = provider(checked)
    req = request(AWS_SESSION_TOKEN=token, HF_TOKEN="hf_abc")
    req.secret_env["CLOUDTUNE_BOOTSTRAP_WHEEL_URL"] = url
    p.launch(req)
    body = checked.calls("PUT", "/api/v0/asks/")[-1].json
    assert all(len(e) <= ENV_MAX_LENGTH for e in split_docker_env(body["env"]))
    env = parse_docker_env(body["env"])
    assert "AWS_SESSION_TOKEN" not in env and env["CLOUDTUNE_ENV_JOIN"]  # sent in parts
    show = "import json, os; print(json.dumps(dict(os.environ)))"
    prefix, command = body["args"][:4], body["args"][4:]
    assert prefix[:2] == ["sh", "-c"] and command == ["python", "-m", "cloudtune.trainer"]
    args = prefix + [sys.executable, "-c", show]  # the joiner the machine runs, then a probe for the command
    seen = json.loads(subprocess.run(args, env={**env, "PATH": os.environ["PATH"]}, capture_output=True,
                                     text=True, check=True, timeout=30).stdout)
    assert seen["AWS_SESSION_TOKEN"] == token and seen["CLOUDTUNE_BOOTSTRAP_WHEEL_URL"] == url
    assert seen["HF_TOKEN"] == "hf_abc" and not [k for k in seen if "__P" in k or k == "CLOUDTUNE_ENV_JOIN"]


def test_a_command_over_the_documented_args_limit_is_refused_before_renting(checked):
    req = request()
    req.command = ["sh", "-c", "echo " + "x" * 4100]
    with pytest.raises(InvalidRequestError, match="4096 for args"):
        provider(checked).launch(req)
    assert checked.calls("PUT", "/api/v0/asks/") == [] and checked.instances == {}


def test_short_variables_keep_the_command_as_it_is(checked):
    provider(checked).launch(request(HF_TOKEN="hf_abc"))
    body = checked.calls("PUT", "/api/v0/asks/")[-1].json
    assert body["args"] == ["python", "-m", "cloudtune.trainer"]


def test_docker_env_quotes_values_with_spaces():
    text = docker_env({"A": "x y", "B": "z"})
    assert text == '-e A="x y" -e B=z' and parse_docker_env(text) == {"A": "x y", "B": "z"}
    with pytest.raises(InvalidRequestError, match="quote"):
        docker_env({"A": 'say "hi"'})


def test_destroyed_and_terminated_are_terminated():
    for word in ("destroyed", "terminated"):
        state, _ = _map_state({"actual_status": word, "intended_status": "stopped", "cur_state": "stopped"})
        assert state is MachineState.TERMINATED
    assert _map_state({"actual_status": "unknown", "intended_status": "running"})[0] is MachineState.FAILED


def test_offer_ending_before_the_job_is_skipped(checked):
    checked.offers.append(_offer(110, "RTX 4090", 1, 24564, 0.30, duration=1800.0))  # ends in 30 min
    p = provider(checked)
    m = p.launch(request(offer_id="110", lifetime=7200.0))
    assert checked.instances[int(m.machine_id)]["_ask"] != 110  # an equivalent ask that lasts
    q = checked.queries[0]
    assert q["duration"] == {"gte": 7200.0 + 3600.0} and q["id"] == {"eq": 110}


def test_spot_price_includes_storage_and_bid_excludes_it(checked):
    p = provider(checked)
    by_id = {o.offer_id: o for o in p.offers()}
    raw = next(o for o in checked.offers if o["id"] == 104)
    assert by_id["104"].spot_price_hr == pytest.approx(raw["min_bid"] + raw["storage_cost"] * 100 / 730, abs=1e-4)
    p.launch(request(offer_id="104", gpu="H100-SXM", spot=True))
    assert checked.calls("PUT", "/api/v0/asks/")[-1].json["price"] == pytest.approx(raw["min_bid"] * 1.05, abs=1e-4)


def test_bad_key_on_search_is_a_404_and_an_auth_error(checked):
    with pytest.raises(AuthError, match="VAST_API_KEY"):
        provider(checked, api_key="wrong-key").offers()
    assert checked.exchanges[-1][1].status == 404


def test_observed_insufficient_credit_error_is_a_quota_error():
    """The spec's 400 enum has no credit code; vast-cli users see `insufficient_credit` (observed)."""
    from cloudtune.providers.base import QuotaError

    with VastFake(api_key=KEY, credit=0.0) as fake:
        with pytest.raises(QuotaError):
            provider(fake).launch(request())
