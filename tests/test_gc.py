"""gc finds machines with our names that no live job owns, and terminates them (verified) on --yes."""

from __future__ import annotations

import json
import sys

from cloudtune.providers import get_provider
from cloudtune.providers.base import LaunchRequest, MachineState

from cloudtune.run import state as S
from cloudtune.run.gc import scan
from tests._run_util import cli, cli_env


def _launch(job_id: str, attempt: int = 1):
    p = get_provider("local")
    req = LaunchRequest(job_id=job_id, attempt=attempt, offer=p.offers()[0], spot=False, image="-",
                        command=[sys.executable, "-c", "import time; time.sleep(120)"])
    return p, p.launch(req)


def test_gc_lists_then_terminates_orphans_only(tmp_path, _isolated_home):
    db = S.StateDB()
    db.insert_job(id="livejobx", name="l", provider="local", store_url="file:///s", spec_json="{}", plan_json="[]",
                  state=S.RUNNING)
    p, owned = _launch("livejobx")
    db.insert_attempt("livejobx", 1, owned.name, "local", "local")
    db.update_attempt("livejobx", 1, machine_id=owned.machine_id, state=S.A_RUNNING)
    _, stray = _launch("ghostjob")  # no such job: e.g. a crash between create and record
    db.insert_job(id="donejobx", name="d", provider="local", store_url="file:///s", spec_json="{}", plan_json="[]",
                  state=S.DONE)
    _, leftover = _launch("donejobx")  # the job ended but its machine did not

    _, ended = _launch("endedjb1")  # not in this db, but its store (the default one) says it ended
    from cloudtune.home import default_store_url
    from cloudtune.store import layout, open_store

    open_store(default_store_url()).put_json(layout.done_key("endedjb1"), {"time": 1})

    result = scan(db, ["local"])
    assert {o.machine.machine_id for o in result.orphans} == {leftover.machine_id, ended.machine_id}
    # A job id this db does not know may be a colleague's live job on a shared key: not proven dead.
    assert [o.machine.machine_id for o in result.foreign] == [stray.machine_id]
    assert [m.machine_id for m in result.owned] == [owned.machine_id]

    env = cli_env(_isolated_home)
    listed = cli(env, "gc", "--provider", "local", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["orphans"]) == 2
    assert p.status(stray.machine_id).state is MachineState.RUNNING  # listing alone terminates nothing

    out = cli(env, "gc", "--yes", "--provider", "local", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert all(o["terminated"] for o in rep["orphans"]) and len(rep["orphans"]) == 2
    assert rep["foreign"][0]["machine_id"] == stray.machine_id and rep["foreign"][0]["terminated"] is None
    assert p.status(leftover.machine_id).state is MachineState.TERMINATED
    assert p.status(ended.machine_id).state is MachineState.TERMINATED
    assert p.status(stray.machine_id).state is MachineState.RUNNING  # --yes alone leaves foreign machines
    assert p.status(owned.machine_id).state is MachineState.RUNNING

    shown = cli(env, "gc", "--foreign", "--provider", "local")
    assert shown.returncode == 0 and stray.machine_id in shown.stdout and "--foreign --yes" in shown.stdout
    assert p.status(stray.machine_id).state is MachineState.RUNNING
    wide = cli(env, "gc", "--foreign", "--yes", "--provider", "local", "--json")
    assert wide.returncode == 0, wide.stderr
    assert json.loads(wide.stdout)["foreign"][0]["terminated"] is True
    assert p.status(stray.machine_id).state is MachineState.TERMINATED
    assert p.status(owned.machine_id).state is MachineState.RUNNING
    p.terminate(owned.machine_id)


def test_gc_with_an_empty_db_kills_nothing_it_cannot_prove_dead(tmp_path, _isolated_home):
    """A lost or fresh state.db must not turn every live job of the key into an orphan."""
    p, live = _launch("colleag1")
    try:
        out = cli(cli_env(_isolated_home), "gc", "--yes", "--provider", "local", "--json")
        assert out.returncode == 0, out.stderr
        rep = json.loads(out.stdout)
        assert rep["orphans"] == [] and [f["machine_id"] for f in rep["foreign"]] == [live.machine_id]
        assert p.status(live.machine_id).state is MachineState.RUNNING
    finally:
        p.terminate(live.machine_id)


def test_gc_returns_quickly_when_a_provider_does_not_answer(tmp_path, _isolated_home):
    """A provider API that accepts connections and never answers costs one deadline, not minutes."""
    import socket
    import time

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # accepts (the kernel completes the handshake), never reads or answers
    port = hole.getsockname()[1]
    try:
        p, stray = _launch("donejob2")
        db = S.StateDB()
        db.insert_job(id="donejob2", name="d", provider="local", store_url="file:///s", spec_json="{}",
                      plan_json="[]", state=S.DONE)
        env = cli_env(_isolated_home, RUNPOD_API_KEY="rp-test-key", CLOUDTUNE_GC_TIMEOUT_S="3",
                      CLOUDTUNE_PROVIDER_CONFIG=json.dumps({"runpod": {
                          "base_url": f"http://127.0.0.1:{port}/v2"}}))
        t0 = time.time()
        out = cli(env, "gc", "--yes", "--provider", "runpod,local", "--json", timeout=90)
        took = time.time() - t0
        assert out.returncode == 0, out.stderr
        rep = json.loads(out.stdout)
        assert "no answer within 3s" in rep["skipped"]["runpod"]
        assert [o["machine_id"] for o in rep["orphans"]] == [stray.machine_id]  # the sweep went on
        assert p.status(stray.machine_id).state is MachineState.TERMINATED
        assert took < 20, f"gc took {took:.1f}s with one provider unreachable"
    finally:
        hole.close()


def test_gc_skips_providers_without_credentials(tmp_path, _isolated_home, monkeypatch):
    for var in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "VAST_API_KEY", "AWS_ACCESS_KEY_ID", "MODAL_TOKEN_ID"):
        monkeypatch.delenv(var, raising=False)
    out = cli(cli_env(_isolated_home), "gc", "--json", "--provider", "local,lambda")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["orphans"] == [] and "lambda" in rep["skipped"]
