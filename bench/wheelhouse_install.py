"""What the public-image bootstrap costs cold (pip from the index) and warm (from the store's wheelhouse).

Why: the planner's start-up estimate (cloudtune/planner/throughput.py BOOTSTRAP_COLD_S / BOOTSTRAP_WARM_S)
charges a first attempt the cold install and a relaunch the warm one; this measures both on this
machine with the exact pins `cloudtune run` stages (run/bootstrap.py pinned_requirements).

Steps, in one fresh venv that already has torch (as the image has):
  cold   : pip install -c torch -r pins, empty pip cache, from the index (PyPI)  -- what boot 1 does
  publish: pip wheel --no-deps of what was installed + tar                        -- boot 1, in the background
  warm   : uninstall them; empty pip cache; untar + pip install --no-index --find-links  -- a relaunch
The S3 download of the tar is not timed here (no bucket); the result adds it at DOWNLOAD_GBS.

    python bench/wheelhouse_install.py [--out bench/results/wheelhouse_install-DATE.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(cmd: list[str], **env: str) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def image_site(dest: Path) -> None:
    """A folder holding only torch and what torch needs, linked from this environment: the image's part."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    from cloudtune.run.bootstrap import _closure

    env = {k: str(v) for k, v in default_environment().items()}
    dest.mkdir()
    for name in _closure([Requirement("torch")], env):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (dest / top).exists() and top not in ("..", "bin"):
                (dest / top).symlink_to(src)


def main() -> None:
    from cloudtune.planner.throughput import DOWNLOAD_GBS
    from cloudtune.run.bootstrap import pinned_requirements
    from cloudtune.run.wheelhouse_boot import installed

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=f"bench/results/wheelhouse_install-{dt.date.today()}.md")
    args = ap.parse_args()
    pins = pinned_requirements()
    import torch

    torch_pin = "torch==" + torch.__version__.split("+")[0]
    with tempfile.TemporaryDirectory(prefix="ct-wh-bench-") as tmp:
        t = Path(tmp)
        (t / "reqs.txt").write_text("\n".join(pins) + "\n")
        (t / "constraints.txt").write_text(torch_pin + "\n")
        subprocess.run([sys.executable, "-m", "venv", str(t / "v")], check=True)
        py = str(t / "v" / "bin" / "python")
        pip = [py, "-m", "pip", "--disable-pip-version-check", "-q"]
        image_site(t / "image-site")  # the image's torch (this machine's, linked in), not timed
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "_image.pth").write_text(str(t / "image-site") + "\n")
        cold = run([*pip, "install", "--report", str(t / "report.json"), "-c", str(t / "constraints.txt"),
                    "-r", str(t / "reqs.txt")], PIP_CACHE_DIR=str(t / "cache1"))
        names = installed(str(t / "report.json"))
        wh = t / "wh"
        publish = run([*pip, "wheel", "--no-deps", "-w", str(wh), *names], PIP_CACHE_DIR=str(t / "cache1"))
        started = time.perf_counter()
        with tarfile.open(t / "wh.tar", "w") as tar:
            for w in sorted(wh.iterdir()):
                tar.add(w, arcname=w.name)
        publish += time.perf_counter() - started
        size = (t / "wh.tar").stat().st_size
        run([*pip, "uninstall", "-y", *[n.split("==")[0] for n in names]])
        started = time.perf_counter()
        (t / "wh2").mkdir()
        with tarfile.open(t / "wh.tar") as tar:
            tar.extractall(t / "wh2", filter="data")
        untar = time.perf_counter() - started
        warm = run([*pip, "install", "--no-index", "--find-links", str(t / "wh2"), "-c", str(t / "constraints.txt"),
                    "-r", str(t / "reqs.txt")], PIP_CACHE_DIR=str(t / "cache2"))
    fetch_s = size / (DOWNLOAD_GBS * 1e9)
    result = {"date": str(dt.date.today()), "pins": len(pins), "installed": len(names), "wheelhouse_mb": size / 1e6,
              "cold_s": round(cold, 1), "publish_s": round(publish, 1), "untar_s": round(untar, 1),
              "warm_install_s": round(warm, 1), "warm_fetch_s_at_download_gbs": round(fetch_s, 1),
              "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__}
    text = (f"# wheelhouse_install {result['date']}\n\n`python bench/wheelhouse_install.py` on this machine "
            f"({result['cpus']} CPUs, shared with other work; PyPI over the internet).\n\n```json\n"
            f"{json.dumps(result, indent=1)}\n```\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
