"""Leaf layers: linear, embedding, RMSNorm and rotary position embeddings.

Weights keep the PyTorch/HF layout (`Linear.weight` is `[out, in]`) so a checkpoint tensor drops into its leaf
without a transpose, and a tensor-parallel slice of the file is a slice of the leaf.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import ModelConfig, rope_inv_freq


LINEAR_OUTPUT = "linear_output"


def constrain(x, sharding):
    """`x` constrained to `sharding` under jit (`jax.lax.with_sharding_constraint`); as it is when `sharding` is
    None (the layout left to XLA)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
"""`checkpoint_name` of every [`linear`][] product, for remat policies that keep them (see `run_layers`)."""


def linear(x: Float[Array, "*batch in"], weight: Float[Array, "out in"]) -> Float[Array, "*batch out"]:
    """`x @ weight.T`, named [`LINEAR_OUTPUT`][] for remat policies.

    On XLA's CPU backend the product's backward pass is written out ([`_cpu_linear`][]); elsewhere it is the plain
    einsum and autodiff."""
    if jax.default_backend() == "cpu":
        y = _cpu_linear(x, weight)
    else:
        y = jnp.einsum("...i,oi->...o", x, weight)
    return checkpoint_name(y, LINEAR_OUTPUT)


@jax.custom_vjp
def _cpu_linear(x, weight):
    """`x @ weight.T` whose weight gradient `dyᵀ x` transposes the smaller of the two token-major operands.

    Autodiff leaves the choice to XLA, whose CPU backend copies `dy` into `[out, tokens]` whatever the widths; when
    `in < out` (q/k/v, gate and up projections) transposing `x` instead and the `[in, out]` result after is less
    copying (demo-size distillation step on 2 CPU cores: 37.7 -> 34.6 ms)."""
    return jnp.einsum("...i,oi->...o", x, weight)


def _cpu_linear_fwd(x, weight):
    return _cpu_linear(x, weight), (x, weight)


def _cpu_linear_bwd(residuals, dy):
    x, weight = residuals
    d_in, d_out = x.shape[-1], dy.shape[-1]
    dx = jnp.einsum("...o,oi->...i", dy, weight)
    x2, dy2 = x.reshape(-1, d_in), dy.reshape(-1, d_out)
    if d_in < d_out:
        d_weight = jnp.einsum("in,no->io", x2.T, dy2).T
    else:
        d_weight = jnp.einsum("on,ni->oi", dy2.T, x2)
    return dx, d_weight.astype(weight.dtype)


_cpu_linear.defvjp(_cpu_linear_fwd, _cpu_linear_bwd)


class Linear(eqx.Module):
    """`y = x @ weight.T + bias`, weight in the HF `[out_features, in_features]` layout."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, key: PRNGKeyArray,
                 std: float | None = None):
        std = 1.0 / math.sqrt(in_features) if std is None else std
        self.weight = std * jax.random.normal(key, (out_features, in_features), jnp.float32)
        self.bias = jnp.zeros((out_features,), jnp.float32) if use_bias else None

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        y = linear(x, self.weight.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y


class Embedding(eqx.Module):
    """Token embedding table `[vocab, embed]`."""

    weight: Float[Array, "vocab embed"]

    def __init__(self, vocab_size: int, hidden_size: int, *, key: PRNGKeyArray, std: float = 0.02):
        self.weight = std * jax.random.normal(key, (vocab_size, hidden_size), jnp.float32)

    def __call__(self, ids: Int[Array, "*batch"]) -> Float[Array, "*batch embed"]:
        return jnp.take(self.weight, ids, axis=0)


class RMSNorm(eqx.Module):
    """RMS normalization with float32 statistics; the result is cast back to the input dtype before the gain,
    as transformers does (`weight * hidden.to(input_dtype)`)."""

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.astype(x.dtype) * normed.astype(x.dtype)


def rotary_tables(
    config: ModelConfig, positions: Int[Array, "batch seq"]
) -> tuple[Float[Array, "batch seq head_dim"], Float[Array, "batch seq head_dim"]]:
    """cos and sin tables `[batch, seq, head_dim]` (float32) for the rotate-half RoPE convention."""
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "batch seq heads head_dim"],
    cos: Float[Array, "batch seq head_dim"],
    sin: Float[Array, "batch seq head_dim"],
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotate-half RoPE (the Llama/Qwen convention: the two halves of head_dim form the complex pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
