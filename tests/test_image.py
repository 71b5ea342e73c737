"""The trainer image, checked statically (docker build cannot run here): its base, flash-attn wheel and
import check agree with each other and with pyproject.toml's pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "images" / "trainer" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert m, f"ARG {name}= missing"
    return m.group(1)


def _floor(extra: str, pkg: str) -> SpecifierSet:
    for dep in PYPROJECT["project"]["optional-dependencies"][extra]:
        m = re.fullmatch(rf"{re.escape(pkg)}\s*([<>=!~][^;]*)", dep.split("#")[0].strip())
        if m:
            return SpecifierSet(m.group(1))
    raise AssertionError(f"{pkg} not in [{extra}]")


def test_base_torch_and_cuda_are_what_the_pins_allow():
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)", _arg("BASE"))
    assert m, _arg("BASE")
    torch, cuda = Version(m.group(1)), (int(m.group(2)), int(m.group(3)))
    assert torch in _floor("train", "torch") and torch >= Version("2.6")  # transformers 5 disables < 2.6
    assert cuda >= (12, 4)


def test_flash_attn_wheel_matches_the_base():
    base = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda(\d+)\.\d+-.*", _arg("BASE"))
    wheel = _arg("FLASH_ATTN_WHEEL").rsplit("/", 1)[-1]
    m = re.fullmatch(r"flash_attn-[\d.]+(?:post\d+)?\+cu(\d+)torch(\d+)\.(\d+)cxx11abi(TRUE|FALSE)-cp(\d+)-cp\d+-"
                     r"linux_x86_64\.whl", wheel)
    assert base and m, wheel
    assert m.group(1) == base.group(3)  # CUDA major
    assert (m.group(2), m.group(3)) == (base.group(1), base.group(2))  # torch major.minor
    # PyTorch's own builds switched to the cxx11 ABI with 2.7; the pytorch/pytorch 2.6 images use Python 3.11
    assert m.group(4) == ("TRUE" if (int(base.group(1)), int(base.group(2))) >= (2, 7) else "FALSE")
    assert m.group(5) == "311"
    assert "ARG FLASH_ATTN_WHEEL\n" in DOCKERFILE.split("FROM ${BASE}", 1)[1]  # re-declared after FROM


def test_install_keeps_base_torch_and_import_check_covers_the_extras():
    install = re.search(r'pip install -c /tmp/torch-constraint.txt "\.\[([a-z0-9,]+)\]" "\$\{FLASH_ATTN_WHEEL\}"',
                        DOCKERFILE)
    assert install, "the install line changed"
    extras = set(install.group(1).split(","))
    assert {"train", "export", "s3"} <= extras and extras <= set(PYPROJECT["project"]["optional-dependencies"])
    check = re.search(r'python -c "import ([^;]+);', DOCKERFILE.split("pip install -c", 1)[1]).group(1)
    modules = {m.strip() for m in check.split(",")}
    assert {"flash_attn", "flash_attn_2_cuda", "tensorboard", "wandb", "trl", "peft", "bitsandbytes",
            "cloudtune.trainer.cli", "cloudtune.export.gguf"} <= modules
    train = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0] for d in PYPROJECT["project"]["optional-dependencies"]["train"]}
    assert {"tensorboard", "wandb"} <= train
