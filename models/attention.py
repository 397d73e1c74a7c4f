"""Grouped-query self-attention with rotary embeddings (Qwen2, Qwen3, Llama)."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .config import ModelConfig
from .layers import Linear, RMSNorm, apply_rotary


class AttentionOutput(eqx.Module):
    """What one attention block returns: its output, and the per-head probabilities and q/k/v when asked."""

    output: Float[Array, "batch seq embed"]
    probs: Float[Array, "batch heads seq seq"] | None
    qkv: tuple[Array, Array, Array] | None


class Attention(eqx.Module):
    """Causal GQA self-attention. Query head `h` reads key/value head `h // (heads // kv_heads)`, as
    transformers' `repeat_kv` does. Qwen3 normalises each head's q and k (RMSNorm over head_dim) before RoPE.
    Scores, masking and softmax are float32 whatever the compute dtype."""

    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        d, h, g, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = Linear(d, h * hd, use_bias=config.qkv_bias, key=kq, std=0.02)
        self.k_proj = Linear(d, g * hd, use_bias=config.qkv_bias, key=kk, std=0.02)
        self.v_proj = Linear(d, g * hd, use_bias=config.qkv_bias, key=kv, std=0.02)
        self.o_proj = Linear(h * hd, d, use_bias=config.o_bias, key=ko, std=0.02)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, hd

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        cos: Float[Array, "batch seq head_dim"],
        sin: Float[Array, "batch seq head_dim"],
        mask: Bool[Array, "batch 1 1 seq seq"],
        *,
        output_attentions: bool = False,
        output_qkv: bool = False,
    ) -> AttentionOutput:
        b, s, _ = x.shape
        h, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(b, s, h, hd)
        k = self.k_proj(x).reshape(b, s, g, hd)
        v = self.v_proj(x).reshape(b, s, g, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        # [b, s, kv, group, hd]: query heads grouped under the kv head they share.
        qg = q.reshape(b, s, g, h // g, hd)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(hd))
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        # A query row with no valid key (a left-pad position) attends to nothing rather than uniformly.
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(b, s, h * hd)
        return AttentionOutput(
            output=self.o_proj(out),
            probs=probs.reshape(b, h, s, s) if output_attentions else None,
            qkv=(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if output_qkv else None,
        )
