"""Intermediate feature matching: a student layer's hidden states regress onto a teacher layer's.

When the widths differ, a learned `Projection` maps the student's hidden states into the teacher's width
(FitNets, Romero et al., 2015, "FitNets: Hints for Thin Deep Nets"; TinyBERT, Jiao et al., 2020, uses the same
`H_s W = H_t` regression). The projections of all mapped pairs live in `FeatureProjections`, a pytree that trains
with the student but is never part of the exported student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .errors import ConfigError

TokenMask = Bool[Array, "batch seq"] | Int[Array, "batch seq"] | Float[Array, "batch seq"]

FEATURE_KINDS = ("mse", "cosine")

_RMS_EPS = 1e-6
_NORM_EPS = 1e-8


class Projection(eqx.Module):
    """A learned linear map from the student's width to the teacher's, `y = x @ weight.T` (no bias).

    Initialisation: the identity when the widths are equal (so matching starts from the raw student states); a
    semi-orthogonal matrix otherwise, scaled by `sqrt(max(1, out / in))` so that the per-coordinate RMS of an
    isotropic input is kept (orthonormal columns keep the norm when widening, which would shrink each
    coordinate by `sqrt(in / out)`; orthonormal rows of a random rotation already keep the RMS when narrowing).
    """

    weight: Float[Array, "teacher_hidden student_hidden"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(self, in_features: int, out_features: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `in_features`: the student's hidden size.
        - `out_features`: the teacher's hidden size.
        - `key`: a PRNG key for the (non-identity) initialisation.
        """
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"Projection: widths must be positive, got in={in_features}, out={out_features}")
        if in_features == out_features:
            self.weight = jnp.eye(out_features, dtype=jnp.float32)
        else:
            scale = math.sqrt(max(1.0, out_features / in_features))
            w = jax.nn.initializers.orthogonal()(key, (out_features, in_features), jnp.float32)
            self.weight = scale * w
        self.in_features, self.out_features = in_features, out_features

    def __call__(self, x: Float[Array, "*batch student_hidden"]) -> Float[Array, "*batch teacher_hidden"]:
        """Maps `x` (any dtype) to the teacher's width in float32."""
        return jnp.einsum("...i,oi->...o", x.astype(jnp.float32), self.weight.astype(jnp.float32))


class FeatureProjections(eqx.Module):
    """One `Projection` per mapped layer pair, in the mapping's pair order (shallow to deep).

    A separate pytree from the student: it goes into the optimizer state next to the student, and is left out
    of the exported student. Changing the mapping (EPLB re-mapping) rewrites entries with `eqx.tree_at`
    (`distill.eplb.replace_projections`); the mapping itself is not stored here, so a rewritten container keeps
    its tree structure.
    """

    projections: tuple[Projection, ...]
    student_hidden: int = eqx.field(static=True)
    teacher_hidden: int = eqx.field(static=True)

    def __init__(
        self, pairs: Sequence[Sequence[int]], student_hidden: int, teacher_hidden: int, *, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `pairs`: the layer mapping, `(student_layer, teacher_layer)` pairs (see `distill.mapping`).
        - `student_hidden`, `teacher_hidden`: the two hidden sizes.
        - `key`: a PRNG key, split once across the pairs.
        """
        if len(pairs) == 0:
            raise ConfigError("FeatureProjections: the layer mapping is empty")
        keys = jax.random.split(key, len(pairs))
        self.projections = tuple(Projection(student_hidden, teacher_hidden, key=k) for k in keys)
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden

    def __len__(self) -> int:
        return len(self.projections)

    def __getitem__(self, i: int) -> Projection:
        return self.projections[i]


def rms_normalize(x: Float[Array, "*batch hidden"]) -> Float[Array, "*batch hidden"]:
    """Parameter-free RMS normalisation over the last axis, in float32: `x / sqrt(mean(x**2) + 1e-6)`."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _RMS_EPS)


def feature_loss(
    student_h: Float[Array, "batch seq student_hidden"],
    teacher_h: Float[Array, "batch seq teacher_hidden"],
    mask: TokenMask,
    *,
    kind: str,
    normalize: bool,
    projection: Projection | None,
    prefix: str = "distill/feature",
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The feature-matching loss between one student layer's and one teacher layer's hidden states.

    The student states are first projected (if a projection is given), then both sides are RMS-normalised (if
    `normalize`), then compared per token:

    - `mse`: `mean_hidden((s - t)**2)`;
    - `cosine`: `1 - <s, t> / (|s| |t|)` (norms floored at 1e-8).

    The loss is the mean over valid tokens (0 when there are none). The teacher is behind `stop_gradient`; all
    arithmetic is float32.

    **Arguments:**

    - `student_h`: the student layer's output `[batch, seq, student_hidden]`.
    - `teacher_h`: the teacher layer's output `[batch, seq, teacher_hidden]`.
    - `mask`: `[batch, seq]`, 1 (or True) for real tokens.
    - `kind`: `"mse"` or `"cosine"`.
    - `normalize`: whether to RMS-normalise both sides (parameter-free) before comparing.
    - `projection`: the student-to-teacher projection, or None when the widths are equal.
    - `prefix`: the metrics namespace.

    **Returns:**

    `(loss, metrics)`: a scalar, and `{prefix/kind: loss, prefix/cos_sim: mean cosine similarity}`.
    """
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"feature_loss: unknown kind {kind!r}; expected one of {', '.join(FEATURE_KINDS)}")
    if student_h.shape[:2] != teacher_h.shape[:2] or student_h.shape[:2] != mask.shape:
        raise ConfigError(
            f"feature_loss: batch/seq shapes differ: student {student_h.shape}, teacher {teacher_h.shape}, "
            f"mask {mask.shape}"
        )
    s = student_h.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_h.astype(jnp.float32))
    if projection is not None:
        if projection.in_features != s.shape[-1] or projection.out_features != t.shape[-1]:
            raise ConfigError(
                f"feature_loss: projection maps {projection.in_features} -> {projection.out_features}, but the "
                f"student width is {s.shape[-1]} and the teacher width is {t.shape[-1]}"
            )
        s = projection(s)
    elif s.shape[-1] != t.shape[-1]:
        raise ConfigError(
            f"feature_loss: student width {s.shape[-1]} != teacher width {t.shape[-1]} and no projection given"
        )
    if normalize:
        s, t = rms_normalize(s), rms_normalize(t)

    cos = jnp.sum(s * t, axis=-1) / (_safe_norm(s) * _safe_norm(t))
    if kind == "mse":
        per_token = jnp.mean(jnp.square(s - t), axis=-1)
    else:
        per_token = 1.0 - cos
    valid = mask.astype(bool)
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(valid, per_token, 0.0)) / count
    mean_cos = jnp.sum(jnp.where(valid, cos, 0.0)) / count
    return loss, {f"{prefix}/{kind}": loss, f"{prefix}/cos_sim": jax.lax.stop_gradient(mean_cos)}


def mapped_feature_losses(
    student_hidden_states: Sequence[Float[Array, "batch seq student_hidden"]],
    teacher_hidden_states: Sequence[Float[Array, "batch seq teacher_hidden"] | None],
    mask: TokenMask,
    pairs: Sequence[Sequence[int]],
    projections: FeatureProjections | None,
    *,
    kind: str,
    normalize: bool,
) -> tuple[Float[Array, " pairs"], dict[str, Array]]:
    """`feature_loss` for every mapped pair, stacked (the per-pair vector EPLB balances).

    **Arguments:**

    - `student_hidden_states`, `teacher_hidden_states`: the models' `hidden_states` (L+1 entries each, entry
      `i + 1` being layer `i`'s output).
    - `mask`: `[batch, seq]`, 1 for real tokens.
    - `pairs`: the layer mapping, `(student_layer, teacher_layer)` pairs.
    - `projections`: one projection per pair (in pair order), or None when the widths are equal.
    - `kind`, `normalize`: as in `feature_loss`.

    **Returns:**

    `(losses [pairs], metrics)`, metrics under `distill/feature/layer_{student_layer}`.
    """
    if projections is not None and len(projections) != len(pairs):
        raise ConfigError(f"mapped_feature_losses: {len(projections)} projections for {len(pairs)} layer pairs")
    losses, metrics = [], {}
    for p, (i, j) in enumerate(pairs):
        if not (0 <= i < len(student_hidden_states) - 1 and 0 <= j < len(teacher_hidden_states) - 1):
            raise ConfigError(
                f"mapped_feature_losses: pair {(i, j)} out of range for {len(student_hidden_states) - 1} student "
                f"and {len(teacher_hidden_states) - 1} teacher layers"
            )
        loss, m = feature_loss(
            student_hidden_states[i + 1], teacher_hidden_states[j + 1], mask, kind=kind, normalize=normalize,
            projection=None if projections is None else projections[p], prefix=f"distill/feature/layer_{i}",
        )
        losses.append(loss)
        metrics.update(m)
    return jnp.stack(losses), metrics


def _safe_norm(x: Float[Array, "*batch hidden"]) -> Float[Array, "*batch"]:
    # Floor the squared norm, not the norm: sqrt's gradient at 0 is inf, and 0 * inf poisons masked tokens.
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), _NORM_EPS**2))
