"""`cloudtune catalog refresh` and `cloudtune run --dry-run` for RunPod, through the real CLI process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests._fake_run_util import cli_over_environ as cli
from tests._fake_run_util import s3_quickstart
from tests.fakes.runpod_fake import RunPodFake

KEY = "rp-cli-secret-key-123"


def test_catalog_refresh_and_dry_run_against_the_fake(tmp_path):
    with RunPodFake(api_key=KEY) as fake:
        env = {"RUNPOD_API_KEY": KEY, "CLOUDTUNE_RUNPOD_API_URL": fake.url + "/v2"}
        r = cli("catalog", "refresh", "--provider", "runpod", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert KEY not in r.stdout + r.stderr
        cache = Path(os.environ["CLOUDTUNE_HOME"]) / "cache"
        rows = json.loads(next(cache.glob("*runpod*")).read_text())
        text = json.dumps(rows)
        assert "1x_RTX4090_COMMUNITY" in text and "1x_A100-80GB_SECURE" not in text  # live stock, not the snapshot
        assert fake.calls("GET", "/v2/catalog/gpus")

        r = cli("run", str(s3_quickstart(tmp_path)), "--provider", "runpod", "--dry-run", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert KEY not in r.stdout + r.stderr
        launch = json.loads(r.stdout)["launch"]
        assert launch[0]["method"] == "POST" and launch[0]["url"] == fake.url + "/v2/pods"
        assert launch[0]["json"]["cloud"] == "COMMUNITY"  # the cheapest live offer that fits
        assert launch[0]["headers"]["Authorization"] == "Bearer ***"
        assert not fake.calls("POST", "/v2/pods")  # a dry run creates nothing
