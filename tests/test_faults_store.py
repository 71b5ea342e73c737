"""Store faults (#16 finding 5): a spell of a store that cannot be written is retried with backoff and
survived; past the budget it is one clear error, and the trainer stops resumable (75), not failed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest

from cloudtune.store import open_store
from cloudtune.store.retry import StoreUnavailable
from tests._run_util import ROOT, cli_env
from tests._trainer_util import tiny_spec


def _block(path, seconds: float) -> threading.Thread:
    """Make `path` unusable as a folder for a while: a plain file takes its place (a real OS fault:
    NotADirectoryError/FileExistsError on every write under it), then the folder comes back."""
    held = path.with_name(path.name + ".held")
    path.rename(held)
    path.write_bytes(b"in the way")

    def restore() -> None:
        time.sleep(seconds)
        path.unlink()
        held.rename(path)

    t = threading.Thread(target=restore, daemon=True)
    t.start()
    return t


def test_a_store_spell_is_ridden_out(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}", retry_s=20)
    store.put_json("job1/heartbeat.json", {"n": 1})
    t = _block(tmp_path / "store" / "job1", 1.5)
    t0 = time.monotonic()
    store.put_json("job1/heartbeat.json", {"n": 2})
    assert time.monotonic() - t0 >= 1.0  # it waited the spell out
    t.join()
    assert store.get_json("job1/heartbeat.json") == {"n": 2}


def test_past_the_budget_the_error_is_one_line_naming_store_and_key(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}", retry_s=0.5)
    store.put_json("job2/x.json", {})
    shutil.rmtree(tmp_path / "store" / "job2")
    (tmp_path / "store" / "job2").write_bytes(b"in the way")
    with pytest.raises(StoreUnavailable) as info:
        store.put_json("job2/heartbeat.json", {"n": 1})
    msg = str(info.value)
    assert "\n" not in msg and store.url in msg and "job2/heartbeat.json" in msg and "tries" in msg
    assert open_store(f"file://{tmp_path / 'store'}").read_json("nope/none.json") is None  # not-found is an answer


def test_trainer_stops_resumable_when_the_store_stays_unwritable(tmp_path):
    import json

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(tmp_path, training={"max_steps": 4}, checkpoint={"every_steps": 2})))
    bad = tmp_path / "not-a-folder"
    bad.write_bytes(b"a file where the store should be")
    env = cli_env(tmp_path / "home", CLOUDTUNE_STORE_RETRY_S="1")
    out = subprocess.run([sys.executable, "-m", "cloudtune.trainer", "--spec", str(spec), "--job-id", "storef1",
                          "--store", f"file://{bad}/store"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=240)
    assert out.returncode == 74, out.stderr[-3000:]  # EXIT_STORE_UNAVAILABLE: resumable, not FAILED
    assert "stopping resumable" in out.stderr and "Traceback" not in out.stderr
