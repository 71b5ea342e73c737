"""A two-node job end to end through the orchestrator, the SkyPilot adapter and the SDK fake (issue #11).

Everything but the cloud is real: `create_job` stages the data into an S3 store on moto_server, the
Orchestrator's ticks (what the watchdog runs every second) launch the attempt through
`SkyPilotProvider`, which builds a real `sky.Task`/`sky.Resources` and hands it to the fake SDK; the
fake runs the task's `run` command on each of its 2 "nodes" as a local process group with
SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS / SKYPILOT_NUM_NODES / SKYPILOT_NUM_GPUS_PER_NODE set, and
`python -m cloudtune.trainer.launch` turns those into a 2-process gloo DDP job through accelerate.
The fake SDK is injected the way other in-process orchestrator tests inject an adapter
(tests/test_faults_create.py): `orch._providers[name] = Adapter(<fake>)`; the detached watchdog of
`cloudtune run` cannot hold an in-process fake.

Midway, node 1 is lost (its processes SIGKILLed, the cloud reports the cluster INIT): the
orchestrator must tear the whole cluster down (`sky.down`), relaunch it as one new attempt, and the
job resumes from the last checkpoint to DONE.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

sky = pytest.importorskip("sky")

from cloudtune.providers.base import Offer  # noqa: E402
from cloudtune.providers.skypilot import SkyPilotProvider, wrap_offer  # noqa: E402

from cloudtune.run import state as S  # noqa: E402
from cloudtune.run.orchestrator import Draft, Option, Orchestrator, create_job  # noqa: E402
from cloudtune.run.polling import PollBudget, StatusPoller  # noqa: E402
from cloudtune.spec import load_spec  # noqa: E402
from cloudtune.store import layout  # noqa: E402
from cloudtune.trainer import contract as C  # noqa: E402
from tests._fake_run_util import machine_env, s3_bucket, s3_job_spec, s3_json, s3_keys  # noqa: E402
from tests._run_util import ROOT  # noqa: E402
from tests.fakes.skypilot_fake import FakeSky  # noqa: E402

BUCKET = "sky-two-nodes"
STEPS, EVERY = 24, 4
# One A10G per node: SKYPILOT_NUM_GPUS_PER_NODE=1, so each node runs 1 process and the job has 2.
NODE_OFFER = Offer("aws", "g5.xlarge", "A10G", 1, 24, "us-east-1", price_hr=1.006, spot_price_hr=0.45)
IMAGE = "ghcr.io/example/cloudtune-trainer:0.1"  # a cloudtune image: no bootstrap install on the node


def _drive(orch: Orchestrator, until, timeout: float, what: str) -> bool:
    """Tick like the watchdog does until `until()` holds or the orchestrator has nothing left to do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        more = orch.tick()
        if until() or not more:
            return more
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; events:\n"
                         + "\n".join(f"{e['kind']}: {e['message']}" for e in orch.db.events(orch.job_id)[-15:]))


def _node_logs(log_dir: Path, cluster: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(log_dir.glob(f"{cluster}-*.log")))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_skypilot_job_loses_a_node_relaunches_the_cluster_and_resumes_to_done(
        tmp_path, monkeypatch, aws_env):
    from cloudtune import tiny
    from cloudtune.home import home
    from tests.conftest import _free_port

    endpoint = aws_env
    s3 = s3_bucket(endpoint, BUCKET)
    machine_env(monkeypatch)
    monkeypatch.setenv(C.ENV_MASTER_PORT, str(_free_port()))  # the head's rendezvous port (SkyPilot sets none)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # built once up front: two ranks building the same fresh cache at once race (tiny.py)
    tiny.ensure_tiny_model("tiny:reverse", cache=home() / "cache" / "tiny")

    spec_path = s3_job_spec(tmp_path, endpoint, BUCKET,
                            training={"max_steps": STEPS, "micro_batch": 8, "logging_steps": 4},
                            checkpoint={"every_steps": EVERY, "every_minutes": None, "keep": 2},
                            resources={"provider": "skypilot", "gpus": 2, "nodes": 2, "sharding": "ddp",
                                       "image": IMAGE})
    spec = load_spec(spec_path)
    option = Option(wrap_offer(NODE_OFFER), True, 2 * 0.45, 0.05, 0.05, nodes=2, gpu_count=2,
                    launcher="skypilot+ddp")
    db = S.StateDB()
    job = create_job(db, Draft(spec=spec, provider="skypilot", options=[option]))
    assert s3_keys(s3, BUCKET, f"jobs/{job}/inputs/"), "the local data was not staged for the cloud machines"

    log_dir = tmp_path / "nodes"
    log_dir.mkdir()
    fake = FakeSky(idle_minute_s=0.2, cwd=str(ROOT), log_dir=str(log_dir))
    orch = Orchestrator(db, job)
    # refresh_every_s=0: every status asks the "cloud" (the fake's refresh=FORCE), as the 60 s default would
    # eventually; the poller's intervals are shortened the same way (30 s while healthy in production).
    orch._providers["skypilot"] = SkyPilotProvider(sdk=fake, refresh_every_s=0.0)
    orch._pollers = {"skypilot": StatusPoller(PollBudget("skypilot"), healthy_interval_s=0.5,
                                              active_interval_s=0.5)}
    first, second = f"cloudtune-{job}-1", f"cloudtune-{job}-2"
    started = time.monotonic()
    try:
        def checkpoint_of_attempt_1() -> bool:
            latest = s3_json(s3, BUCKET, "jobs/" + layout.latest_key(job))
            hb = s3_json(s3, BUCKET, "jobs/" + layout.heartbeat_key(job))
            return bool(latest and hb and int(hb.get("attempt", 0)) == 1 and int(latest["step"]) >= EVERY
                        and int(hb.get("step") or 0) > int(latest["step"]))

        try:
            assert _drive(orch, checkpoint_of_attempt_1, 180, "attempt 1 to commit a checkpoint")
        except AssertionError:
            raise AssertionError(_node_logs(log_dir, first)[-4000:]) from None
        lost_at_step = int(s3_json(s3, BUCKET, "jobs/" + layout.latest_key(job))["step"])
        assert lost_at_step < STEPS
        c1 = fake.clusters[first]
        assert (c1.num_nodes, c1.gpus_per_node, c1.cloud, c1.use_spot) == (2, 1, "aws", True)
        fake.lose_node(first, rank=1)

        try:
            more = _drive(orch, lambda: False, 220, "the job to end")
        except AssertionError:
            raise AssertionError(_node_logs(log_dir, second)[-4000:]) from None
        wall = time.monotonic() - started
    finally:
        fake.close()

    final = db.get_job(job)
    assert not more and final.state == S.DONE, (final.state, final.reason, _node_logs(log_dir, second)[-3000:])
    # one lost node = one lost attempt: the whole first cluster went down, one new 2-node cluster came up
    assert [c.name for c in fake.launched] == [first, second]
    assert all(c.num_nodes == 2 for c in fake.launched)
    downs = [kw["cluster_name"] for name, kw in fake.calls if name == "down"]
    assert downs[0] == first and second in downs, downs
    assert fake.clusters == {}, "a cluster was left up"
    assert all(p.poll() is not None for c in fake.launched for p in c.procs)
    attempts = db.attempts(job)
    assert [a["n"] for a in attempts] == [1, 2]
    ledger = db.ledger(job)
    assert len(ledger) == 2 and all(r["ended_at"] for r in ledger)
    assert "preempted" in ledger[0]["end_reason"] and "a node is down" in ledger[0]["end_reason"], ledger[0]

    # both attempts trained as 2 gloo ranks on 2 nodes; the second resumed the first's checkpoint
    log1, log2 = _node_logs(log_dir, first), _node_logs(log_dir, second)
    for log in (log1, log2):
        assert "rank 0/2 (local 0, node 0), backend gloo, sharding ddp" in log, log[-3000:]
        assert "rank 1/2 (local 0, node 1), backend gloo, sharding ddp" in log, log[-3000:]
    assert "resuming from checkpoint" in log2, log2[-3000:]
    summary = s3_json(s3, BUCKET, "jobs/" + layout.final_prefix(job) + "summary.json")
    assert summary and summary["steps"] == STEPS and summary["attempt"] == 2
    manifest = s3_json(s3, BUCKET, "jobs/" + layout.manifest_key(job, STEPS))
    assert manifest and (manifest["world_size"], manifest["nodes"], manifest["attempt"]) == (2, 2, 2)
    assert s3_json(s3, BUCKET, "jobs/" + layout.done_key(job)) and not s3_json(s3, BUCKET, "jobs/" + layout.failed_key(job))
    print(f"two-node SkyPilot-fake run: {wall:.1f}s, node lost after checkpoint {lost_at_step}")
