"""`python -m cloudtune.trainer`: read the spec, open the store, run one attempt, map outcomes to exit codes.

Where the spec comes from, first match wins: --spec FILE (YAML or JSON), $CLOUDTUNE_SPEC (JSON, or
'b64:' + base64 JSON), $CLOUDTUNE_SPEC_URL (a store URL such as s3://bucket/jobs/abc/spec.json).
The store: --store, $CLOUDTUNE_STORE, spec.store.url, else $CLOUDTUNE_HOME/store. The job id:
--job-id, $CLOUDTUNE_JOB_ID, else the spec's name.

Bad input (spec, data, model ref) exits 2 with one line on stderr and FAILED.json in the store; any
other error exits 1 with its traceback and FAILED.json; see contract.py for 75/76.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from cloudtune.errors import SpecError, UserError
from cloudtune.spec import JobSpec, load_spec, parse_spec
from cloudtune.store import layout, open_store
from cloudtune.store.base import Store
from cloudtune.store.retry import StoreUnavailable
from cloudtune.trainer import contract
from cloudtune.trainer.disk import DiskFull
from cloudtune.trainer.distributed import PeerLost

log = logging.getLogger("cloudtune.trainer")


def read_spec(path: str | None) -> JobSpec:
    if path:
        return load_spec(path)
    raw = os.environ.get(contract.ENV_SPEC)
    if raw:
        source = f"${contract.ENV_SPEC}"
        if raw.startswith("b64:"):
            try:
                raw = base64.b64decode(raw[4:], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise SpecError(f"{source} starts with 'b64:' but is not valid base64") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SpecError(f"{source} is not valid JSON ({err.msg} at column {err.colno})") from None
        return parse_spec(data, source)
    url = os.environ.get(contract.ENV_SPEC_URL)
    if url:
        parent, _, name = url.rstrip("/").rpartition("/")
        store = open_store(parent, endpoint_url=os.environ.get(contract.ENV_STORE_ENDPOINT))
        try:
            data = json.loads(store.get_bytes(name))
        except KeyError:
            raise SpecError(f"${contract.ENV_SPEC_URL} {url!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise SpecError(f"{url} is not valid JSON ({err.msg})") from None
        return parse_spec(data, url)
    raise SpecError(
        f"no job spec: pass --spec job.yaml, or set ${contract.ENV_SPEC} (JSON) or ${contract.ENV_SPEC_URL}"
    )


def open_job_store(spec: JobSpec | None, override: str | None) -> Store:
    from cloudtune.home import default_store_url

    url = override or os.environ.get(contract.ENV_STORE) or (spec.store.url if spec else "") or default_store_url()
    endpoint = os.environ.get(contract.ENV_STORE_ENDPOINT) or (spec.store.endpoint_url if spec else None)
    # On the machine a store spell (read-only, full, unreachable) costs a pause, not the job (#16).
    from cloudtune.store.retry import retry_budget_s

    return open_store(url, endpoint_url=endpoint, region=spec.store.region if spec else None,
                      retry_s=retry_budget_s(default=300.0))


def write_failed(store: Store | None, job_id: str | None, attempt: int, reason: str, kind: str, code: int) -> None:
    if store is None or not job_id:
        return
    try:
        store.put_json(layout.failed_key(job_id), {"time": time.time(), "attempt": attempt, "reason": reason,
                                                   "kind": kind, "exit_code": code})
        store.put_json(layout.heartbeat_key(job_id), {"job_id": job_id, "attempt": attempt, "time": time.time(),
                                                      "phase": "failed", "reason": reason})
    except Exception as err:  # noqa: BLE001 - we are already failing; say so and keep the first error
        print(f"warning: could not write FAILED.json: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cloudtune.trainer",
                                 description="Run one attempt of a cloudtune training job (resumes from the store).")
    ap.add_argument("--spec", help="job spec file (YAML or JSON); default: $CLOUDTUNE_SPEC or $CLOUDTUNE_SPEC_URL")
    ap.add_argument("--job-id", help="job id (store folder); default: $CLOUDTUNE_JOB_ID or the spec's name")
    ap.add_argument("--store", help="store URL; default: $CLOUDTUNE_STORE, spec.store.url or $CLOUDTUNE_HOME/store")
    ap.add_argument("--attempt", type=int, help="attempt number (default: $CLOUDTUNE_ATTEMPT or 1)")
    ap.add_argument("--work-dir", help="local scratch folder (default: $CLOUDTUNE_HOME/work/<job>/attempt-<n>)")
    ap.add_argument("--validate-only", action="store_true", help="check spec and data, print a summary, exit")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloudtune %(levelname)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "botocore", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    attempt = args.attempt or int(os.environ.get(contract.ENV_ATTEMPT) or 1)
    store: Store | None = None
    job_id: str | None = args.job_id or os.environ.get(contract.ENV_JOB_ID)
    try:
        spec = read_spec(args.spec)
        job_id = job_id or spec.name
        if args.validate_only:
            from cloudtune.trainer.data import validate_data

            print(json.dumps(validate_data(spec, full=True).to_dict(), indent=2))  # every record, as training
            return contract.EXIT_DONE
        store = open_job_store(spec, args.store)
        from cloudtune.home import home
        from cloudtune.trainer.train import Attempt, run

        work = Path(args.work_dir) if args.work_dir else home() / "work" / job_id / f"attempt-{attempt}"
        if int(os.environ.get("GROUP_RANK") or 0) > 0:  # each node of a multi-node run has its own disk
            work = work.with_name(f"{work.name}-node{os.environ['GROUP_RANK']}")
        return run(Attempt(spec=spec, job_id=job_id, attempt=attempt, store=store, work_dir=work))
    except StoreUnavailable as err:
        # Not the job's fault and not final: stop resumable (74); the watchdog waits until the store takes
        # writes again, then relaunches from the last good checkpoint. No FAILED.json: that would end the
        # job for a fault of the moment (and could not be written anyway).
        print(f"error: {err}; stopping resumable (exit {contract.EXIT_STORE_UNAVAILABLE})", file=sys.stderr)
        return contract.EXIT_STORE_UNAVAILABLE
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        write_failed(store, job_id, attempt, str(err), "bad_input", contract.EXIT_BAD_INPUT)
        return contract.EXIT_BAD_INPUT
    except DiskFull as err:  # this machine's disk: resumable on a fresh disk (train.py removed the partial save)
        print(f"error: {err}; stopping resumable (exit {contract.EXIT_DISK_FULL})", file=sys.stderr)
        return contract.EXIT_DISK_FULL
    except PeerLost as err:  # another rank/node vanished: the orchestrator relaunches and resumes
        print(f"error: {err}", file=sys.stderr)
        return contract.EXIT_PEER_LOST
    except Exception as err:  # noqa: BLE001 - unrecoverable: record it, keep the traceback for the log
        traceback.print_exc()
        reason = f"{type(err).__name__}: {err}"
        write_failed(store, job_id, attempt, reason, "error", contract.EXIT_FAILED)
        return contract.EXIT_FAILED
