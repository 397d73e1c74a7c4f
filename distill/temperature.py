"""Distillation temperature: a schedule over training steps, and an adaptive per-token temperature."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from distill.logits import align_vocab, chunked_map
from .errors import ConfigError

SCHEDULE_KINDS = ("constant", "linear", "cosine")


class TemperatureSchedule(eqx.Module):
    """A KD temperature that moves from `start` to `end` over `total_steps` training steps.

    With `progress = clip(step / total_steps, 0, 1)`:

    - `"constant"`: `start` (`end` is ignored);
    - `"linear"`: `start + (end - start) · progress`;
    - `"cosine"`: `end + (start - end) · ½ · (1 + cos(π · progress))`.

    Steps past `total_steps` keep `end`. Calling it with a traced step works under `jit`.
    """

    kind: str = eqx.field(static=True)
    start: float = eqx.field(static=True)
    end: float = eqx.field(static=True)
    total_steps: int = eqx.field(static=True)

    def __check_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            kinds = ", ".join(SCHEDULE_KINDS)
            raise ConfigError(f"temperature schedule kind must be one of {kinds}; got {self.kind!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"temperature schedule {name} must be a finite number > 0, got {value!r}")
        if isinstance(self.total_steps, bool) or self.total_steps < 1:
            raise ConfigError(f"temperature schedule total_steps must be >= 1, got {self.total_steps!r}")

    def __call__(self, step: Int[ArrayLike, ""]) -> Float[Array, ""]:
        """**Arguments:**

        - `step`: the training step (a Python int or an int array, possibly traced).

        **Returns:**

        The fp32 scalar temperature at `step`.
        """
        if self.kind == "constant":
            return jnp.asarray(self.start, jnp.float32)
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / self.total_steps, 0.0, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def _entropy(logits: Array) -> Array:
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def adaptive_temperature(
    student_logits: Float[Array, "batch seq student_vocab"],
    teacher_logits: Float[Array, "batch seq teacher_vocab"],
    *,
    base: float,
    min_t: float,
    max_t: float,
    chunk_size: int | None = None,
) -> Float[Array, "batch seq"]:
    """Per-token temperature from the gap between teacher and student confidence.

    Follows the idea of "Dynamic Temperature Knowledge Distillation" (Wei & Bai, 2024, DTKD): the temperature of
    each sample should depend on how sharp the teacher's and the student's distributions are relative to each
    other. DTKD measures sharpness with the logsumexp of the logits and gives teacher and student two different
    temperatures; here one temperature is shared by both (as `kd_loss` takes), and sharpness is measured by the
    entropy normalised by its maximum, which is comparable across vocabularies and logit scales:

        H̃ = H(softmax(logits)) / log(vocab)  ∈ [0, 1]     (at temperature 1)
        T_tok = clip(base · exp(H̃_teacher − H̃_student), min_t, max_t)

    So `T_tok ∈ [base/e, base·e]` before clipping, and:

    - teacher more confident than the student (`H̃_T < H̃_S`): lower temperature, sharper targets that pull the
        student towards the teacher's mode;
    - student over-confident relative to the teacher (`H̃_T > H̃_S`): higher temperature, softer distributions
        that give the teacher's non-argmax mass ("dark knowledge") more weight;
    - equal confidence (in particular equal logits): exactly `base` (if within `[min_t, max_t]`).

    The result is under `jax.lax.stop_gradient`. Padding tokens get a temperature too; the losses ignore it.

    **Arguments:**

    - `student_logits`: `[batch, seq, student_vocab]`, any float dtype.
    - `teacher_logits`: `[batch, seq, teacher_vocab]`; vocabularies are reconciled with `align_vocab`.
    - `base`: the temperature at equal confidence, `min_t <= base <= max_t`.
    - `min_t`, `max_t`: clipping bounds, `0 < min_t <= max_t`.
    - `chunk_size`: sequence positions per chunk, as in the losses (the entropies touch the whole vocabulary);
        `None` for one chunk.

    **Returns:**

    `[batch, seq]` fp32 temperatures.
    """
    for name, value in (("base", base), ("min_t", min_t), ("max_t", max_t)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"adaptive temperature {name} must be a finite number > 0, got {value!r}")
    if not min_t <= base <= max_t:
        raise ConfigError(f"adaptive temperature needs min_t <= base <= max_t, got {min_t}, {base}, {max_t}")
    student_logits, teacher_logits = jax.lax.stop_gradient((student_logits, teacher_logits))
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_vocab = math.log(vocab) if vocab > 1 else 1.0

    def tokens(s, t):
        s, t = align_vocab(s, t)  # per chunk: no copy of the whole logits
        # One entropy computation over both: equal logits then give bitwise-equal entropies, so exactly `base`.
        h_teacher, h_student = _entropy(jnp.stack([t.astype(jnp.float32), s.astype(jnp.float32)]))
        gap = (h_teacher - h_student) / log_vocab
        return jnp.clip(base * jnp.exp(gap), min_t, max_t)

    return chunked_map(tokens, (student_logits, teacher_logits), chunk_size)
