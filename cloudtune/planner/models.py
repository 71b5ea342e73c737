"""Model architectures: turn a `--model` value into the shape the memory and time models need.

Why a registry and not the hub: `cloudtune plan` must answer offline and in milliseconds, so the
shapes of the popular fine-tuning bases ship with the package (cloudtune/data/model_architectures.csv,
copied from the models' published configs). A local `config.json`, or the hub's when the network
allows, covers everything else. Only the standard library is imported here; httpx is imported inside
the one function that talks to the hub.

Accepted refs, in the order they are tried:
  tiny:<task>                 the demo model the trainer builds (cloudtune.tiny), no network
  8b, 70B, 1.5b, 8x7b         a size shorthand -> a representative modern model (SHORTHANDS)
  meta-llama/Llama-3.1-8B     a registry id, case-insensitive; the id without its org also works
  ./dir or ./dir/config.json  a local Hugging Face config
  org/name in the HF cache    HF_HUB_CACHE / HF_HOME/hub / ~/.cache/huggingface/hub snapshots, offline
  Qwen/Qwen2.5-7B-Instruct    an Instruct/chat/it variant of a registry base: the base's shape (fine-tuning
                              changes weights, not the architecture)
  org/name                    any other hub id: config.json fetched from the hub (HF_ENDPOINT, HF_TOKEN)
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.planner.types import ModelArch

DATA_CSV = Path(__file__).resolve().parent.parent / "data" / "model_architectures.csv"

# Size shorthand -> the registry model that stands for it. A representative *modern* base of that
# size (the one people fine-tune today); older or rarer shapes stay reachable by their id.
SHORTHANDS: dict[str, str] = {
    "0.5b": "Qwen/Qwen2.5-0.5B",
    "0.6b": "Qwen/Qwen3-0.6B",
    "1b": "meta-llama/Llama-3.2-1B",
    "1.5b": "Qwen/Qwen2.5-1.5B",
    "1.7b": "Qwen/Qwen3-1.7B",
    "2b": "google/gemma-2-2b",
    "3b": "meta-llama/Llama-3.2-3B",
    "4b": "Qwen/Qwen3-4B",
    "7b": "Qwen/Qwen2.5-7B",
    "8b": "meta-llama/Llama-3.1-8B",
    "9b": "google/gemma-2-9b",
    "12b": "google/gemma-3-12b-pt",
    "13b": "meta-llama/Llama-2-13b-hf",
    "14b": "Qwen/Qwen2.5-14B",
    "27b": "google/gemma-2-27b",
    "32b": "Qwen/Qwen2.5-32B",
    "70b": "meta-llama/Llama-3.1-70B",
    "72b": "Qwen/Qwen2.5-72B",
    "405b": "meta-llama/Llama-3.1-405B",
    "8x7b": "mistralai/Mixtral-8x7B-v0.1",
}
# A size that is not in SHORTHANDS maps to the nearest one within this ratio (34b -> 32b), else errors.
SHORTHAND_TOLERANCE = 1.25

_SIZE_RE = re.compile(r"^(?:(\d+)x)?(\d+(?:\.\d+)?)b$")

# MoE fields of the CSV rows (the CSV has no expert columns; its notes say 8 experts, top-2).
_MOE = {"mistralai/Mixtral-8x7B-v0.1": (8, 2)}


def count_params(
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    tied_embeddings: bool,
    num_experts: int = 1,
    qkv_bias: bool = False,
) -> int:
    """Parameters of a Llama-style decoder (gated MLP, GQA), all experts counted.

    q/o: hidden x heads*head_dim; k/v: hidden x kv_heads*head_dim; MLP: 3 x hidden x intermediate per
    expert plus a hidden x experts router; two RMSNorms per layer and a final one; embeddings, plus a
    separate lm_head unless tied."""
    q = heads * head_dim
    kv = kv_heads * head_dim
    attn = 2 * hidden * q + 2 * hidden * kv + (q + 2 * kv if qkv_bias else 0)
    mlp = 3 * hidden * intermediate * num_experts + (hidden * num_experts if num_experts > 1 else 0)
    per_layer = attn + mlp + 2 * hidden
    embed = vocab * hidden * (1 if tied_embeddings else 2)
    return layers * per_layer + embed + hidden


def active_params(arch: ModelArch) -> int:
    """Parameters a token passes through (MoE: only its experts); what FLOPs scale with."""
    return count_params(**_dims(arch), num_experts=max(1, arch.experts_per_token), qkv_bias=arch.qkv_bias)


def _dims(arch: ModelArch) -> dict[str, Any]:
    return {
        "layers": arch.layers,
        "hidden": arch.hidden,
        "intermediate": arch.intermediate,
        "heads": arch.heads,
        "kv_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "vocab": arch.vocab,
        "tied_embeddings": arch.tied_embeddings,
    }


@lru_cache(maxsize=1)
def _registry() -> tuple[ModelArch, ...]:
    rows: list[ModelArch] = []
    with DATA_CSV.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            experts, per_tok = _MOE.get(r["model_id"], (1, 1))
            notes = r.get("notes", "")
            rows.append(
                ModelArch(
                    id=r["model_id"],
                    params_b=float(r["params_b"]),
                    layers=int(r["layers"]),
                    hidden=int(r["hidden"]),
                    intermediate=int(r["intermediate"]),
                    heads=int(r["heads"]),
                    kv_heads=int(r["kv_heads"]),
                    head_dim=int(r["head_dim"]),
                    vocab=int(r["vocab"]),
                    tied_embeddings=r["tied_embeddings"].strip().lower() == "true",
                    max_pos=int(r["max_pos"]),
                    num_experts=experts,
                    experts_per_token=per_tok,
                    qkv_bias="q/k/v have bias" in notes,
                    source="registry",
                )
            )
    return tuple(rows)


def known_models() -> list[ModelArch]:
    """Every model of the bundled registry, in the CSV's order."""
    return list(_registry())


def _by_key() -> dict[str, ModelArch]:
    table: dict[str, ModelArch] = {}
    for m in _registry():
        table.setdefault(m.id.lower(), m)
    for m in _registry():  # the id without its org, unless two orgs share a name
        table.setdefault(m.id.split("/", 1)[-1].lower(), m)
    return table


def _suggest(ref: str) -> str:
    names = [m.id for m in _registry()] + [m.id.split("/", 1)[-1] for m in _registry()] + list(SHORTHANDS)
    lowered = {n.lower(): n for n in names}
    near: list[str] = []
    for probe in dict.fromkeys([ref.lower(), *(c.lower() for c in _variant_candidates(ref))]):
        near += [n for n in difflib.get_close_matches(probe, list(lowered), n=3, cutoff=0.5) if n not in near]
    return f"did you mean {', '.join(lowered[n] for n in near[:3])}? " if near else ""


# Fine-tuned variants keep their base's architecture: a suffix token naming the tuning, not the shape.
_VARIANT_TOKEN = re.compile(r"-(?:instruct|chat|it|sft|dpo|rlhf)(?=-|$)", re.IGNORECASE)
_DATE_TAIL = re.compile(r"-\d{4}$")  # Qwen3-4B-Instruct-2507
# A base id may carry a marker its variants drop (gemma-3-12b-pt -> gemma-3-12b-it, Llama-2-7b-hf -> -chat-hf).
_BASE_TAILS = ("", "-pt", "-hf", "-v0.1", "-base")


def _variant_candidates(ref: str) -> list[str]:
    """Ids the base of a variant may have: Qwen2.5-7B-Instruct -> Qwen2.5-7B, gemma-2-9b-it -> gemma-2-9b,
    Mistral-7B-Instruct-v0.3 -> Mistral-7B-v0.3, Llama-2-13b-chat-hf -> Llama-2-13b-hf."""
    org, _, name = ref.rpartition("/")
    stripped = _VARIANT_TOKEN.sub("", name)
    if stripped == name:
        return []
    out: list[str] = []
    for base in dict.fromkeys([stripped, _DATE_TAIL.sub("", stripped)]):
        for tail in _BASE_TAILS:
            if tail and base.lower().endswith(tail):
                continue
            cand = base + tail
            out.append(f"{org}/{cand}" if org else cand)
    return out


def _base_of_variant(ref: str) -> ModelArch | None:
    table = _by_key()
    for cand in _variant_candidates(ref):
        hit = table.get(cand.lower())
        if hit is not None:
            return replace(hit, id=ref, source=f"registry (architecture of its base {hit.id})")
    return None


# ---------------------------------------------------------------------------------------------
# The local Hugging Face hub cache (what `huggingface-cli download` and from_pretrained fill)


def hf_hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, by its own precedence (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); read without importing it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hf_cached_config(model_id: str) -> Path | None:
    """The config.json of `model_id` in the local HF cache: the snapshot refs/main points at, else the newest
    snapshot holding one. A bare name (no org) matches models--*--name. Case-insensitive; None if absent."""
    root = hf_hub_cache_dir()
    try:
        dirs = [d for d in root.iterdir() if d.name.startswith("models--")]
    except OSError:
        return None
    want = model_id.lower().replace("/", "--")
    repos = [d for d in dirs if d.name[len("models--"):].lower() == want]
    if not repos and "/" not in model_id:
        repos = [d for d in dirs if d.name.lower().endswith("--" + want)]
    for repo in repos:
        ref = repo / "refs" / "main"
        try:
            rev = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
        except OSError:
            rev = ""
        if rev and (repo / "snapshots" / rev / "config.json").is_file():
            return repo / "snapshots" / rev / "config.json"
        snaps = sorted((p for p in (repo / "snapshots").glob("*/config.json") if p.is_file()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        if snaps:
            return snaps[0]
    return None


def _from_hf_cache(model_id: str) -> ModelArch | None:
    file = hf_cached_config(model_id)
    if file is None:
        return None
    repo_id = file.parents[2].name[len("models--"):].replace("--", "/", 1)
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
        return arch_from_config(cfg, model_id=repo_id, source=f"hf cache ({file})")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot parse the cached config {str(file)!r} of {model_id!r} ({err.__class__.__name__}); "
                        f"delete it or re-download with `huggingface-cli download {repo_id} config.json`") from None
    except ValueError as err:
        raise UserError(f"the cached config {str(file)!r} of {model_id!r} is not a usable model config: {err}; "
                        "pass a decoder-only Hugging Face config.json") from None


_CONFIG_ROUTE = ("or fetch its config once with `huggingface-cli download ORG/NAME config.json` (then it resolves "
                 "offline from the HF cache), or pass a local config.json path or a size like 8b")


def resolve_model(ref: str, *, allow_network: bool = True) -> ModelArch:
    """The architecture behind a `--model` value. Raises UserError (one line, what to do) on failure."""
    ref = (ref or "").strip()
    if not ref:
        raise UserError("--model is empty; pass a size such as 8b, a model id such as meta-llama/Llama-3.1-8B, "
                        "or a config.json path")
    if ref.startswith("tiny:"):
        from cloudtune import tiny

        return tiny.arch(ref)
    size = _shorthand(ref)
    if size is not None:
        return size
    hit = _by_key().get(ref.lower())
    if hit is not None:
        return hit
    path = Path(ref).expanduser()
    if path.is_dir() or path.suffix == ".json" or ref.startswith((".", "/", "~")):
        return _from_local(path, ref)
    if re.fullmatch(r"[\w.\-]+(?:/[\w.\-]+)?", ref):
        cached = _from_hf_cache(ref)  # the model's own config beats a base's shape
        if cached is not None:
            return cached
        base = _base_of_variant(ref)
        if base is not None:
            return base
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", ref):
        return _from_hub(ref, allow_network=allow_network)
    raise UserError(
        f"unknown model {ref!r}; {_suggest(ref)}use a size (8b, 70b, 8x7b), a model id from `cloudtune models`, "
        "a hub id (org/name), a model in the local HF cache, or a config.json path"
    )


def _shorthand(ref: str) -> ModelArch | None:
    m = _SIZE_RE.match(ref.lower())
    if not m:
        return None
    key = ref.lower()
    if key in SHORTHANDS:
        return _by_key()[SHORTHANDS[key].lower()]
    experts, size = m.group(1), float(m.group(2))
    sizes = ", ".join(SHORTHANDS)
    if experts:
        raise UserError(f"no representative MoE model for {ref!r}; known MoE sizes: 8x7b (or pass a config.json)")
    best = None
    for short, model_id in SHORTHANDS.items():
        if "x" in short:
            continue
        s = float(short[:-1])
        ratio = max(s, size) / min(s, size) if size > 0 else float("inf")
        if ratio <= SHORTHAND_TOLERANCE and (best is None or ratio < best[0]):
            best = (ratio, model_id)
    if best is None:
        raise UserError(f"no representative model near {ref!r}; use one of {sizes}, a model id or a config.json path")
    return _by_key()[best[1].lower()]


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


_TIED_BY_DEFAULT = ("gemma", "gpt2", "gpt_neo", "bloom", "opt", "phi")


def arch_from_config(cfg: dict[str, Any], *, model_id: str, source: str) -> ModelArch:
    """A ModelArch from a Hugging Face config.json dict (Llama, Qwen, Mistral, Mixtral, Gemma, Phi, GLM,
    DeepSeek-style MoE...). Raises ValueError naming the missing or bad field."""
    if not isinstance(cfg, dict):
        raise ValueError("it is not a JSON object")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma 3, Llava...): the text backbone
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type", ""))}
    model_type = str(cfg.get("model_type", "")).lower()

    def need(name: str, *keys: str) -> int:
        v = _first(cfg, *keys)
        if v is None:
            raise ValueError(f"it has no {keys[0]}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 or int(v) != v:
            raise ValueError(f"{keys[0]} is {v!r}, expected a positive integer")
        return int(v)

    layers = need("layers", "num_hidden_layers", "n_layer", "num_layers")
    hidden = need("hidden", "hidden_size", "n_embd", "d_model")
    heads = need("heads", "num_attention_heads", "n_head")
    vocab = need("vocab", "vocab_size", "padded_vocab_size")
    kv_heads = _first(cfg, "num_key_value_heads", "multi_query_group_num", "num_kv_heads") or heads
    head_dim = _first(cfg, "head_dim", "kv_channels") or hidden // heads
    experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts") or 1)
    per_tok = int(_first(cfg, "num_experts_per_tok", "moe_topk", "top_k") or 1) if experts > 1 else 1
    if experts > 1 and _first(cfg, "moe_intermediate_size") is not None:
        intermediate = need("intermediate", "moe_intermediate_size")
    else:
        intermediate = _first(cfg, "intermediate_size", "ffn_hidden_size", "n_inner")
        intermediate = int(intermediate) if intermediate else 4 * hidden
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type.startswith(_TIED_BY_DEFAULT)
    max_pos = int(_first(cfg, "max_position_embeddings", "n_positions", "seq_length", "max_sequence_length") or 4096)
    qkv_bias = bool(_first(cfg, "attention_bias", "qkv_bias", "add_qkv_bias")) or model_type == "qwen2"
    for name, v in (("num_key_value_heads", kv_heads), ("head_dim", head_dim), ("intermediate_size", intermediate)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} is {v!r}, expected a positive integer")
    params = count_params(
        layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=int(kv_heads),
        head_dim=int(head_dim), vocab=vocab, tied_embeddings=bool(tied), num_experts=experts, qkv_bias=qkv_bias,
    )
    return ModelArch(
        id=model_id,
        params_b=round(params / 1e9, 3),
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab=vocab,
        tied_embeddings=bool(tied),
        max_pos=max_pos,
        num_experts=experts,
        experts_per_token=per_tok,
        qkv_bias=qkv_bias,
        source=source,
    )


def _from_local(path: Path, ref: str) -> ModelArch:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"cannot read model config {ref!r}: no such file {str(file)!r}; "
                        "pass a directory holding config.json, a config.json path, a model id or a size like 8b")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot parse {str(file)!r} as JSON ({err.__class__.__name__}: {err}); "
                        "pass a Hugging Face config.json") from None
    model_id = cfg.get("_name_or_path") if isinstance(cfg, dict) else None
    try:
        return arch_from_config(cfg, model_id=str(model_id or file.parent.name or file.name), source=str(file))
    except ValueError as err:
        raise UserError(f"config {str(file)!r} is not a usable model config: {err}; "
                        "pass a decoder-only Hugging Face config.json") from None


def _cache_file(model_id: str) -> Path:
    from cloudtune.home import cache_dir

    return cache_dir() / "models" / model_id.replace("/", "--") / "config.json"


def _from_hub(model_id: str, *, allow_network: bool) -> ModelArch:
    cached = _cache_file(model_id)
    if cached.is_file():
        try:
            return arch_from_config(json.loads(cached.read_text(encoding="utf-8")), model_id=model_id,
                                    source=f"hub (cached {cached})")
        except (ValueError, json.JSONDecodeError):
            cached.unlink(missing_ok=True)
    hint = _suggest(model_id)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not allow_network:
        why = "HF_HUB_OFFLINE is set" if offline else "the network is not allowed here"
        raise UserError(f"cannot fetch config.json for {model_id!r}: {why} and it is not in the HF cache "
                        f"({hf_hub_cache_dir()}); {hint}{_CONFIG_ROUTE.replace('ORG/NAME', model_id)}")
    cfg = fetch_hub_config(model_id)
    try:
        arch = arch_from_config(cfg, model_id=model_id, source="hub")
    except ValueError as err:
        raise UserError(f"the hub's config.json for {model_id!r} is not a usable model config: {err}; "
                        "pass a local config.json path or a size like 8b") from None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg), encoding="utf-8")
        tmp.replace(cached)
    except OSError:
        pass  # a cache we cannot write is only slower next time
    return arch


def fetch_hub_config(model_id: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET <HF_ENDPOINT>/<id>/resolve/main/config.json (with HF_TOKEN when set). UserError otherwise."""
    import httpx

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{model_id}/resolve/main/config.json"
    headers = {"User-Agent": "cloudtune"}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s, follow_redirects=True)
    except httpx.HTTPError:
        raise UserError(f"cannot fetch config.json for {model_id!r}: network unreachable ({endpoint}); "
                        f"{_suggest(model_id)}pass a local config.json path or a size like 8b") from None
    if resp.status_code in (401, 403):
        raise UserError(f"cannot fetch config.json for {model_id!r}: the hub answered {resp.status_code} "
                        "(gated or private); set HF_TOKEN with access to it, or pass a local config.json path")
    if resp.status_code == 404:
        raise UserError(f"unknown model {model_id!r}: the hub has no such repo; {_suggest(model_id)}"
                        "check the id, or pass a local config.json path or a size like 8b")
    if resp.status_code != 200:
        raise UserError(f"cannot fetch config.json for {model_id!r}: the hub answered {resp.status_code}; "
                        "retry later, or pass a local config.json path or a size like 8b")
    try:
        cfg = resp.json()
    except ValueError:
        raise UserError(f"the hub's config.json for {model_id!r} is not JSON; pass a local config.json path") from None
    return cfg
