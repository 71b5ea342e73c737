"""The machine's half of the wheelhouse (cloudtune/run/wheelhouse.py): fetch one, or publish one.

Why a separate file: the boot script writes this file's source onto a public PyTorch image and
runs it before cloudtune (or boto3) is installed there, so it may use the standard library only and
must import nothing from cloudtune. The machine holds no store credentials for it: the controller
hands it presigned URLs (a GET for a wheelhouse that exists, PUTs for one that does not yet).

  fetch DIR          $CLOUDTUNE_WHEELHOUSE_URL -> DIR/*.whl, verified against $CLOUDTUNE_WHEELHOUSE_EXPECT
                     ("<tar sha256> <python> <platform> <torch>", from the MANIFEST the controller read)
  publish DIR REPORT the wheels pip installed (its --report) -> one tar + MANIFEST.json, manifest last

Every failure prints one line and exits non-zero; the boot script then installs from the index,
so a damaged or partial wheelhouse costs time, never the job.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile

FORMAT = 1
CHUNK = 1 << 20


def say(msg):
    print("cloudtune wheelhouse: " + msg, file=sys.stderr, flush=True)


def here():
    """What a wheel built here is tied to: the interpreter, the platform, the image's torch build."""
    return [sys.implementation.cache_tag, sysconfig.get_platform(), os.environ.get("CLOUDTUNE_TORCH") or "none"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _tries():
    return int(os.environ.get("CLOUDTUNE_BOOT_TRIES") or 4)


def get(url, dest):
    """Download `url` to `dest` (via dest.part, so a cut transfer never looks complete)."""
    def once():
        with urllib.request.urlopen(url, timeout=60) as r, open(dest + ".part", "wb") as f:
            shutil.copyfileobj(r, f, CHUNK)
        os.replace(dest + ".part", dest)

    _retrying("download", (403, 404), once)


def _retrying(what, fatal_codes, once):
    """Run `once` up to _tries() times with exponential backoff; an HTTP answer in `fatal_codes` (the
    URL itself is wrong or expired) is not retried."""
    for attempt in range(_tries()):
        try:
            return once()
        except Exception as err:
            if getattr(err, "code", None) in fatal_codes:
                raise
            say(f"{what} failed ({type(err).__name__}), retrying")
            time.sleep(2 ** attempt)
    raise OSError(f"{what} failed {_tries()} times")


def put(url, path):
    """Upload `path` to a presigned PUT URL (file:// for a local store)."""
    if url.startswith("file://"):
        dest = urllib.request.url2pathname(url[len("file://"):])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(path, dest + ".part")
        os.replace(dest + ".part", dest)
        return
    size = os.path.getsize(path)

    def once():
        with open(path, "rb") as f:
            req = urllib.request.Request(url, data=f, method="PUT", headers={"Content-Length": str(size),
                                                                           "Content-Type": "application/octet-stream"})
            urllib.request.urlopen(req, timeout=600).close()

    _retrying("upload", (400, 403), once)


def fetch(wh):
    """Download the wheelhouse tar, check its digest and the tags it was built for, unpack its wheels."""
    expect = (os.environ.get("CLOUDTUNE_WHEELHOUSE_EXPECT") or "").split()
    if len(expect) != 4:
        say("no expected digest given; not using it")
        return 1
    if expect[1:] != here():
        say("built for {}, this machine is {}; installing from the index".format(" ".join(expect[1:]), " ".join(here())))
        return 1
    os.makedirs(wh, exist_ok=True)
    tar = wh + ".tar"
    try:
        get(os.environ["CLOUDTUNE_WHEELHOUSE_URL"], tar)
    except Exception as err:
        say("could not download it (%s); installing from the index" % (getattr(err, "code", None) or type(err).__name__))
        return 1
    digest = sha256(tar)
    if digest != expect[0]:
        say(f"digest {digest[:12]} does not match its manifest ({expect[0][:12]}): damaged or replaced; installing from the index")
        return 1
    try:
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                name = m.name
                # only plain wheel files at the top: nothing a crafted tar could place elsewhere
                if not m.isfile() or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".whl"):
                    raise ValueError(f"unexpected member {name[:80]!r}")
                with t.extractfile(m) as src, open(os.path.join(wh, name), "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                zipfile.ZipFile(os.path.join(wh, name)).close()  # a truncated wheel has no central directory
    except Exception as err:
        say(f"unusable ({str(err)[:120]}); installing from the index")
        shutil.rmtree(wh, ignore_errors=True)
        return 1
    finally:
        os.remove(tar)
    return 0


def installed(report):
    """name==version of every distribution pip installed (its --report), cloudtune's own wheel excepted
    (it is per job, fetched from the job's bootstrap/ folder)."""
    with open(report) as f:
        items = json.load(f).get("install", [])
    out = []
    for item in items:
        meta = item.get("metadata", {})
        if meta.get("name", "").lower() != "cloudtune":
            out.append(f"{meta['name']}=={meta['version']}")
    return sorted(out)


def publish(wh, report):
    """Wheels of what was installed -> one tar (PUT) -> MANIFEST.json naming its digest (PUT, last)."""
    pins = installed(report)
    if not pins:
        say("nothing was installed from the index; nothing to publish")
        return 0
    shutil.rmtree(wh, ignore_errors=True)
    os.makedirs(wh)
    started = time.time()
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wh]
    pip += shlex.split(os.environ.get("CLOUDTUNE_PIP_ARGS") or "")
    if subprocess.call(pip + pins) != 0:  # pip's caches on this disk: mostly no download
        say("pip wheel failed; not publishing")
        return 1
    wheels = sorted(n for n in os.listdir(wh) if n.endswith(".whl"))
    tar = wh + ".tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for name in wheels:
            info = t.gettarinfo(os.path.join(wh, name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(os.path.join(wh, name), "rb") as f:
                t.addfile(info, f)
    python, platform, torch = here()
    manifest = {
        "format": FORMAT, "key": os.environ.get("CLOUDTUNE_WHEELHOUSE_KEY", ""),
        "tar": os.environ.get("CLOUDTUNE_WHEELHOUSE_NAME", ""), "tar_sha256": sha256(tar),
        "tar_bytes": os.path.getsize(tar), "python": python, "platform": platform, "torch": torch,
        "files": [{"name": n, "sha256": sha256(os.path.join(wh, n)), "bytes": os.path.getsize(os.path.join(wh, n))}
                  for n in wheels],
        "built_by": os.environ.get("CLOUDTUNE_JOB_ID", ""), "created_at": time.time(),
    }
    path = os.path.join(os.path.dirname(wh), "wheelhouse-manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    put(os.environ["CLOUDTUNE_WHEELHOUSE_PUT_TAR"], tar)
    put(os.environ["CLOUDTUNE_WHEELHOUSE_PUT_MANIFEST"], path)  # last: a wheelhouse without it does not exist
    os.remove(tar)
    say(f"published {len(wheels)} wheels ({manifest['tar_bytes'] / 1e6:.0f} MB) in {time.time() - started:.0f} s")
    return 0


def main(argv):
    try:
        if argv[:1] == ["fetch"] and len(argv) == 2:
            return fetch(argv[1])
        if argv[:1] == ["publish"] and len(argv) == 3:
            return publish(argv[1], argv[2])
    except Exception as err:  # never fatal to the boot: one line, then the index
        say(f"{type(err).__name__}: {str(err)[:160]}")
        return 1
    say("usage: fetch DIR | publish DIR REPORT")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
