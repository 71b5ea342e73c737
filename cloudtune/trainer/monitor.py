"""What the trainer watches while it trains: signals, the spot notice, control.json; and its heartbeat.

Why a background thread: a 70B model loads for minutes and a checkpoint upload can take longer than
a heartbeat interval, so the heartbeat and the pollers must not depend on the training loop
reaching a step boundary. The thread only *records* requests (StopRequest); the training loop acts
on them at the next optimizer-step boundary, where a checkpoint is consistent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudtune.store import layout
from cloudtune.store.base import Store
from cloudtune.trainer.contract import ENV_IMDS, HEARTBEAT_INTERVAL_S

log = logging.getLogger("cloudtune.trainer")

DEFAULT_IMDS = "http://169.254.169.254"


@dataclass
class StopRequest:
    """Requests seen so far. `reason` is 'signal', 'spot' or 'control' for a stop."""

    stop: bool = False
    reason: str = ""
    detail: str = ""
    checkpoint_now: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_stop(self, reason: str, detail: str = "") -> None:
        with self.lock:
            if not self.stop:
                self.stop, self.reason, self.detail = True, reason, detail

    def request_checkpoint(self) -> None:
        with self.lock:
            self.checkpoint_now = True

    def take_checkpoint_request(self) -> bool:
        with self.lock:
            wanted, self.checkpoint_now = self.checkpoint_now, False
            return wanted


def install_signal_handlers(req: StopRequest) -> dict[int, Any]:
    """SIGTERM/SIGINT (preemption, `docker stop`, Ctrl-C) → emergency checkpoint and exit 75.

    A second signal while the checkpoint is being written is ignored on purpose: cutting the upload
    short would lose the work the checkpoint is saving. The provider's SIGKILL still ends us.
    """

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if req.stop:
            log.warning("%s again: still writing the emergency checkpoint", name)
            return
        log.warning("%s received: checkpointing at the end of this step, then exiting", name)
        req.request_stop("signal", name)

    if threading.current_thread() is not threading.main_thread():
        return {}  # signals are delivered to the main thread only; an embedding caller handles them
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


# ------------------------------------------------------------------------------ AWS spot notice


def on_ec2() -> bool:
    """True on an EC2 instance (DMI says so), without any network call."""
    for path in ("/sys/devices/virtual/dmi/id/board_asset_tag", "/sys/devices/virtual/dmi/id/sys_vendor",
                 "/sys/hypervisor/uuid"):
        try:
            text = Path(path).read_text().strip().lower()
        except OSError:
            continue
        if text.startswith("i-") or "amazon" in text or text.startswith("ec2"):
            return True
    return False


def imds_endpoint() -> str | None:
    """Where to poll for the spot notice: $CLOUDTUNE_IMDS_ENDPOINT, else IMDS on EC2, else nowhere."""
    explicit = os.environ.get(ENV_IMDS)
    if explicit is not None:
        return explicit.rstrip("/") or None  # set-but-empty disables polling
    return DEFAULT_IMDS if on_ec2() else None


class SpotNotice:
    """Polls IMDSv2 `spot/instance-action`: 404 means no interruption, 200 carries {action, time}.

    Usable on its own: `SpotNotice("http://127.0.0.1:PORT").check()` returns the notice or None.
    """

    TOKEN_TTL_S = 21600

    def __init__(self, endpoint: str, timeout_s: float = 1.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_expiry = 0.0

    def _get_token(self, client: Any) -> str | None:
        if self._token and time.time() < self._token_expiry - 60:
            return self._token
        resp = client.put(
            f"{self.endpoint}/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
        )
        if resp.status_code != 200:
            return None  # IMDSv1-only hosts: fall back to unauthenticated GETs
        self._token, self._token_expiry = resp.text, time.time() + self.TOKEN_TTL_S
        return self._token

    def check(self) -> dict[str, Any] | None:
        """The interruption notice, or None (no notice, or IMDS unreachable)."""
        import httpx

        try:
            with httpx.Client(timeout=self.timeout_s) as client:
                token = self._get_token(client)
                headers = {"X-aws-ec2-metadata-token": token} if token else {}
                resp = client.get(f"{self.endpoint}/latest/meta-data/spot/instance-action", headers=headers)
                if resp.status_code == 401:  # token expired early: refresh once
                    self._token = None
                    token = self._get_token(client)
                    headers = {"X-aws-ec2-metadata-token": token} if token else {}
                    resp = client.get(f"{self.endpoint}/latest/meta-data/spot/instance-action", headers=headers)
        except httpx.HTTPError as err:
            log.debug("IMDS poll failed: %s", err)
            return None
        if resp.status_code != 200:
            return None
        try:
            notice = resp.json()
        except json.JSONDecodeError:
            notice = {"action": resp.text.strip()}
        if notice.get("action") in ("terminate", "stop", "hibernate"):
            return notice
        return None


# ---------------------------------------------------------------------------------- heartbeat


class Monitor:
    """Background thread: heartbeat every `heartbeat_s`, control.json every `control_s`, spot notice
    every `spot_s`. The training loop updates `fields`; `beat()` writes one heartbeat right away."""

    def __init__(
        self,
        store: Store,
        job_id: str,
        attempt: int,
        req: StopRequest,
        *,
        heartbeat_s: float | None = None,
        control_s: float | None = None,
        spot_s: float | None = None,
        imds: str | None = None,
        main: bool = True,
    ) -> None:
        # `main`: rank 0 of a multi-process run (or the only process) writes heartbeats and reads
        # control.json; the other ranks only watch their machine's spot notice (pass imds=None on all
        # but one process per machine). Their requests reach rank 0 through Dist.agree.
        self.store, self.job_id, self.attempt, self.req = store, job_id, attempt, req
        self.main = main
        self.heartbeat_s = min(heartbeat_s or _env_float("CLOUDTUNE_HEARTBEAT_S", HEARTBEAT_INTERVAL_S),
                               HEARTBEAT_INTERVAL_S)
        self.control_s = control_s or _env_float("CLOUDTUNE_CONTROL_POLL_S", 10.0)
        # AWS asks for a poll every 5 s (the notice comes 2 minutes ahead); a shorter interval costs one
        # loopback request each time and sees the notice sooner.
        self.spot_s = spot_s or _env_float("CLOUDTUNE_SPOT_POLL_S", 5.0)
        self.spot = SpotNotice(imds) if imds else None
        self.fields: dict[str, Any] = {"phase": "loading"}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.fields.update({k: v for k, v in fields.items()})

    def beat(self, **fields: Any) -> None:
        """Write heartbeat.json now (after merging fields). Never raises: a heartbeat is best effort."""
        self.update(**fields)
        if not self.main:
            return
        with self._lock:
            body = {**self.fields, "job_id": self.job_id, "attempt": self.attempt, "time": time.time()}
        with self._beat_lock:
            try:
                self.store.put_json(layout.heartbeat_key(self.job_id), body)
            except Exception as err:  # noqa: BLE001 - the store may blip; the next beat retries
                log.warning("heartbeat write failed: %s", err)

    def poll_control(self) -> None:
        """Act on control.json: {"action": "checkpoint"} or {"action": "stop"}; then remove it."""
        key = layout.control_key(self.job_id)
        try:
            ctl = self.store.read_json(key)
        except Exception as err:  # noqa: BLE001 - malformed or unreachable: ignore this round
            log.warning("cannot read control.json: %s", err)
            return
        if not isinstance(ctl, dict):
            return
        action = ctl.get("action")
        if action == "checkpoint":
            log.warning("controller asked for a checkpoint")
            self.req.request_checkpoint()
        elif action == "stop":
            log.warning("controller asked to stop: %s", ctl.get("reason", ""))
            self.req.request_stop("control", str(ctl.get("reason", "")))
        else:
            log.warning("ignoring control.json with unknown action %r", action)
        try:
            self.store.delete(key)
        except Exception:  # noqa: BLE001
            pass

    def poll_spot(self) -> None:
        if self.spot is None:
            return
        notice = self.spot.check()
        if notice:
            log.warning("spot interruption notice: %s", notice)
            self.req.request_stop("spot", json.dumps(notice, sort_keys=True))

    def _run(self) -> None:
        next_beat = next_ctl = next_spot = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_spot and self.spot is not None:
                self.poll_spot()
                next_spot = now + self.spot_s
            if now >= next_ctl and self.main:
                self.poll_control()
                next_ctl = now + self.control_s
            if now >= next_beat:
                self.beat()
                next_beat = now + self.heartbeat_s
            self._stop.wait(min(0.5, self.heartbeat_s, self.control_s, self.spot_s))

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="cloudtune-monitor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): torch.cuda.max_memory_reserved on GPU, the process's peak RSS on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_reserved()), "cuda_reserved"
    except ImportError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "rss"
    except (ImportError, OSError):
        import psutil

        return int(psutil.Process().memory_info().rss), "rss"
