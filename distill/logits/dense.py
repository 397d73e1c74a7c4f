"""Dense knowledge distillation between full student and teacher logits, and the vocabulary helpers."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Shaped

from ..errors import ConfigError, DataError
from .chunks import _as_valid, _check_chunk_size, _masked_mean, _token_temperature, chunked_map

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv")


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
    return _kd(lambda s: s, student_logits, teacher_logits, mask, temperature=temperature, kind=kind, beta=beta,
               chunk_size=chunk_size)


def linear_kd_loss(
    hidden: Float[Array, "batch seq embed"],
    weight: Float[Array, "student_vocab embed"],
    teacher_logits: Float[Array, "batch seq teacher_vocab"],
    mask: Shaped[Array, "batch seq"],
    *,
    temperature: float | Float[Array, ""] | Float[Array, "batch seq"],
    kind: str,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """[`kd_loss`][] of the student logits `hidden @ weight.T`, the LM head applied one chunk at a time.

    Each chunk's logits are computed (in `hidden`'s dtype, as `CausalLM.unembed`) inside the chunk's
    `jax.checkpoint`, so neither the forward nor the backward pass holds the student's whole
    `[batch, seq, vocab]` logits; the head's gradient is summed over the chunks by autodiff of the chunk loop.

    **Arguments:** `hidden` is the student's final-normed hidden states (`CausalLM(..., output_logits=False)
    .last_hidden`), `weight` its `unembedding_weight()`; the rest as [`kd_loss`][].

    **Returns:** as [`kd_loss`][].
    """
    head = lambda h: jnp.einsum("bsd,vd->bsv", h, weight.astype(h.dtype))  # noqa: E731
    return _kd(head, hidden, teacher_logits, mask, temperature=temperature, kind=kind, beta=beta,
               chunk_size=chunk_size)


def _kd(logits_of, student, teacher_logits, mask, *, temperature, kind: str, beta: float, chunk_size):
    """The mean KD loss of the student logits `logits_of(chunk of student)` (see [`kd_loss`][])."""
    if kind not in KD_KINDS:
        raise ConfigError(f"kd kind must be one of {', '.join(KD_KINDS)}; got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"kd beta must be in [0, 1], got {beta!r}")
    _check_chunk_size(chunk_size)
    temperature = _token_temperature(temperature, mask.shape)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    valid = _as_valid(mask)

    def tokens(s, t, temp, v):
        return _kd_tokens(logits_of(s), t, temp, v, kind=kind, beta=float(beta))

    div, agree = chunked_map(tokens, (student, teacher_logits, temperature, valid), chunk_size)
    loss = _masked_mean(div, valid)
    return loss, {"distill/kd": loss, "distill/top1_agreement": _masked_mean(agree, valid)}
