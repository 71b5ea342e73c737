"""The local provider runs real process groups: exit codes, preemption with and without notice,
terminate (idempotent, kills grandchildren), lifetime cap, log shipping, and cross-process listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from cloudtune.providers import get_provider
from cloudtune.providers.base import LaunchRequest, MachineState, NotFoundError
from cloudtune.providers.local import machines_dir, preemption_time

from cloudtune.store import layout, open_store

TRAP = (
    "import signal, sys, time, os\n"
    "def h(*a):\n"
    "    print('got SIGTERM', flush=True); sys.exit(75)\n"
    "signal.signal(signal.SIGTERM, h)\n"
    "print('started', os.getpid(), flush=True)\n"
    "time.sleep(60)\n"
)


def _req(job="jobaaaaa", attempt=1, command=None, local=None, lifetime=None, env=None):
    p = get_provider("local")
    e = {"CLOUDTUNE_SPEC": json.dumps({"local": local or {}}), **(env or {})}
    return p, LaunchRequest(job_id=job, attempt=attempt, offer=p.offers()[0], spot=True, image="-",
                            command=command or ["python", "-c", TRAP], env=e, secret_env={"TOKEN": "s3cr3t"},
                            max_lifetime_s=lifetime)


def _wait(p, mid, states, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = p.status(mid)
        if m.state in states:
            return m
        time.sleep(0.1)
    raise AssertionError(f"machine {mid} stayed {p.status(mid).state}")


def test_exit_code_and_secret_env_reach_the_workload_but_not_disk():
    p, req = _req(command=["python", "-c", "import os,sys; print(os.environ['TOKEN'][:2]); sys.exit(3)"])
    m = p.launch(req)
    assert m.name == "cloudtune-jobaaaaa-1" and m.job_id == "jobaaaaa" and m.attempt == 1
    m = _wait(p, m.machine_id, {MachineState.EXITED})
    assert m.exit_code == 3
    mdir = machines_dir() / m.machine_id
    assert (mdir / "output.log").read_text().strip() == "s3"
    for f in mdir.iterdir():
        assert "s3cr3t" not in f.read_text(errors="replace"), f
    assert "s3cr3t" not in json.dumps(p.describe_launch(req))
    p.terminate(m.machine_id)
    assert p.status(m.machine_id).state is MachineState.TERMINATED


def test_preemption_with_notice_sends_sigterm_first():
    # 2.5 s: the entrypoint and the workload must both be up (and have their handlers) on a loaded CI box
    p, req = _req(local={"preempt_after_s": 2.5, "notice_s": 3.0})
    m = p.launch(req)
    m = _wait(p, m.machine_id, {MachineState.PREEMPTED})
    assert m.exit_code == 75  # the workload's SIGTERM handler ran
    assert "with 3s notice" in m.detail
    assert "got SIGTERM" in (machines_dir() / m.machine_id / "output.log").read_text()
    p.terminate(m.machine_id)


def test_preemption_without_notice_is_sigkill():
    p, req = _req(local={"preempt_every_s": 1.0, "notice_s": 0})
    m = _wait(p, p.launch(req).machine_id, {MachineState.PREEMPTED})
    assert m.exit_code == -9
    assert "got SIGTERM" not in (machines_dir() / m.machine_id / "output.log").read_text()
    p.terminate(m.machine_id)


def test_preemption_schedule_is_reproducible():
    assert preemption_time({"preempt_after_s": 5}, 1) == 5 and preemption_time({"preempt_after_s": 5}, 2) is None
    assert preemption_time({"preempt_every_s": 7}, 3) == 7
    r = {"preempt_random": True, "preempt_every_s": 10, "seed": 3}
    times = [preemption_time(r, a) for a in range(1, 6)]
    assert times == [preemption_time(r, a) for a in range(1, 6)]
    assert all(5 <= t <= 15 for t in times) and len(set(times)) == 5
    assert times != [preemption_time({**r, "seed": 4}, a) for a in range(1, 6)]
    assert preemption_time({}, 1) is None


def test_terminate_kills_the_whole_group_and_is_idempotent():
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    p, req = _req(command=["python", "-c", script])
    m = _wait(p, p.launch(req).machine_id, {MachineState.RUNNING})
    st = json.loads((machines_dir() / m.machine_id / "status.json").read_text())
    time.sleep(0.5)
    group = [q for q in psutil.process_iter(["pid"]) if _pgid(q.pid) == st["trainer_pid"]]
    assert len(group) >= 2  # the workload and its grandchild
    p.terminate(m.machine_id)
    p.terminate(m.machine_id)
    assert p.status(m.machine_id).state is MachineState.TERMINATED
    time.sleep(0.2)
    assert not [q for q in group if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
    assert p.list_machines() == []
    p.terminate("no-such-machine")  # unknown ids are "already gone"
    with pytest.raises(NotFoundError):
        p.status("no-such-machine")


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_lifetime_cap_ends_the_machine():
    p, req = _req(lifetime=1.0)
    m = _wait(p, p.launch(req).machine_id, {MachineState.TERMINATED}, timeout=20)
    assert "max lifetime" in m.detail


def test_output_is_shipped_to_the_store(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    p, req = _req(job="jobbbbbb", attempt=2, command=["python", "-c", "print('hello from the machine')"],
                  env={"CLOUDTUNE_STORE": store.url})
    _wait(p, p.launch(req).machine_id, {MachineState.EXITED})
    assert store.get_bytes(layout.log_key("jobbbbbb", 2)).decode().strip() == "hello from the machine"


def test_another_process_sees_and_terminates_the_machine():
    p, req = _req(job="jobcccccc"[:8])
    m = _wait(p, p.launch(req).machine_id, {MachineState.RUNNING})
    code = (
        "from cloudtune.providers.local import LocalProvider as L\n"
        "p = L(); ms = p.list_machines(); print([x.machine_id for x in ms])\n"
        f"assert p.find_by_name({req.name!r}).machine_id == {m.machine_id!r}\n"
        f"p.terminate({m.machine_id!r}); print(p.status({m.machine_id!r}).state.value)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=60)
    assert out.returncode == 0, out.stderr
    assert m.machine_id in out.stdout and "terminated" in out.stdout
    assert p.status(m.machine_id).state is MachineState.TERMINATED


def test_a_reused_pid_is_not_our_machine():
    # A machine record whose pid is alive but started at another time (pid reuse) is a lost machine,
    # and terminate must not signal the stranger that now has the pid.
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        p = get_provider("local")
        mdir = machines_dir() / "cloudtune-jobddddd-1-abcdef"
        mdir.mkdir(parents=True)
        (mdir / "machine.json").write_text(json.dumps({
            "id": mdir.name, "name": "cloudtune-jobddddd-1", "supervisor_pid": stranger.pid,
            "supervisor_start": psutil.Process(stranger.pid).create_time() - 1000, "job_id": "jobddddd",
            "attempt": 1,
        }))
        m = p.status(mdir.name)
        assert m.state is MachineState.TERMINATED and "lost" in m.detail
        p.terminate(mdir.name)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
