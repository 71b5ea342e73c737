"""Several processes on one machine (issue #11): the launcher, rank-0 ownership, agreed stops,
world-size-aware resume, and the local provider running `resources.gpus`/`nodes` as gloo processes.

Real processes throughout: `python -m cloudtune.trainer.launch` runs accelerate's launcher
(torch.distributed.run) with gloo workers on CPU; `cloudtune run` drives the local provider, whose
supervisor starts one process group per simulated node and preempts one of them.
FSDP is not run here: accelerate 1.15's FSDP plugin refuses to start without a CUDA/XPU device (see
docs/trainer.md); the CPU path is DDP, and `check_shape` refuses fsdp on a CPU-only local machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudtune.errors import UserError
from cloudtune.spec import parse_spec
from cloudtune.store import layout, open_store
from cloudtune.trainer import contract as C
from cloudtune.trainer.checkpoint import CheckpointStore
from cloudtune.trainer.distributed import Dist
from cloudtune.trainer.launch import Shape, accelerate_args, exit_code, shape_from_env
from tests._fake_run_util import RunProcess
from tests._run_util import ROOT, assert_nothing_left, cli, cli_env, db_rows, last_json, quickstart_spec
from tests._trainer_util import TRAINER_ENV, tiny_spec, trainer_env, write_spec

# ------------------------------------------------------------------ the launcher's contract (fast)


def test_shape_from_cloudtune_env_and_skypilot_env():
    assert shape_from_env({}) == Shape()
    s = shape_from_env({C.ENV_NPROC_PER_NODE: "4", C.ENV_NNODES: "2", C.ENV_NODE_RANK: "1",
                        C.ENV_MASTER_ADDR: "10.0.0.5", C.ENV_MASTER_PORT: "29600", C.ENV_SHARDING: "fsdp"})
    assert (s.world_size, s.node_rank, s.master_addr, s.master_port, s.sharding) == (8, 1, "10.0.0.5", 29600, "fsdp")
    # a SkyPilot node: the head node's IP is the first line of SKYPILOT_NODE_IPS
    sky = shape_from_env({C.SKYPILOT_NUM_GPUS_PER_NODE: "8", C.SKYPILOT_NUM_NODES: "2", C.SKYPILOT_NODE_RANK: "1",
                          C.SKYPILOT_NODE_IPS: "10.1.0.1\n10.1.0.2\n"})
    assert (sky.nproc_per_node, sky.nnodes, sky.node_rank, sky.master_addr) == (8, 2, 1, "10.1.0.1")


@pytest.mark.parametrize("env, fragment", [
    ({C.ENV_NPROC_PER_NODE: "two"}, "not a whole number"),
    ({C.ENV_NPROC_PER_NODE: "0"}, "must be >= 1"),
    ({C.ENV_NNODES: "2", C.ENV_NODE_RANK: "2", C.ENV_MASTER_ADDR: "h"}, "outside a job of 2 node"),
    ({C.ENV_NNODES: "2"}, "need the master's address"),
    ({C.ENV_SHARDING: "zero3"}, "DeepSpeed ZeRO is not installed"),
])
def test_bad_shape_env_is_one_line(env, fragment):
    with pytest.raises(UserError, match=fragment):
        shape_from_env(env)


def test_accelerate_args_parse_with_the_real_launcher():
    from accelerate.commands.launch import launch_command_parser

    for sharding in ("ddp", "fsdp"):
        args = launch_command_parser().parse_args(
            accelerate_args(Shape(2, 2, 1, "10.0.0.1", 29501, sharding), ["--spec", "job.yaml"]))
        assert (args.num_processes, args.num_machines, args.machine_rank) == (4, 2, 1)
        assert args.module and args.training_script == "cloudtune.trainer"
        assert args.training_script_args == ["--spec", "job.yaml"] and args.max_restarts == 0
        assert bool(args.use_fsdp) == (sharding == "fsdp") and bool(args.multi_gpu) == (sharding == "ddp")
    assert args.fsdp_state_dict_type == "SHARDED_STATE_DICT"


def test_worker_exit_codes_become_one_machine_code():
    assert exit_code({0: 75, 1: 75}) == C.EXIT_PREEMPTED
    assert exit_code({0: 0, 1: 0}) == C.EXIT_DONE
    assert exit_code({0: 1, 1: -15}) == C.EXIT_FAILED  # torchrun SIGTERMs the survivors of a failure
    assert exit_code({0: 77, 1: -9}) == 137  # the killed rank is the cause: relaunch
    assert exit_code({0: 2, 1: 77}) == C.EXIT_BAD_INPUT
    assert exit_code({0: 77, 1: 75}) == C.EXIT_PEER_LOST


def _dist(monkeypatch, world: int, sharding: str = "ddp") -> Dist:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv(C.ENV_SHARDING, sharding)
    return Dist()


def test_resume_batch_keeps_the_global_batch_or_refuses(monkeypatch):
    meta2 = _dist(monkeypatch, 2).checkpoint_meta(micro_batch=4, grad_accum=1)
    assert meta2 == {"world_size": 2, "nodes": 2, "sharding": "ddp", "micro_batch": 4, "grad_accum": 1,
                     "global_batch": 8, "topology_independent": True}
    assert _dist(monkeypatch, 2).resume_batch(meta2, 4, 4, 1) == 1  # same shape: exactly as written
    assert _dist(monkeypatch, 1).resume_batch(meta2, 4, 4, 1) == 2  # 2 -> 1: grad_accum doubles
    meta1 = _dist(monkeypatch, 1).checkpoint_meta(micro_batch=4, grad_accum=2)
    assert _dist(monkeypatch, 2).resume_batch(meta1, 4, 4, 2) == 1  # 1 -> 2: halves
    with pytest.raises(UserError, match="do not divide it"):
        _dist(monkeypatch, 3).resume_batch(meta1, 4, 4, 2)
    fsdp = _dist(monkeypatch, 2, "fsdp").checkpoint_meta(micro_batch=4, grad_accum=1)
    with pytest.raises(UserError, match="fsdp shards, which only load on that shape"):
        _dist(monkeypatch, 1).resume_batch(fsdp, 4, 4, 1)
    assert _dist(monkeypatch, 2, "fsdp").resume_batch(fsdp, 4, 4, 1) == 1
    with pytest.raises(UserError, match="micro_batch 4"):
        _dist(monkeypatch, 2).resume_batch(meta2, 4, 8, 1)


# ------------------------------------------------------------------ bad input before anything runs


SPEC = {"model": "tiny:reverse", "data": {"train": "x.jsonl"}}


@pytest.mark.parametrize("over, fragment", [
    ({"resources": {"gpus": 3, "nodes": 2}}, "gpus 3 does not split evenly over nodes 2"),
    ({"resources": {"nodes": 2}}, "nodes 2 needs gpus"),
    ({"resources": {"gpus": 2, "sharding": "none"}}, "sharding none means one GPU"),
    ({"resources": {"nodes": 0, "gpus": 2}}, "nodes"),
    ({"method": "qlora", "quant_bits": 8, "resources": {"gpus": 2, "sharding": "fsdp"}}, "8-bit QLoRA cannot be sharded"),
    ({"stage": "dpo", "resources": {"gpus": 2, "sharding": "zero3"}}, "stage dpo with resources.sharding zero3"),
])
def test_spec_refuses_shapes_that_cannot_work(over, fragment):
    from cloudtune.errors import SpecError

    with pytest.raises(SpecError, match=fragment):
        parse_spec({**SPEC, **over})
    assert parse_spec({**SPEC, "resources": {"gpus": 4, "nodes": 2, "sharding": "auto"}}).resources.sharding is None


@pytest.mark.parametrize("resources, fragment", [
    ({"gpus": 64}, "the local provider runs one process per"),
    ({"gpus": 2, "sharding": "fsdp"}, "fsdp needs CUDA GPUs"),
    ({"gpus": 2, "sharding": "zero3"}, "DeepSpeed is not in the trainer image"),
])
def test_run_refuses_a_shape_the_provider_cannot_offer(tmp_path, resources, fragment):
    env = cli_env(tmp_path / "home")
    spec = quickstart_spec(tmp_path, "bad", resources={"provider": "local", **resources})
    res = cli(env, "run", str(spec), "--yes", timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "home" / "local" / "machines").exists() or not any(
        (tmp_path / "home" / "local" / "machines").iterdir())


# ------------------------------------------------------------------ resume across world sizes (real runs)


def _launch(spec_path: Path, job: str, nproc: int, log: Path, port: int) -> subprocess.CompletedProcess:
    env = trainer_env(**{C.ENV_NPROC_PER_NODE: str(nproc), C.ENV_MASTER_PORT: str(port)})
    with log.open("ab") as out:
        return subprocess.run([sys.executable, "-m", "cloudtune.trainer.launch", "--spec", str(spec_path),
                               "--job-id", job], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                              timeout=300)


def _unfinish(store_dir: Path, job: str) -> None:
    """Make a finished job resumable again: what a longer max_steps on the same job would meet."""
    (store_dir / job / "DONE.json").unlink()
    shutil.rmtree(store_dir / job / "final")


def test_resume_2_to_1_to_2_processes_keeps_the_global_batch(tmp_path, monkeypatch, capsys):
    from cloudtune.trainer.cli import main
    from tests.conftest import _free_port

    store_dir, job, log = tmp_path / "store", "ws", tmp_path / "trainer.log"
    ckpts = CheckpointStore(open_store(f"file://{store_dir}"), job)
    def spec_for(steps: int, name: str) -> Path:
        return write_spec(tmp_path, tiny_spec(tmp_path, training={"max_steps": steps, "micro_batch": 4, "grad_accum": 1},
                                              checkpoint={"every_steps": 4}), name)

    # 2 processes, steps 1-4: rank 0 alone commits, the manifest says who wrote it
    spec = spec_for(4, "a.json")
    assert _launch(spec, job, 2, log, _free_port()).returncode == 0, log.read_text()[-3000:]
    m4 = ckpts.manifest(4)
    assert (m4["world_size"], m4["grad_accum"], m4["global_batch"], m4["sharding"]) == (2, 1, 8, "ddp")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f["path"] for f in m4["files"]}
    _unfinish(store_dir, job)

    # 1 process, steps 5-8: grad_accum 2 keeps 8 samples per step
    spec = spec_for(8, "b.json")
    assert _launch(spec, job, 1, log, _free_port()).returncode == 0, log.read_text()[-3000:]
    assert "resuming checkpoint 4 of 2 processes on 1: grad_accum 1 -> 2" in log.read_text()
    m8 = ckpts.manifest(8)
    assert (m8["world_size"], m8["grad_accum"], m8["global_batch"]) == (1, 2, 8)
    _unfinish(store_dir, job)

    # 2 processes again, steps 9-12, to DONE
    spec = spec_for(12, "c.json")
    assert _launch(spec, job, 2, log, _free_port()).returncode == 0, log.read_text()[-3000:]
    assert "resuming checkpoint 8 of 1 processes on 2: grad_accum 2 -> 1" in log.read_text()
    summary = json.loads((store_dir / job / "final" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens_seen"] > 0
    m12 = ckpts.manifest(12)
    assert (m12["world_size"], m12["grad_accum"], m12["global_batch"]) == (2, 1, 8)
    # 12 steps x 8 samples were consumed in all: the epoch counter agrees with one 8-sample batch a step
    state = json.loads((store_dir / job / "checkpoints" / f"{12:08d}" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(12 * 8 / 300, abs=0.02)

    # A sharded checkpoint of another world size is refused in one line, not crashed on
    manifest_key = layout.manifest_key(job, 12)
    meta = json.loads((store_dir / manifest_key).read_text())
    meta.update(sharding="fsdp", topology_independent=False)
    (store_dir / manifest_key).write_text(json.dumps(meta))
    _unfinish(store_dir, job)
    # in this process (the refusal comes before any model load: a trainer start would add ~10 s of imports)
    for name, value in TRAINER_ENV.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main(["--spec", str(spec), "--job-id", job])
    err = capsys.readouterr().err
    assert code == C.EXIT_BAD_INPUT, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "fsdp shards, which only load on that shape" in errors[0]
    assert "Traceback" not in err
    failed = json.loads((store_dir / job / "FAILED.json").read_text())
    assert failed["kind"] == "bad_input"


# ------------------------------------------------------------------ the local provider, end to end

# 2 simulated nodes x 1 gloo process; node 1 is preempted mid-training (the clock starts at the first
# training heartbeat), with a notice window (SIGTERM -> agreed stop, rank 0 commits) and without one
# (SIGKILL -> rank 0 sees its peer vanish, exits 77 without FAILED.json).
SCENARIOS = {"with-notice": 4.0, "sigkill-no-notice": 0.0}
# the SIGKILL comes later: a checkpoint (every 3 steps) must exist for it to resume from
PREEMPT_AFTER_S = {"with-notice": 0.5, "sigkill-no-notice": 3.0}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    from cloudtune import tiny

    tmp = tmp_path_factory.mktemp("ddp")
    env = cli_env(tmp / "home")
    # Built once up front: four ranks of two jobs building the same fresh cache at once race (tiny.py)
    tiny.ensure_tiny_model("tiny:reverse", cache=tmp / "home" / "cache" / "tiny")
    runs = {}
    for name, notice in SCENARIOS.items():
        spec = quickstart_spec(
            tmp, name, name=f"ddp-{name}",
            training={"max_steps": 30, "micro_batch": 8, "logging_steps": 5},
            checkpoint={"every_steps": 3},
            resources={"provider": "local", "gpus": 2, "nodes": 2},
            local={"preempt_after_s": PREEMPT_AFTER_S[name], "preempt_clock": "training", "notice_s": notice},
            limits={"max_restarts": 3, "heartbeat_timeout_s": 120},
        )
        runs[name] = RunProcess(env, tmp, str(spec), "--yes", "--json", tag=name)
    yield tmp, env, runs
    for run in runs.values():
        run.kill()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_local_two_nodes_preempt_one_and_resume_to_done(ddp_runs, scenario):
    tmp, env, runs = ddp_runs
    home = Path(env["CLOUDTUNE_HOME"])
    code, stdout, stderr = runs[scenario].wait(timeout=400)
    assert code == 0, stderr[-3000:]
    job_id = last_json(stdout)["job_id"]
    assert last_json(stdout)["state"] == "done"
    ledger = db_rows(home, "SELECT * FROM ledger WHERE job_id = ? ORDER BY attempt", job_id)
    reasons = [r["end_reason"] for r in ledger]
    assert len(ledger) == 2 and reasons[0].startswith("preempted: simulated spot preemption of node 1"), reasons
    assert ("without notice" in reasons[0]) == (SCENARIOS[scenario] == 0), reasons
    store = open_store(f"file://{tmp / 'store'}")
    assert store.exists(layout.done_key(job_id)) and not store.exists(layout.failed_key(job_id))
    summary = store.get_json(f"{layout.final_prefix(job_id)}summary.json")
    assert summary["steps"] == 30 and summary["attempt"] == 2
    # both attempts ran 2 ranks over gloo through the launcher; the second resumed rank 0's checkpoint
    log1 = store.get_bytes(layout.log_key(job_id, 1)).decode()
    log2 = store.get_bytes(layout.log_key(job_id, 2)).decode()
    assert "rank 0/2 (local 0, node 0), backend gloo, sharding ddp" in log1
    assert "rank 1/2 (local 0, node 1), backend gloo, sharding ddp" in log1
    assert "resuming from checkpoint" in log2
    manifest = store.get_json(layout.manifest_key(job_id, 30))
    assert manifest["world_size"] == 2 and manifest["nodes"] == 2 and manifest["attempt"] == 2
    if SCENARIOS[scenario]:
        # the notice reached node 1 only; rank 0 agreed to stop at the same step, committed the
        # emergency checkpoint and its node exited 75 (preempted) on its own
        assert "preempted at step" in log1 and "workers exited with {0: 75}: machine exit code 75" in log1
    else:
        assert "another process of the job is gone" in log1
    assert_nothing_left(job_id)


def test_a_fresh_work_dir_empties_only_a_folder_the_trainer_made(tmp_path):
    """The attempt's work dir is emptied at start; a folder of the user's (files, no marker) is refused
    in one line and keeps every file."""
    from cloudtune.trainer.distributed import WORK_MARK, fresh_work_dir

    mine = tmp_path / "work"
    fresh_work_dir(mine)
    (mine / "checkpoint-10").mkdir()
    (mine / "checkpoint-10" / "adapter.safetensors").write_bytes(b"x")
    (mine / "link").symlink_to(tmp_path)  # a link is removed, never followed
    fresh_work_dir(mine)
    assert sorted(p.name for p in mine.iterdir()) == [WORK_MARK] and tmp_path.exists()

    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a cloudtune work dir"):
        fresh_work_dir(theirs)
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_a_mount_point_work_dir_is_emptied_not_removed(tmp_path):
    """rmtree of a mount point itself fails with EBUSY: the contents go, the folder stays."""
    from cloudtune.trainer.distributed import WORK_MARK, fresh_work_dir
    from tests._kernel_fs import Mounts, can_mount

    ok, why = can_mount()
    if not ok:
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    m = Mounts()
    try:
        point = m.tmpfs(tmp_path / "mnt", "1m")
        fresh_work_dir(point)
        (point / "resume").mkdir()
        fresh_work_dir(point)
        assert [p.name for p in point.iterdir()] == [WORK_MARK]
    finally:
        m.cleanup()
