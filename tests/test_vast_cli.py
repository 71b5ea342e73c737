"""`cloudtune catalog refresh` and `cloudtune run --dry-run` for Vast.ai, through the real CLI process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests._fake_run_util import cli_over_environ as cli
from tests._fake_run_util import s3_quickstart
from tests.fakes.vast_fake import VastFake

KEY = "vast-cli-secret-key-123"


def test_catalog_refresh_and_dry_run_against_the_fake(tmp_path):
    with VastFake(api_key=KEY) as fake:
        env = {"VAST_API_KEY": KEY, "CLOUDTUNE_VAST_API_URL": fake.url}
        r = cli("catalog", "refresh", "--provider", "vast", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert KEY not in r.stdout + r.stderr
        rows = json.loads(next((Path(os.environ["CLOUDTUNE_HOME"]) / "cache").glob("*vast*")).read_text())
        text = json.dumps(rows)
        assert '"101"' in text and '"102"' not in text  # the unreliable host stays out
        r = cli("run", str(s3_quickstart(tmp_path)), "--provider", "vast", "--dry-run", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert KEY not in r.stdout + r.stderr
        launch = json.loads(r.stdout)["launch"]
        assert [x["method"] for x in launch] == ["PUT"]  # a live ask id: no search needed
        assert launch[0]["url"] == fake.url + "/api/v0/asks/101/"  # cheapest reliable ask
        assert launch[0]["json"]["label"].startswith("cloudtune-") and not fake.calls("PUT", "/api/v0/asks/")
