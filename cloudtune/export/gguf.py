"""GGUF export: merge (when the source is an adapter), then llama.cpp's convert_hf_to_gguf.py.

The converter writes f32/f16/bf16 and, of the quantized types, q8_0 (and the ternary tq1_0/tq2_0
for BitNet-style models). The k-quants Ollama users often want (q4_k_m, q5_k_m, ...) are made by
llama.cpp's compiled `llama-quantize` from an f16/q8_0 GGUF; cloudtune says so instead of pretending.
The GGUF is written to a temporary name in OUT's folder and renamed: complete or absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.export.source import Source

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")  # convert_hf_to_gguf.py --outtype
NEEDS_LLAMA_QUANTIZE = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1",
                        "q5_k_s", "q5_k_m", "q6_k", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs")


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q in OUTTYPES:
        return q
    if q in NEEDS_LLAMA_QUANTIZE:
        raise UserError(f"--quant {quant}: the converter writes only {', '.join(OUTTYPES[:-1])}; export --quant f16 "
                        f"(or q8_0) and run llama.cpp's `llama-quantize OUT.gguf OUT-{q}.gguf {q.upper()}`")
    raise UserError(f"--quant {quant!r} is not a GGUF type; use one of {', '.join(OUTTYPES)}")


def check_tokenizer(folder: Path) -> None:
    """Refuse, before any merge or conversion, a tokenizer the converter cannot read: it takes sentencepiece
    (tokenizer.model) or BPE/Unigram tokenizer.json files; WordLevel/WordPiece ones (such as the tiny
    model's character tokenizer) end in "BPE pre-tokenizer was not recognized" after a full model load."""
    import json

    if (folder / "tokenizer.model").is_file():
        return
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"{folder} has no tokenizer.json or tokenizer.model; llama.cpp's converter needs the "
                        "tokenizer next to the weights (save it with tokenizer.save_pretrained)")
    kind = json.loads(tj.read_text()).get("model", {}).get("type")
    if kind not in ("BPE", "Unigram"):
        raise UserError(f"{tj}: a {kind} tokenizer, which llama.cpp's convert_hf_to_gguf.py cannot convert; GGUF "
                        "needs a sentencepiece or BPE tokenizer (real model families have one)")


def convert(model_dir: Path, out: Path, quant: str, script: Path, log_path: Path) -> Path:
    """Run the converter on a whole-weights HF folder; its output goes to `log_path`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=".gguf")
    os.close(fd)
    tmp = Path(tmp_name)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the script's own gguf-py, see llama_cpp
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", quant]
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=script.parent)
        if proc.returncode != 0:
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            raise UserError(f"llama.cpp's converter failed on {model_dir}: {last.strip()[:300]} (full log: {log_path})",
                            exit_code=1)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_gguf(src: Source, out: Path, quant: str = "q8_0", converter: str | None = None,
                work: Path | None = None) -> tuple[Path, Path]:
    """Merge if needed, convert; returns (gguf path, converter log). All input checks come first."""
    from cloudtune.export.llama_cpp import converter_script
    from cloudtune.export.merge import merge

    quant = check_quant(quant)
    if out.exists():
        raise UserError(f"output {out} already exists; choose another path or remove it")
    check_tokenizer(src.merged_dir or src.dir)
    script = converter_script(converter)
    log_path = out.with_name(out.name + ".log")
    if src.kind == "full":
        return convert(src.dir, out, quant, script, log_path), log_path
    model_dir = src.merged_dir
    tmp = None
    if model_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="cloudtune-merge-", dir=work))
        model_dir = merge(src, tmp / "merged")
    try:
        return convert(model_dir, out, quant, script, log_path), log_path
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def describe(path: Path) -> dict[str, Any]:
    """What a GGUF holds, read back with the `gguf` package: architecture, tensors, tokenizer, file type."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.contents()
        return value

    tokens = field("tokenizer.ggml.tokens")
    return {
        "architecture": field("general.architecture"),
        "tensors": len(reader.tensors),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "file_type": field("general.file_type"),
        "tokenizer": field("tokenizer.ggml.model"),
        "vocab": len(tokens) if tokens is not None else 0,
        "chat_template": field("tokenizer.chat_template") is not None,
        "bytes": path.stat().st_size,
    }
