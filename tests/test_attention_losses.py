"""Attention-pattern KL (GQA head correspondence) and MiniLMv2 relation losses against references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from distill.attention import attention_kl_loss, reduce_teacher_heads, relation_loss
from vishwam.errors import ConfigError

B, S = 2, 6


def _mask():
    mask = np.ones((B, S), np.int32)
    mask[0, :2] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    return mask


def _allowed(mask):
    """[b, 1, q, k]: causal and key padding, as the models mask."""
    causal = np.tril(np.ones((S, S), bool))
    return causal[None, None] & mask.astype(bool)[:, None, None, :]


def _probs(rng, heads, mask):
    """Model-like attention probabilities: softmax over allowed keys, padded query rows all zero."""
    allowed = _allowed(mask)
    p = np.where(allowed, np.exp(rng.normal(size=(B, heads, S, S)) * 2), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    return np.where(mask.astype(bool)[:, None, :, None], p, 0.0)


def _np_kl(p_s, p_t, mask, eps=1e-8):
    """Mean over valid query rows and heads of sum over valid keys of p_t (log p_t - log p_s)."""
    total, count = 0.0, 0
    for b in range(B):
        for h in range(p_s.shape[1]):
            for q in range(S):
                if not mask[b, q]:
                    continue
                keys = mask[b].astype(bool)
                pt, ps = p_t[b, h, q, keys], p_s[b, h, q, keys]
                total += np.sum(pt * (np.log(pt + eps) - np.log(ps + eps)))
                count += 1
    return total / count


def test_kl_matches_numpy_and_torch():
    rng = np.random.default_rng(0)
    mask = _mask()
    p_s, p_t = _probs(rng, 4, mask), _probs(rng, 4, mask)
    loss, metrics = attention_kl_loss(jnp.asarray(p_s, jnp.float32), jnp.asarray(p_t, jnp.float32),
                                      jnp.asarray(mask), head_mapping="group_average")
    np.testing.assert_allclose(float(loss), _np_kl(p_s, p_t, mask), rtol=1e-5)
    assert float(metrics["distill/attention/kl"]) == float(loss)
    # torch's kl_div(log q, p) = p (log p - log q), 0 where p = 0; mean over valid rows and heads.
    rows = torch.nn.functional.kl_div(torch.log(torch.tensor(p_s) + 1e-8), torch.tensor(p_t), reduction="none")
    rows = rows.sum(-1) * torch.tensor(mask)[:, None, :]
    ref = rows.sum() / (mask.sum() * 4)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


def test_kl_ignores_padded_rows_and_keys_and_is_zero_when_identical():
    rng = np.random.default_rng(1)
    mask = _mask()
    p_s, p_t = _probs(rng, 2, mask), _probs(rng, 2, mask)
    loss = attention_kl_loss(jnp.asarray(p_s), jnp.asarray(p_t), jnp.asarray(mask), head_mapping="head_wise")[0]
    p_s2 = p_s.copy()
    p_s2[0, :, :2] = 0.7  # padded query rows
    p_s2[1, :, :, 5] = 0.3  # padded key column
    loss2 = attention_kl_loss(jnp.asarray(p_s2), jnp.asarray(p_t), jnp.asarray(mask), head_mapping="head_wise")[0]
    np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-6)
    same = attention_kl_loss(jnp.asarray(p_t), jnp.asarray(p_t), jnp.asarray(mask), head_mapping="head_wise")[0]
    assert abs(float(same)) < 1e-6


@pytest.mark.parametrize("group", [2, 4])
def test_gqa_group_average_known_answer(group):
    """Teacher heads built so that each contiguous group of `group` heads averages to the student's head."""
    rng = np.random.default_rng(2)
    mask = _mask()
    hs = 2
    allowed = _allowed(mask) & mask.astype(bool)[:, None, :, None]
    uniform = np.where(allowed, 1.0, 0.0)
    uniform = uniform / np.maximum(uniform.sum(-1, keepdims=True), 1)
    student = 0.5 * uniform + 0.5 * _probs(rng, hs, mask)  # >= uniform / 2 on every allowed key
    teacher = []
    for j in range(hs):
        for _ in range(group // 2):
            # d = 0.4 * uniform * z with z in [-1, 1] summing to 0 over the allowed keys: student +- d are
            # distributions (student >= uniform / 2 > |d|) whose mean is the student.
            z = np.where(allowed[:, 0], rng.uniform(-1, 1, size=(B, S, S)), 0.0)
            n = np.maximum(allowed[:, 0].sum(-1, keepdims=True), 1)
            z = np.where(allowed[:, 0], z - z.sum(-1, keepdims=True) / n, 0.0)
            z = z / np.maximum(np.abs(z).max(-1, keepdims=True), 1e-12)
            d = 0.4 * uniform[:, 0] * z
            teacher += [student[:, j] + d, student[:, j] - d]
    teacher = np.stack(teacher, axis=1)  # [B, hs*group, S, S]
    np.testing.assert_allclose(teacher.reshape(B, hs, group, S, S).mean(2), student, atol=1e-12)
    reduced = reduce_teacher_heads(jnp.asarray(teacher), hs, head_mapping="group_average")
    np.testing.assert_allclose(np.asarray(reduced), student, atol=1e-6)
    loss = attention_kl_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask),
                             head_mapping="group_average")[0]
    assert abs(float(loss)) < 1e-5
    # head_wise: student head j <-> teacher head j * group.
    loss_hw = attention_kl_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask),
                                head_mapping="head_wise")[0]
    np.testing.assert_allclose(float(loss_hw), _np_kl(student, teacher[:, ::group], mask), rtol=1e-5)
    assert float(loss_hw) > 1e-3


def test_student_with_more_heads_repeats_teacher_heads():
    rng = np.random.default_rng(3)
    mask = _mask()
    p_s, p_t = _probs(rng, 4, mask), _probs(rng, 2, mask)
    loss = attention_kl_loss(jnp.asarray(p_s), jnp.asarray(p_t), jnp.asarray(mask), head_mapping="group_average")[0]
    np.testing.assert_allclose(float(loss), _np_kl(p_s, np.repeat(p_t, 2, axis=1), mask), rtol=1e-5)


def test_kl_errors_and_gradients():
    rng = np.random.default_rng(4)
    mask = _mask()
    p_s, p_t = jnp.asarray(_probs(rng, 3, mask)), jnp.asarray(_probs(rng, 4, mask))
    with pytest.raises(ConfigError, match=r"teacher heads \(4\) and student heads \(3\)"):
        attention_kl_loss(p_s, p_t, jnp.asarray(mask), head_mapping="group_average")
    with pytest.raises(ConfigError, match="unknown head_mapping 'nearest'"):
        attention_kl_loss(p_t, p_t, jnp.asarray(mask), head_mapping="nearest")
    p_s = jnp.asarray(_probs(rng, 2, mask))
    g_s, g_t = jax.grad(
        lambda a, b: attention_kl_loss(a, b, jnp.asarray(mask), head_mapping="group_average")[0], argnums=(0, 1)
    )(p_s, p_t)
    assert np.all(np.asarray(g_t) == 0) and np.all(np.isfinite(np.asarray(g_s))) and np.abs(g_s).sum() > 0


# --- relation loss --------------------------------------------------------------------------------------------


def _qkv(rng, heads, kv_heads, head_dim):
    q = rng.normal(size=(B, heads, S, head_dim)).astype(np.float32)
    k = rng.normal(size=(B, kv_heads, S, head_dim)).astype(np.float32)
    v = rng.normal(size=(B, kv_heads, S, head_dim)).astype(np.float32)
    return q, k, v


def _np_relation_inputs(qkv, r):
    q, k, v = (np.asarray(x, np.float64) for x in qkv)
    h = q.shape[1]
    out = {}
    for name, x in zip("qkv", (q, k, v)):
        x = np.repeat(x, h // x.shape[1], axis=1)  # kv head -> the query heads that read it
        x = np.concatenate([x[:, i] for i in range(h)], axis=-1)  # [b, s, h*d]
        out[name] = np.stack(np.split(x, r, axis=-1), axis=1)  # [b, r, s, d_r]
    return out


def _np_relation(student, teacher, mask, r, relations, causal=False):
    xs, xt = _np_relation_inputs(student, r), _np_relation_inputs(teacher, r)
    allowed = np.broadcast_to(mask.astype(bool)[:, None, None, :], (B, 1, S, S))
    if causal:
        allowed = allowed & np.tril(np.ones((S, S), bool))
    total = 0.0
    for rel in relations:
        def logrel(x):
            sc = np.einsum("brqd,brkd->brqk", x[rel[0]], x[rel[1]]) / np.sqrt(x[rel[0]].shape[-1])
            e = np.where(allowed, np.exp(sc - sc.max(-1, keepdims=True)), 0.0)
            p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
            return p, np.log(np.where(allowed, p, 1.0))
        (_, ls), (pt, lt) = logrel(xs), logrel(xt)
        kl = (pt * (lt - ls)).sum(-1)  # [b, r, q]; padded query rows are dropped below
        total += (kl * mask[:, None, :]).sum() / (mask.sum() * r)
    return total


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "student, teacher, r",
    [((2, 1, 6), (4, 2, 8), 2), ((4, 4, 4), (8, 2, 4), 4), ((2, 2, 8), (6, 3, 4), 8)],
)
def test_relation_matches_numpy(student, teacher, r, causal):
    rng = np.random.default_rng(5)
    mask = _mask()
    s_qkv, t_qkv = _qkv(rng, *student), _qkv(rng, *teacher)
    relations = ("qq", "kk", "vv", "qk")
    loss, metrics = relation_loss(tuple(map(jnp.asarray, s_qkv)), tuple(map(jnp.asarray, t_qkv)), jnp.asarray(mask),
                                  num_relation_heads=r, relations=relations, causal=causal)
    np.testing.assert_allclose(float(loss), _np_relation(s_qkv, t_qkv, mask, r, relations, causal), rtol=1e-4)
    np.testing.assert_allclose(float(loss), sum(float(metrics[f"distill/relation/{x}"]) for x in relations),
                               rtol=1e-6)


def test_relation_zero_when_identical_and_invariances():
    rng = np.random.default_rng(6)
    mask = _mask()
    jmask = jnp.asarray(mask)
    s_qkv, t_qkv = _qkv(rng, 4, 2, 4), _qkv(rng, 8, 2, 4)

    def loss(s, t, **kw):
        return float(relation_loss(tuple(map(jnp.asarray, s)), tuple(map(jnp.asarray, t)), jmask,
                                   num_relation_heads=2, **kw)[0])

    assert abs(loss(s_qkv, s_qkv)) < 1e-6
    base = loss(s_qkv, t_qkv)
    assert base > 1e-3
    # GQA expansion: the same k/v written out with one kv head per query head gives the same loss.
    q, k, v = s_qkv
    assert np.isclose(loss((q, np.repeat(k, 2, 1), np.repeat(v, 2, 1)), t_qkv), base, rtol=1e-5)
    # A rotation within each relation head (here, of the whole 16-wide concatenation's two halves) changes no
    # relation. The concatenated width per relation head is 8 = 2 heads x 4 dims.
    rot = np.linalg.qr(rng.normal(size=(8, 8)))[0].astype(np.float32)

    def rotate(x):  # x [b, h, s, d]: rotate each group of 2 consecutive heads' concatenated features
        b, h, s, d = x.shape
        cat = x.transpose(0, 2, 1, 3).reshape(b, s, h // 2, 2 * d) @ rot
        return cat.reshape(b, s, h, d).transpose(0, 2, 1, 3)

    q4, k4, v4 = q, np.repeat(k, 2, 1), np.repeat(v, 2, 1)
    assert np.isclose(loss((rotate(q4), rotate(k4), rotate(v4)), t_qkv), base, rtol=1e-4)
    # Padded tokens change nothing.
    q2 = q.copy()
    q2[0, :, :2] = 50.0
    assert np.isclose(loss((q2, k, v), t_qkv), base, rtol=1e-5)


def test_relation_errors_and_gradients():
    rng = np.random.default_rng(7)
    mask = jnp.asarray(_mask())
    s_qkv = tuple(map(jnp.asarray, _qkv(rng, 2, 1, 6)))  # width 12
    t_qkv = tuple(map(jnp.asarray, _qkv(rng, 4, 2, 8)))  # width 32
    with pytest.raises(ConfigError, match=r"student heads\*head_dim = 2\*6 = 12 is not divisible by "
                                          r"num_relation_heads=8"):
        relation_loss(s_qkv, t_qkv, mask, num_relation_heads=8)
    with pytest.raises(ConfigError, match=r"teacher heads\*head_dim = 4\*8 = 32 is not divisible by "
                                          r"num_relation_heads=3"):
        relation_loss(s_qkv, t_qkv, mask, num_relation_heads=3)
    with pytest.raises(ConfigError, match="unknown relation 'qx'"):
        relation_loss(s_qkv, t_qkv, mask, num_relation_heads=2, relations=("qq", "qx"))
    with pytest.raises(ConfigError, match="num_relation_heads must be a positive int, got 0$"):
        relation_loss(s_qkv, t_qkv, mask, num_relation_heads=0)
    grads = jax.grad(lambda s, t: relation_loss(s, t, mask, num_relation_heads=2)[0], argnums=(0, 1))(s_qkv, t_qkv)
    assert all(np.all(np.asarray(g) == 0) for g in grads[1])
    assert all(np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0 for g in grads[0])
