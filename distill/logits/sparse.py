"""Sparse forward-KL distillation from a cached teacher top-k (plus the logsumexp of its tail)."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Shaped

from ..errors import ConfigError
from .chunks import _as_valid, _check_chunk_size, _masked_mean, _token_temperature, chunked_map
from .dense import _safe_teacher_log


# --------------------------------------------------------------------------------------------------- sparse KD


def _topk_membership(indices: Array, vocab: int) -> Array:
    """`[..., k]` ids -> `[..., vocab]` booleans, True at the given ids."""
    lead = indices.shape[:-1]
    grids = jnp.meshgrid(*(jnp.arange(n) for n in lead), indexing="ij")
    return jnp.zeros((*lead, vocab), bool).at[(*(g[..., None] for g in grids), indices)].set(True)


def teacher_topk(
    teacher_logits: Float[Array, "batch seq vocab"],
    k: int,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "batch seq k"], Int[Array, "batch seq k"], Float[Array, "batch seq"]]:
    """Compress teacher logits into a top-k cache for [`sparse_kd_loss`][].

    **Arguments:**

    - `teacher_logits`: `[batch, seq, vocab]`.
    - `k`: how many logits to keep per token, `1 <= k <= vocab`.
    - `vocab_size`: if given, only the first `vocab_size` logits are used (the student's vocabulary, as in
        [`align_vocab`][]), so that the tail matches what the student can produce.
    - `chunk_size`: sequence positions per chunk (see [`chunked_map`][]); `None` for one chunk.

    **Returns:**

    `(values, indices, tail_logsumexp)`: the top-k logits (input dtype, descending), their int32 ids, and the
    fp32 logsumexp of all the other logits at temperature 1 (`-inf` when `k` is the whole vocabulary).
    """
    vocab = teacher_logits.shape[-1]
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or vocab_size < 1:
            raise ConfigError(f"top-k vocab_size must be a positive integer, got {vocab_size!r}")
        vocab = min(vocab, vocab_size)
    if isinstance(k, bool) or not 1 <= k <= vocab:
        raise ConfigError(f"top-k k must be in [1, {vocab}] (the vocabulary), got {k!r}")
    teacher_logits = jax.lax.stop_gradient(teacher_logits)

    def tokens(t):
        t = t[..., :vocab]  # per chunk: no copy of the whole logits
        values, indices = jax.lax.top_k(t, k)
        rest = jnp.where(_topk_membership(indices, vocab), -jnp.inf, t.astype(jnp.float32))
        return values, indices.astype(jnp.int32), jax.nn.logsumexp(rest, axis=-1)

    return chunked_map(tokens, (teacher_logits,), chunk_size)


def _sparse_kd_tokens(student, values, indices, tail_lse, temperature, valid, *, n_tail: int):
    vocab = student.shape[-1]
    k = values.shape[-1]
    temp = jnp.where(valid, temperature, 1.0)[..., None]
    s = jnp.where(valid[..., None], student.astype(jnp.float32), 0.0)
    v = jnp.where(valid[..., None], values.astype(jnp.float32), 0.0)
    # Distinct ids at masked tokens keep the student's tail bucket non-empty there.
    idx = jnp.where(valid[..., None], indices, jnp.arange(k, dtype=indices.dtype))
    tail = jnp.where(valid, tail_lse.astype(jnp.float32), 0.0)

    s_t = s / temp
    student_lse = jax.nn.logsumexp(s_t, axis=-1, keepdims=True)
    log_q = jnp.take_along_axis(s_t, idx, axis=-1) - student_lse
    teacher_buckets = v / temp
    teacher_lse_t1 = jax.nn.logsumexp(v, axis=-1)
    if n_tail > 0:
        # Student tail bucket: logsumexp over the ids outside the top-k (= log(1 - Σ_k q), without cancellation).
        rest = jnp.where(_topk_membership(idx, vocab), -jnp.inf, s_t)
        log_q = jnp.concatenate([log_q, jax.nn.logsumexp(rest, axis=-1, keepdims=True) - student_lse], axis=-1)
        # Teacher tail bucket at T: as if all n_tail tail logits equalled tail_lse - log(n_tail).
        log_n = math.log(n_tail)
        tail_t = log_n + (tail - log_n) / temp[..., 0]
        teacher_buckets = jnp.concatenate([teacher_buckets, tail_t[..., None]], axis=-1)
        teacher_lse_t1 = jnp.logaddexp(teacher_lse_t1, tail)
        tail_mass = jnp.exp(tail - teacher_lse_t1)
    else:
        tail_mass = jnp.zeros_like(teacher_lse_t1)

    log_p = jax.nn.log_softmax(teacher_buckets, axis=-1)
    p = jnp.exp(log_p)
    div = jnp.sum(p * (_safe_teacher_log(p, log_p) - log_q), axis=-1) * temp[..., 0] ** 2
    teacher_top1 = jnp.take_along_axis(idx, jnp.argmax(v, axis=-1)[..., None], axis=-1)[..., 0]
    agree = (jnp.argmax(s, axis=-1) == teacher_top1).astype(jnp.float32)
    return div, agree, tail_mass


def sparse_kd_tokens(
    student_logits: Float[Array, "batch seq vocab"],
    topk_values: Float[Array, "batch seq k"],
    topk_indices: Int[Array, "batch seq k"],
    tail_logsumexp: Float[Array, "batch seq"],
    valid: Bool[Array, "batch seq"],
) -> tuple[Float[Array, "batch seq"], Float[Array, "batch seq"], Float[Array, "batch seq"]]:
    """[`sparse_kd_loss`][] at `T = 1` before its reduction, for a caller that sums over chunks itself
    (evaluation): per token the KL of the collapsed distributions, whether the student's top-1 is the cache's
    top-1, and the teacher's tail mass. Values at tokens where `valid` is False are finite and meaningless."""
    n_tail = student_logits.shape[-1] - topk_values.shape[-1]
    return _sparse_kd_tokens(student_logits, topk_values, topk_indices, tail_logsumexp,
                             jnp.ones(valid.shape, jnp.float32), valid, n_tail=n_tail)


def sparse_kd_loss(
    student_logits: Float[Array, "batch seq vocab"],
    topk_values: Float[Array, "batch seq k"],
    topk_indices: Int[Array, "batch seq k"],
    tail_logsumexp: Float[Array, "batch seq"],
    mask: Shaped[Array, "batch seq"],
    *,
    temperature: float | Float[Array, ""] | Float[Array, "batch seq"],
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Forward-KL distillation from a cached top-k teacher (see [`teacher_topk`][]).

    Both distributions are collapsed onto `k + 1` buckets: the teacher's `k` top ids and one tail bucket for
    the `n_tail = vocab - k` other ids. The student's buckets are exact: its softmax at `T` on the `k` ids, and
    the rest of its mass (`1 - Σ_k q`, computed as a logsumexp over the other ids). The loss is
    `KL(p_buckets || q_buckets) · T²`; with `k = vocab` it is the dense forward KL of [`kd_loss`][].

    The teacher's tail is known only through its logsumexp `L` at `T = 1`. At `T = 1` the tail bucket is exact:
    logit `L`. At any `T` the tail bucket gets logit `log(n_tail) + (L - log(n_tail)) / T`, its exact value if all
    tail logits were equal (to `L - log(n_tail)`). By the power-mean inequality this is an upper bound of the true
    tail mass for `T > 1` and a lower bound for `T < 1`.

    **Arguments:**

    - `student_logits`: `[batch, seq, vocab]`, the student's (already vocabulary-aligned) logits.
    - `topk_values`: `[batch, seq, k]` teacher logits at temperature 1.
    - `topk_indices`: `[batch, seq, k]` their distinct ids, `< vocab` (an id out of range at a valid token makes
        the loss NaN; the data loader checks ids on the host: `vishwam.data.text.check_vocab`).
    - `tail_logsumexp`: `[batch, seq]` logsumexp of the teacher's other logits at temperature 1.
    - `mask`: `[batch, seq]`, nonzero for the tokens that count.
    - `temperature`: as in [`kd_loss`][].
    - `chunk_size`: sequence positions per chunk (see [`chunked_map`][]); `None` for one chunk.

    **Returns:**

    `(loss, metrics)` with `"distill/kd"`, `"distill/top1_agreement"` and `"distill/teacher_tail_mass"` (the
    mean teacher probability outside the top-k at `T = 1`).
    """
    vocab, k = student_logits.shape[-1], topk_values.shape[-1]
    if k > vocab:
        raise ConfigError(f"sparse KD cache has k={k} logits per token, more than the student vocabulary {vocab}")
    _check_chunk_size(chunk_size)
    temperature = _token_temperature(temperature, mask.shape)
    topk_values, tail_logsumexp = jax.lax.stop_gradient((topk_values, tail_logsumexp))
    valid = _as_valid(mask)

    def tokens(s, v, i, tail, temp, m):
        return _sparse_kd_tokens(s, v, i, tail, temp, m, n_tail=vocab - k)

    arrays = (student_logits, topk_values, topk_indices, tail_logsumexp, temperature, valid)
    div, agree, tail_mass = chunked_map(tokens, arrays, chunk_size)
    loss = _masked_mean(div, valid)
    metrics = {
        "distill/kd": loss,
        "distill/top1_agreement": _masked_mean(agree, valid),
        "distill/teacher_tail_mass": _masked_mean(tail_mass, valid),
    }
    return loss, metrics
