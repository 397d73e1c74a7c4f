"""EPLB, Enhanced Progressive Layer Balancing: how the intermediate (per layer pair) losses are weighted.

Three mechanisms, all pure functions over pytrees of jax arrays so their state lives in (and is checkpointed
with) the train state:

a. progressive: `ProgressiveSchedule` switches the mapped pairs on in stages, shallow to deep, each with a
   linear ramp (curriculum in the spirit of progressive knowledge transfer, Sun et al., 2020, "MobileBERT").
b. balancing: `LossBalancer` / `balance` divide each pair's loss by a running estimate of its own magnitude, so
   active pairs contribute equally, then hold the sum of the intermediate losses at a fixed ratio of the KD
   loss (the scheme of NVIDIA NeMo's distillation loss balancer).
c. re-mapping: `cka_matrix` measures student/teacher layer similarity with linear CKA (Kornblith et al., 2019,
   "Similarity of Neural Network Representations Revisited"), `best_monotone_assignment` picks the monotone
   mapping of maximal total similarity, and `replace_projections` re-initialises the projections of the pairs
   whose teacher layer changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .errors import ConfigError

from .features import FeatureProjections, Projection
from .mapping import Pairs

TokenMask = Bool[Array, "batch seq"] | Int[Array, "batch seq"] | Float[Array, "batch seq"]


# --- a. progressive -------------------------------------------------------------------------------------------


class ProgressiveSchedule(eqx.Module):
    """Mapped pairs switch on in stages, shallow to deep.

    With `n` pairs in mapping order (shallow to deep) and `S = num_stages`: pair `p` belongs to stage
    `floor(p * S / n)`, stage `s` starts at step `s * stage_steps`, and the weight of pair `p` at `step` is
    `clip((step - start) / ramp_steps, 0, 1)`; with `ramp_steps = 0` it is the step function `step >= start`.
    Stage 0 starts at step 0 (so with a ramp, its weight is 0 at step 0 and 1 at `ramp_steps`).
    """

    num_pairs: int = eqx.field(static=True)
    num_stages: int = eqx.field(static=True)
    stage_steps: int = eqx.field(static=True)
    ramp_steps: int = eqx.field(static=True)

    def __init__(self, num_pairs: int, *, num_stages: int, stage_steps: int, ramp_steps: int = 0):
        """**Arguments:**

        - `num_pairs`: the number of mapped layer pairs, `n >= 1`.
        - `num_stages`: `1 <= num_stages <= n`.
        - `stage_steps`: steps between the starts of consecutive stages, `>= 0`.
        - `ramp_steps`: steps over which a pair's weight rises from 0 to 1, `>= 0`.
        """
        for name, value, lo in (("num_pairs", num_pairs, 1), ("num_stages", num_stages, 1),
                                ("stage_steps", stage_steps, 0), ("ramp_steps", ramp_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"eplb: {name} must be an int >= {lo}, got {value!r}")
        if num_stages > num_pairs:
            raise ConfigError(f"eplb: num_stages={num_stages} is more than the {num_pairs} mapped pairs")
        self.num_pairs, self.num_stages = num_pairs, num_stages
        self.stage_steps, self.ramp_steps = stage_steps, ramp_steps

    def stages(self) -> tuple[int, ...]:
        """The stage of each pair."""
        return tuple(p * self.num_stages // self.num_pairs for p in range(self.num_pairs))

    def weights(self, step: Int[Array, ""] | int) -> Float[Array, " pairs"]:
        """The per-pair weights `[num_pairs]` (float32) at `step`; jit-able with a traced step."""
        start = jnp.asarray(self.stages(), jnp.float32) * self.stage_steps
        elapsed = jnp.asarray(step, jnp.float32) - start
        if self.ramp_steps == 0:
            return (elapsed >= 0).astype(jnp.float32)
        return jnp.clip(elapsed / self.ramp_steps, 0.0, 1.0)


# --- b. balancing ---------------------------------------------------------------------------------------------


class LossBalancer(eqx.Module):
    """The state of the intermediate-loss balancer: a bias-corrected EMA of each pair's loss magnitude.

    `magnitude` is the raw (biased) EMA `m <- decay * m + (1 - decay) * |loss|`, updated only for active pairs
    (weight > 0), and `count` the number of updates per pair; the estimate is `m / (1 - decay**count)`, as
    Adam corrects its moments (Kingma & Ba, 2015). Hyperparameters are static fields, arrays are leaves.
    """

    magnitude: Float[Array, " pairs"]
    count: Int[Array, " pairs"]
    decay: float = eqx.field(static=True)
    target_ratio: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, num_pairs: int, *, decay: float = 0.99, target_ratio: float = 1.0, eps: float = 1e-8):
        """**Arguments:**

        - `num_pairs`: the number of mapped layer pairs.
        - `decay`: the EMA decay, in `[0, 1)`.
        - `target_ratio`: the intermediate losses' sum is held at `target_ratio * kd_loss`; `> 0`.
        - `eps`: added to denominators.
        """
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
            raise ConfigError(f"eplb: num_pairs must be a positive int, got {num_pairs!r}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"eplb: decay must be in [0, 1), got {decay}")
        if not target_ratio > 0.0:
            raise ConfigError(f"eplb: target_ratio must be > 0, got {target_ratio}")
        if not eps > 0.0:
            raise ConfigError(f"eplb: eps must be > 0, got {eps}")
        self.magnitude = jnp.zeros((num_pairs,), jnp.float32)
        self.count = jnp.zeros((num_pairs,), jnp.int32)
        self.decay, self.target_ratio, self.eps = float(decay), float(target_ratio), float(eps)


def balance(
    state: LossBalancer,
    pair_losses: Float[Array, " pairs"],
    pair_weights: Float[Array, " pairs"],
    kd_loss: Float[Array, ""],
) -> tuple[Float[Array, ""], LossBalancer, dict[str, Array]]:
    """Combines the per-pair intermediate losses into one term, balanced per pair and against the KD loss.

    With `w` the schedule weights and `m_hat` the bias-corrected magnitudes after this step's update:

        n_p   = w_p * L_p / sg(m_hat_p + eps)                        each active pair ~ w_p
        scale = sg(target_ratio * kd / (sum_p n_p + eps))            (0 when no pair is active)
        total = scale * sum_p n_p                                    value ~ target_ratio * kd

    Gradients flow through `L_p` only; the effective weight of pair `p` is `scale * w_p / (m_hat_p + eps)`.

    **Arguments:**

    - `state`: the balancer state.
    - `pair_losses`: `[pairs]` intermediate losses (non-negative), in mapping order.
    - `pair_weights`: `[pairs]` schedule weights (e.g. `ProgressiveSchedule.weights(step)`), `>= 0`.
    - `kd_loss`: the KD (logit) loss of the same step.

    **Returns:**

    `(total_intermediate, new_state, metrics)`; metrics hold `eplb/scale`, and per pair `eplb/weight/pair_i`
    (effective weight), `eplb/contribution/pair_i` (its share of `total`) and `eplb/magnitude/pair_i`.
    """
    n = state.magnitude.shape[0]
    if pair_losses.shape != (n,) or pair_weights.shape != (n,):
        raise ConfigError(
            f"eplb: balancer holds {n} pairs, got losses {pair_losses.shape} and weights {pair_weights.shape}"
        )
    losses = pair_losses.astype(jnp.float32)
    weights = jax.lax.stop_gradient(pair_weights.astype(jnp.float32))
    kd = jax.lax.stop_gradient(kd_loss.astype(jnp.float32))
    active = weights > 0

    observed = jnp.abs(jax.lax.stop_gradient(losses))
    magnitude = jnp.where(active, state.decay * state.magnitude + (1.0 - state.decay) * observed, state.magnitude)
    count = state.count + active.astype(jnp.int32)
    correction = 1.0 - jnp.power(jnp.float32(state.decay), count.astype(jnp.float32))
    m_hat = jnp.where(count > 0, magnitude / jnp.where(count > 0, correction, 1.0), 1.0)

    per_unit = weights / (m_hat + state.eps)
    normalized = per_unit * losses
    norm_sum = jnp.sum(normalized)
    norm_sum_sg = jax.lax.stop_gradient(norm_sum)
    scale = jnp.where(norm_sum_sg > 0, state.target_ratio * kd / (norm_sum_sg + state.eps), 0.0)
    total = scale * norm_sum

    new_state = eqx.tree_at(lambda s: (s.magnitude, s.count), state, (magnitude, count))
    effective = scale * per_unit
    contribution = jax.lax.stop_gradient(scale * normalized)
    metrics: dict[str, Array] = {"eplb/scale": scale}
    for p in range(n):
        metrics[f"eplb/weight/pair_{p}"] = effective[p]
        metrics[f"eplb/contribution/pair_{p}"] = contribution[p]
        metrics[f"eplb/magnitude/pair_{p}"] = m_hat[p]
    return total, new_state, metrics


# --- c. re-mapping --------------------------------------------------------------------------------------------


def linear_cka(
    x: Float[Array, "n d1"], y: Float[Array, "n d2"], mask: Bool[Array, " n"] | None = None
) -> Float[Array, ""]:
    """Linear CKA (Kornblith et al., 2019, eq. 5): `||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`.

    `Xc`, `Yc` are the column-centred representations of the same `n` examples. Invariant to orthogonal
    transforms and isotropic scaling of either side, 1 for `x == y`. Rows where `mask` is False are dropped
    (centred with the valid rows' mean and zeroed), with shapes kept static for `jit`.

    **Arguments:**

    - `x`: `[n, d1]`; `y`: `[n, d2]`.
    - `mask`: optional `[n]` row mask.

    **Returns:**

    A float32 scalar in `[0, 1]` (0 when either side is constant).
    """
    kx = _centered_gram(x, mask)
    ky = _centered_gram(y, mask)
    return _gram_cka(kx, ky)


def cka_matrix(
    student_hiddens: Sequence[Float[Array, "batch seq student_hidden"]],
    teacher_hiddens: Sequence[Float[Array, "batch seq teacher_hidden"]],
    mask: TokenMask,
) -> Float[Array, "student_layers teacher_layers"]:
    """Linear CKA between every student layer's and every teacher layer's output on a probe batch.

    The inputs are the models' `hidden_states` (L+1 entries, entry `i + 1` being layer `i`'s output); the
    embeddings (entry 0) are skipped, so entry `[i, j]` compares student layer `i` with teacher layer `j`. The
    examples are the valid tokens of the batch. Computed in the Gram (`n x n`, `n = batch*seq`) form: memory
    `(student_layers + 1) * n^2` floats (one copy of the student's, one teacher's at a time), so keep the probe
    to a few thousand tokens.

    **Arguments:**

    - `student_hiddens`, `teacher_hiddens`: the two `hidden_states` tuples of the same probe batch.
    - `mask`: `[batch, seq]`, 1 for real tokens.

    **Returns:**

    `[student_layers, teacher_layers]` float32 similarities.
    """
    if len(student_hiddens) < 2 or len(teacher_hiddens) < 2:
        raise ConfigError("cka_matrix: hidden_states need the embeddings plus at least one layer output")
    valid = mask.astype(bool).reshape(-1)
    flat = lambda h: h.reshape(-1, h.shape[-1])  # noqa: E731
    s_stack = jnp.stack([flat(h) for h in student_hiddens[1:]])
    t_stack = jnp.stack([flat(h) for h in teacher_hiddens[1:]])
    # One copy of the student's Grams: normalised by their norms at the end (scalars), not as a second array.
    s_grams = jax.vmap(lambda x: _centered_gram(x, valid))(s_stack)  # [S, n, n]
    s_norms = _norm(s_grams, axes=(1, 2))

    def column(y):
        ky = _centered_gram(y, valid)
        return jnp.einsum("snm,nm->s", s_grams, ky) / _norm(ky)

    return (jax.lax.map(column, t_stack) / s_norms).T


def best_monotone_assignment(
    similarity: Float[Array, "student_layers teacher_layers"] | Float[np.ndarray, "student_layers teacher_layers"],
    student_layers: Sequence[int],
) -> Pairs:
    """The mapping of maximal total similarity with teacher layers strictly increasing in the student layer.

    Dynamic programming on the host: with the student layers sorted, `best[a, t]` is the best total for the
    first `a + 1` of them with the last one on teacher layer `t`, `best[a, t] = sim[s_a, t] + max_{t' < t}
    best[a - 1, t']`; O(len(student_layers) * teacher_layers). Ties go to the shallower teacher layer.

    **Arguments:**

    - `similarity`: `[student_layers, teacher_layers]`, e.g. from `cka_matrix`.
    - `student_layers`: the student layers to map (distinct, in range); at most `teacher_layers` of them.

    **Returns:**

    `(student_layer, teacher_layer)` pairs sorted by student layer.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    n_s, n_t = sim.shape
    layers = sorted(int(s) for s in student_layers)
    if len(layers) == 0:
        raise ConfigError("best_monotone_assignment: no student layers to map")
    for s in layers:
        if not 0 <= s < n_s:
            raise ConfigError(f"best_monotone_assignment: student layer {s} out of range [0, {n_s})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"best_monotone_assignment: student layers {tuple(student_layers)} repeat a layer")
    m = len(layers)
    if m > n_t:
        raise ConfigError(
            f"best_monotone_assignment: {m} student layers cannot map injectively to {n_t} teacher layers"
        )

    best = np.full((m, n_t), -np.inf)  # -inf: infeasible (not enough shallower teacher layers)
    back = np.zeros((m, n_t), dtype=np.int64)
    best[0] = sim[layers[0]]
    for a in range(1, m):
        # (run_val, run_arg): the max of best[a-1, :t] and its first argmax, grown as t advances.
        run_val, run_arg = -np.inf, -1
        for t in range(1, n_t):
            if best[a - 1, t - 1] > run_val:
                run_val, run_arg = best[a - 1, t - 1], t - 1
            if run_arg >= 0:
                best[a, t] = sim[layers[a], t] + run_val
                back[a, t] = run_arg
    t = int(np.argmax(best[m - 1]))
    out = [0] * m
    for a in range(m - 1, -1, -1):
        out[a] = t
        t = int(back[a, t])
    return tuple((s, t) for s, t in zip(layers, out))


def remap_pairs(old_pairs: Sequence[Sequence[int]], new_pairs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The indices of the pairs that differ between two mappings of the same length, compared position by
    position (a pair's index is its projection's index in `FeatureProjections`).

    **Arguments:**

    - `old_pairs`, `new_pairs`: two mappings with the same number of pairs.

    **Returns:**

    The changed indices, ascending.
    """
    if len(old_pairs) != len(new_pairs):
        raise ConfigError(f"remap_pairs: the old mapping has {len(old_pairs)} pairs, the new one {len(new_pairs)}")
    return tuple(p for p, (a, b) in enumerate(zip(old_pairs, new_pairs)) if tuple(a) != tuple(b))


def replace_projections(
    projections: FeatureProjections, changed: Sequence[int], *, key: PRNGKeyArray
) -> FeatureProjections:
    """Re-initialises the projections of the changed pairs (`eqx.tree_at`); all other leaves stay identical.

    The new projection of pair `p` is `Projection(student_hidden, teacher_hidden, key=fold_in(key, p))`.
    (The optimizer state of a replaced projection is the integrator's to reset.)

    **Arguments:**

    - `projections`: the current projections.
    - `changed`: pair indices, e.g. from `remap_pairs`.
    - `key`: a PRNG key.

    **Returns:**

    A `FeatureProjections` with the same tree structure.
    """
    changed = sorted(set(int(p) for p in changed))
    n = len(projections)
    for p in changed:
        if not 0 <= p < n:
            raise ConfigError(f"replace_projections: pair index {p} out of range [0, {n})")
    if not changed:
        return projections
    fresh = [
        Projection(projections.student_hidden, projections.teacher_hidden, key=jax.random.fold_in(key, p))
        for p in changed
    ]
    return eqx.tree_at(lambda fp: [fp.projections[p] for p in changed], projections, fresh)


def _centered_gram(x: Float[Array, "n d"], mask: Bool[Array, " n"] | None) -> Float[Array, "n n"]:
    x = x.astype(jnp.float32)
    if mask is None:
        xc = x - jnp.mean(x, axis=0, keepdims=True)
    else:
        w = mask.astype(jnp.float32)[:, None]
        mean = jnp.sum(x * w, axis=0, keepdims=True) / jnp.maximum(jnp.sum(w), 1.0)
        xc = (x - mean) * w
    return xc @ xc.T


def _norm(k, axes=None):
    """Frobenius norm(s) of Gram matrices, floored (a constant representation's Gram is 0: its CKA is 0)."""
    return jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(k), axis=axes)), 1e-12)


def _unit(k: Float[Array, "n n"]) -> Float[Array, "n n"]:
    return k / _norm(k)


def _gram_cka(kx: Float[Array, "n n"], ky: Float[Array, "n n"]) -> Float[Array, ""]:
    # <Kx, Ky>_F = ||Yc^T Xc||_F^2 and ||Kx||_F = ||Xc^T Xc||_F for Kx = Xc Xc^T.
    return jnp.sum(_unit(kx) * _unit(ky))

