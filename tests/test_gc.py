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

    result = scan(db, ["local"])
    assert {o.machine.machine_id for o in result.orphans} == {stray.machine_id, leftover.machine_id}
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
    assert p.status(stray.machine_id).state is MachineState.TERMINATED
    assert p.status(leftover.machine_id).state is MachineState.TERMINATED
    assert p.status(owned.machine_id).state is MachineState.RUNNING
    p.terminate(owned.machine_id)


def test_gc_skips_providers_without_credentials(tmp_path, _isolated_home, monkeypatch):
    for var in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "VAST_API_KEY", "AWS_ACCESS_KEY_ID", "MODAL_TOKEN_ID"):
        monkeypatch.delenv(var, raising=False)
    out = cli(cli_env(_isolated_home), "gc", "--json", "--provider", "local,lambda")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["orphans"] == [] and "lambda" in rep["skipped"]
