"""Merge a LoRA/QLoRA adapter into its base model (PEFT `merge_and_unload`), as a plain HF model folder.

Why not the trainer's `merge: true` alone: merging is also what a user does after the job, on their
own machine, before GGUF conversion or a Hub push, and a QLoRA adapter must be merged into the
*unquantized* base (merging into 4-bit weights would round the update away). The base is loaded in
16/32-bit from the job's `spec.model`, the adapter is merged, and the result is written to a temporary
sibling folder that is renamed into place: OUT is complete or absent, never half-written.

SFT then DPO: the trainer's DPO stage continues the SFT adapter (`dpo.base_adapter` is loaded
trainable and trained further), so the DPO job's final adapter already holds both stages, in order;
merging the DPO job merges SFT-then-DPO. A second adapter trained on top of a merged model is merged
by pointing `model` of that job at the merged folder (the base comes from the job's spec).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.export.source import Source

DTYPES = ("auto", "bf16", "fp16", "fp32")


def check_out(out: Path) -> None:
    """OUT must be new (or an empty folder): merging over an existing model would mix two."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists; choose another path or remove it")


def _torch_dtype(name: str, base_path: str) -> Any:
    import torch

    if name == "auto":  # the dtype the base was saved in (real models: bf16; the tiny model: fp32)
        cfg_path = Path(base_path) / "config.json"
        saved = None
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            saved = cfg.get("dtype") or cfg.get("torch_dtype")
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(saved or "", torch.float32)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def merge(src: Source, out: Path, dtype: str = "auto") -> Path:
    """Write base + adapter merged to `out`; a full fine-tune's weights are copied as they are."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        if src.kind == "full":
            shutil.copytree(src.dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("merged"))
        else:
            _merge_adapter(src, tmp, dtype)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merge_adapter(src: Source, dest: Path, dtype: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cloudtune.trainer.train import resolve_model

    assert src.base is not None
    base_path = resolve_model(src.base)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=_torch_dtype(dtype, base_path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load base model {src.base!r}: {str(err).splitlines()[0]}; pass --base MODEL") from None
    merged = PeftModel.from_pretrained(base, str(src.dir)).merge_and_unload()
    merged.save_pretrained(str(dest))
    tok_dir = src.dir if (src.dir / "tokenizer_config.json").is_file() else Path(base_path)
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(dest))
    (dest / "cloudtune_merge.json").write_text(json.dumps(
        {"base": src.base, "adapter": str(src.dir), "job_id": src.job_id, "dtype": str(merged.dtype)},
        indent=2, sort_keys=True))
