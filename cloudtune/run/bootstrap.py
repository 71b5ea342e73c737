"""Boot the trainer on a public CUDA PyTorch image: ship this cloudtune as a wheel, install it there.

Why: a private trainer image has to be built and pushed before a first job can run, and a missing
one is found only after a GPU is rented. SkyPilot solves the same problem by shipping its own wheel
to every cluster; we do the same. `cloudtune run` builds the wheel of the cloudtune that is running
(from its source tree, cached by a digest of the sources) and stages it in `<store>/<job>/bootstrap/`
with a requirements file pinned to the training dependencies installed here. The machine starts the
public image (`PUBLIC_IMAGE`, whose torch/CUDA the pins leave alone) with a small `sh` script as its
command: fetch the wheel by a presigned GET URL (from the environment, never on the command line),
`pip install` it with the pins and the image's own torch as a constraint, then exec the trainer's
entrypoint exactly as the trainer image would. pip's cache lives on the machine's disk, so a trainer
restarted on the same machine (a container restart, a stopped-and-started VM) installs from it.

A user-built image (images/trainer, `resources.image` set to anything but a public PyTorch base)
is the fast path: no bootstrap, the command is the image's. The local provider never bootstraps:
it runs the trainer in place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.run import wheelhouse as WH
from cloudtune.trainer import contract as C

# The default image: public on Docker Hub, amd64, Python 3.11, the torch floor of pyproject's train extra
# (2.6), CUDA 12.4 (driver >= 550). images/trainer/Dockerfile builds the fast-path image FROM the same base.
PUBLIC_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
# Images with torch but no cloudtune: a job on one of these is bootstrapped.
PUBLIC_BASES = ("pytorch/pytorch:", "docker.io/pytorch/pytorch:", "nvcr.io/nvidia/pytorch:")
BOOTSTRAP_DIR = "bootstrap"
REQUIREMENTS = "requirements.txt"
ENV_WHEEL_URL = "CLOUDTUNE_BOOTSTRAP_WHEEL_URL"  # a presigned GET URL: travels as a secret env var
ENV_SCRIPT_URL = "CLOUDTUNE_BOOTSTRAP_SCRIPT_URL"  # the boot script's presigned GET URL (secret env)
BOOT_SCRIPT = "boot.sh"
ENV_BOOT_DIR = "CLOUDTUNE_BOOT_DIR"  # where the wheel and pip's cache go (default /workspace/.cloudtune-boot)
ENV_PIP_ARGS = "CLOUDTUNE_PIP_ARGS"  # extra pip arguments (tests: --no-index --find-links DIR)
# A presigned URL is a bearer grant to read one object (the wheel); short, but longer than a slow
# provider's queue-to-boot time. A relaunch gets a fresh one (build_request runs per attempt).
URL_EXPIRY_S = 3 * 3600
# What the bootstrap costs a start (the planner's figures: cloudtune/planner/throughput.py BOOTSTRAP_COLD_S,
# BOOTSTRAP_WARM_S): download the wheel (~0.3 MB) and pip install the train extra without torch (~450 MB of
# wheels from the index the first time; a relaunch installs the store's wheelhouse, run/wheelhouse.py).
# The source files a wheel is built from (the rest of the checkout is not part of the package).
_SOURCES = ("pyproject.toml", "README.md", "cloudtune", "providers")
# Extras the machine needs: training, and boto3 for an s3:// store.
_EXTRAS = ("train", "s3")


def needs_bootstrap(image: str | None, provider: str) -> bool:
    """A cloud machine on a public PyTorch image (no cloudtune inside) is bootstrapped; local never is."""
    return provider != "local" and bool(image) and str(image).startswith(PUBLIC_BASES)


def wheel_name(version: str | None = None) -> str:
    """The staged wheel's file name (setuptools' name for this pure-Python package)."""
    from cloudtune import __version__

    return f"cloudtune-{version or __version__}-py3-none-any.whl"


def wheel_key(job_id: str) -> str:
    return f"{job_id}/{BOOTSTRAP_DIR}/{wheel_name()}"


def requirements_key(job_id: str) -> str:
    return f"{job_id}/{BOOTSTRAP_DIR}/{REQUIREMENTS}"


# ---------------------------------------------------------------- the wheel


def source_root() -> Path:
    """The source tree of the running cloudtune (an editable or source install)."""
    import cloudtune

    root = Path(cloudtune.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "providers").is_dir():
        raise UserError(
            f"resources.image: this cloudtune ({root}) is not a source checkout, so its wheel cannot be built "
            f"for the public image; install cloudtune from its repository (`pip install -e .`), or build "
            f"images/trainer and set resources.image to it"
        )
    return root


def _source_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for name in _SOURCES:
        p = root / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                            and f.suffix not in (".pyc", ".pyo"))
    return files


def source_digest(root: Path) -> str:
    """A digest of every file that goes into the wheel: the cache key of the built wheel."""
    h = hashlib.sha256()
    for f in _source_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def wheel_cache_dir() -> Path:
    from cloudtune.home import cache_dir

    return Path(os.environ.get("CLOUDTUNE_WHEEL_CACHE") or cache_dir() / "wheels")


def build_wheel(cache_dir: Path | None = None) -> Path:
    """The wheel of the running cloudtune, built once per source digest (pip wheel, no deps).

    The sources are copied to a temporary directory first, so the build writes no build/ or
    egg-info into the checkout other people are working in.
    """
    root = source_root()
    cache = (cache_dir or wheel_cache_dir()) / source_digest(root)
    out = cache / wheel_name()
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="cloudtune-wheel-") as tmp:
        src = Path(tmp) / "src"
        for f in _source_files(root):
            dest = src / f.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        dist = Path(tmp) / "dist"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
             "-q", "-w", str(dist), str(src)],
            capture_output=True, text=True,
        )
        built = dist / wheel_name()
        if proc.returncode != 0 or not built.is_file():
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
                     if ln.strip() and not ln.strip().startswith(("hint:", "note:"))]
            tail = [ln for ln in lines if "error" in ln.lower()][-1:] or lines[-1:] or ["no output"]
            raise UserError(f"could not build the cloudtune wheel for the public image: {tail[0]}; install "
                            f"setuptools>=68 and wheel, or set resources.image to a built images/trainer image")
        cache.mkdir(parents=True, exist_ok=True)
        tmp_out = cache / (out.name + ".part")
        shutil.copy2(built, tmp_out)
        os.replace(tmp_out, out)  # never a half-copied wheel in the cache
    return out


# ---------------------------------------------------------------- the pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[Any], env: dict[str, str]) -> dict[str, str]:
    """name -> installed version for `roots` (packaging Requirements) and everything they need here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional or platform-only dependency): the machine resolves it
        seen[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(sub)
    return seen


def pinned_requirements() -> list[str]:
    """`name==version` for the train and s3 extras and their dependencies, as installed here.

    torch and everything torch itself needs (CUDA libraries, triton, sympy ...) are left out: the
    public image's torch is kept (the script constrains it to itself), and pinning torch's own
    dependencies to this machine's CPU build could conflict with the image's torch.
    """
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    root = source_root()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    env = {k: str(v) for k, v in default_environment().items()}
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in _EXTRAS:
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    roots = [r for r in reqs if _norm(r.name) != "torch"]
    torch_side = _closure([Requirement("torch")], env)
    pins = _closure(roots, env)
    return [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in torch_side and n != "cloudtune"]


# ---------------------------------------------------------------- staging and the URL


def script_key(job_id: str) -> str:
    return f"{job_id}/{BOOTSTRAP_DIR}/{BOOT_SCRIPT}"


def stage(store: Any, job_id: str, *, cache_dir: Path | None = None) -> list[str]:
    """Upload the wheel, the pinned requirements and the boot script to `<job>/bootstrap/`; returns the keys."""
    wheel = build_wheel(cache_dir)
    pins = pinned_requirements()
    store.upload_file(wheel, wheel_key(job_id))
    store.put_bytes(requirements_key(job_id), ("\n".join(pins) + "\n").encode())
    store.put_bytes(script_key(job_id), script(pins).encode())
    return [wheel_key(job_id), requirements_key(job_id), script_key(job_id)]


def staged_script(store: Any, job_id: str, requirements: list[str]) -> None:
    """The boot script of these pins in the store (a job staged before boot.sh existed gets it now)."""
    from cloudtune.store import StoreNotFound

    want = script(requirements).encode()
    try:
        if store.get_bytes(script_key(job_id)) == want:
            return
    except StoreNotFound:
        pass
    store.put_bytes(script_key(job_id), want)


def staged_requirements(store: Any, job_id: str) -> list[str]:
    """The pins `run` staged (every attempt of a job installs the same versions). A job made without
    them (an older cloudtune, a job row written by hand) gets them staged now, once."""
    from cloudtune.store import StoreNotFound

    try:
        text = store.get_bytes(requirements_key(job_id)).decode()
    except StoreNotFound:
        stage(store, job_id)
        text = store.get_bytes(requirements_key(job_id)).decode()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def presigned_url(store: Any, key: str, expiry_s: int = URL_EXPIRY_S) -> str:
    """A GET URL for one object that needs no credentials on the machine: presigned for s3://, file:// locally."""
    inner = getattr(store, "inner", store)
    if hasattr(inner, "bucket"):
        return inner.client.generate_presigned_url(
            "get_object", Params={"Bucket": inner.bucket, "Key": inner._key(key)}, ExpiresIn=int(expiry_s))
    return store.url_for(key)


def attempt_env(store: Any, job_id: str, attempt: int, requirements: list[str], image: str,
                gpu: str) -> tuple[dict[str, str], dict[str, str]]:
    """(env, secret env) a bootstrapped attempt needs: the wheel's GET URL, and the wheelhouse's URLs
    (a GET for one that exists, PUTs for the first machine on these pins; run/wheelhouse.py)."""
    from cloudtune.preflight import machine_arch

    key = WH.cache_key(requirements, _EXTRAS, image, machine_arch(gpu))
    env, secret = WH.attempt_env(store, key, job_id, attempt, URL_EXPIRY_S)
    staged_script(store, job_id, requirements)
    return env, {ENV_WHEEL_URL: presigned_url(store, wheel_key(job_id)),
                 ENV_SCRIPT_URL: presigned_url(store, script_key(job_id)), **secret}


# ---------------------------------------------------------------- the script

_FETCH_PY = """\
import os, sys, time, urllib.request
url, dest = sys.argv[1], sys.argv[2]
for attempt in range(int(os.environ.get("CLOUDTUNE_BOOT_TRIES") or 6)):
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest + ".part", "wb") as f:
            f.write(r.read())
        break
    except Exception as err:
        print(f"cloudtune bootstrap: download of {os.path.basename(dest)} failed ({type(err).__name__}), retrying",
              file=sys.stderr)
        time.sleep(2 ** attempt)
else:
    sys.exit(1)
os.replace(dest + ".part", dest)
"""
# The wheelhouse's machine-side program travels inside the wheel just fetched (no bytes in the command).
_UNZIP_PY = "import sys, zipfile; sys.stdout.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]).decode())"
_BOOT_PROGRAM = "cloudtune/run/wheelhouse_boot.py"


def script(requirements: list[str], *, extras: tuple[str, ...] = _EXTRAS, then: list[str] | None = None) -> str:
    """The machine's boot script (POSIX sh, `set -e`): fetch, install, exec the trainer's entrypoint.

    It holds no credential: the wheel's URL comes from $CLOUDTUNE_BOOTSTRAP_WHEEL_URL (a secret env
    var, removed from the environment before the trainer starts). A failed download exits 75 (the
    watchdog relaunches); a failed pip install exits 1 (a resolution conflict would fail again).
    Either way the provider's self-terminate hook runs, as the entrypoint would run it.
    """
    then = then or ["python", "-m", "cloudtune.trainer.entrypoint", "--", *C.LAUNCH_COMMAND]
    reqs = "\n".join(requirements)
    if "CLOUDTUNE_REQS" in reqs or "'" in reqs:
        raise ValueError("a requirement line cannot hold the heredoc marker or a quote")
    wheel = wheel_name()
    target = wheel + (f"[{','.join(extras)}]" if extras else "")  # extras not installed here resolve unpinned
    return f"""set -e
B="${{{ENV_BOOT_DIR}:-/workspace/.cloudtune-boot}}"
mkdir -p "$B" 2>/dev/null || B=/tmp/.cloudtune-boot
mkdir -p "$B"
export PIP_CACHE_DIR="${{PIP_CACHE_DIR:-$B/pip-cache}}" PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
PY="$(command -v python3 || command -v python)"
fail() {{
  echo "cloudtune bootstrap: $2" >&2
  if [ -n "${{{C.ENV_SELF_TERMINATE}:-}}" ]; then sh -c "${C.ENV_SELF_TERMINATE}" >/dev/null 2>&1 || true; fi
  exit "$1"
}}
if "$PY" -c 'import cloudtune.trainer.entrypoint' >/dev/null 2>&1; then
  # cloudtune is already here (a restarted container, an image with it inside): never install over it
  echo "cloudtune bootstrap: cloudtune is already installed; starting the trainer"
  unset {ENV_WHEEL_URL} {" ".join(WH.SECRET_VARS)}
  exec {shlex.join(then)}
fi
TORCH="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" || TORCH=""
echo "cloudtune bootstrap: installing {wheel} on torch ${{TORCH:-(none)}}"
[ -n "${{{ENV_WHEEL_URL}:-}}" ] || fail 1 "{ENV_WHEEL_URL} is not set"
"$PY" -c '{_FETCH_PY}' "${ENV_WHEEL_URL}" "$B/{wheel}" || fail {C.EXIT_PREEMPTED} "could not download the wheel"
unset {ENV_WHEEL_URL}
: > "$B/constraints.txt"
[ -z "$TORCH" ] || echo "torch==${{TORCH%%+*}}" > "$B/constraints.txt"  # the image's torch stays
cat > "$B/requirements.txt" <<'CLOUDTUNE_REQS'
{reqs}
CLOUDTUNE_REQS
"$PY" -c '{_UNZIP_PY}' "$B/{wheel}" {_BOOT_PROGRAM} > "$B/wheelhouse_boot.py"
export CLOUDTUNE_TORCH="$TORCH"
WH="$B/wheelhouse"
if [ -n "${{{WH.ENV_GET}:-}}" ] && "$PY" "$B/wheelhouse_boot.py" fetch "$WH" \
    && "$PY" -m pip install -q --no-index --find-links "$WH" -c "$B/constraints.txt" -r "$B/requirements.txt" \
       "$B/{target}"; then
  echo "cloudtune bootstrap: installed from the store's wheelhouse (no index)"
else
  [ -z "${{{WH.ENV_GET}:-}}" ] || echo "cloudtune bootstrap: the wheelhouse was not usable; installing from the index"
  REPORT=""
  # one publisher per attempt: node 0 of a multi-node cluster (SkyPilot's rank variable), the only node elsewhere
  [ -z "${{{WH.ENV_PUT_MANIFEST}:-}}" ] || [ "${{SKYPILOT_NODE_RANK:-0}}" != 0 ] || REPORT="--report $B/install-report.json"
  "$PY" -m pip install -q ${{{ENV_PIP_ARGS}:-}} $REPORT -c "$B/constraints.txt" -r "$B/requirements.txt" \
    "$B/{target}" || fail {C.EXIT_FAILED} "pip install of {wheel} and its pinned dependencies failed (log above)"
  # the first machine on these pins publishes them for its successors, in the background (never fatal)
  [ -z "$REPORT" ] || ( "$PY" "$B/wheelhouse_boot.py" publish "$WH" "$B/install-report.json" & )
fi
unset {" ".join(WH.SECRET_VARS)}
echo "cloudtune bootstrap: installed; starting the trainer"
exec {shlex.join(then)}
"""


def stub() -> str:
    """The machine's command: fetch the boot script from the store (its presigned URL is a secret env
    var), then run it. Why two stages: the full script (~5 KB with 70+ pins) is over what some
    providers take as a command (Vast: 4096 characters for args + onstart), and user-data or a
    container's command line is the wrong place for a requirements list anyway. A failed download
    exits 75 (the watchdog relaunches) after the provider's self-terminate hook, as the script does."""
    return f"""set -e
B="${{{ENV_BOOT_DIR}:-/workspace/.cloudtune-boot}}"
mkdir -p "$B" 2>/dev/null || B=/tmp/.cloudtune-boot
mkdir -p "$B"
PY="$(command -v python3 || command -v python)"
if ! "$PY" -c '{_FETCH_PY}' "${{{ENV_SCRIPT_URL}:-}}" "$B/{BOOT_SCRIPT}"; then
  echo "cloudtune bootstrap: could not download the boot script (${ENV_SCRIPT_URL})" >&2
  if [ -n "${{{C.ENV_SELF_TERMINATE}:-}}" ]; then sh -c "${C.ENV_SELF_TERMINATE}" >/dev/null 2>&1 || true; fi
  exit {C.EXIT_PREEMPTED}
fi
unset {ENV_SCRIPT_URL}
export {ENV_BOOT_DIR}="$B"
exec sh "$B/{BOOT_SCRIPT}"
"""


def command() -> list[str]:
    """The LaunchRequest.command for a bootstrapped machine: the stub; `script(pins)` is what it runs
    (staged in the store by `stage` / `attempt_env`)."""
    return ["sh", "-c", stub()]
