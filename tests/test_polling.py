"""The shared per-provider polling budget (cloudtune/run/polling.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cloudtune.providers.base import Machine, MachineState, RateLimitedError
from cloudtune.providers.http import HttpClient

from cloudtune.run.polling import LIMITS, PollBudget, StatusPoller


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def running(mid: str = "m-1") -> Machine:
    return Machine(provider="runpod", machine_id=mid, name="cloudtune-j-1", state=MachineState.RUNNING)


def test_a_watchdog_over_a_healthy_machine_polls_far_less_than_once_a_second():
    clock = Clock()
    poller = StatusPoller(PollBudget("runpod", clock=clock), clock=clock)
    for _ in range(600):  # ten minutes of one-second ticks, heartbeat always 10 s old
        poller.status("m-1", running, heartbeat_age_s=10.0)
        clock.t += 1.0
    assert poller.calls <= 600 / 30 + 1  # one status call per 30 s, not 600


def test_launch_and_a_missing_heartbeat_poll_faster():
    clock = Clock()
    poller = StatusPoller(PollBudget("runpod", clock=clock), clock=clock)
    pending = Machine(provider="runpod", machine_id="m-2", name="x", state=MachineState.PENDING)
    for _ in range(60):
        poller.status("m-2", lambda: pending, heartbeat_age_s=None)
        clock.t += 1.0
    assert 10 <= poller.calls <= 13  # every 5 s while booting


def test_a_429_with_retry_after_slows_every_process_sharing_the_budget():
    clock = Clock()
    budget = PollBudget("lambda", clock=clock)
    other_process = PollBudget("lambda", clock=clock)  # same file: what `status` or `gc` would use
    poller = StatusPoller(budget, clock=clock)
    poller.status("m-3", running, heartbeat_age_s=None)

    def throttled() -> Machine:
        raise RateLimitedError("lambda: HTTP 429", provider="lambda", retry_after_s=120.0)

    clock.t += 10
    with pytest.raises(RateLimitedError):
        poller.status("m-3", throttled, heartbeat_age_s=None)
    assert other_process.try_acquire() == pytest.approx(120.0)  # blocked for Retry-After
    calls = poller.calls
    for _ in range(100):  # the next 100 s: answered from the last status, no call
        clock.t += 1
        assert poller.status("m-3", running, heartbeat_age_s=None).state is MachineState.RUNNING
    assert poller.calls == calls
    clock.t += 30
    poller.status("m-3", running, heartbeat_age_s=None)
    assert poller.calls == calls + 1


def test_the_bucket_is_shared_across_processes():
    limits = LIMITS["lambda"]
    code = ("from cloudtune.run.polling import PollBudget; b = PollBudget('lambda'); "
            f"print(sum(b.try_acquire() == 0 for _ in range({int(limits.burst) + 3})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout) >= int(limits.burst)  # that process spent the burst ...
    assert PollBudget("lambda").try_acquire() > 0  # ... so this one must wait


def test_http_429_retry_after_reaches_the_budget_through_the_typed_error():
    """A real HTTP 429 with Retry-After, through the shared client (providers/http.py), slows the budget."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cloudtune.providers.http import RetryPolicy

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(429)
            self.send_header("Retry-After", "45")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "slow down"}')

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HttpClient("lambda", f"http://127.0.0.1:{server.server_port}", api_key="k",
                            retry=RetryPolicy(max_attempts=1), sleep=lambda s: None)
        clock = Clock()
        poller = StatusPoller(PollBudget("lambda", clock=clock), clock=clock)
        with pytest.raises(RateLimitedError) as info:
            poller.status("m-4", lambda: client.request("GET", "/instances/m-4"), heartbeat_age_s=None)
    finally:
        server.shutdown()
    assert info.value.retry_after_s == pytest.approx(45.0)
    assert PollBudget("lambda", clock=clock).blocked_for() == pytest.approx(45.0)


def test_gc_shares_the_providers_budget_a_429_penalty_delays_its_listing(tmp_path, monkeypatch):
    """`gc` takes its requests from the same per-provider bucket as the watchdogs (issue #12): while a
    429's Retry-After holds, its listing waits instead of adding to the burst."""
    import time

    from cloudtune.run import gc
    from cloudtune.run.state import StateDB

    PollBudget("local").penalize(1.5)
    assert PollBudget("local").wait(max_wait_s=0.2) is False  # blocked longer than it may wait
    t0 = time.time()
    gc.scan(StateDB(), only=["local"])
    assert time.time() - t0 >= 1.2
    assert PollBudget("local").wait(max_wait_s=0.5) is True
