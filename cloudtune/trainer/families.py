"""What model families need from the trainer: attention kernel, MoE adapters, router settings.

Why a module: these rules depend only on the model's config (model_type, experts), so they run
both in `cloudtune run`'s validation (config.json is local for tiny:, folders and the HF cache) and
on the machine before the model loads, and each is tested on a tiny model of the family
(tests/test_families_train.py).

- Gemma2 has no SDPA kernel in transformers (it soft-caps attention logits): `eager` unless the
  user asked for an attention kernel; asking for `sdpa` is bad input naming `training.attention: eager`.
- Mixture-of-experts (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5) hold their experts as fused
  3-D parameters. PEFT adapts them through `target_parameters` (its ParamWrapper), which refuses
  LoRA dropout, and PEFT's "all-linear" also puts an adapter on the router (`gate`), which should
  stay as trained (adapting it reshuffles which experts see which tokens). So on an MoE model
  cloudtune lists the targets itself: the linear projections (attention, shared experts) as
  target_modules, the fused expert tensors as target_parameters, never the router, and LoRA
  dropout 0 (with a log line when the spec asked for more).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cloudtune.errors import SpecError

log = logging.getLogger("cloudtune.trainer")

NO_SDPA = ("gemma2",)  # model types whose attention transformers cannot run through SDPA
# module names of MoE routers (Mixtral, Qwen-MoE, DeepSeek-style) and Qwen2-MoE's shared-expert gate
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def local_config(model: str) -> dict[str, Any] | None:
    """config.json of the model when it is on this machine (tiny:, a folder, the HF cache)."""
    from cloudtune import tiny

    if tiny.is_tiny_ref(model):
        return {"model_type": "llama"}
    p = Path(model).expanduser()
    if p.is_dir():
        f = p / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    if "/" not in model or "://" in model:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id or no cache
        return None
    return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None


def model_type(config: dict[str, Any] | None) -> str:
    cfg = config or {}
    return str(cfg.get("model_type") or (cfg.get("text_config") or {}).get("model_type") or "")


def attention(spec: Any, config: dict[str, Any] | None) -> str:
    """The attn_implementation to load with; a SpecError when the asked-for one cannot run."""
    mtype = model_type(config)
    asked = "attention" in spec.training.model_fields_set
    if mtype in NO_SDPA and spec.training.attention == "sdpa":
        if asked:
            raise SpecError(f"training.attention: sdpa does not run {mtype} models (transformers has no SDPA "
                            f"kernel for their soft-capped attention); set training.attention: eager")
        return "eager"
    return spec.training.attention


def check(spec: Any, config: dict[str, Any] | None) -> list[str]:
    """Validation-time family checks; returns notes (what the trainer will adjust)."""
    notes = []
    if attention(spec, config) != spec.training.attention:
        notes.append(f"{model_type(config)}: training.attention eager (no SDPA kernel for this family)")
    if is_moe_config(config) and spec.method != "full" and spec.lora.dropout:
        notes.append(f"{model_type(config)} is a mixture of experts: lora.dropout {spec.lora.dropout} -> 0 "
                     f"(PEFT's expert adapters take no dropout)")
    return notes


def is_moe_config(config: dict[str, Any] | None) -> bool:
    cfg = config or {}
    return any(int(cfg.get(k) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def expert_parameters(model: Any) -> list[str]:
    """Names (relative to their module, e.g. 'experts.gate_up_proj') of fused 3-D expert weights."""
    found = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.ndim == 3 and "experts" in parts:
            found.add(".".join(parts[parts.index("experts"):]))
    return sorted(found)


def _is_router(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in ROUTER_NAMES and len(parts) > 1 and parts[-2] in ("mlp", "block_sparse_moe", "moe")


def moe_lora(model: Any, targets: str | list[str], dropout: float) -> dict[str, Any] | None:
    """LoraConfig arguments for an MoE model (None for a dense one): explicit targets without the
    router, fused experts as target_parameters, dropout 0."""
    experts = expert_parameters(model)
    if not experts:
        return None
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if type(m).__name__ == "Linear" and not _is_router(n) and "lm_head" not in n}
    if targets == "all-linear":
        modules = sorted(linear_names)
    elif targets == "attention":
        from cloudtune.trainer.train import ATTENTION_MODULES

        modules, experts = [t for t in ATTENTION_MODULES if t in linear_names], []
    else:
        wanted = set(targets)
        chosen = [e for e in experts if e.rsplit(".", 1)[-1] in wanted]
        modules = sorted(wanted & linear_names)
        missing = wanted - linear_names - {e.rsplit(".", 1)[-1] for e in chosen}
        if missing:
            raise SpecError(f"lora.targets {sorted(missing)} match no linear layer or expert weight of "
                            f"{model.config.model_type} (the router is never adapted); available: "
                            f"{', '.join(sorted(linear_names | {e.rsplit('.', 1)[-1] for e in experts}))}")
        experts = chosen
    if dropout:
        log.info("mixture of experts: lora.dropout %s -> 0 (PEFT's expert adapters take no dropout)", dropout)
    return {"target_modules": modules, "target_parameters": experts or None, "lora_dropout": 0.0}


def stop_router_logits(model: Any) -> None:
    """TRL turns on output_router_logits for the aux loss; off again after training, so held-out
    generation and a saved full fine-tune's config.json are the model's own (batched generate works)."""
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        cfg = getattr(m, "config", None)
        if cfg is None:
            continue
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for c in {id(cfg): cfg, id(text): text}.values():
            if getattr(c, "output_router_logits", False):
                c.output_router_logits = False


def quantized_share(model: Any) -> float | None:
    """Share of the transformer blocks' weight elements held in bitsandbytes 4/8-bit layers; None
    without any. On MoE models the fused experts stay 16-bit (bnb quantizes nn.Linear only), so
    this is what a planner's 4-bit budget must be checked against."""
    total = quant = 0
    for name, p in model.named_parameters():
        if ".layers." not in name or "lora_" in name or p.ndim < 2:
            continue
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # packed: 2 values a byte
        total += n
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            quant += n
    return round(quant / total, 4) if total and quant else None


def keep_adapter_dtype_on_resume(model: Any) -> None:
    """QLoRA resume, bitwise: TRL casts a quantized model's LoRA weights to bf16 (the QLoRA paper's
    recipe) when the trainer is built, but HF Trainer's resume reloads the adapter with PEFT's
    load_adapter, whose default autocast_adapter_dtype=True upcasts them to fp32, so the resumed
    run trains in another precision than the uninterrupted one (different from the first step
    after resume). This makes this model's load_adapter keep the dtype the trainer set."""
    import functools

    load = getattr(type(model), "load_adapter", None)
    if load is None or not hasattr(model, "peft_config"):
        return
    model.load_adapter = functools.partial(load, model, autocast_adapter_dtype=False)
