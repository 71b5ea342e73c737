"""The controller lease under contention, over file:// and over real S3 conditional writes
(moto_server): exactly one of several racing controllers wins, the holder renews, a dead holder's
lease expires and is taken, and a stale holder cannot write over its successor."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from cloudtune.run.lease import Lease, lease_key
from cloudtune.store import open_store
from cloudtune.store.conditional import PreconditionFailed, put_versioned, read_versioned


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    url = request.getfixturevalue("moto_server")
    request.getfixturevalue("aws_env")
    import boto3

    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return open_store(f"s3://{bucket}/jobs", endpoint_url=url, region="us-east-1")


def test_compare_and_swap_create_then_replace(store):
    assert read_versioned(store, "j/x.json") is None
    etag = put_versioned(store, "j/x.json", b"1", expect=None)
    with pytest.raises(PreconditionFailed):
        put_versioned(store, "j/x.json", b"2", expect=None)  # it exists now
    with pytest.raises(PreconditionFailed):
        put_versioned(store, "j/x.json", b"2", expect='"not-the-etag"')
    etag2 = put_versioned(store, "j/x.json", b"3", expect=etag)
    assert read_versioned(store, "j/x.json") == (b"3", etag2)
    with pytest.raises(PreconditionFailed):
        put_versioned(store, "j/x.json", b"4", expect=etag)  # a writer with the old etag loses
    assert store.list("j/") == ["j/x.json"]  # no lock or temp files show up as objects


def test_exactly_one_of_eight_racing_controllers_takes_the_lease(store):
    results: dict[str, bool] = {}
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        lease = Lease(store, "jobrace1", f"controller:c{i}:1:x", ttl_s=30)
        barrier.wait()
        results[f"c{i}"] = lease.acquire()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for k, v in results.items() if v]
    assert len(winners) == 1, results
    info, _ = Lease(store, "jobrace1", "observer").read()
    assert info.holder == f"controller:{winners[0]}:1:x" and info.generation == 1


def test_holder_renews_others_wait_then_take_an_expired_lease(store):
    a = Lease(store, "jobexp01", "watchdog:laptop:1:a", ttl_s=10)
    b = Lease(store, "jobexp01", "controller:modal:2:b", ttl_s=10)
    t0 = time.time()
    assert a.acquire(now=t0)
    assert not b.acquire(now=t0 + 1)  # live and not b's
    assert a.acquire(now=t0 + 6)  # renewal keeps it
    assert not b.acquire(now=t0 + 12)  # renewed at t0+6: live until t0+16
    assert b.acquire(now=t0 + 17)  # a died: its lease ran out
    info, _ = b.read()
    assert info.holder == "controller:modal:2:b" and info.generation == 2
    assert not a.acquire(now=t0 + 18)  # the old holder comes back: it does not get it back while b lives
    assert not a.hold(now=t0 + 18)


def test_a_stale_holders_renewal_cannot_overwrite_its_successor(store):
    a = Lease(store, "jobstale", "watchdog:laptop:1:a", ttl_s=5)
    t0 = time.time()
    assert a.acquire(now=t0)
    b = Lease(store, "jobstale", "controller:modal:2:b", ttl_s=5)
    # a reads the lease, then b takes it after expiry, then a tries to renew with what it read.
    info, etag = a.read()
    assert b.acquire(now=t0 + 6)
    with pytest.raises(PreconditionFailed):
        put_versioned(store, lease_key("jobstale"), b'{"holder": "a", "expires_at": 1e12}', expect=etag)
    assert b.read()[0].holder == "controller:modal:2:b"


def test_release_lets_the_next_controller_in_at_once_and_damage_counts_as_expired(store):
    a = Lease(store, "jobrel01", "watchdog:laptop:1:a", ttl_s=300)
    b = Lease(store, "jobrel01", "controller:modal:2:b", ttl_s=300)
    assert a.acquire()
    a.release()
    assert b.acquire()
    store.put_bytes(lease_key("jobdmg01"), b"{not json")
    assert Lease(store, "jobdmg01", "controller:x:1:c").acquire()


def test_proven_dead_holder_is_replaced_before_expiry(store):
    old = Lease(store, "jobdead1", "watchdog:host/abc:100:a", ttl_s=300)
    assert old.acquire()
    other_home = Lease(store, "jobdead1", "watchdog:host/zzz:101:b", ttl_s=300,
                       proven_dead=lambda h: h.startswith("watchdog:host/abc:"))
    assert not Lease(store, "jobdead1", "watchdog:host/zzz:102:c", ttl_s=300).acquire()
    assert other_home.acquire()
