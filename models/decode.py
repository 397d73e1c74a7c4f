"""Incremental decoding: a static KV cache filled by a prefill pass and advanced one token per row per step.

Prompts are left-padded (as transformers batches them), so every row's newest token sits in the same cache slot
and one scalar `length` says how many slots are filled. A row's padding slots stay invalid keys; its position
ids count only its real tokens, the same rule as the full forward (`prepare_inputs`), so a decoded token sees
exactly what the full forward over the unpadded sequence would.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from .layers import constrain, rotary_tables
from .transformer import CausalLM, prepare_inputs


class KVCache(eqx.Module):
    """Keys and values of every layer, `[layers, batch, kv_heads, slots, head_dim]` (after RoPE, in the model's
    dtype); `key_valid[b, t]` marks the slots row `b` attends to; `positions[b]` is the position id of row `b`'s
    next token; `length` the number of filled slots."""

    k: Float[Array, "layers batch kv_heads slots head_dim"]
    v: Float[Array, "layers batch kv_heads slots head_dim"]
    key_valid: Bool[Array, "batch slots"]
    positions: Int[Array, " batch"]
    length: Int[Array, ""]


def _rows(cache_sharding):
    """The hidden states' sharding that goes with a cache's: rows as the cache's batch axis, the rest whole (left
    to itself XLA may follow the embedding table's split of the hidden axis and run every row on every device)."""
    if cache_sharding is None:
        return None
    return NamedSharding(cache_sharding.mesh, PartitionSpec(cache_sharding.spec[1]))


def prefill(model: CausalLM, input_ids: Int[Array, "batch prompt"], attention_mask: Bool[Array, "batch prompt"],
            slots: int, *, cache_sharding=None, attention_impl: str = "auto"
            ) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Run the (left-padded) prompts through the model once. Returns the float32 logits at the last position
    (every row's last real token) and a cache of `slots` slots holding the prompts' keys and values in the first
    `prompt` slots. `cache_sharding` (a sharding of the `[layers, batch, kv_heads, slots, head_dim]` arrays)
    places the cache on a mesh."""
    b, s = input_ids.shape
    if slots < s:
        raise ValueError(f"a cache of {slots} slots cannot hold a prompt of {s} tokens")
    mask, cos, sin = prepare_inputs(model.config, input_ids, attention_mask)
    params, static = eqx.partition(model.model.layers, eqx.is_array)
    rows = _rows(cache_sharding)

    def step(h, layer_params):
        layer = eqx.combine(layer_params, static)
        h, _, (_, k, v) = layer(constrain(h, rows), cos, sin, mask, output_qkv=True, attention_impl=attention_impl)
        return h, (k, v)  # [b, kv_heads, s, hd]

    h, (k, v) = jax.lax.scan(step, constrain(model.embed(input_ids), rows), params)
    pad = ((0, 0), (0, 0), (0, 0), (0, slots - s), (0, 0))
    k, v = constrain(jnp.pad(k, pad), cache_sharding), constrain(jnp.pad(v, pad), cache_sharding)
    valid = jnp.pad(mask.key_valid, ((0, 0), (0, slots - s)))
    positions = jnp.sum(mask.key_valid, axis=-1, dtype=jnp.int32)
    logits = constrain(model.unembed(model.model.norm(h[:, -1:]))[:, 0].astype(jnp.float32), rows)
    return logits, KVCache(k, v, valid, positions, jnp.asarray(s, jnp.int32))


def decode_step(model: CausalLM, cache: KVCache, tokens: Int[Array, " batch"], *, cache_sharding=None
                ) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Feed one token per row: its keys and values go into slot `cache.length` of every layer. Returns the
    float32 next-token logits and the advanced cache."""
    slot = cache.length
    valid = jax.lax.dynamic_update_slice(cache.key_valid, jnp.ones((tokens.shape[0], 1), bool), (0, slot))
    cos, sin = rotary_tables(model.config, cache.positions[:, None])
    params, static = eqx.partition(model.model.layers, eqx.is_array)
    rows = _rows(cache_sharding)

    def step(carry, xs):
        h, k, v = carry
        layer_params, index = xs
        h, k, v = eqx.combine(layer_params, static).decode(constrain(h, rows), cos, sin, k, v, index, valid, slot)
        return (h, constrain(k, cache_sharding), constrain(v, cache_sharding)), None

    layers = jnp.arange(model.config.num_hidden_layers, dtype=jnp.int32)
    (h, k, v), _ = jax.lax.scan(step, (constrain(model.embed(tokens[:, None]), rows), cache.k, cache.v),
                                (params, layers))
    logits = model.unembed(model.model.norm(h))[:, 0].astype(jnp.float32)
    return logits, KVCache(k, v, valid, cache.positions + 1, slot + 1)


__all__ = ["KVCache", "decode_step", "prefill"]
