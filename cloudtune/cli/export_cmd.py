"""`cloudtune merge`, `cloudtune export gguf`, `cloudtune push`: what to do with a finished job's model.

Thin: flags are checked (repo id, token, quant type, output path) before anything is downloaded,
merged or converted; the work is in cloudtune/export/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

export_app = typer.Typer(help="Convert a finished job's model to other formats.", no_args_is_help=True)

SOURCE_HELP = "a job id (its final/ is fetched from the job's store) or a folder: an adapter or a saved model"
BASE_HELP = "base model for an adapter (default: the job's spec.model, or the folder's summary.json)"


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_cmd)
    app.command("push")(push_cmd)
    export_app.command("gguf")(gguf_cmd)
    app.add_typer(export_app, name="export")


def _work() -> Path:
    from cloudtune.home import cache_dir

    work = cache_dir() / "exports"
    work.mkdir(parents=True, exist_ok=True)
    return work


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def merge_cmd(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(None, help="output folder (default: ./<job-or-folder>-merged)"),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's saved dtype), bf16, fp16 or fp32"),
) -> None:
    """Merge a LoRA/QLoRA adapter into its base model (PEFT merge_and_unload) and save a plain HF model."""
    from cloudtune.errors import UserError
    from cloudtune.export import merge
    from cloudtune.export import source as src_mod

    if dtype not in merge.DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(merge.DTYPES)}")
    if out is not None:
        merge.check_out(out)
    src = src_mod.resolve(source, _work(), base)
    out = out or Path(f"{src.name}-merged")
    if src.kind == "full":
        _say(f"{source} is a full fine-tune (whole weights); copying it as is")
    merge.merge(src, out, dtype)
    typer.echo(str(out))


def gguf_cmd(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(None, help="output .gguf file (default: ./<job-or-folder>-<quant>.gguf)"),
    quant: str = typer.Option("q8_0", "--quant", help="f32, f16, bf16, q8_0 (the converter's types); k-quants "
                                                      "need llama.cpp's llama-quantize afterwards"),
    converter: str = typer.Option(None, "--converter", help="llama.cpp folder, convert_hf_to_gguf.py or "
                                  "llama-cpp-python sdist (default: $CLOUDTUNE_LLAMA_CPP, else fetched once)"),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print what the GGUF holds as JSON"),
) -> None:
    """Export to GGUF (llama.cpp, Ollama): merge the adapter, then llama.cpp's convert_hf_to_gguf.py."""
    from cloudtune.errors import UserError
    from cloudtune.export import gguf
    from cloudtune.export import source as src_mod

    quant = gguf.check_quant(quant)
    if out is not None and out.exists():
        raise UserError(f"output {out} already exists; choose another path or remove it")
    src = src_mod.resolve(source, _work(), base)
    out = out or Path(f"{src.name}-{quant}.gguf")
    path, log_path = gguf.export_gguf(src, out, quant, converter, work=_work())
    try:
        info = gguf.describe(path)
    except ImportError:  # the `gguf` package (export extra) reads it back; the file is written either way
        info = {"bytes": path.stat().st_size}
    if as_json:
        typer.echo(json.dumps({"path": str(path), "log": str(log_path), **info}, indent=2, default=str))
        return
    details = ", ".join(f"{k} {v}" for k, v in info.items() if k != "tensor_types")
    typer.echo(f"{path} ({details})")
    _say(f"try it: ollama create NAME -f <(echo 'FROM ./{path.name}')  |  llama-cli -m {path}")


def push_cmd(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    repo: str = typer.Option(..., "--repo", help="Hub repo id, user/name (created if missing)"),
    merged: bool = typer.Option(False, "--merged", help="push the merged model instead of the adapter"),
    private: bool = typer.Option(False, "--private", help="create the repo private"),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    message: str = typer.Option(None, "--message", "-m", help="commit message"),
) -> None:
    """Push a job's adapter (or, with --merged, the merged model) to the Hugging Face Hub. Token: $HF_TOKEN."""
    import shutil
    import tempfile

    from cloudtune.export import hub, merge
    from cloudtune.export import source as src_mod

    hub.check_repo(repo)
    token = hub.token_from_env()
    src = src_mod.resolve(source, _work(), base)
    tmp = None
    folder = src.dir
    if merged and src.kind == "adapter":
        if src.merged_dir is not None:
            folder = src.merged_dir
        else:
            tmp = Path(tempfile.mkdtemp(prefix="cloudtune-push-", dir=_work()))
            _say(f"merging {source} into {src.base} before the push")
            folder = merge.merge(src, tmp / "merged")
    try:
        url = hub.push_folder(folder, repo, token, private=private, message=message)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    typer.echo(url)
