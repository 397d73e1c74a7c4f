"""The chunking machinery the logit losses share, and their common per-token helpers.

A 152k vocabulary times a whole batch in fp32 does not fit next to a model, so the per-token math runs over
sequence chunks (`chunk_size`) with `lax.map`, each chunk under `jax.checkpoint`: forward and backward then hold
one chunk's fp32 `[batch, chunk, vocab]` tensors at a time (see [`chunked_map`][]).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ..errors import ConfigError

Scalar = Float[Array, ""]


# --------------------------------------------------------------------------------------------------- chunking


def chunked_map(fn: Callable[..., Any], arrays: Sequence[Array], chunk_size: int | None) -> Any:
    """Apply a per-token function to the sequence, `chunk_size` positions (of every batch row) at a time.

    Each chunk runs under `jax.checkpoint` inside `lax.map`, so forward and backward hold one chunk's
    intermediates at a time.

    A chunk is the same `chunk_size` positions of every row, handed to `fn` shaped `[batch, chunk_size]`, so each
    row stays on the devices that hold it (the batch axis is sharded over the mesh's batch axes) and every device
    works on its own rows' chunk. (Cutting the flat `[batch·seq]` token axis instead is a free reshape, but it puts
    a whole chunk on the devices of one or two rows: the scan over chunks then gathers it and every device
    computes every chunk, all rows' `[batch, chunk, vocab]` softmaxes, redundantly.) The price is one transposed
    copy of the (per-device) inputs and outputs. `fn` must be per-token (each output token depends only on the
    same token's inputs), which the losses are. When `chunk_size` does not divide `seq`, the sequence is padded
    with zeros, False for booleans: `fn` must give finite results there, which sanitising with the mask (passed as
    one of the arrays) does.

    **Arguments:**

    - `fn`: takes `len(arrays)` arrays with leading axes `[batch, chunk_size]` and returns a pytree of arrays with
        the same leading axes.
    - `arrays`: arrays with leading axes `[batch, seq]`.
    - `chunk_size`: sequence positions per chunk; `None` (or at least `seq`) runs `fn` once on everything.

    **Returns:**

    `fn`'s outputs for the whole sequence, leading axes `[batch, seq]`.
    """
    _check_chunk_size(chunk_size)
    seq = arrays[0].shape[1]
    if chunk_size is None or chunk_size >= seq:
        return fn(*arrays)
    # The checkpoint makes the backward pass recompute each chunk's fp32 softmaxes instead of saving them all.
    outputs = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(_split_chunks(x, chunk_size) for x in arrays))
    return jax.tree.map(lambda y: _merge_chunks(y, seq), outputs)


def _split_chunks(x: Array, chunk_size: int) -> Array:
    """`[batch, seq, ...]` -> `[n_chunks, batch, chunk_size, ...]`: chunk `j` is positions
    `j·chunk_size ... (j+1)·chunk_size - 1` of every row (the sequence zero-padded to a multiple of `chunk_size`;
    see [`chunked_map`][])."""
    batch, seq = x.shape[:2]
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, n_chunks, chunk_size, *x.shape[2:]), 1, 0)


def _merge_chunks(y: Array, seq: int) -> Array:
    """The inverse of `_split_chunks`."""
    n_chunks, batch, chunk_size = y.shape[:3]
    return jnp.moveaxis(y, 0, 1).reshape(batch, n_chunks * chunk_size, *y.shape[3:])[:, :seq]


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _masked_mean(values: Float[Array, "batch seq"], valid: Array) -> Scalar:
    count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    return jnp.sum(jnp.where(valid, values, 0.0)) / count


def _as_valid(mask: Shaped[Array, "batch seq"]) -> Array:
    return mask.astype(bool)


def _token_temperature(
    temperature: float | Float[Array, ""] | Float[Array, "batch seq"], shape: tuple[int, int]
) -> Float[Array, "batch seq"]:
    if isinstance(temperature, (int, float)):
        if isinstance(temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), shape)
