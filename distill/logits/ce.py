"""Next-token cross-entropy with label smoothing."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from ..errors import ConfigError
from .chunks import _as_valid, _check_chunk_size, _masked_mean, chunked_map


# --------------------------------------------------------------------------------------------------- cross-entropy


def _ce_tokens(logits, labels, valid, *, label_smoothing: float):
    x = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
    labels = jnp.where(valid, labels, 0)
    log_q = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
    loss = nll
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_q, axis=-1)
    correct = (jnp.argmax(x, axis=-1) == labels).astype(jnp.float32)
    return loss, correct


def cross_entropy_loss(
    logits: Float[Array, "batch seq vocab"],
    labels: Int[Array, "batch seq"],
    mask: Shaped[Array, "batch seq"],
    *,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Next-token cross-entropy with label smoothing, as torch's `F.cross_entropy(label_smoothing=ε)`.

    Per token: `(1 - ε)·(-log q[label]) + ε·mean_vocab(-log q)`, averaged over valid tokens.

    **Arguments:**

    - `logits`: `[batch, seq, vocab]`, any float dtype.
    - `labels`: `[batch, seq]` target ids, `< vocab` where the mask is set (any value, e.g. `-100`, elsewhere);
        an id out of range at a valid token makes the loss NaN (`vishwam.data.text.check_vocab` catches it on the host).
    - `mask`: `[batch, seq]`, nonzero for the tokens that count.
    - `label_smoothing`: `ε` in `[0, 1]`.
    - `chunk_size`: sequence positions per chunk (see [`chunked_map`][]); `None` for one chunk.

    **Returns:**

    `(loss, metrics)` with `"distill/ce"` (the loss) and `"distill/accuracy"` (argmax == label over valid
    tokens).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    _check_chunk_size(chunk_size)
    valid = _as_valid(mask)

    def tokens(x, y, v):
        return _ce_tokens(x, y, v, label_smoothing=float(label_smoothing))

    ce, correct = chunked_map(tokens, (logits, labels, valid), chunk_size)
    loss = _masked_mean(ce, valid)
    return loss, {"distill/ce": loss, "distill/accuracy": _masked_mean(correct, valid)}
