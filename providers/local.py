"""The local provider: the trainer runs on this machine, as if this machine were a rented one.

Why it looks like a cloud: the orchestrator, watchdog, ledger and gc are the same code for every
provider, so the local provider must behave like one. Each launch starts a small detached
*supervisor* (`python -m cloudtune.providers.local supervise DIR`) in its own session; the
supervisor starts the command in a second process group, enforces the lifetime cap, simulates spot
preemption (SIGTERM, a notice window, then SIGKILL; or SIGKILL with no notice), ships the output
to the job's store, and records how the workload ended. It outlives the `cloudtune run` process,
so preemption keeps happening when nobody watches, exactly like a real spot market.

Machines are directories under `$CLOUDTUNE_HOME/local/machines/<machine_id>/`:
  machine.json      name, tags, price, supervisor pid + start time (written at launch)
  status.json       trainer pid + start time, then how it ended (written by the supervisor)
  terminated.json   written by `terminate`: the machine is gone
  output.log        stdout + stderr of the workload
Liveness is checked by pid *and* process start time, so a reused pid never looks like ours.

Preemption (the spec's `local:` section, read from the launch request's spec):
  preempt_after_s   the job's first machine (attempt 1) is preempted this many seconds after start
  preempt_every_s   every machine is preempted this many seconds after it starts
  preempt_random    the time is drawn uniformly in [0.5, 1.5] x (every_s or after_s or 30 s),
                    from random.Random(seed, attempt): reproducible
  preempt_max       only attempts 1..N are preempted (a bounded chaos run)
  preempt_clock     "machine" (default): count from machine start, as a spot market does;
                    "training": count from the attempt's first training heartbeat in the store, so
                    every preemption lands mid-training however long the start-up takes
  notice_s          SIGTERM, then SIGKILL after this many seconds; 0 = SIGKILL with no notice
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cloudtune.providers.base import (
    LaunchRequest,
    Machine,
    MachineState,
    NotFoundError,
    Offer,
    SelfTerminate,
    parse_machine_name,
)

TERMINATE_GRACE_S = 3.0
LIFETIME_GRACE_S = 10.0
LOG_SHIP_INTERVAL_S = 2.0
PEER_EXIT_GRACE_S = 60.0  # after one node is preempted, how long the others get to notice and exit


def machines_dir() -> Path:
    from cloudtune.home import home

    path = home() / "local" / "machines"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- process helpers


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _alive(pid: int | None, started: float | None) -> bool:
    """True when `pid` runs and is the process we started (same start time): pid reuse is not ours."""
    if not pid:
        return False
    now = _start_time(pid)
    return now is not None and (started is None or abs(now - started) < 0.5)


def _killpg(pgid: int | None, sig: int) -> None:
    if not pgid:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _spec_local(env: dict[str, str]) -> dict[str, Any]:
    """The spec's `local:` section from the launch environment (the spec travels in CLOUDTUNE_SPEC)."""
    from cloudtune.trainer.contract import ENV_SPEC

    raw = env.get(ENV_SPEC)
    if not raw:
        return {}
    try:
        text = base64.b64decode(raw[4:]).decode() if raw.startswith("b64:") else raw
        return dict(json.loads(text).get("local") or {})
    except (ValueError, json.JSONDecodeError):
        return {}


def preemption_time(local: dict[str, Any], attempt: int) -> float | None:
    """Seconds after start at which this attempt's machine is preempted, or None (never)."""
    cap = local.get("preempt_max")
    if cap is not None and attempt > int(cap):
        return None
    after = local.get("preempt_after_s")
    every = local.get("preempt_every_s")
    if local.get("preempt_random"):
        base = every or after or 30.0
        if after and not every and attempt != 1:
            return None
        rng = random.Random(int(local.get("seed", 0)) * 1_000_003 + attempt)
        return rng.uniform(0.5, 1.5) * float(base)
    if every:
        return float(every)
    if after and attempt == 1:
        return float(after)
    return None


# ---------------------------------------------------------------- the provider


class LocalProvider:
    """Runs each launch as a supervised process group on this machine. Price: 0 or `local.price_hr`."""

    name = "local"

    def __init__(self, price_hr: float = 0.0, terminate_grace_s: float = TERMINATE_GRACE_S, **_: Any) -> None:
        self.price_hr = float(price_hr)
        self.terminate_grace_s = terminate_grace_s
        self._children: dict[int, subprocess.Popen] = {}

    # -- offers

    def offers(self) -> list[Offer]:
        gpu, count, vram = _local_accelerator()
        return [
            Offer(
                provider="local",
                offer_id="local",
                gpu=gpu,
                gpu_count=count,
                vram_gib_per_gpu=vram,
                region="local",
                price_hr=self.price_hr,
                spot_price_hr=self.price_hr,
                as_of=time.strftime("%Y-%m-%d"),
                billing_granularity_s=1,
                vcpus=os.cpu_count(),
                fresh=True,
            )
        ]

    # -- launch

    def launch(self, req: LaunchRequest) -> Machine:
        machine_id = f"{req.name}-{secrets.token_hex(3)}"
        mdir = machines_dir() / machine_id
        mdir.mkdir(parents=True)
        env = req.all_env()
        local = _spec_local(env)
        price = float(local.get("price_hr") or self.price_hr)
        preempt_at = preemption_time(local, req.attempt)
        nproc, nodes = _shape(env)
        record: dict[str, Any] = {
            "id": machine_id,
            "name": req.name,
            "tags": req.tags,
            "job_id": req.job_id,
            "attempt": req.attempt,
            "created_at": time.time(),
            "price_hr": price,
            "spot": req.spot,
            "command": _this_python(req.command),  # never the environment: it may hold secrets
            "workdir": req.workdir,
            "max_lifetime_s": req.max_lifetime_s,
            "preempt_at_s": preempt_at,
            "notice_s": float(local.get("notice_s", 5.0)),
            "preempt_clock": local.get("preempt_clock") or "machine",
            # gpus/nodes: N simulated nodes (process groups) of `nproc` gloo processes each, meeting
            # at a free port of this machine, through the same launcher a cloud machine runs
            "nodes": nodes,
            "nproc_per_node": nproc,
            "master_port": _free_port() if nodes * nproc > 1 else None,
            "preempt_node": local.get("preempt_node"),
        }
        _write_json(mdir / "machine.json", record)
        log = open(mdir / "supervisor.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtune.providers.local", "supervise", str(mdir)],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        self._children[proc.pid] = proc
        record["supervisor_pid"] = proc.pid
        record["supervisor_start"] = _start_time(proc.pid)
        _write_json(mdir / "machine.json", record)
        return self._machine(mdir, record)

    # -- status

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _machine(self, mdir: Path, record: dict[str, Any] | None = None) -> Machine:
        self._reap()
        record = record or _read_json(mdir / "machine.json") or {}
        st = _read_json(mdir / "status.json") or {}
        sup_alive = _alive(record.get("supervisor_pid"), record.get("supervisor_start"))
        trainer_alive = _alive(st.get("trainer_pid"), st.get("trainer_start"))
        exit_code = st.get("exit_code")
        detail = st.get("detail", "")
        if (mdir / "terminated.json").exists():
            state = MachineState.TERMINATING if (sup_alive or trainer_alive) else MachineState.TERMINATED
            detail = detail or "terminated"
        elif st.get("state") == "preempted":
            state = MachineState.PREEMPTED
        elif st.get("state") == "exited":
            state = MachineState.EXITED
        elif st.get("state") == "lifetime":
            state = MachineState.TERMINATED
        elif trainer_alive:
            state = MachineState.RUNNING
        elif sup_alive:
            state = MachineState.PENDING
        else:
            state = MachineState.TERMINATED
            detail = detail or "machine lost: its supervisor and workload are gone"
        parsed = parse_machine_name(record.get("name", "")) or (record.get("job_id"), record.get("attempt"))
        return Machine(
            provider="local",
            machine_id=record.get("id", mdir.name),
            name=record.get("name", ""),
            state=state,
            job_id=parsed[0],
            attempt=parsed[1],
            region="local",
            price_hr=record.get("price_hr"),
            spot=record.get("spot"),
            detail=detail,
            exit_code=exit_code,
            ended_at=st.get("ended_at") if state in (MachineState.EXITED, MachineState.PREEMPTED,
                                                     MachineState.TERMINATED) else None,
        )

    def _dir(self, machine_id: str) -> Path:
        mdir = machines_dir() / machine_id
        if "/" in machine_id or not (mdir / "machine.json").exists():
            raise NotFoundError(f"local machine {machine_id!r} does not exist", provider="local")
        return mdir

    def status(self, machine_id: str) -> Machine:
        return self._machine(self._dir(machine_id))

    def console_log(self, machine_id: str) -> bytes | None:
        """The machine's own output (its console), kept beside it: what `cloudtune logs` shows when the
        store's copy is behind (a full or read-only store could not take the last shipment)."""
        try:
            return (self._dir(machine_id) / "output.log").read_bytes()
        except (NotFoundError, OSError):
            return None

    # -- terminate

    def terminate(self, machine_id: str) -> None:
        """Kill the workload's group and the supervisor (SIGTERM, grace, SIGKILL). Idempotent."""
        try:
            mdir = self._dir(machine_id)
        except NotFoundError:
            return
        if not (mdir / "terminated.json").exists():
            _write_json(mdir / "terminated.json", {"time": time.time()})
        record = _read_json(mdir / "machine.json") or {}
        deadline = time.time() + self.terminate_grace_s
        sent_term = False
        while True:
            st = _read_json(mdir / "status.json") or {}
            groups = []
            for pid, start in st.get("node_pids") or [[st.get("trainer_pid"), st.get("trainer_start")]]:
                if _alive(pid, start):
                    groups.append(pid)
            if _alive(record.get("supervisor_pid"), record.get("supervisor_start")):
                groups.append(record["supervisor_pid"])
            if not groups:
                break
            if not sent_term:
                for g in groups:
                    _killpg(g, signal.SIGTERM)
                sent_term = True
            elif time.time() >= deadline:
                for g in groups:
                    _killpg(g, signal.SIGKILL)
            self._reap()
            time.sleep(0.1)
        self._reap()

    # -- listing

    def list_machines(self) -> list[Machine]:
        out = []
        for mdir in sorted(machines_dir().iterdir()):
            if (mdir / "machine.json").exists():
                m = self._machine(mdir)
                if m.state is not MachineState.TERMINATED:
                    out.append(m)
        return out

    def find_by_name(self, name: str) -> Machine | None:
        found = []
        for mdir in machines_dir().iterdir():
            record = _read_json(mdir / "machine.json")
            if record and record.get("name") == name:
                found.append(self._machine(mdir, record))
        found.sort(key=lambda m: m.state is MachineState.TERMINATED)
        return found[0] if found else None

    def self_terminate(self) -> SelfTerminate:
        return SelfTerminate(command=[], note="the local supervisor exits when the workload exits")

    def describe_launch(self, req: LaunchRequest) -> list[dict]:
        local = _spec_local(req.all_env())
        env = req.redacted_env()
        from cloudtune.trainer.contract import ENV_SPEC

        if ENV_SPEC in env:
            env[ENV_SPEC] = f"<job spec, {len(env[ENV_SPEC])} bytes>"
        return [
            {
                "action": "spawn local supervised process group",
                "name": req.name,
                "tags": req.tags,
                "command": req.command,
                "env": env,
                "workdir": req.workdir,
                "max_lifetime_s": req.max_lifetime_s,
                "preempt_at_s": preemption_time(local, req.attempt),
                "notice_s": float(local.get("notice_s", 5.0)),
                "price_hr": float(local.get("price_hr") or self.price_hr),
            }
        ]

    # -- housekeeping

    def forget_terminated(self, older_than_s: float = 7 * 86400) -> int:
        """Remove directories of machines terminated long ago (their logs are in the store)."""
        removed = 0
        now = time.time()
        for mdir in machines_dir().iterdir():
            marker = _read_json(mdir / "terminated.json")
            if marker and now - marker.get("time", now) > older_than_s:
                shutil.rmtree(mdir, ignore_errors=True)
                removed += 1
        return removed


def _shape(env: dict[str, str]) -> tuple[int, int]:
    """(processes per node, nodes) that the orchestrator asked for (contract.py's launcher env)."""
    from cloudtune.trainer import contract as C

    def num(name: str) -> int:
        try:
            return max(1, int(env.get(name) or 1))
        except ValueError:
            return 1

    return num(C.ENV_NPROC_PER_NODE), num(C.ENV_NNODES)


def _free_port() -> int:
    """A TCP port nobody listens on now: the rendezvous port of this machine's simulated nodes."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _this_python(command: list[str]) -> list[str]:
    """On this machine `python` means this interpreter (the one cloudtune is installed in)."""
    if command and command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return list(command)


def _local_accelerator() -> tuple[str, int, float]:
    """(gpu name, count, GiB per GPU) from nvidia-smi when present, else the CPU. No torch import."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip().splitlines()
            if out:
                name, mem = out[0].rsplit(",", 1)
                return name.strip(), len(out), round(float(mem) / 1024, 1)
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        import psutil

        ram = psutil.virtual_memory().total / 2**30
    except Exception:  # noqa: BLE001 - only a hint for the planner
        ram = 0.0
    return "CPU", 1, round(ram, 1)


# ---------------------------------------------------------------- the supervisor process


class _Supervisor:
    """Runs inside the detached supervisor process: one per local machine."""

    def __init__(self, mdir: Path) -> None:
        self.mdir = mdir
        self.record = _read_json(mdir / "machine.json") or {}
        self.proc: subprocess.Popen | None = None  # node 0 (the master)
        self.procs: list[subprocess.Popen] = []  # every simulated node
        self.status: dict[str, Any] = {"state": "starting"}
        self._terminating = False
        self._store = None
        self._shipped_size = -1

    def write_status(self, **fields: Any) -> None:
        self.status.update(fields)
        _write_json(self.mdir / "status.json", self.status)

    def _on_term(self, signum: int, _frame: Any) -> None:
        # `terminate` SIGTERMs our group; pass it on to the workload's group and let run() finish.
        self._terminating = True
        for proc in self.procs:
            _killpg(proc.pid, signal.SIGTERM)

    def _open_store(self):
        """(store, layout) of the job this machine runs, or None when the launch named no store."""
        from cloudtune.trainer.contract import ENV_STORE, ENV_STORE_ENDPOINT

        url = os.environ.get(ENV_STORE)
        if not url or not self.record.get("job_id") or self.record.get("attempt") is None:
            return None
        if self._store is None:
            from cloudtune.store import layout, open_store

            self._store = (open_store(url, endpoint_url=os.environ.get(ENV_STORE_ENDPOINT)), layout)
        return self._store

    def _ship_log(self, force: bool = False) -> None:
        """Copy the output to <store>/<job>/logs/attempt-<n>.log, as a cloud machine's agent would."""
        path = self.mdir / "output.log"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size == self._shipped_size and not force:
            return
        try:
            opened = self._open_store()
            if opened is None:
                return
            store, layout = opened
            store.upload_file(path, layout.log_key(self.record["job_id"], int(self.record["attempt"])))
            self._shipped_size = size
        except Exception as err:  # noqa: BLE001 - log shipping must never take the machine down
            print(f"log shipping failed: {err}", file=sys.stderr, flush=True)

    def _training_started(self) -> bool:
        """True once this attempt's heartbeat in the store says it is training."""
        try:
            opened = self._open_store()
            if opened is None:
                return False
            store, layout = opened
            hb = store.read_json(layout.heartbeat_key(self.record["job_id"]))
        except Exception:  # noqa: BLE001 - no heartbeat yet is "not yet"
            return False
        return bool(hb) and int(hb.get("attempt", -1)) == int(self.record["attempt"]) and \
            hb.get("phase") == "training" and hb.get("step") is not None

    def _descendants(self, procs: list[subprocess.Popen]) -> list[Any]:
        """Every process below the node launchers: torchrun starts workers in their own sessions, so
        a signal to a node's process group does not reach them."""
        import psutil

        out = []
        for proc in procs:
            try:
                out += psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                pass
        return out

    def _kill_nodes(self, procs: list[subprocess.Popen], notice_s: float) -> None:
        """Preempt these nodes: SIGTERM (the launcher forwards it to its workers), `notice_s`, SIGKILL."""
        import psutil

        tree = self._descendants(procs)
        if notice_s > 0:
            # Like a container runtime, the notice goes to the machine's PID 1 (the entrypoint), which
            # forwards it; signalling the whole group too delivered it twice, and a second SIGTERM landing
            # while the workload was already exiting killed it (-15) instead of letting it exit 75.
            for proc in procs:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.time() + notice_s
            while time.time() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.05)
        tree += self._descendants(procs)
        for proc in procs:
            _killpg(proc.pid, signal.SIGKILL)
        for kid in tree:
            try:
                kid.kill()
            except psutil.Error:
                pass
        for proc in procs:
            proc.wait()

    def _kill_workload(self, notice_s: float) -> int | None:
        assert self.proc is not None
        self._kill_nodes(self.procs, notice_s)
        return self._code()

    def _code(self) -> int | None:
        """The machine's exit code from its nodes' (launch.exit_code: the root cause wins)."""
        codes = {i: p.returncode for i, p in enumerate(self.procs) if p.returncode is not None}
        if not codes:
            return None
        if len(codes) == 1:
            return next(iter(codes.values()))
        from cloudtune.trainer.launch import exit_code

        return exit_code(codes)

    def _start_nodes(self) -> None:
        """One process group per simulated node, each running the machine's command with its rank."""
        from cloudtune.trainer import contract as C

        nodes = int(self.record.get("nodes") or 1)
        self.procs = []
        for rank in range(nodes):
            env = os.environ.copy()
            if nodes > 1 or self.record.get("nproc_per_node", 1) > 1:
                env.update({C.ENV_NODE_RANK: str(rank), C.ENV_NNODES: str(nodes),
                            C.ENV_MASTER_ADDR: "127.0.0.1", C.ENV_MASTER_PORT: str(self.record["master_port"])})
            out = open(self.mdir / "output.log", "ab")
            # Like PID 1 of the image, the entrypoint runs the workload: the on-machine guards (stall,
            # budget, lifetime; cloudtune/trainer/guards.py) hold here too when no watchdog is left.
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "cloudtune.trainer.entrypoint", "--", *self.record["command"]],
                cwd=self.record.get("workdir") or None,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
            out.close()
        self.proc = self.procs[0]

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if (self.mdir / "terminated.json").exists():
            return 0
        self._start_nodes()
        assert self.proc is not None
        started = time.time()
        self.write_status(
            state="running", trainer_pid=self.proc.pid, trainer_start=_start_time(self.proc.pid), started_at=started,
            node_pids=[[p.pid, _start_time(p.pid)] for p in self.procs],
        )
        if self._terminating:  # terminate arrived while we were starting the workload
            for p in self.procs:
                _killpg(p.pid, signal.SIGTERM)
        preempt_at = self.record.get("preempt_at_s")
        training_clock = self.record.get("preempt_clock") == "training"
        clock_start = None if training_clock else started
        lifetime = self.record.get("max_lifetime_s")
        last_ship = last_hb = 0.0
        while True:
            if all(p.poll() is not None for p in self.procs):
                break
            now = time.time()
            elapsed = now - started
            if clock_start is None and preempt_at is not None and now - last_hb >= 0.2:
                last_hb = now
                if self._training_started():
                    clock_start = now
                    print(f"training started after {elapsed:.1f}s; preemption in {preempt_at:.1f}s", flush=True)
            if self._terminating:
                deadline = time.time() + TERMINATE_GRACE_S
                while time.time() < deadline and any(p.poll() is None for p in self.procs):
                    time.sleep(0.05)
                self._kill_nodes(self.procs, 0)
                self._ship_log(force=True)
                self.write_status(state="terminated", exit_code=self._code(), ended_at=time.time(), detail="terminated")
                return 0
            if preempt_at is not None and clock_start is not None and now - clock_start >= preempt_at:
                notice = float(self.record.get("notice_s", 5.0))
                victim = self._preempted_nodes()
                which = "" if len(victim) == len(self.procs) else f" of node {self.procs.index(victim[0])}"
                print(f"simulated preemption{which} after {elapsed:.1f}s (notice {notice:g}s)", flush=True)
                self._kill_nodes(victim, notice)
                # The surviving nodes notice (agreed stop, or a lost peer) and exit on their own.
                deadline = time.time() + notice + PEER_EXIT_GRACE_S
                while time.time() < deadline and any(p.poll() is None for p in self.procs):
                    time.sleep(0.1)
                self._kill_nodes(self.procs, 0)
                self._ship_log(force=True)
                how = f"with {notice:g}s notice" if notice > 0 else "without notice (SIGKILL)"
                self.write_status(
                    state="preempted", exit_code=self._code(), ended_at=time.time(),
                    detail=f"simulated spot preemption{which} after {elapsed:.0f}s {how}",
                )
                return 0
            if lifetime is not None and elapsed >= lifetime:
                self._kill_nodes(self.procs, LIFETIME_GRACE_S)
                self._ship_log(force=True)
                self.write_status(
                    state="lifetime", exit_code=self._code(), ended_at=time.time(),
                    detail=f"max lifetime of {lifetime:.0f}s reached: machine terminated itself",
                )
                return 0
            if time.time() - last_ship >= LOG_SHIP_INTERVAL_S:
                self._ship_log()
                last_ship = time.time()
            time.sleep(0.1)
        # Reap anything the workload left behind, then record how it ended.
        self._kill_nodes(self.procs, 0)
        code = self._code()
        self._ship_log(force=True)
        self.write_status(state="exited", exit_code=code, ended_at=time.time(), detail=f"workload exited with {code}")
        return 0

    def _preempted_nodes(self) -> list[subprocess.Popen]:
        """A spot market takes one machine: with several nodes, `local.preempt_node` (default: the last)."""
        if len(self.procs) == 1:
            return list(self.procs)
        node = self.record.get("preempt_node")
        node = len(self.procs) - 1 if node is None else min(int(node), len(self.procs) - 1)
        return [self.procs[node]]


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "supervise":
        print("usage: python -m cloudtune.providers.local supervise MACHINE_DIR", file=sys.stderr)
        return 2
    return _Supervisor(Path(argv[1])).run()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
