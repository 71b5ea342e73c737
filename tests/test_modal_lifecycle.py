"""Modal lifecycle at the adapter's boundary, with a fake client that follows Modal's documented
Sandbox behaviour and runs each sandbox's command as a real local process.

The workload is a stand-in trainer that keeps the trainer contract: it resumes from its LATEST
checkpoint, checkpoints and exits 75 on SIGINT (Modal's preemption) or SIGTERM (the per-attempt
time limit), and exits 0 when done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import modal.exception as mexc
import pytest
from cloudtune.providers.base import (
    AuthError,
    LaunchRequest,
    MachineState,
    NotFoundError,
    Offer,
    TransientError,
)
from cloudtune.providers.modal import ModalProvider

from tests.fakes.modal_fake import FakeModalClient

SECRET = "hf_modal_secret_value_99"

WORKLOAD = r"""
import json, os, signal, sys, time
state = os.environ["WORK_DIR"]
target = int(os.environ["TARGET_STEPS"])
latest = os.path.join(state, "LATEST.json")
step = json.load(open(latest))["step"] if os.path.exists(latest) else 0
attempt = os.environ["CLOUDTUNE_ATTEMPT"]
with open(os.path.join(state, "attempts.log"), "a") as fh:
    fh.write(json.dumps({"attempt": attempt, "resumed_at": step, "hf": os.environ.get("HF_TOKEN")}) + "\n")

def checkpoint():
    tmp = latest + ".tmp"
    json.dump({"step": step}, open(tmp, "w"))
    os.replace(tmp, latest)

def stop(signum, frame):
    checkpoint()
    with open(os.path.join(state, "attempts.log"), "a") as fh:
        fh.write(json.dumps({"attempt": attempt, "signal": signal.Signals(signum).name, "step": step}) + "\n")
    sys.exit(75)

signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
while step < target:
    time.sleep(0.05)
    step += 1
    checkpoint()
open(os.path.join(state, "DONE.json"), "w").write(json.dumps({"step": step}))
sys.exit(0)
"""


@pytest.fixture
def fake():
    client = FakeModalClient()
    yield client
    client.close()


def make_request(tmp_path: Path, attempt: int, *, target: int = 1000, lifetime: float | None = None,
                 code: str = WORKLOAD) -> LaunchRequest:
    script = tmp_path / "workload.py"
    script.write_text(code)
    return LaunchRequest(
        job_id="abcd2345",
        attempt=attempt,
        offer=Offer("modal", "modal-l4-1x", "L4", 1, 24, "auto", price_hr=0.7992),
        spot=False,
        image="ghcr.io/example/cloudtune-trainer:0.1",
        command=[sys.executable, str(script)],
        env={"CLOUDTUNE_JOB_ID": "abcd2345", "CLOUDTUNE_ATTEMPT": str(attempt), "CLOUDTUNE_STORE": "s3://b/j",
             "WORK_DIR": str(tmp_path), "TARGET_STEPS": str(target)},
        secret_env={"HF_TOKEN": SECRET},
        max_lifetime_s=lifetime,
    )


def wait_until(pred, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def progress(tmp_path: Path) -> int:
    try:
        return json.loads((tmp_path / "LATEST.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def attempts_log(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "attempts.log").read_text().splitlines()]


def test_launch_status_list_find_terminate(fake, tmp_path):
    p = ModalProvider(client=fake)
    m = p.launch(make_request(tmp_path, 1))
    assert m.state is MachineState.RUNNING and m.name == "cloudtune-abcd2345-1" and m.machine_id.startswith("sb-")
    sb = fake.sandboxes[m.machine_id]
    assert sb.kwargs["gpu"] == "L4" and sb.kwargs["timeout"] == 86400 and sb.kwargs["tags"]["cloudtune:job"] == "abcd2345"
    assert sb.command[0] == "timeout"
    assert [x.machine_id for x in p.list_machines()] == [m.machine_id]
    found = p.find_by_name("cloudtune-abcd2345-1")
    assert found is not None and found.machine_id == m.machine_id and found.job_id == "abcd2345"
    wait_until(lambda: progress(tmp_path) > 0)
    assert attempts_log(tmp_path)[0]["hf"] == SECRET  # the secret reached the workload ...
    assert SECRET not in json.dumps(p.describe_launch(make_request(tmp_path, 1)))  # ... and no printout
    p.terminate(m.machine_id)
    st = p.status(m.machine_id)
    assert st.state is MachineState.TERMINATED and st.exit_code == 137
    p.terminate(m.machine_id)  # no-op once finished
    p.terminate("sb-never-existed")  # NotFound counts as done
    assert p.list_machines() == [] and p.find_by_name("cloudtune-abcd2345-1") is None
    with pytest.raises(NotFoundError):
        p.status("sb-never-existed")


def test_exit_codes_map_to_states(fake, tmp_path):
    p = ModalProvider(client=fake)
    done = p.launch(make_request(tmp_path, 1, target=3))
    assert fake.wait(done.machine_id) == 0
    st = p.status(done.machine_id)
    assert st.state is MachineState.EXITED and st.exit_code == 0 and st.attempt == 1
    failing = p.launch(make_request(tmp_path, 2, code="import sys; sys.exit(1)"))
    fake.wait(failing.machine_id)
    st = p.status(failing.machine_id)
    assert st.state is MachineState.EXITED and st.exit_code == 1


def test_job_lifetime_cap_is_not_chained_but_the_attempt_limit_is(fake, tmp_path):
    p = ModalProvider(client=fake)
    capped = p.launch(make_request(tmp_path, 1, lifetime=3600))  # the job's own cap < 24 h
    fake.expire(capped.machine_id)  # Modal's hard timeout: returncode 124
    st = p.status(capped.machine_id)
    assert st.state is MachineState.EXITED and st.exit_code == 124
    chained = p.launch(make_request(tmp_path, 2))  # timeout = Modal's 24 h limit
    fake.expire(chained.machine_id)
    st = p.status(chained.machine_id)
    assert st.state is MachineState.PREEMPTED and "per-attempt time limit" in st.detail


def test_preemption_and_the_attempt_time_limit_chain_resumable_attempts(fake, tmp_path):
    """Attempt 1 is preempted (SIGINT, as Modal does); attempt 2 runs into the per-attempt limit
    (24 h on Modal, 4 s here) and is stopped by the command wrapper's SIGTERM before the hard kill,
    as are the next ones until the last finishes. Each attempt resumes where the previous one checkpointed."""
    target = 90
    p = ModalProvider(client=fake, attempt_limit_s=4)
    ended: list = []
    attempt = 1
    while True:
        m = p.launch(make_request(tmp_path, attempt, target=target))
        assert m.name == f"cloudtune-abcd2345-{attempt}"
        if attempt == 1:
            wait_until(lambda: progress(tmp_path) >= 10)
            assert fake.preempt(m.machine_id, grace_s=5) == 75
        else:
            fake.wait(m.machine_id, timeout_s=20)
        st = p.status(m.machine_id)
        ended.append(st)
        if st.state is not MachineState.PREEMPTED:
            break
        attempt += 1  # what the orchestrator does on PREEMPTED: relaunch, the trainer resumes
        assert attempt <= 4, "the chain did not converge"

    # preempted once, then k >= 1 attempts ended by the time limit, then done
    k = len(ended) - 2
    assert k >= 1
    assert [s.state for s in ended] == [MachineState.PREEMPTED] * (k + 1) + [MachineState.EXITED]
    assert [s.exit_code for s in ended] == [75] * (k + 1) + [0]
    assert "75" in ended[0].detail
    log = attempts_log(tmp_path)
    starts = [e for e in log if "resumed_at" in e]
    stops = [e for e in log if "signal" in e]
    assert [s["signal"] for s in stops] == ["SIGINT"] + ["SIGTERM"] * k  # preemption, then the time limit
    assert starts[0]["resumed_at"] == 0
    for i, stop in enumerate(stops):  # every attempt resumed exactly where the previous one checkpointed
        assert starts[i + 1]["resumed_at"] == stop["step"] > (stops[i - 1]["step"] if i else 0)
    assert json.loads((tmp_path / "DONE.json").read_text())["step"] == target
    assert len(fake.created) == k + 2 and all(sb.kwargs["timeout"] == 4 for sb in fake.created)


def test_transient_error_after_create_adopts_the_sandbox_instead_of_a_second_one(fake, tmp_path):
    p = ModalProvider(client=fake, sleep=lambda s: None)
    fake.fail_next("create", mexc.ConnectionError("connection reset"), after=True)
    m = p.launch(make_request(tmp_path, 1))
    assert len(fake.created) == 1 and m.machine_id == fake.created[0].sandbox_id
    assert fake.calls[:3] == ["create", "create", "find"]


def test_errors_are_mapped_and_only_transient_ones_retried(fake, tmp_path):
    slept: list[float] = []
    p = ModalProvider(client=fake, sleep=slept.append, max_attempts=3)
    m = p.launch(make_request(tmp_path, 1))
    fake.fail_next("get", mexc.ResourceExhaustedError("rate limited"))
    assert p.status(m.machine_id).state is MachineState.RUNNING and len(slept) == 1
    fake.fail_next("list", mexc.AuthError("Token ID is malformed"))
    with pytest.raises(AuthError, match="MODAL_TOKEN_ID"):
        p.list_machines()
    for _ in range(3):
        fake.fail_next("get", mexc.InternalError("server error"))
    with pytest.raises(TransientError):
        p.status(m.machine_id)
    assert len(slept) == 3  # 1 + 2 backoffs, then it gave up


@pytest.mark.parametrize("status", ["INTERNAL_FAILURE", "MEMORY_MANAGER_EVICTION", "MEMORY_THRASHING_EVICTION"])
def test_modal_ending_the_container_with_exit_code_0_is_preemption_not_a_finished_trainer(fake, tmp_path, status):
    p = ModalProvider(client=fake)
    m = p.launch(make_request(tmp_path, 1))
    wait_until(lambda: progress(tmp_path) > 0)
    assert fake.end_by_modal(m.machine_id, status) == 0  # what the real SDK's returncode says
    st = p.status(m.machine_id)
    assert st.exit_code == 0 and not (tmp_path / "DONE.json").exists()
    assert st.state is MachineState.PREEMPTED and status in st.detail  # relaunch, not "exited 0 without DONE"


def test_a_trainer_that_really_exits_0_is_still_exited(fake, tmp_path):
    p = ModalProvider(client=fake)
    done = p.launch(make_request(tmp_path, 1, target=2))
    fake.wait(done.machine_id)
    st = p.status(done.machine_id)
    assert st.state is MachineState.EXITED and st.exit_code == 0
