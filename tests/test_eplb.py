"""EPLB: progressive stages, loss balancing, CKA and monotone re-mapping, projection rewrite."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.eplb import (
    LossBalancer,
    ProgressiveSchedule,
    balance,
    best_monotone_assignment,
    cka_matrix,
    linear_cka,
    remap_pairs,
    replace_projections,
)
from distill.features import FeatureProjections
from vishwam.errors import ConfigError

# --- progressive ----------------------------------------------------------------------------------------------


def test_progressive_stages_and_ramps():
    sched = ProgressiveSchedule(6, num_stages=3, stage_steps=100, ramp_steps=50)
    assert sched.stages() == (0, 0, 1, 1, 2, 2)
    expected = {
        0: [0, 0, 0, 0, 0, 0],
        25: [0.5, 0.5, 0, 0, 0, 0],
        100: [1, 1, 0, 0, 0, 0],
        110: [1, 1, 0.2, 0.2, 0, 0],
        225: [1, 1, 1, 1, 0.5, 0.5],
        10_000: [1, 1, 1, 1, 1, 1],
    }
    weights = jax.jit(sched.weights)
    for step, w in expected.items():
        np.testing.assert_allclose(np.asarray(weights(jnp.asarray(step))), w, atol=1e-6)
        assert weights(jnp.asarray(step)).dtype == jnp.float32
    assert ProgressiveSchedule(5, num_stages=2, stage_steps=10).stages() == (0, 0, 0, 1, 1)


def test_progressive_step_function():
    sched = ProgressiveSchedule(4, num_stages=4, stage_steps=10, ramp_steps=0)
    np.testing.assert_array_equal(np.asarray(sched.weights(0)), [1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(sched.weights(19)), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(sched.weights(20)), [1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(sched.weights(30)), [1, 1, 1, 1])


def test_progressive_errors():
    with pytest.raises(ConfigError, match="num_stages=5 is more than the 4 mapped pairs"):
        ProgressiveSchedule(4, num_stages=5, stage_steps=10)
    with pytest.raises(ConfigError, match="ramp_steps must be an int >= 0, got -1$"):
        ProgressiveSchedule(4, num_stages=2, stage_steps=10, ramp_steps=-1)


# --- balancing ------------------------------------------------------------------------------------------------


def test_balancer_equalizes_planted_magnitudes():
    state = LossBalancer(3, decay=0.9, target_ratio=0.5)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
    magnitudes = jnp.asarray([1.0, 10.0, 100.0])
    weights = jnp.ones(3)
    kd = jnp.asarray(2.0)
    step = jax.jit(balance)
    key = jax.random.key(0)
    for _ in range(100):
        key, sub = jax.random.split(key)
        losses = magnitudes * (1.0 + 0.1 * jax.random.normal(sub, (3,)))
        total, state, metrics = step(state, losses, weights, kd)
        np.testing.assert_allclose(float(total), 0.5 * 2.0, rtol=1e-5)  # held at target_ratio * kd
    # Steady losses: every pair contributes a third.
    total, state, metrics = step(state, magnitudes, weights, kd)
    contributions = np.array([float(metrics[f"eplb/contribution/pair_{p}"]) for p in range(3)])
    np.testing.assert_allclose(contributions, 1.0 / 3.0, rtol=0.05)
    eff = np.array([float(metrics[f"eplb/weight/pair_{p}"]) for p in range(3)])
    np.testing.assert_allclose(eff * np.asarray(magnitudes), contributions, rtol=1e-5)
    np.testing.assert_allclose(eff[0] / eff[2], 100.0, rtol=0.05)
    # Gradients flow through the pair losses only, with the effective weights.
    grad = jax.grad(lambda l: balance(state, l, weights, kd)[0])(magnitudes)
    new_state = balance(state, magnitudes, weights, kd)[1]
    m_hat = new_state.magnitude / (1 - 0.9 ** new_state.count.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), 1.0 / (3 * np.asarray(m_hat)), rtol=0.05)


def test_balancer_first_step_and_inactive_pairs():
    state = LossBalancer(3, decay=0.99, target_ratio=1.0)
    losses, weights = jnp.asarray([2.0, 30.0, 400.0]), jnp.asarray([1.0, 0.5, 0.0])
    total, new, metrics = balance(state, losses, weights, jnp.asarray(3.0))
    # First update: the bias-corrected magnitude is the loss itself, so pair p's normalised loss is w_p.
    np.testing.assert_allclose(float(total), 3.0, rtol=1e-6)
    contributions = [float(metrics[f"eplb/contribution/pair_{p}"]) for p in range(3)]
    np.testing.assert_allclose(contributions, [2.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.count), [1, 1, 0])
    assert float(new.magnitude[2]) == 0.0 and float(metrics["eplb/weight/pair_2"]) == 0.0
    # Nothing active: no intermediate loss, no NaN.
    total, _, _ = balance(state, losses, jnp.zeros(3), jnp.asarray(3.0))
    assert float(total) == 0.0
    with pytest.raises(ConfigError, match="balancer holds 3 pairs"):
        balance(state, jnp.ones(2), jnp.ones(2), jnp.asarray(1.0))
    with pytest.raises(ConfigError, match="target_ratio must be > 0, got 0.0$"):
        LossBalancer(3, target_ratio=0.0)


# --- CKA ------------------------------------------------------------------------------------------------------


def _np_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.normal(size=(40, 9)).astype(np.float32) + x @ rng.normal(size=(6, 9)).astype(np.float32)
    assert np.isclose(float(linear_cka(jnp.asarray(x), jnp.asarray(x))), 1.0, atol=1e-5)
    base = float(linear_cka(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(base, _np_cka(x.astype(np.float64), y.astype(np.float64)), rtol=1e-4)
    q = np.linalg.qr(rng.normal(size=(9, 9)))[0].astype(np.float32)
    np.testing.assert_allclose(float(linear_cka(jnp.asarray(x * 3.7), jnp.asarray(y @ q))), base, rtol=1e-4)
    # Masked rows are dropped.
    mask = rng.uniform(size=40) > 0.3
    np.testing.assert_allclose(float(linear_cka(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))),
                               _np_cka(x[mask].astype(np.float64), y[mask].astype(np.float64)), rtol=1e-4)


def test_cka_matrix_equals_feature_space_cka_in_float64():
    """The Gram form the probe computes (one copy of the student's Grams, normalised at the end) against the
    feature-space form `||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)` in float64 NumPy over the valid tokens,
    for every pair of layers, with masked tokens and layers of unequal scale."""
    rng = np.random.default_rng(3)
    b, s, ds, dt = 3, 10, 6, 9
    mask = np.ones((b, s), np.int32)
    mask[1, 6:] = 0
    student = [rng.normal(size=(b, s, ds)) * (1 + i) for i in range(4)]
    teacher = [rng.normal(size=(b, s, dt)) + 0.3 * np.tile(student[min(j, 3)][..., :1], dt) for j in range(6)]
    sim = np.asarray(jax.jit(cka_matrix)([jnp.asarray(h, jnp.float32) for h in student],
                                         [jnp.asarray(h, jnp.float32) for h in teacher], jnp.asarray(mask)))
    valid = mask.reshape(-1).astype(bool)

    def centred(h):
        x = h.reshape(-1, h.shape[-1])[valid]
        return x - x.mean(0)

    want = np.array([[np.linalg.norm(centred(y).T @ centred(x)) ** 2
                      / (np.linalg.norm(centred(x).T @ centred(x)) * np.linalg.norm(centred(y).T @ centred(y)))
                      for y in teacher[1:]] for x in student[1:]])
    # float32 Grams of 27 tokens: relative error ~1e-6 per entry; the ratio of sums keeps it near that.
    np.testing.assert_allclose(sim, want, rtol=1e-4, atol=1e-6)
    assert want.max() - want.min() > 0.3  # the comparison spans related and unrelated layers


def test_cka_matrix_recovers_planted_alignment():
    rng = np.random.default_rng(1)
    b, s, ds, dt = 4, 16, 8, 12
    mask = np.ones((b, s), np.int32)
    mask[0, :5] = 0
    student = [rng.normal(size=(b, s, ds)) for _ in range(4)]  # embeddings + 3 layer outputs
    planted = {0: 1, 1: 3, 2: 6}
    teacher = [rng.normal(size=(b, s, dt)) for _ in range(8)]  # embeddings + 7 layer outputs
    for i, j in planted.items():
        rot = np.linalg.qr(rng.normal(size=(dt, dt)))[0][:ds]  # [ds, dt], orthonormal rows
        teacher[j + 1] = 2.5 * student[i + 1] @ rot + 0.05 * rng.normal(size=(b, s, dt))
    sh = [jnp.asarray(h, jnp.float32) for h in student]
    th = [jnp.asarray(h, jnp.float32) for h in teacher]
    sim = np.asarray(jax.jit(cka_matrix)(sh, th, jnp.asarray(mask)))
    assert sim.shape == (3, 7)
    valid = mask.reshape(-1).astype(bool)
    for i in range(3):
        for j in range(7):
            ref = _np_cka(student[i + 1].reshape(-1, ds)[valid], teacher[j + 1].reshape(-1, dt)[valid])
            np.testing.assert_allclose(sim[i, j], ref, rtol=1e-3, atol=1e-5)
    assert best_monotone_assignment(sim, [0, 1, 2]) == ((0, 1), (1, 3), (2, 6))


@pytest.mark.parametrize("seed", range(8))
def test_best_monotone_assignment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_s, n_t = 5, 7
    sim = rng.normal(size=(n_s, n_t))
    layers = sorted(rng.choice(n_s, size=int(rng.integers(1, n_s + 1)), replace=False).tolist())
    best, best_pairs = -np.inf, None
    for teach in itertools.combinations(range(n_t), len(layers)):
        score = sum(sim[s, t] for s, t in zip(layers, teach))
        if score > best:
            best, best_pairs = score, tuple(zip(layers, teach))
    got = best_monotone_assignment(jnp.asarray(sim, jnp.float32), layers[::-1])
    assert got == best_pairs


def test_assignment_and_remap_errors():
    sim = np.zeros((3, 2))
    with pytest.raises(ConfigError, match="3 student layers cannot map injectively to 2"):
        best_monotone_assignment(sim, [0, 1, 2])
    with pytest.raises(ConfigError, match="student layer 3 out of range"):
        best_monotone_assignment(sim, [3])
    assert remap_pairs(((0, 1), (1, 3), (2, 5)), ((0, 1), (1, 4), (2, 5))) == (1,)
    assert remap_pairs(((0, 1),), ((0, 1),)) == ()
    with pytest.raises(ConfigError, match="old mapping has 1 pairs, the new one 2"):
        remap_pairs(((0, 1),), ((0, 1), (1, 2)))


# --- projection rewrite ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [(4, 8), (6, 6)])
def test_replace_projections_touches_only_changed(widths):
    pairs = ((0, 1), (1, 3), (2, 5))
    fp = FeatureProjections(pairs, *widths, key=jax.random.key(0))
    # Pretend training moved every projection away from its init.
    fp = jax.tree_util.tree_map(lambda w: w + 0.123, fp)
    new = replace_projections(fp, remap_pairs(pairs, ((0, 1), (1, 4), (2, 5))), key=jax.random.key(7))
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(fp)
    for p in (0, 2):
        assert np.array_equal(np.asarray(new[p].weight), np.asarray(fp[p].weight))
        assert new[p].weight is fp[p].weight
    w = np.asarray(new[1].weight)
    assert not np.allclose(w, np.asarray(fp[1].weight))
    if widths[0] == widths[1]:
        np.testing.assert_array_equal(w, np.eye(widths[0]))
    else:
        np.testing.assert_allclose(w.T @ w, (widths[1] / widths[0]) * np.eye(widths[0]), atol=1e-5)
    assert replace_projections(fp, (), key=jax.random.key(0)) is fp
    with pytest.raises(ConfigError, match="pair index 3 out of range"):
        replace_projections(fp, (3,), key=jax.random.key(0))
    assert eqx.tree_equal(replace_projections(fp, (0, 1, 2), key=jax.random.key(7))[1], new[1])
