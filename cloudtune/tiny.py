"""A tiny random-weight Llama and toy tasks it learns in seconds on a CPU.

Why: the quickstart, the tests and the benchmarks must train a real model end to end (TRL, PEFT,
bitsandbytes, checkpoints, resume) without the model hub and without a GPU. A model ref
`tiny:<task>` (e.g. `tiny:reverse`) in a JobSpec means "build this model once, deterministically,
into $CLOUDTUNE_HOME/cache/tiny/<task>/ and load it from there with from_pretrained".

The tokenizer is character-level over printable ASCII (built with `tokenizers`, saved as a
PreTrainedTokenizerFast with bos/eos/pad and a small chat template), so every task's text and any
alpaca-style instruction round-trips exactly. The model is the same for every task; the task only
names the dataset it is meant for and seeds nothing else, so `tiny:reverse` is reproducible
byte for byte.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions that need
them: the planner imports this module to resolve `tiny:` refs and must stay fast.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError

PREFIX = "tiny:"
SEED = 1234

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
# Every printable ASCII character (letters, digits, punctuation, space, \t\n\r...), one token each.
CHARS = [c for c in string.printable if c not in "\x0b\x0c"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Model dimensions: small enough to train a few steps per second on 2 CPU cores, large enough that
# bitsandbytes' 4-bit blocks (64 values) and LoRA targets behave as on a real Llama.
DIMS: dict[str, Any] = {
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "max_pos": 512,
    "tied_embeddings": False,
}

# Init std of the random weights. LoRA leaves embeddings and lm_head frozen, so the base must make
# both possible for a low-rank update: quiet layers (HF's default 0.02, so the random blocks do not
# drown what the adapter writes into the residual stream) and a loud lm_head (0.5, so a hidden state
# the adapter aligns with one row gives a sharp distribution; at 0.02 the logits cannot exceed ~1.3
# and no adapter can make the model confident). With 0.2 everywhere (the earlier setting) a LoRA run
# learned only the output alphabet; with these it learns to reverse unseen strings (docs/trainer.md).
INIT_RANGE = 0.02
HEAD_INIT_RANGE = 0.5

# The reverse task: short strings over a small alphabet, so a 2-layer model learns the
# position-dependent copy in a few hundred CPU steps (and 3-6 letters still make 37k distinct inputs).
REVERSE_ALPHABET = string.ascii_lowercase[:8]
REVERSE_LENGTHS = (3, 6)

INSTRUCTIONS = {
    "reverse": "Reverse the string.",
    "add": "Add the two numbers.",
}
TASKS = tuple(INSTRUCTIONS)


def is_tiny_ref(ref: str) -> bool:
    return ref.startswith(PREFIX)


def task_of(ref: str) -> str:
    """The task of a `tiny:<task>` ref, with a clear error for an unknown one."""
    task = ref[len(PREFIX):] if is_tiny_ref(ref) else ref
    if task not in INSTRUCTIONS:
        raise UserError(f"unknown tiny model {ref!r}; use one of {', '.join(PREFIX + t for t in TASKS)}")
    return task


def vocab() -> dict[str, int]:
    """Token -> id: the special tokens first, then one id per printable character."""
    tokens = SPECIAL_TOKENS + CHARS
    return {tok: i for i, tok in enumerate(tokens)}


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(CHARS)


def param_count() -> int:
    """Parameters of the tiny Llama, computed from the dims (no torch needed)."""
    h, i, layers = DIMS["hidden"], DIMS["intermediate"], DIMS["layers"]
    head_dim = h // DIMS["heads"]
    kv = DIMS["kv_heads"] * head_dim
    attn = h * h * 2 + h * kv * 2  # q, o + k, v
    mlp = 3 * h * i
    norms = 2 * h
    embed = vocab_size() * h
    lm_head = 0 if DIMS["tied_embeddings"] else vocab_size() * h
    return layers * (attn + mlp + norms) + embed + lm_head + h


def arch(ref: str = "tiny:reverse") -> Any:
    """The planner's ModelArch for a `tiny:` ref (import-light: no torch)."""
    from cloudtune.planner.types import ModelArch

    task_of(ref)
    return ModelArch(
        id=ref,
        params_b=param_count() / 1e9,
        layers=DIMS["layers"],
        hidden=DIMS["hidden"],
        intermediate=DIMS["intermediate"],
        heads=DIMS["heads"],
        kv_heads=DIMS["kv_heads"],
        head_dim=DIMS["hidden"] // DIMS["heads"],
        vocab=vocab_size(),
        tied_embeddings=DIMS["tied_embeddings"],
        max_pos=DIMS["max_pos"],
        source="tiny",
    )


# ----------------------------------------------------------------------------------------- data


def make_records(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n alpaca records (instruction/input/output) for a task, the same for the same seed."""
    task = task_of(task)
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        if task == "reverse":
            length = rng.randint(*REVERSE_LENGTHS)
            s = "".join(rng.choice(REVERSE_ALPHABET) for _ in range(length))
            out.append({"instruction": INSTRUCTIONS[task], "input": s, "output": s[::-1]})
        else:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            out.append({"instruction": INSTRUCTIONS[task], "input": f"{a}+{b}", "output": str(a + b)})
    return out


def make_preference_records(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n preference records (prompt/chosen/rejected): the right answer against a plausible wrong one."""
    recs = make_records(task, n, seed)
    out = []
    for r in recs:
        wrong = r["input"] if task_of(task) == "reverse" else str(int(r["output"]) + 1)
        out.append(
            {"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"], "rejected": wrong}
        )
    return out


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return p


# ---------------------------------------------------------------------------------------- model


def build_tokenizer() -> Any:
    """A char-level PreTrainedTokenizerFast with bos/eos/pad/unk and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocab()
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=DIMS["max_pos"],
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(seed: int = SEED) -> Any:
    """The tiny random-weight LlamaForCausalLM, identical for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    v = vocab()
    config = LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=DIMS["hidden"],
        intermediate_size=DIMS["intermediate"],
        num_hidden_layers=DIMS["layers"],
        num_attention_heads=DIMS["heads"],
        num_key_value_heads=DIMS["kv_heads"],
        max_position_embeddings=DIMS["max_pos"],
        tie_word_embeddings=DIMS["tied_embeddings"],
        bos_token_id=v["<s>"],
        eos_token_id=v["</s>"],
        pad_token_id=v["<pad>"],
        initializer_range=INIT_RANGE,
        dtype="float32",
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if HEAD_INIT_RANGE != INIT_RANGE:
            with torch.no_grad():
                model.lm_head.weight.normal_(0.0, HEAD_INIT_RANGE)
    finally:
        torch.random.set_rng_state(state)
    return model


def _stamp(seed: int = SEED) -> str:
    """What a cached tiny model was built from; a different stamp means rebuild."""
    return json.dumps({"seed": seed, "dims": DIMS, "init_range": INIT_RANGE, "head_init_range": HEAD_INIT_RANGE, "vocab": vocab_size()}, sort_keys=True)


def save_tiny(dest: str | Path, seed: int = SEED) -> Path:
    """Write model + tokenizer to dest (save_pretrained), atomically: a half-built folder never shows."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        # Not model.save_pretrained: once torch.distributed is initialized it writes on global rank 0
        # only, and the rank that builds the cache under the lock (one per node) may be any rank; a
        # folder without weights failed every rank. Same bytes as save_pretrained (checked).
        from safetensors.torch import save_model

        model = build_model(seed)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        build_tokenizer().save_pretrained(tmp)
        (tmp / "cloudtune_tiny.json").write_text(_stamp(seed))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: keep theirs (same bytes)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_tiny_model(ref: str, cache: str | Path | None = None) -> Path:
    """The local folder of a `tiny:<task>` model, built on first use."""
    task = task_of(ref)
    if cache is None:
        from cloudtune.home import cache_dir

        cache = cache_dir() / "tiny"
    dest = Path(cache) / task
    stamp = dest / "cloudtune_tiny.json"
    if stamp.is_file() and stamp.read_text() == _stamp():
        return dest
    # One builder at a time (the ranks of a distributed job all start here at once): the others wait
    # for it and then find its folder, instead of racing a rebuild against a reader.
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{task}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file():
            if stamp.read_text() == _stamp():
                return dest
            shutil.rmtree(dest, ignore_errors=True)  # built by an older cloudtune: rebuild
        save_tiny(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m cloudtune.tiny data reverse -n 300 -o examples/data/reverse.jsonl` or `model DIR`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cloudtune.tiny", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write a task's alpaca JSONL")
    d.add_argument("task", choices=TASKS)
    d.add_argument("-n", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preference", action="store_true", help="prompt/chosen/rejected records")
    d.add_argument("-o", "--out", required=True)
    m = sub.add_parser("model", help="save the tiny model + tokenizer to a folder")
    m.add_argument("dest")
    args = ap.parse_args(argv)
    if args.cmd == "data":
        make = make_preference_records if args.preference else make_records
        print(write_jsonl(make(args.task, args.n, args.seed), args.out))
    else:
        print(save_tiny(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
