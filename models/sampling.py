"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p (nucleus) filtering.

The order and the rules are transformers' (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`):
divide by the temperature, keep the `top_k` largest logits (ties with the k-th kept), then keep the smallest set
of the most probable tokens whose probability reaches `top_p` (a token is kept when the mass of the tokens
more probable than it is below `top_p`; the most probable is always kept). Every setting is a traced value, so
changing one does not recompile; `top_k = 0` and `top_p = 1` turn their filter off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


def filter_logits(logits: Float[Array, "batch vocab"], top_k: Int[Array, ""] | int = 0,
                  top_p: Float[Array, ""] | float = 1.0) -> Float[Array, "batch vocab"]:
    """`logits` with the tokens that top-k and then top-p remove set to -inf."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth = jax.lax.dynamic_slice_in_dim(ordered, k - 1, 1, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    kept = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)


def sample_tokens(logits: Float[Array, "batch vocab"], key: PRNGKeyArray, temperature: Float[Array, ""] | float = 0.0,
                  top_k: Int[Array, ""] | int = 0, top_p: Float[Array, ""] | float = 1.0) -> Int[Array, " batch"]:
    """One token per row: the argmax when `temperature` is 0, else a draw from the filtered softmax of
    `logits / temperature`."""
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    vocab = logits.shape[-1]

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn():
        scaled = logits.astype(jnp.float32) / temperature
        # The filters sort the vocabulary (a third of a small model's decode step on CPU): only when they are on.
        unfiltered = ((top_k <= 0) | (top_k >= vocab)) & (top_p >= 1.0)
        scaled = jax.lax.cond(unfiltered, lambda: scaled, lambda: filter_logits(scaled, top_k, top_p))
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, drawn, greedy)


__all__ = ["filter_logits", "sample_tokens"]
