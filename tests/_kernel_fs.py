"""Real file-system faults for the tests: a small tmpfs that fills up (ENOSPC) and a remount read-only
(EROFS), made by the kernel rather than simulated.

`mount` needs CAP_SYS_ADMIN: as root it works directly; otherwise a user+mount namespace
(`unshare -rm`) gives a private mount table in which an unprivileged user may mount a tmpfs. When
only the namespace works, the test re-runs itself inside `unshare -rm` (every process it starts
inherits the namespace, so they all see the mounts) and the outer run reports the inner one's result.
Every mount is lazily unmounted when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

INSIDE = "CLOUDTUNE_TEST_IN_USERNS"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


def can_mount() -> tuple[bool, str]:
    probe = tempfile.mkdtemp(prefix="ct-mount-probe-")
    try:
        out = _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe)
        if out.returncode == 0:
            _run("umount", "-l", probe)
            return True, ""
        return False, out.stderr.strip() or f"mount exited {out.returncode}"
    except (OSError, subprocess.SubprocessError) as err:
        return False, str(err)
    finally:
        os.rmdir(probe)


def can_unshare() -> tuple[bool, str]:
    if not shutil.which("unshare"):
        return False, "no unshare(1)"
    out = _run("unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d")
    return out.returncode == 0, out.stderr.strip()


class Mounts:
    """The mounts of one test; `cleanup` unmounts them all (lazily: a process may still hold a file)."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        out = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        assert out.returncode == 0, out.stderr
        self.points.append(path)
        return path

    def read_only(self, path: Path, ro: bool = True) -> None:
        out = _run("mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(path))
        assert out.returncode == 0, out.stderr

    def cleanup(self) -> None:
        for p in reversed(self.points):
            _run("umount", "-l", str(p))
        self.points.clear()


def fill(path: Path, name: str = "ballast") -> Path:
    """Write zeros under `path` until the kernel says ENOSPC; returns the ballast file."""
    ballast = path / name
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 16, 4096, 512, 1):  # big blocks, then smaller ones down to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as err:
                assert err.errno == 28, err  # ENOSPC
    finally:
        os.close(fd)
    return ballast


@pytest.fixture
def mounts(request):
    """A Mounts for this test, or None when the test has just run (and passed) inside `unshare -rm`."""
    ok, why = can_mount()
    if not ok and not os.environ.get(INSIDE):
        ns, ns_why = can_unshare()
        if not ns:
            pytest.skip(f"cannot make a tmpfs: mount failed ({why}) and unshare -rm failed ({ns_why})")
        out = subprocess.run(["unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              request.node.nodeid], capture_output=True, text=True, timeout=900,
                             env={**os.environ, INSIDE: "1"}, cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        yield None
        return
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()
