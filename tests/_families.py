"""Tiny random-weight models of real families, each with its real chat template and a trained tokenizer.

Why: the trainer must work on the model families users bring (their chat templates, fused
projections, experts, soft-capping, sliding windows), and no test may fetch a model. So each family
is built here from transformers' own config class (2 layers, 64 wide), with a byte-level BPE
tokenizer trained with `tokenizers` on the family test data plus the family's special tokens, and
the family's real chat template: TRL ships the originals in `trl/chat_templates/` (read from the
installed package, so the test follows TRL's copy); for Mistral, which TRL lacks, the template is
copied below from the model's tokenizer_config.json.

`build_family(name, root)` writes `root/<name>/` once (a stamp file marks a finished build), so a
session builds each family at most once (tests/test_families*.py use a session-scoped cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAMP = "cloudtune_family.json"
VERSION = 1  # bump to rebuild cached families

# Mistral-7B-Instruct-v0.2, tokenizer_config.json "chat_template" (huggingface.co/mistralai/
# Mistral-7B-Instruct-v0.2, the same template also ships with Mixtral-8x7B-Instruct-v0.1): user and
# assistant turns must alternate, a system turn is refused, the assistant turn ends with eos.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """What differs between families: config class, template, special tokens and the end of a turn."""

    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    template: str  # a file name in trl/chat_templates/ or "mistral"
    bos: str | None
    eos: str
    pad: str | None
    eot: str  # the token that ends an assistant turn (what the model must learn to emit)
    specials: tuple[str, ...]
    system: bool = True  # does the template accept a system turn?
    moe: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    gen_eos: tuple[str, ...] = ()  # generation_config stop tokens besides eos


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>",
           None, "<|eot_id|>", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "qwen2_5.jinja", None, "<|im_end|>", "<|endoftext|>",
           "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>",
           "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
           extra={"head_dim": 16}),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "mistral", "<s>", "</s>", None, "</s>",
           ("<unk>", "<s>", "</s>"), system=False),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "gemma.jinja", "<bos>", "<eos>", "<pad>",
           "<end_of_turn>", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
           system=False, extra={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
           gen_eos=("<end_of_turn>",)),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3.jinja", "<bos>", "<eos>", "<pad>",
           "<end_of_turn>", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
           extra={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
           gen_eos=("<end_of_turn>",)),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "phi3.jinja", "<s>", "<|endoftext|>", "<|endoftext|>",
           "<|end|>", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                       "<|user|>"), gen_eos=("<|end|>",)),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3.jinja", None, "<|im_end|>",
           "<|endoftext|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
           moe=True, extra={"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
]}


def template_text(fam: Family) -> str:
    if fam.template == "mistral":
        return MISTRAL_TEMPLATE
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / fam.template).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ data

LETTERS = "abcdefgh"


def _word(i: int, n: int = 4) -> str:
    return "".join(LETTERS[(i * 7 + k * 3) % len(LETTERS)] for k in range(n - i % 2))


def conversations(n: int = 24, system: bool = True) -> list[list[dict[str, str]]]:
    """n two-round conversations (system prompt optional): reverse a word, then say its length."""
    out = []
    for i in range(n):
        w = _word(i)
        msgs = [{"role": "system", "content": "You reverse strings."}] if system and i % 2 == 0 else []
        msgs += [{"role": "user", "content": f"Reverse {w}"}, {"role": "assistant", "content": w[::-1]},
                 {"role": "user", "content": "How long is it?"}, {"role": "assistant", "content": f"{len(w)} letters"}]
        out.append(msgs)
    return out


def corpus() -> list[str]:
    """The text the tokenizers are trained on: every string the test data holds, many times."""
    texts = []
    for conv in conversations(40):
        texts += [m["content"] for m in conv]
    texts += ["Reverse the string.", "Reverse", "user", "assistant", "system", "model", "letters", "How long is it?",
              "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024", "You are Qwen, created by "
              "Alibaba Cloud. You are a helpful assistant.", "[INST]", "[/INST]", "lookup", "arguments", "name"]
    return texts * 4


# ------------------------------------------------------------------------------------- building


def build_tokenizer(fam: Family) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(fam.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    kw = {k: v for k, v in (("bos_token", fam.bos), ("eos_token", fam.eos), ("pad_token", fam.pad)) if v}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, padding_side="right", **kw)
    fast.chat_template = template_text(fam)
    return fast


def build_model(fam: Family, tok: Any, seed: int = 1234) -> Any:
    import torch
    import transformers

    config_cls = getattr(transformers, fam.config)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("bos_token_id", fam.bos), ("pad_token_id", fam.pad)) if v}
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, eos_token_id=tok.convert_tokens_to_ids(fam.eos),
                        dtype="float32", **ids, **fam.extra)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = getattr(transformers, fam.model)(config)
    finally:
        torch.random.set_rng_state(state)
    stops = [tok.convert_tokens_to_ids(fam.eos)] + [tok.convert_tokens_to_ids(t) for t in fam.gen_eos]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    return model


def build_family(name: str, root: str | Path) -> Path:
    """root/<name>/ with config, weights and tokenizer (built once; a half-built folder never shows)."""
    fam = FAMILIES[name]
    dest = Path(root) / name
    stamp = json.dumps({"version": VERSION, "family": name})
    if (dest / STAMP).is_file() and (dest / STAMP).read_text() == stamp:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{name}-"))
    try:
        tok = build_tokenizer(fam)
        build_model(fam, tok).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(stamp)
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest



def build_all(tmp_path_factory: Any) -> dict[str, Path]:
    """Every family's model folder under the session's base temp dir, each built once per session
    (the test modules' session fixtures share the folder: a second call finds the stamps)."""
    root = tmp_path_factory.getbasetemp() / "families"
    return {name: build_family(name, root) for name in FAMILIES}
