"""Tiny transformers reference models, saved as HF checkpoints (sharded with a small max_shard_size)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 96


def hf_config(family: str, kv_heads: int = 2, tied: bool = False, layers: int = 2, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, eos_token_id=1, bos_token_id=0)
    common.update(extra)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        common.setdefault("head_dim", 16)  # explicit head_dim != hidden/heads, as in released Qwen3
        return transformers.Qwen3Config(**common)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    raise ValueError(family)


def make_hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # Random non-trivial norms and biases so that parity exercises them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_hf(model, path, max_shard_size="20KB", dtype=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    return path


def left_padded_batch(seed: int = 0, batch: int = 3, seq: int = 7, vocab: int = VOCAB):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    for b, pad in enumerate([0, 2, 4][:batch]):
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    return ids, mask, positions


def hf_greedy_completions(model_dir, tokenizer_dir, prompts, max_new_tokens: int, eos_token_id: int = 0) -> list[str]:
    """transformers end to end: its tokenizer (left padding), greedy `generate`, the new tokens decoded."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
