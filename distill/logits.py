"""Logit-level losses: knowledge distillation (dense and top-k sparse) and cross-entropy.

Every loss takes `[batch, seq, vocab]` logits and a `[batch, seq]` mask (bool or 0/1; padding and ignored labels
are 0) and returns `(loss, metrics)`: the loss is an fp32 scalar, the mean over valid tokens
(`sum / max(count, 1)`), and the metrics are fp32 scalars under `distill/...` keys.

The math is fp32 whatever the input dtype. A 152k vocabulary times a whole batch in fp32 does not fit next to a
model, so the per-token math runs over sequence chunks (`chunk_size`) with `lax.map`, each chunk under
`jax.checkpoint`: forward and backward then hold one chunk's fp32 `[batch, chunk, vocab]` tensors at a time
(see [`chunked_map`][]).

Tokens whose mask is 0 are replaced by harmless values inside each chunk before any math, so garbage there (huge,
inf or NaN logits, `-100` labels, a zero temperature) changes neither the loss nor the gradient.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Shaped

from vishwam.errors import ConfigError, DataError

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv")

Scalar = Float[Array, ""]


# --------------------------------------------------------------------------------------------------- chunking


def chunked_map(fn: Callable[..., Any], arrays: Sequence[Array], chunk_size: int | None) -> Any:
    """Apply a per-token function to the sequence, `chunk_size` positions (of every batch row) at a time.

    Each chunk runs under `jax.checkpoint` inside `lax.map`, so forward and backward hold one chunk's
    intermediates at a time.

    A chunk is `batch · chunk_size` consecutive tokens of the row-major `[batch, seq]` grid, handed to `fn`
    shaped `[batch, chunk_size]`: cutting the flat token axis is a free reshape, whereas cutting the sequence axis
    of every row would copy all the logits into chunk-major order. So `fn` must be per-token (each output token
    depends only on the same token's inputs), which the losses are. When `chunk_size` does not divide `seq`, the
    sequence is padded (one copy of the inputs) with zeros, False for booleans: `fn` must give finite results
    there, which sanitising with the mask (passed as one of the arrays) does.

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
    """`[batch, seq, ...]` -> `[n_chunks, batch, chunk_size, ...]` (flat token chunks, the sequence zero-padded
    to a multiple of `chunk_size`; see [`chunked_map`][])."""
    batch, seq = x.shape[:2]
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(n_chunks, batch, chunk_size, *x.shape[2:])


def _merge_chunks(y: Array, seq: int) -> Array:
    """The inverse of `_split_chunks`."""
    n_chunks, batch, chunk_size = y.shape[:3]
    return y.reshape(batch, n_chunks * chunk_size, *y.shape[3:])[:, :seq]


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


def _safe_teacher_log(p: Array, log_p: Array) -> Array:
    # A teacher probability of exactly 0 contributes 0 to sum(p * (log p - ...)), even where log p is -inf.
    return jnp.where(p > 0, log_p, 0.0)


# --------------------------------------------------------------------------------------------------- vocabulary


def align_vocab(
    student_logits: Float[Array, "batch seq student_vocab"],
    teacher_logits: Float[Array, "batch seq teacher_vocab"],
) -> tuple[Float[Array, "batch seq vocab"], Float[Array, "batch seq vocab"]]:
    """Slice student and teacher logits to their shared vocabulary.

    Checkpoints of one tokenizer family pad their embedding matrices differently (Qwen2.5-32B has 152064 rows,
    Qwen2.5-1.5B 151936, the tokenizer 151665 ids). The ids past the smaller matrix are never produced by the
    tokenizer, so both sides keep only the first `min(student_vocab, teacher_vocab)` logits.

    **Arguments:**

    - `student_logits`: `[batch, seq, student_vocab]`.
    - `teacher_logits`: `[batch, seq, teacher_vocab]`.

    **Returns:**

    `(student_logits, teacher_logits)`, both `[batch, seq, min(student_vocab, teacher_vocab)]`.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def check_token_ids(ids: Int[np.ndarray, "..."] | Int[Array, "..."], vocab_size: int, what: str) -> None:
    """Host-side check that every token id fits the student's vocabulary.

    Negative ids are ignore markers (e.g. `-100` labels) and pass. Inside a jitted loss an out-of-range id cannot
    raise; it would silently gather garbage, hence this check on the host when data is loaded.

    **Arguments:**

    - `ids`: token ids of any shape.
    - `vocab_size`: the student's vocabulary size (rows of its embedding / LM head).
    - `what`: names the data in the error message (a file, a field).

    **Raises:**

    `DataError` naming `what`, the first offending id and its position.
    """
    ids = np.asarray(ids)
    bad = ids >= vocab_size
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{what}: token id {int(ids[where])} at index {where} is >= the student's vocabulary size {vocab_size}"
        )


# --------------------------------------------------------------------------------------------------- dense KD


def _log_mixture(log_p: Array, log_q: Array, beta: float) -> Array:
    """log(beta * p + (1 - beta) * q), exactly log q where p == q, without overflow for any gap."""
    d = log_p - log_q
    below = d <= 0
    # where (not minimum) clamps, so that the branch taken gets the whole gradient, also at d == 0.
    log_m_below = log_q + jnp.log1p(beta * jnp.expm1(jnp.where(below, d, 0.0)))
    log_m_above = log_p + jnp.log1p((1.0 - beta) * jnp.expm1(jnp.where(below, 0.0, -d)))
    return jnp.where(below, log_m_below, log_m_above)


def _kd_tokens(student, teacher, temperature, valid, *, kind: str, beta: float):
    # Slicing per chunk, not up front, spares a copy of the (larger) teacher logits.
    student, teacher = align_vocab(student, teacher)
    s = jnp.where(valid[..., None], student.astype(jnp.float32), 0.0)
    t = jnp.where(valid[..., None], teacher.astype(jnp.float32), 0.0)
    temp = jnp.where(valid, temperature, 1.0)
    # One log-softmax over both sides: equal logits then give bitwise-equal distributions, so the loss and its
    # gradient are exactly 0 there (the TV gradient is sign(p - q), which rounding noise would make random).
    log_p, log_q = jax.nn.log_softmax(jnp.stack([t, s]) / temp[..., None], axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    log_p_safe = _safe_teacher_log(p, log_p)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        div = jnp.sum(p * (log_p_safe - log_q), axis=-1)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        div = jnp.sum(q * (log_q - log_p), axis=-1)
    elif kind == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        kl_teacher = jnp.sum(p * (log_p_safe - log_m), axis=-1)
        kl_student = jnp.sum(q * (log_q - log_m), axis=-1)
        div = beta * kl_teacher + (1.0 - beta) * kl_student
    else:  # "tv"
        div = 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)

    if kind != "tv":
        div = div * temp**2
    agree = (jnp.argmax(s, axis=-1) == jnp.argmax(t, axis=-1)).astype(jnp.float32)
    return div, agree


def kd_loss(
    student_logits: Float[Array, "batch seq student_vocab"],
    teacher_logits: Float[Array, "batch seq teacher_vocab"],
    mask: Shaped[Array, "batch seq"],
    *,
    temperature: float | Float[Array, ""] | Float[Array, "batch seq"],
    kind: str,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Knowledge-distillation loss between student and teacher token distributions.

    With `p = softmax(teacher / T)` and `q = softmax(student / T)` per token:

    - `"forward_kl"`: `KL(p || q) · T²` (Hinton et al. 2015; the `T²` keeps gradient magnitudes independent of
        `T`).
    - `"reverse_kl"`: `KL(q || p) · T²`.
    - `"jsd"`: generalised Jensen-Shannon `β·KL(p || m) + (1-β)·KL(q || m)`, `m = β·p + (1-β)·q`, times `T²`
        (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD). At `β = 0` and `β = 1` this is
        identically 0, so, as in TRL's `GKDTrainer`, those endpoints give forward and reverse KL (`· T²`).
    - `"tv"`: total variation `½·Σ|p - q|`, a distance bounded in `[0, 1]`. Not scaled by `T²`: that factor
        compensates the `1/T²` shrinking of a KL's gradient, which TV's (`sign(p - q)` through the softmax) does
        not share.

    Vocabularies of different sizes are reconciled with [`align_vocab`][]. The teacher is under
    `jax.lax.stop_gradient`; a temperature array is not (pass a stop-gradient one, as `adaptive_temperature`
    returns, unless the temperature is meant to be learnt).

    **Arguments:**

    - `student_logits`: `[batch, seq, student_vocab]`, any float dtype.
    - `teacher_logits`: `[batch, seq, teacher_vocab]`, any float dtype.
    - `mask`: `[batch, seq]`, nonzero for the tokens that count.
    - `temperature`: a Python float (> 0, checked), a scalar array (e.g. from a `TemperatureSchedule`) or a
        per-token `[batch, seq]` array; arrays must be > 0 at valid tokens (not checked inside `jit`).
    - `kind`: one of `"forward_kl"`, `"reverse_kl"`, `"jsd"`, `"tv"`.
    - `beta`: the JSD mixture weight of the teacher, in `[0, 1]`; used by `"jsd"` only.
    - `chunk_size`: sequence positions per chunk (see [`chunked_map`][]); `None` for one chunk.

    **Returns:**

    `(loss, metrics)`: the fp32 mean over valid tokens, and `{"distill/kd": loss, "distill/top1_agreement":
    fraction of valid tokens whose student and teacher argmax agree}`.
    """
    if kind not in KD_KINDS:
        raise ConfigError(f"kd kind must be one of {', '.join(KD_KINDS)}; got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"kd beta must be in [0, 1], got {beta!r}")
    _check_chunk_size(chunk_size)
    temperature = _token_temperature(temperature, mask.shape)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    valid = _as_valid(mask)

    def tokens(s, t, temp, v):
        return _kd_tokens(s, t, temp, v, kind=kind, beta=float(beta))

    div, agree = chunked_map(tokens, (student_logits, teacher_logits, temperature, valid), chunk_size)
    loss = _masked_mean(div, valid)
    return loss, {"distill/kd": loss, "distill/top1_agreement": _masked_mean(agree, valid)}


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
        the loss NaN; check caches on the host with [`check_token_ids`][]).
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
        an id out of range at a valid token makes the loss NaN ([`check_token_ids`][] catches it on the host).
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


# --------------------------------------------------------------------------------------------------- fused KD + CE


def _first_argmax(x: Float[Array, "... vocab"]) -> Int[Array, "..."]:
    """`jnp.argmax(x, -1)` (the first index of the maximum) for finite `x`, as a max and a min over an iota: two
    plain reductions, which XLA's CPU backend runs several times faster than argmax's index-carrying one. A row
    holding NaN gives the last index (argmax gives the NaN's); such a step is non-finite whatever its metrics."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    top = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), iota, x.shape[-1] - 1), axis=-1)
    return top


def _kd_ce_tokens(student, teacher, labels, temperature, valid, *, kd_weight: float, ce_weight: float,
                  label_smoothing: float):
    """Per token: the forward-KL·T² and cross-entropy values and the gradient of
    `kd_weight · KD + ce_weight · CE` with respect to the student logits (zero at invalid tokens)."""
    vocab_s = student.shape[-1]
    vocab = min(vocab_s, teacher.shape[-1])
    x = jnp.where(valid[..., None], student.astype(jnp.float32), 0.0)
    t = jnp.where(valid[..., None], teacher[..., :vocab].astype(jnp.float32), 0.0)
    temp = jnp.where(valid, temperature, 1.0)[..., None]
    labels = jnp.where(valid, labels, 0)

    # KD at temperature T over the shared vocabulary: d/ds [T² KL(p || q)] = T (q - p).
    log_p = jax.nn.log_softmax(t / temp, axis=-1)
    log_q = jax.nn.log_softmax(x[..., :vocab] / temp, axis=-1)
    p = jnp.exp(log_p)
    div = jnp.sum(p * (_safe_teacher_log(p, log_p) - log_q), axis=-1) * temp[..., 0] ** 2
    grad_kd = temp * (jnp.exp(log_q) - p)
    if vocab < vocab_s:
        grad_kd = jnp.pad(grad_kd, [(0, 0)] * (grad_kd.ndim - 1) + [(0, vocab_s - vocab)])

    # Metrics with one top-1 index instead of three: the student's top-1 agrees with the teacher's when the
    # teacher's logit there is the teacher's maximum.
    s_top = _first_argmax(x[..., :vocab])
    agree = (jnp.take_along_axis(t, s_top[..., None], axis=-1)[..., 0] >= jnp.max(t, axis=-1)).astype(jnp.float32)

    grad = kd_weight * grad_kd
    ce = correct = jnp.zeros(x.shape[:-1], jnp.float32)
    if ce_weight > 0:
        # CE at T = 1 over the student's vocabulary: d/ds = softmax(s) - ((1 - ε)·onehot + ε / V).
        log_q1 = jax.nn.log_softmax(x, axis=-1)
        onehot = jax.nn.one_hot(labels, vocab_s, dtype=jnp.float32)
        nll = -jnp.sum(onehot * log_q1, axis=-1)
        ce = nll
        if label_smoothing > 0.0:
            ce = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_q1, axis=-1)
        target = (1.0 - label_smoothing) * onehot + label_smoothing / vocab_s
        grad = grad + ce_weight * (jnp.exp(log_q1) - target)
        s_top_all = s_top if vocab == vocab_s else _first_argmax(x)
        correct = (s_top_all == labels).astype(jnp.float32)
    grad = jnp.where(valid[..., None], grad, 0.0).astype(student.dtype)
    return div, ce, agree, correct, grad


def _kd_ce_sums_of(valid, kd_weight, ce_weight, div, ce, agree, correct):
    """Sums over the valid tokens of the weighted loss and of each per-token value."""
    weighted = kd_weight * div + ce_weight * ce
    return tuple(jnp.sum(jnp.where(valid, a, 0.0)) for a in (weighted, div, ce, agree, correct))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _kd_ce_sums(student, teacher, labels, temperature, valid, kd_weight, ce_weight, label_smoothing, chunk_size):
    return _kd_ce_fwd(student, teacher, labels, temperature, valid, kd_weight, ce_weight, label_smoothing,
                      chunk_size)[0]


def _kd_ce_fwd(student, teacher, labels, temperature, valid, kd_weight, ce_weight, label_smoothing, chunk_size):
    def tokens(s, t, y, temp, v):
        return _kd_ce_tokens(s, t, y, temp, v, kd_weight=kd_weight, ce_weight=ce_weight,
                             label_smoothing=label_smoothing)

    div, ce, agree, correct, grad = chunked_map(tokens, (student, teacher, labels, temperature, valid), chunk_size)
    return _kd_ce_sums_of(valid, kd_weight, ce_weight, div, ce, agree, correct), grad


def _kd_ce_bwd(kd_weight, ce_weight, label_smoothing, chunk_size, grad, cotangents):
    # Only the weighted sum is differentiable (the wrapper stops the gradient of the others).
    return (cotangents[0].astype(grad.dtype) * grad, None, None, None, None)


_kd_ce_sums.defvjp(_kd_ce_fwd, _kd_ce_bwd)


def kd_ce_loss(
    student_logits: Float[Array, "batch seq student_vocab"],
    teacher_logits: Float[Array, "batch seq teacher_vocab"],
    labels: Int[Array, "batch seq"],
    mask: Shaped[Array, "batch seq"],
    *,
    temperature: float | Float[Array, ""] | Float[Array, "batch seq"],
    kd_weight: float,
    ce_weight: float,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """`kd_weight · KL(p || q)·T² + ce_weight · CE` in one pass over the logits, its gradient written there too.

    The same values as [`kd_loss`][] (`kind="forward_kl"`) and [`cross_entropy_loss`][] combined, but the gradient
    with respect to the student logits is the closed form `kd_weight · T·(q_T - p_T) + ce_weight · (q - y_ε)` per
    valid token, divided by their count, computed in the forward pass (one chunked sweep, a `jax.custom_vjp`):
    the backward pass is one multiply instead of differentiating through two log-softmaxes, and no fp32
    `[batch, seq, vocab]` intermediate outlives the chunk it belongs to. The gradient is kept in the logits' dtype.

    The teacher logits and the temperature get no gradient (the temperature is a schedule value or
    `adaptive_temperature`'s stop-gradient output).

    **Arguments:** as [`kd_loss`][] and [`cross_entropy_loss`][]; `kd_weight` and `ce_weight` are Python floats.

    **Returns:**

    `(loss, metrics)`: the weighted loss (differentiable) and `distill/kd`, `distill/top1_agreement`, and with
    `ce_weight > 0` `distill/ce`, `distill/accuracy` (values only; with `ce_weight == 0` no CE is computed).
    """
    teacher_logits, temperature, valid = _kd_ce_inputs(teacher_logits, mask, temperature, kd_weight, ce_weight,
                                                       label_smoothing, chunk_size)
    weighted, div, ce, agree, correct = _kd_ce_sums(
        student_logits, teacher_logits, labels, temperature, valid, float(kd_weight), float(ce_weight),
        float(label_smoothing), chunk_size,
    )
    return _kd_ce_result(valid, ce_weight, weighted, div, ce, agree, correct)


def _kd_ce_inputs(teacher_logits, mask, temperature, kd_weight, ce_weight, label_smoothing, chunk_size):
    """Checks the settings of [`kd_ce_loss`][] / [`linear_kd_ce_loss`][]; returns the stop-gradient teacher logits,
    the per-token stop-gradient temperature and the boolean mask."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if kd_weight < 0 or ce_weight < 0:
        raise ConfigError(f"kd_weight and ce_weight must be >= 0, got {kd_weight!r} and {ce_weight!r}")
    _check_chunk_size(chunk_size)
    temperature = jax.lax.stop_gradient(_token_temperature(temperature, mask.shape))
    return jax.lax.stop_gradient(teacher_logits), temperature, _as_valid(mask)


def _kd_ce_result(valid, ce_weight, weighted, div, ce, agree, correct):
    count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    div, ce, agree, correct = jax.lax.stop_gradient((div, ce, agree, correct))
    metrics = {"distill/kd": div / count, "distill/top1_agreement": agree / count}
    if ce_weight > 0:
        metrics.update({"distill/ce": ce / count, "distill/accuracy": correct / count})
    return weighted / count, metrics


# --------------------------------------------------------------------------------------------------- with the LM head


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _linear_kd_ce_sums(hidden, weight, teacher, labels, temperature, valid, kd_weight, ce_weight, label_smoothing,
                       chunk_size):
    return _linear_kd_ce_fwd(hidden, weight, teacher, labels, temperature, valid, kd_weight, ce_weight,
                             label_smoothing, chunk_size)[0]


def _linear_kd_ce_fwd(hidden, weight, teacher, labels, temperature, valid, kd_weight, ce_weight, label_smoothing,
                      chunk_size):
    w = weight.astype(hidden.dtype)

    def chunk(h, t, y, temp, v):
        logits = jnp.einsum("bsd,vd->bsv", h, w)  # as `CausalLM.unembed`
        div, ce, agree, correct, grad = _kd_ce_tokens(logits, t, y, temp, v, kd_weight=kd_weight,
                                                      ce_weight=ce_weight, label_smoothing=label_smoothing)
        d_hidden = jnp.einsum("bsv,vd->bsd", grad, w)
        if h.dtype == jnp.float32:
            # hᵀ·G as [embed, vocab], then a transpose of that small result: with the big gradient as the
            # right-hand operand XLA keeps it row-major instead of writing a transposed copy of it (CPU: 44.6 ->
            # 40.4 ms per demo step). Not for bf16: XLA's CPU dot has no bf16 x bf16 -> f32 in this operand order.
            d_weight = jnp.einsum("bsd,bsv->dv", h, grad).T
        else:
            d_weight = jnp.einsum("bsv,bsd->vd", grad, h, preferred_element_type=jnp.float32)
        return (div, ce, agree, correct, d_hidden), d_weight

    arrays = (hidden, teacher, labels, temperature, valid)
    seq = hidden.shape[1]
    if chunk_size is None or chunk_size >= seq:
        (div, ce, agree, correct, d_hidden), d_weight = chunk(*arrays)
    else:
        # One chunk's logits and their gradient at a time; the LM head's gradient is summed over the chunks.
        def body(acc, xs):
            per_token, dw = chunk(*xs)
            return acc + dw, per_token

        d_weight, per_token = jax.lax.scan(body, jnp.zeros(weight.shape, jnp.float32),
                                           tuple(_split_chunks(x, chunk_size) for x in arrays))
        div, ce, agree, correct, d_hidden = (_merge_chunks(y, seq) for y in per_token)
    sums = _kd_ce_sums_of(valid, kd_weight, ce_weight, div, ce, agree, correct)
    return sums, (d_hidden, d_weight.astype(weight.dtype))


def _linear_kd_ce_bwd(kd_weight, ce_weight, label_smoothing, chunk_size, residuals, cotangents):
    d_hidden, d_weight = residuals
    ct = cotangents[0]
    return (ct.astype(d_hidden.dtype) * d_hidden, ct.astype(d_weight.dtype) * d_weight, None, None, None, None)


_linear_kd_ce_sums.defvjp(_linear_kd_ce_fwd, _linear_kd_ce_bwd)


def linear_kd_ce_loss(
    hidden: Float[Array, "batch seq embed"],
    weight: Float[Array, "student_vocab embed"],
    teacher_logits: Float[Array, "batch seq teacher_vocab"],
    labels: Int[Array, "batch seq"],
    mask: Shaped[Array, "batch seq"],
    *,
    temperature: float | Float[Array, ""] | Float[Array, "batch seq"],
    kd_weight: float,
    ce_weight: float,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """[`kd_ce_loss`][] of the student logits `hidden @ weight.T`, with the LM head inside the loss.

    Per chunk of `chunk_size` positions the logits are computed (in `hidden`'s dtype, as `CausalLM.unembed`),
    the losses and their closed-form gradient taken, and the gradient pushed through the head at once:
    `d_hidden = G @ W` per chunk and `d_weight = Σ_chunks Gᵀ @ h` (float32). The student's `[batch, seq, vocab]`
    logits never exist whole, forward or backward: with a 152k vocabulary that is the largest tensor of a step.

    **Arguments:** `hidden` is the student's final-normed hidden states (`CausalLM(..., output_logits=False)
    .last_hidden`), `weight` its `unembedding_weight()`; the rest as [`kd_ce_loss`][].

    **Returns:** as [`kd_ce_loss`][].
    """
    teacher_logits, temperature, valid = _kd_ce_inputs(teacher_logits, mask, temperature, kd_weight, ce_weight,
                                                       label_smoothing, chunk_size)
    weighted, div, ce, agree, correct = _linear_kd_ce_sums(
        hidden, weight, teacher_logits, labels, temperature, valid, float(kd_weight), float(ce_weight),
        float(label_smoothing), chunk_size,
    )
    return _kd_ce_result(valid, ce_weight, weighted, div, ce, agree, correct)
