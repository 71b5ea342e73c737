"""A tiny Llama whose tokenizer llama.cpp's converter accepts, and a LoRA adapter on it (export tests).

Why not tiny.py's model: its character-level WordLevel tokenizer is refused by convert_hf_to_gguf.py
(not sentencepiece, not a Llama BPE with byte fallback, and its pre-tokenizer hash is unknown:
"BPE pre-tokenizer was not recognized"). This one is a Llama-2-style BPE (byte_fallback, "▁" for
spaces, a Sequence decoder), trained here on a few sentences; the converter reads it through
gguf's LlamaHfVocab as tokenizer model "llama".
"""

from __future__ import annotations

from pathlib import Path

TEXT = ["Reverse the string.", "abcdefgh hgfedcba", "Add the two numbers.", "12+30 = 42",
        "The quick brown fox jumps over the lazy dog."] * 20


def build_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_max_length=256)
    fast.chat_template = ("{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")
    return fast


def save_bpe_llama(dest: Path, seed: int = 3) -> Path:
    """A 2-layer random LlamaForCausalLM + the BPE tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_bpe_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def save_random_adapter(base_dir: Path, dest: Path, seed: int = 4) -> Path:
    """A LoRA adapter on base_dir with non-zero B (PEFT starts B at zero, which would merge to the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(dest)
    return dest
