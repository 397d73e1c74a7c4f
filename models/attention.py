"""Grouped-query self-attention with rotary embeddings (Qwen2, Qwen3, Llama)."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .config import ModelConfig
from .layers import Linear, RMSNorm, apply_rotary


IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve_implementation(implementation: str, dtype, head_dim: int, need_probs: bool) -> str:
    """Which attention kernel runs: `"cudnn"` (cuDNN's fused flash attention through
    `jax.nn.dot_product_attention`) or `"xla"` (the explicit scores/softmax below, which can return the
    probabilities). `"auto"` takes cuDNN on a GPU backend for bf16/fp16 with a head_dim it supports (a multiple of
    8, at most 128) when no probabilities are asked for, and XLA otherwise."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
    fused_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128
    if implementation == "auto":
        return "cudnn" if (not need_probs and fused_ok and jax.default_backend() == "gpu") else "xla"
    if implementation == "cudnn" and (need_probs or not fused_ok):
        raise ValueError("attention implementation 'cudnn' needs bf16/fp16 inputs, a head_dim that is a multiple of "
                         "8 and at most 128, and cannot return attention probabilities")
    return implementation


class CausalMask(eqx.Module):
    """Causal attention over each row's valid keys: query `i` sees key `j` when `j <= i` and `key_valid[b, j]`,
    and, with `segment_ids` (rows packed into one sequence, each row's positions contiguous), when
    `segment_ids[b, j] == segment_ids[b, i]`: attention never crosses packed rows.

    Only the `[batch, seq]` validity (and segment ids) is held; the `[seq, seq]` pattern is built where it is
    used, from iotas and broadcast compares that XLA fuses into the masking of the scores. (A materialised
    `[batch, 1, 1, seq, seq]` mask, read by every layer, cost about a third of the attention forward on CPU.)"""

    key_valid: Bool[Array, "batch seq"]
    segment_ids: Int[Array, "batch seq"] | None = None

    def dense(self) -> Bool[Array, "batch 1 1 seq seq"]:
        s = self.key_valid.shape[-1]
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None, None] & self.key_valid[:, None, None, None, :]
        if self.segment_ids is not None:
            mask = mask & (self.segment_ids[:, None, None, :, None] == self.segment_ids[:, None, None, None, :])
        return mask

    def grouped(self, group: int, start: int = 0, stop: int | None = None) -> Bool[Array, "batch 1 queries keys"]:
        """The mask of queries `[start, stop)` stacked `group` times along the query axis against keys
        `[0, stop)`: `[b, 1, group·(stop - start), stop]` (the keys after `stop` are all masked for them)."""
        b, s = self.key_valid.shape
        stop = s if stop is None else stop
        shape = (group, stop - start, stop)
        query = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + start
        key = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
        allowed = (key <= query)[None] & self.key_valid[:, None, None, :stop]
        if self.segment_ids is not None:
            allowed = allowed & (self.segment_ids[:, None, start:stop, None] == self.segment_ids[:, None, None, :stop])
        return allowed.reshape(b, 1, group * (stop - start), stop)

    def seen(self) -> Int[Array, "batch seq"]:
        """How many valid keys query `i` sees: the valid tokens up to `i` (of its segment, with segment ids)."""
        count = jnp.cumsum(self.key_valid.astype(jnp.int32), axis=-1)
        if self.segment_ids is None:
            return count
        index = jax.lax.broadcasted_iota(jnp.int32, self.segment_ids.shape, 1)
        first = jnp.concatenate([jnp.ones_like(self.segment_ids[:, :1], bool),
                                 self.segment_ids[:, 1:] != self.segment_ids[:, :-1]], axis=-1)
        start = jax.lax.cummax(jnp.where(first, index, 0), axis=1)  # where each position's segment begins
        before = jnp.take_along_axis(count - self.key_valid.astype(jnp.int32), start, axis=-1)
        return count - before

    def row_valid(self) -> Bool[Array, "batch seq"]:
        """Whether query `i` sees any key: false at left-pad positions before a row's first real token (and at
        the padding of packed rows)."""
        return self.seen() > 0


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
        mask: CausalMask,
        *,
        output_attentions: bool = False,
        output_qkv: bool = False,
        implementation: str = "auto",
    ) -> AttentionOutput:
        b, s, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = self.project(x, cos, sin)

        resolve_implementation(implementation, q.dtype, hd, output_attentions)  # a bad request raises here
        if output_attentions:
            out, probs = self._xla_attention(q, k, v, mask, mask.row_valid(), True)
        else:
            out, probs = self.attend(q, k, v, mask, implementation=implementation), None
        return AttentionOutput(
            output=self.o_proj(out),
            probs=probs.reshape(b, h, s, s) if output_attentions else None,  # head = kv · group + g
            qkv=(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if output_qkv else None,
        )

    def project(self, x: Float[Array, "batch seq embed"], cos: Float[Array, "batch seq head_dim"],
                sin: Float[Array, "batch seq head_dim"]) -> tuple[Array, Array, Array]:
        """q `[b, s, heads, hd]`, k and v `[b, s, kv_heads, hd]`: projected, q/k-normed (Qwen3) and rotated."""
        b, s, _ = x.shape
        h, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(b, s, h, hd)
        k = self.k_proj(x).reshape(b, s, g, hd)
        v = self.v_proj(x).reshape(b, s, g, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: Float[Array, "batch seq heads head_dim"], k: Float[Array, "batch seq kv_heads head_dim"],
               v: Float[Array, "batch seq kv_heads head_dim"], mask: CausalMask, *,
               implementation: str = "auto") -> Float[Array, "batch seq heads*head_dim"]:
        """Each query head's attention output, before `o_proj` (no probabilities kept): cuDNN's fused kernel or
        XLA's causal blocks, as `resolve_implementation` picks. A query row with no valid key (a left-pad
        position) attends to nothing rather than uniformly."""
        b, s = q.shape[:2]
        row_valid = mask.row_valid()
        if resolve_implementation(implementation, q.dtype, self.head_dim, False) == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, 0], implementation="cudnn")
            return jnp.where(row_valid[..., None], out.reshape(b, s, -1), 0.0).astype(q.dtype)
        return self._xla_attention(q, k, v, mask, row_valid, False)[0]

    def decode(self, x: Float[Array, "batch 1 embed"], cos: Float[Array, "batch 1 head_dim"],
               sin: Float[Array, "batch 1 head_dim"], cache_k: Float[Array, "layers batch kv_heads slots head_dim"],
               cache_v: Float[Array, "layers batch kv_heads slots head_dim"], layer: Int[Array, ""],
               key_valid: Bool[Array, "batch slots"], slot: Int[Array, ""]) -> tuple[Array, Array, Array]:
        """One new token per row against the stacked KV cache of every layer: this token's k and v are written
        at `[layer, :, :, slot]` (nothing else of the cache is copied), then its query reads this layer's slots
        that `key_valid` marks (the prompt's real tokens and the tokens generated so far, this one included).
        Returns the block's output `[b, 1, embed]` and the updated caches."""
        b = x.shape[0]
        h, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x, cos, sin)
        at = (layer, 0, 0, slot, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3)[None].astype(cache_k.dtype), at)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3)[None].astype(cache_v.dtype), at)
        keys, values = cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype)  # [b, kv, slots, hd]
        q = q.reshape(b, g, h // g, hd)  # query head kv·group + i reads kv head kv, as in training
        scores = jnp.einsum("bkgd,bktd->bkgt", q, keys, preferred_element_type=jnp.float32) / math.sqrt(hd)
        scores = jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgt,bktd->bkgd", probs.astype(q.dtype), values)
        return self.o_proj(out.reshape(b, 1, h * hd)), cache_k, cache_v

    def _xla_attention(self, q, k, v, mask, row_valid, need_probs):
        b, s = q.shape[:2]
        h, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        group = h // g
        # Query heads grouped under the kv head they share, each group's queries stacked along the query axis:
        # q [b, kv, group·s, hd] against k, v [b, kv, s, hd]. Both products are then plain batched matmuls over
        # (b, kv), and the scores [b, kv, group·s, s] need no transpose on the way into or out of the softmax.
        q5 = q.reshape(b, s, g, group, hd).transpose(0, 2, 3, 1, 4)  # [b, kv, group, s, hd]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scale = 1.0 / math.sqrt(hd)
        if need_probs:  # differentiated through the probabilities too (attention-pattern losses)
            probs = _probs(q5.reshape(b, g, group * s, hd), kt, mask.grouped(group), _stacked(row_valid, group),
                           scale)
            out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), vt).reshape(b, g, group, s, hd)
        else:
            # Causal blocks: the queries of block i read only the keys up to the block's end, skipping the masked
            # upper triangle, (n - 1) / 2n of the scores (2 CPU cores: demo step 33.7 -> 31.3 ms with four
            # blocks of 32, d512 step 1202 -> 1151 ms with eight).
            n = causal_blocks(s)
            size = s // n
            parts = []
            for i in range(n):
                lo, hi = i * size, (i + 1) * size
                part = _attention_core(q5[:, :, :, lo:hi].reshape(b, g, group * size, hd), kt[:, :, :hi],
                                       vt[:, :, :hi], mask.grouped(group, lo, hi),
                                       _stacked(row_valid[:, lo:hi], group), scale)
                parts.append(part.reshape(b, g, group, size, hd))
            out, probs = jnp.concatenate(parts, axis=3), None
        return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h * hd), probs


def causal_blocks(seq: int) -> int:
    """How many query blocks causal attention splits `seq` into: blocks of at least 32 queries, at most 8, an
    exact divisor of `seq` (1 when none is)."""
    n = min(8, seq // 32)
    while n > 1 and seq % n:
        n -= 1
    return max(n, 1)


def _stacked(row_valid, group):
    """`[b, s]` row validity for queries stacked `group` times: `[b, 1, group·s, 1]`."""
    b, s = row_valid.shape
    return jnp.broadcast_to(row_valid[:, None, None, :, None], (b, 1, group, s, 1)).reshape(b, 1, group * s, 1)


def _probs(qt, kt, mask, row_valid, scale):
    """Masked softmax of the scaled scores, float32, `[b, kv, group·s, s]`; rows with no valid key are zero."""
    scores = jnp.einsum("bkqd,bksd->bkqs", qt, kt, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(row_valid, jax.nn.softmax(scores, axis=-1), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(qt, kt, vt, mask, row_valid, scale):
    """`softmax(q kᵀ·scale) v` over `[b, kv, queries, ·]` with its backward pass written out.

    The forward's probabilities are the residual, and the two products that contract over the query axis,
    `dK = dSᵀ q` and `dV = Pᵀ dO`, are computed as `(qᵀ dS)ᵀ` and `(dOᵀ P)ᵀ`: the small `[queries, head_dim]`
    operand is transposed, never the `[queries, keys]` one. Autodiff's form ran in XLA's generic CPU dot emitter
    at a tenth of the speed (demo-size distillation step on 2 CPU cores: 37.9 -> 36.1 ms)."""
    return _attention_core_fwd(qt, kt, vt, mask, row_valid, scale)[0]


def _attention_core_fwd(qt, kt, vt, mask, row_valid, scale):
    probs = _probs(qt, kt, mask, row_valid, scale)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(vt.dtype), vt)
    return out, (qt, kt, vt, probs)


def _attention_core_bwd(scale, residuals, d_out):
    qt, kt, vt, probs = residuals
    f32 = jnp.float32
    d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out, vt, preferred_element_type=f32)
    # Softmax backward: dS = P ⊙ (dP - rowsum(P ⊙ dP)); masked keys and empty rows have P = 0, so dS = 0 there.
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True)) * scale
    d_scores_c = d_scores.astype(qt.dtype)
    d_q = jnp.einsum("bkqs,bksd->bkqd", d_scores_c, kt, preferred_element_type=f32)
    d_k = jnp.einsum("bkdq,bkqs->bkds", jnp.swapaxes(qt, -1, -2), d_scores_c, preferred_element_type=f32)
    d_v = jnp.einsum("bkdq,bkqs->bkds", jnp.swapaxes(d_out, -1, -2), probs.astype(vt.dtype),
                     preferred_element_type=f32)
    return (d_q.astype(qt.dtype), jnp.swapaxes(d_k, -1, -2).astype(kt.dtype),
            jnp.swapaxes(d_v, -1, -2).astype(vt.dtype), None, None)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)
