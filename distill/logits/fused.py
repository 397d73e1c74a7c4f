"""Forward-KL KD and cross-entropy fused into one pass with a closed-form gradient (a `jax.custom_vjp`), on
the student logits ([`kd_ce_loss`][]) or with the LM head inside the loss ([`linear_kd_ce_loss`][])."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from ..errors import ConfigError
from .chunks import _as_valid, _check_chunk_size, _merge_chunks, _split_chunks, _token_temperature, chunked_map
from .dense import _safe_teacher_log


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
