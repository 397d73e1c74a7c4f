"""Feature matching: known answers against numpy, masking, identity projections, gradient flow."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.features import FeatureProjections, Projection, feature_loss, mapped_feature_losses
from vishwam.errors import ConfigError

B, S = 2, 5


def _np_loss(s, t, mask, kind, normalize, w=None):
    s, t = s.astype(np.float64), t.astype(np.float64)
    if w is not None:
        s = s @ w.T
    if normalize:
        s = s / np.sqrt(np.mean(s**2, -1, keepdims=True) + 1e-6)
        t = t / np.sqrt(np.mean(t**2, -1, keepdims=True) + 1e-6)
    if kind == "mse":
        per = np.mean((s - t) ** 2, -1)
    else:
        per = 1 - np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    return np.sum(per * mask) / np.sum(mask)


def _data(ds, dt, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, S, ds)).astype(np.float32)
    t = rng.normal(size=(B, S, dt)).astype(np.float32) * 2 + 0.5
    mask = np.ones((B, S), np.int32)
    mask[0, :2] = 0  # left padding
    mask[1, 4:] = 0  # right padding
    return s, t, mask


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("widths", [(6, 6), (4, 8), (8, 6)])
def test_known_answer(kind, normalize, widths):
    ds, dt = widths
    s, t, mask = _data(ds, dt)
    proj = None if ds == dt else Projection(ds, dt, key=jax.random.key(1))
    loss, metrics = feature_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), kind=kind, normalize=normalize,
                                 projection=proj)
    w = None if proj is None else np.asarray(proj.weight, np.float64)
    np.testing.assert_allclose(float(loss), _np_loss(s, t, mask, kind, normalize, w), rtol=1e-5, atol=1e-6)
    assert float(metrics[f"distill/feature/{kind}"]) == float(loss)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_masked_tokens_ignored(kind):
    s, t, mask = _data(6, 6)
    loss = feature_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), kind=kind, normalize=False,
                        projection=None)[0]
    s2, t2 = s.copy(), t.copy()
    s2[mask == 0] = 1e3
    t2[mask == 0] = 0.0  # a zero teacher vector must not produce NaN either
    loss2 = feature_loss(jnp.asarray(s2), jnp.asarray(t2), jnp.asarray(mask.astype(bool)), kind=kind,
                         normalize=False, projection=None)[0]
    np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-6)
    empty = feature_loss(jnp.asarray(s), jnp.asarray(t), jnp.zeros((B, S), jnp.int32), kind=kind, normalize=False,
                         projection=None)[0]
    assert float(empty) == 0.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_zero_when_equal_with_identity_projection(kind, normalize):
    s, _, mask = _data(6, 6)
    proj = Projection(6, 6, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(proj.weight), np.eye(6, dtype=np.float32))
    loss = feature_loss(jnp.asarray(s), jnp.asarray(s), jnp.asarray(mask), kind=kind, normalize=normalize,
                        projection=proj)[0]
    assert abs(float(loss)) < 1e-6


def test_projection_init():
    wide = Projection(4, 16, key=jax.random.key(0)).weight  # widening: orthonormal columns, scaled by sqrt(4)
    np.testing.assert_allclose(np.asarray(wide.T @ wide), 4.0 * np.eye(4), atol=1e-5)
    narrow = Projection(16, 4, key=jax.random.key(0)).weight  # narrowing: orthonormal rows
    np.testing.assert_allclose(np.asarray(narrow @ narrow.T), np.eye(4), atol=1e-5)
    assert wide.shape == (16, 4) and narrow.shape == (4, 16)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_gradients_reach_projection_and_student_only(kind):
    s, t, mask = _data(4, 8)
    proj = Projection(4, 8, key=jax.random.key(2))

    def f(student, teacher, projection):
        return feature_loss(student, teacher, jnp.asarray(mask), kind=kind, normalize=True, projection=projection)[0]

    g_s, g_t, g_p = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(s), jnp.asarray(t), proj)
    assert np.all(np.asarray(g_t) == 0.0)
    assert np.abs(np.asarray(g_p.weight)).sum() > 0
    g_s = np.asarray(g_s)
    assert np.all(np.isfinite(g_s)) and np.all(g_s[mask == 0] == 0.0) and np.abs(g_s[mask == 1]).sum() > 0


def test_errors():
    s, t, mask = _data(4, 8)
    with pytest.raises(ConfigError, match="student width 4 != teacher width 8"):
        feature_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), kind="mse", normalize=False, projection=None)
    with pytest.raises(ConfigError, match="projection maps 4 -> 6"):
        feature_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), kind="mse", normalize=False,
                     projection=Projection(4, 6, key=jax.random.key(0)))
    with pytest.raises(ConfigError, match="unknown kind 'l1'"):
        feature_loss(jnp.asarray(s), jnp.asarray(s), jnp.asarray(mask), kind="l1", normalize=False, projection=None)


def test_feature_projections_and_mapped_losses():
    pairs = ((0, 1), (1, 3))
    fp = FeatureProjections(pairs, 4, 8, key=jax.random.key(0))
    assert len(fp) == 2 and fp[0].weight.shape == (8, 4)
    assert not np.allclose(np.asarray(fp[0].weight), np.asarray(fp[1].weight))
    assert len(jax.tree_util.tree_leaves(eqx.filter(fp, eqx.is_inexact_array))) == 2
    rng = np.random.default_rng(0)
    sh = tuple(jnp.asarray(rng.normal(size=(B, S, 4)), jnp.float32) for _ in range(3))
    th = tuple(jnp.asarray(rng.normal(size=(B, S, 8)), jnp.float32) for _ in range(5))
    mask = jnp.ones((B, S), jnp.int32)
    run = eqx.filter_jit(lambda fp, sh, th: mapped_feature_losses(sh, th, mask, pairs, fp, kind="mse",
                                                                  normalize=False))
    losses, metrics = run(fp, sh, th)
    for p, (i, j) in enumerate(pairs):
        ref = feature_loss(sh[i + 1], th[j + 1], mask, kind="mse", normalize=False, projection=fp[p])[0]
        np.testing.assert_allclose(float(losses[p]), float(ref), rtol=1e-6)
        assert f"distill/feature/layer_{i}/mse" in metrics
    with pytest.raises(ConfigError, match="3 projections for 2 layer pairs"):
        mapped_feature_losses(sh, th, mask, pairs, FeatureProjections(((0, 0),) * 3, 4, 8, key=jax.random.key(0)),
                              kind="mse", normalize=False)
    with pytest.raises(ConfigError, match=r"pair \(2, 1\) out of range"):
        mapped_feature_losses(sh, th, mask, ((2, 1),), None, kind="mse", normalize=False)
