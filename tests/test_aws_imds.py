"""The spot interruption notice path: the trainer's IMDSv2 poller against an IMDS fake on loopback."""

from __future__ import annotations

import time

import httpx

from cloudtune.store.file import FileStore
from cloudtune.trainer.monitor import Monitor, SpotNotice, StopRequest, imds_endpoint
from tests.fakes.imds import IMDSFake


def test_imds_fake_requires_a_v2_token():
    with IMDSFake(instance_id="i-0abc") as fake:
        assert httpx.get(f"{fake.url}/latest/meta-data/instance-id").status_code == 401
        assert httpx.put(f"{fake.url}/latest/api/token").status_code == 400  # no TTL header
        tok = httpx.put(f"{fake.url}/latest/api/token",
                        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}).text
        resp = httpx.get(f"{fake.url}/latest/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": tok})
        assert resp.text == "i-0abc"


def test_spot_notice_appears_only_once_scheduled():
    with IMDSFake() as fake:
        notice = SpotNotice(fake.url)
        assert notice.check() is None  # 404: no interruption scheduled
        scheduled = fake.schedule_interruption("terminate", in_s=120)
        got = notice.check()
        assert got == scheduled and got["action"] == "terminate" and got["time"].endswith("Z")
        # The poller used IMDSv2: a token PUT, then GETs carrying it.
        assert fake.calls("PUT", r"/latest/api/token")
        assert all(r.headers.get("x-aws-ec2-metadata-token") for r in fake.calls("GET", "spot/instance-action"))


def test_spot_notice_recovers_from_an_expired_token():
    with IMDSFake() as fake:
        notice = SpotNotice(fake.url)
        assert notice.check() is None
        fake.expire_tokens()
        fake.schedule_interruption()
        assert notice.check() is not None  # 401 -> new token -> notice
        assert len(fake.calls("PUT", r"/latest/api/token")) == 2


def test_monitor_turns_the_notice_into_a_stop_request(tmp_path, monkeypatch):
    with IMDSFake() as fake:
        monkeypatch.setenv("CLOUDTUNE_IMDS_ENDPOINT", fake.url)
        assert imds_endpoint() == fake.url
        req = StopRequest()
        mon = Monitor(FileStore(str(tmp_path / "store")), "job1", 0, req, spot_s=0.05, heartbeat_s=5,
                      control_s=5, imds=imds_endpoint()).start()
        try:
            time.sleep(0.2)
            assert not req.stop
            fake.schedule_interruption()
            deadline = time.time() + 5
            while not req.stop and time.time() < deadline:
                time.sleep(0.05)
        finally:
            mon.close()
        assert req.stop and req.reason == "spot" and "terminate" in req.detail
