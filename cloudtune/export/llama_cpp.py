"""Find llama.cpp's `convert_hf_to_gguf.py`, the converter Ollama and llama.cpp users are told to run.

Where it comes from, and why not vendored: the script is no longer one file (it imports its
`conversion/` package, ~95 modules, and the `gguf-py` next to it, 2 MB together) and it moves with
llama.cpp's model support every week. PyPI's `gguf` 0.19.0 lags the script it ships with (the 0.3.36
script needs `gguf.LazyChunkedTensor`, which PyPI's 0.19.0 lacks), so the script must run with its own
`gguf-py`. The published, versioned artifact that carries all three is the llama-cpp-python sdist
(`vendor/llama.cpp/`), MIT-licensed. So cloudtune takes the converter, in this order, from:

1. `--converter PATH` or `$CLOUDTUNE_LLAMA_CPP`: a llama.cpp checkout (a folder holding
   convert_hf_to_gguf.py), the script itself, or a downloaded llama-cpp-python sdist (.tar.gz);
2. `$CLOUDTUNE_HOME/cache/llama.cpp/llama-cpp-python-<VERSION>/` (extracted before);
3. `pip download --no-deps --no-binary :all: llama-cpp-python==<VERSION>` (once, ~75 MB), of which
   only the converter, `conversion/`, `gguf-py/` and the licence are kept (~2 MB).

VERSION is pinned so a conversion is reproducible; the converter's own Python needs (torch,
transformers, numpy, sentencepiece) are cloudtune's `train` + `export` extras.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from cloudtune.errors import UserError

VERSION = "0.3.36"
SCRIPT = "convert_hf_to_gguf.py"
KEEP = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")
ENV = "CLOUDTUNE_LLAMA_CPP"


def cache_root() -> Path:
    from cloudtune.home import cache_dir

    return cache_dir() / "llama.cpp"


def extract(sdist: Path, dest: Path) -> Path:
    """Extract the converter pieces of a llama-cpp-python sdist into `dest` (atomically); the script path."""
    if (dest / SCRIPT).is_file():
        return dest / SCRIPT
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with tarfile.open(sdist) as tar:
            found = False
            for member in tar.getmembers():
                _, sep, rel = member.name.partition("/vendor/llama.cpp/")
                if not sep or not any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP):
                    continue
                found = found or rel == SCRIPT
                member.name = rel
                tar.extract(member, tmp, filter="data")
        if not found:
            raise UserError(f"{sdist} holds no vendor/llama.cpp/{SCRIPT}; pass a llama-cpp-python sdist or a "
                            "llama.cpp checkout")
        try:
            tmp.rename(dest)
        except OSError:  # another process extracted it first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / SCRIPT


def download(dest: Path, version: str = VERSION) -> Path:
    """pip download the sdist (no build, no dependencies) and extract the converter from it."""
    with tempfile.TemporaryDirectory(prefix="cloudtune-llama-cpp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise UserError(f"cannot download llama-cpp-python=={version} for its GGUF converter ({last}); "
                            f"download the sdist yourself and pass --converter PATH (or set {ENV})")
        return extract(sdists[0], dest)


def converter_script(explicit: str | None = None) -> Path:
    """The path of convert_hf_to_gguf.py, fetching it once if needed (see the module docstring)."""
    ref = explicit or os.environ.get(ENV)
    if ref:
        p = Path(ref).expanduser()
        if p.is_dir() and (p / SCRIPT).is_file():
            return p / SCRIPT
        if p.is_file() and p.name == SCRIPT:
            return p
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            return extract(p, cache_root() / p.name.removesuffix(".tar.gz").removesuffix(".tgz"))
        raise UserError(f"converter {ref!r} is not a llama.cpp folder with {SCRIPT}, the script, or a "
                        "llama-cpp-python .tar.gz sdist")
    dest = cache_root() / f"llama-cpp-python-{VERSION}"
    if (dest / SCRIPT).is_file():
        return dest / SCRIPT
    return download(dest)
