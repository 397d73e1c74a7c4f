"""Known-answer tests for distill/logits/ against float64 numpy references (and torch for cross-entropy)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.logits import (
    KD_KINDS,
    align_vocab,
    chunked_map,
    cross_entropy_loss,
    kd_ce_loss,
    kd_loss,
    linear_kd_ce_loss,
    sparse_kd_loss,
    teacher_topk,
)
from vishwam.errors import ConfigError

B, S, V = 2, 7, 11
topk = jax.jit(teacher_topk, static_argnums=1)


# --------------------------------------------------------------------------------------------------- references


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kd(student, teacher, mask, temperature, kind, beta=0.5):
    """Float64 reference: per-token divergence, masked mean."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    vocab = min(s.shape[-1], t.shape[-1])
    s, t = s[..., :vocab], t[..., :vocab]
    temp = np.broadcast_to(np.asarray(temperature, np.float64), mask.shape)[..., None]
    log_q, log_p = np_log_softmax(s / temp), np_log_softmax(t / temp)
    p, q = np.exp(log_p), np.exp(log_q)
    if kind == "forward_kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)
    else:
        d = 0.5 * np.abs(p - q).sum(-1)
    if kind != "tv":
        d = d * temp[..., 0] ** 2
    mask = np.asarray(mask, np.float64)
    return (d * mask).sum() / max(mask.sum(), 1.0)


def np_collapsed_kl(student, teacher, k, temperature, mask):
    """Forward KL between (k + 1)-bucket distributions; the teacher tail at T uses the equal-logit rule."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    vocab = s.shape[-1]
    total, count = 0.0, 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            order = np.argsort(-t[b, i], kind="stable")
            top, rest = order[:k], order[k:]
            q = np.exp(np_log_softmax(s[b, i] / temperature))
            q_buckets = np.append(q[top], q[rest].sum())
            tail_lse = np.log(np.exp(t[b, i, rest]).sum())
            n_tail = vocab - k
            tail_logit = np.log(n_tail) + (tail_lse - np.log(n_tail)) / temperature
            p_buckets = np.exp(np_log_softmax(np.append(t[b, i, top] / temperature, tail_logit)))
            total += (p_buckets * np.log(p_buckets / q_buckets)).sum() * temperature**2
            count += 1
    return total / max(count, 1.0)


def make_inputs(seed=0, batch=B, seq=S, vocab=V, teacher_vocab=None, scale=3.0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(batch, seq, vocab)).astype(np.float32) * scale
    teacher = rng.normal(size=(batch, seq, teacher_vocab or vocab)).astype(np.float32) * scale
    mask = rng.random((batch, seq)) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


# --------------------------------------------------------------------------------------------------- dense KD


@functools.partial(jax.jit, static_argnames="chunk_size")
def kd_every_kind(student, teacher, mask, temperature, chunk_size=None):
    """`((loss, metrics), student gradient)` of every KD kind, with a `[batch, seq]` temperature array.

    One jitted function that most tests share, so that they share its compilations too.
    """

    def one(kind):
        def f(x):
            return kd_loss(x, teacher, mask, temperature=temperature, kind=kind, chunk_size=chunk_size)

        return jax.value_and_grad(f, has_aux=True)(student)

    return {kind: one(kind) for kind in KD_KINDS}


def constant(temperature):
    return np.full((B, S), temperature, np.float32)


def test_kd_matches_numpy():
    s, t, mask = make_inputs()
    agree = (s.argmax(-1) == t.argmax(-1))[mask].mean()
    for temp in (1.0, 2.5):
        for kind, ((loss, metrics), _) in kd_every_kind(s, t, mask, constant(temp)).items():
            assert loss.dtype == jnp.float32 and loss.shape == ()
            np.testing.assert_allclose(loss, np_kd(s, t, mask, temp, kind), rtol=2e-5, atol=1e-6, err_msg=kind)
            assert metrics["distill/kd"] == loss
            np.testing.assert_allclose(metrics["distill/top1_agreement"], agree, rtol=1e-6)
    # The T² factor, spelled out: the loss at T is T² times the plain KL between the softened distributions.
    log_q, log_p = np_log_softmax(s.astype(np.float64) / 2.5), np_log_softmax(t.astype(np.float64) / 2.5)
    plain_kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)[mask].mean()
    forward_kl = kd_every_kind(s, t, mask, constant(2.5))["forward_kl"][0][0]
    np.testing.assert_allclose(forward_kl / plain_kl, 2.5**2, rtol=2e-5)


def test_python_and_scalar_temperature():
    s, t, mask = make_inputs(1)

    @jax.jit
    def losses(*a):
        return (
            kd_loss(*a, temperature=1.5, kind="jsd", beta=0.3)[0],
            kd_loss(*a, temperature=jnp.float32(1.5), kind="jsd", beta=0.3)[0],
        )

    python_float, scalar_array = losses(s, t, mask)
    np.testing.assert_allclose(python_float, np_kd(s, t, mask, 1.5, "jsd", 0.3), rtol=2e-5)
    assert python_float == scalar_array


def test_jsd_beta_and_endpoints():
    s, t, mask = make_inputs(2)

    @jax.jit
    def losses(*a):
        return [kd_loss(*a, temperature=1.5, kind="jsd", beta=beta)[0] for beta in (0.1, 0.9, 0.0, 1.0)]

    jsd1, jsd9, jsd0, jsd10 = losses(s, t, mask)
    np.testing.assert_allclose(jsd1, np_kd(s, t, mask, 1.5, "jsd", 0.1), rtol=2e-5)
    np.testing.assert_allclose(jsd9, np_kd(s, t, mask, 1.5, "jsd", 0.9), rtol=2e-5)
    # beta = 0 and 1 make the JSD identically 0; like TRL's GKD they mean forward and reverse KL.
    np.testing.assert_allclose(jsd0, np_kd(s, t, mask, 1.5, "forward_kl"), rtol=2e-5)
    np.testing.assert_allclose(jsd10, np_kd(s, t, mask, 1.5, "reverse_kl"), rtol=2e-5)


def test_per_token_temperature():
    s, t, mask = make_inputs(4)
    temps = np.random.default_rng(4).uniform(0.5, 3.0, size=(B, S)).astype(np.float32)
    for kind, ((loss, _), _) in kd_every_kind(s, t, mask, temps).items():
        np.testing.assert_allclose(loss, np_kd(s, t, mask, temps, kind), rtol=2e-5, err_msg=kind)


def test_masked_tokens_do_not_matter():
    s, t, mask = make_inputs(5)
    clean = kd_every_kind(s, t, mask, constant(2.0))
    s2, t2 = s.copy(), t.copy()
    s2[~mask] = 1e30
    s2[~mask, 0] = np.inf
    t2[~mask] = np.nan
    temps = np.where(mask, 2.0, 0.0).astype(np.float32)  # zero temperature where masked
    for kind, ((dirty, _), grad) in kd_every_kind(s2, t2, mask, temps).items():
        np.testing.assert_allclose(dirty, clean[kind][0][0], rtol=1e-6, err_msg=kind)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0), kind


def test_all_masked_is_zero_and_01_mask():
    s, t, mask = make_inputs(6)

    @jax.jit
    def losses(student, teacher, m):
        return [kd_loss(student, teacher, mm, temperature=1.0, kind="jsd") for mm in (jnp.zeros_like(m), m)]

    (loss, metrics), (loss01, _) = losses(s, t, mask.astype(np.int32))
    assert loss == 0 and metrics["distill/top1_agreement"] == 0
    np.testing.assert_allclose(loss01, np_kd(s, t, mask, 1.0, "jsd"), rtol=2e-5)  # a 0/1 mask is a bool one


def test_zero_when_student_equals_teacher():
    s, _, mask = make_inputs(7)
    for kind, ((loss, _), grad) in kd_every_kind(s, s, mask, constant(1.7)).items():
        assert loss == 0, kind
        np.testing.assert_allclose(grad, 0.0, atol=1e-7, err_msg=kind)


def test_extreme_logits_finite_gradients():
    s, t, mask = make_inputs(8, scale=1e4)
    for kind, ((loss, _), grad) in kd_every_kind(s, t, mask, constant(1.0)).items():
        assert np.isfinite(loss) and np.all(np.isfinite(grad)), kind


def test_teacher_gets_no_gradient():
    s, t, mask = make_inputs(9)

    @jax.jit
    def grads(student, teacher, m):
        return [
            jax.grad(lambda x: kd_loss(student, x, m, temperature=2.0, kind=kind)[0])(teacher) for kind in KD_KINDS
        ]

    for kind, g in zip(KD_KINDS, grads(s, t, mask)):
        assert np.all(np.asarray(g) == 0), kind


@pytest.mark.parametrize("teacher_vocab", [14, 9])
def test_vocab_alignment(teacher_vocab):
    s, t, mask = make_inputs(10, teacher_vocab=teacher_vocab)
    t[..., V:] = 50.0  # extra teacher rows are dropped, whatever they hold
    aligned_s, aligned_t = align_vocab(jnp.asarray(s), jnp.asarray(t))
    shared = min(V, teacher_vocab)
    assert aligned_s.shape == aligned_t.shape == (B, S, shared)
    loss, _ = jax.jit(lambda *a: kd_loss(*a, temperature=2.0, kind="forward_kl"))(s, t, mask)
    np.testing.assert_allclose(loss, np_kd(s[..., :shared], t[..., :shared], mask, 2.0, "forward_kl"), rtol=2e-5)


def test_chunked_equals_unchunked():
    s, t, mask = make_inputs(11)
    temps = np.random.default_rng(11).uniform(0.7, 2.0, size=(B, S)).astype(np.float32)
    whole = kd_every_kind(s, t, mask, temps)
    chunked = kd_every_kind(s, t, mask, temps, chunk_size=3)  # 7 tokens: 3 + 3 + 1 (padded)
    for kind in KD_KINDS:
        (l1, m1), g1 = whole[kind]
        (l3, m3), g3 = chunked[kind]
        np.testing.assert_allclose(l3, l1, rtol=1e-6, atol=1e-7, err_msg=kind)
        assert m3["distill/top1_agreement"] == m1["distill/top1_agreement"]
        np.testing.assert_allclose(g3, g1, rtol=1e-5, atol=1e-7, err_msg=kind)


def test_bf16_inputs():
    s, t, mask = make_inputs(12)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    s32, t32 = np.asarray(s16.astype(jnp.float32)), np.asarray(t16.astype(jnp.float32))
    for kind, ((loss, metrics), grad) in kd_every_kind(s16, t16, mask, constant(2.0), chunk_size=4).items():
        assert loss.dtype == jnp.float32 and metrics["distill/top1_agreement"].dtype == jnp.float32
        np.testing.assert_allclose(loss, np_kd(s32, t32, mask, 2.0, kind), rtol=2e-5, err_msg=kind)
        assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad.astype(jnp.float32)))), kind


def test_large_vocab_chunked():
    s, t, mask = make_inputs(13, batch=2, seq=19, vocab=5000)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)

    @jax.jit
    def step(student):
        def f(x, chunk_size):
            return kd_loss(x, t16, jnp.asarray(mask), temperature=2.0, kind="forward_kl", chunk_size=chunk_size)[0]

        return jax.value_and_grad(f)(student, 4), jax.value_and_grad(f)(student, None)

    (l4, g4), (l1, g1) = step(s16)
    assert np.isfinite(l4) and np.all(np.isfinite(np.asarray(g4.astype(jnp.float32))))
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g4.astype(jnp.float32)), np.asarray(g1.astype(jnp.float32)), atol=1e-6)


def test_kd_validation():
    s, t, mask = (jnp.asarray(a) for a in make_inputs(14))
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number > 0, got 0\.0$"):
        kd_loss(s, t, mask, temperature=0.0, kind="forward_kl")
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number > 0, got -1\.0$"):
        kd_loss(s, t, mask, temperature=-1.0, kind="forward_kl")
    with pytest.raises(ConfigError, match=r"^kd beta must be in \[0, 1\], got 1\.5$"):
        kd_loss(s, t, mask, temperature=1.0, kind="jsd", beta=1.5)
    with pytest.raises(ConfigError, match=r"^kd kind must be one of .*; got 'kl_forward'$"):
        kd_loss(s, t, mask, temperature=1.0, kind="kl_forward")
    with pytest.raises(ConfigError, match=r"^chunk_size must be a positive integer or None, got 0$"):
        kd_loss(s, t, mask, temperature=1.0, kind="tv", chunk_size=0)


# --------------------------------------------------------------------------------------------------- sparse KD


def test_teacher_topk_cache():
    _, t, _ = make_inputs(15)
    wide = np.concatenate([t, t + 100], -1)  # extra rows past the student vocabulary, dropped by vocab_size

    @jax.jit
    def caches(teacher, wide_teacher):
        return (
            teacher_topk(teacher, 4, chunk_size=3),
            teacher_topk(teacher, V),
            teacher_topk(wide_teacher, 4, vocab_size=V, chunk_size=2),
        )

    (values, indices, tail), (_, _, no_tail), (sliced, _, sliced_tail) = caches(t, wide)
    order = np.argsort(-t, axis=-1, kind="stable")
    np.testing.assert_array_equal(indices, order[..., :4])
    np.testing.assert_array_equal(values, np.take_along_axis(t, order[..., :4], -1))
    rest = np.take_along_axis(t.astype(np.float64), order[..., 4:], -1)
    np.testing.assert_allclose(tail, np.log(np.exp(rest).sum(-1)), rtol=1e-6)
    assert indices.dtype == jnp.int32 and tail.dtype == jnp.float32
    assert np.all(np.isneginf(no_tail))
    np.testing.assert_array_equal(sliced, values)
    np.testing.assert_allclose(sliced_tail, tail, rtol=1e-6)


def test_sparse_full_k_equals_dense():
    s, t, mask = make_inputs(16)
    temperatures = (1.0, 2.0)

    @jax.jit
    def losses(student, teacher, m):
        cache = teacher_topk(teacher, V)
        return [
            (
                sparse_kd_loss(student, *cache, m, temperature=temp),
                kd_loss(student, teacher, m, temperature=temp, kind="forward_kl"),
            )
            for temp in temperatures
        ]

    for temp, ((sparse, metrics), (dense, dense_metrics)) in zip(temperatures, losses(s, t, mask)):
        np.testing.assert_allclose(sparse, dense, rtol=1e-6)
        np.testing.assert_allclose(sparse, np_kd(s, t, mask, temp, "forward_kl"), rtol=2e-5)
        assert metrics["distill/top1_agreement"] == dense_metrics["distill/top1_agreement"]
        assert metrics["distill/teacher_tail_mass"] == 0


def test_sparse_topk_matches_collapsed_numpy():
    s, t, mask = make_inputs(17)
    k, temperatures = 4, (1.0, 0.5, 3.0)

    @jax.jit
    def losses(student, teacher, m):
        cache = teacher_topk(teacher, k)
        return [sparse_kd_loss(student, *cache, m, temperature=temp) for temp in temperatures]

    log_p = np_log_softmax(t.astype(np.float64))
    tail_mass = 1 - np.sort(np.exp(log_p), -1)[..., -k:].sum(-1)
    for temp, (loss, metrics) in zip(temperatures, losses(s, t, mask)):
        # Exact at T = 1; at other T the numpy reference applies the documented equal-logit tail rule.
        np.testing.assert_allclose(loss, np_collapsed_kl(s, t, k, temp, mask), rtol=2e-5, err_msg=str(temp))
        np.testing.assert_allclose(metrics["distill/teacher_tail_mass"], tail_mass[mask].mean(), rtol=1e-5)
        if temp == 1.0:
            # Merging buckets only loses information: KL(collapsed) <= KL(full) (data-processing inequality).
            assert float(loss) <= np_kd(s, t, mask, 1.0, "forward_kl")


def test_sparse_chunked_masked_bf16():
    s, t, mask = make_inputs(19)
    values, indices, tail = topk(t, 5)
    values = values.astype(jnp.bfloat16)
    # Garbage where masked: huge student logits, out-of-range ids, NaN tail.
    s2 = np.where(mask[..., None], s, 1e30).astype(np.float32)
    indices = jnp.where(jnp.asarray(mask)[..., None], indices, 10_000)
    tail = jnp.where(jnp.asarray(mask), tail, jnp.nan)

    def f(student, chunk_size):
        return sparse_kd_loss(
            student, values, indices, tail, jnp.asarray(mask), temperature=2.0, chunk_size=chunk_size
        )[0]

    value_and_grad = jax.jit(jax.value_and_grad(f), static_argnums=1)
    l1, g1 = value_and_grad(jnp.asarray(s2), None)
    l3, g3 = value_and_grad(jnp.asarray(s2), 3)
    # The cache holds bf16-rounded teacher logits: compare with the fp32 reference loosely, chunking tightly.
    np.testing.assert_allclose(l1, np_collapsed_kl(s, t, 5, 2.0, mask), rtol=2e-2)
    np.testing.assert_allclose(l3, l1, rtol=1e-6)
    np.testing.assert_allclose(g3, g1, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(g1)) and np.all(np.asarray(g1)[~mask] == 0)


def test_sparse_validation():
    s, t, mask = (jnp.asarray(a) for a in make_inputs(20))
    with pytest.raises(ConfigError, match=rf"^top-k k must be in \[1, {V}\] \(the vocabulary\), got {V + 1}$"):
        teacher_topk(t, V + 1)
    cache = topk(t, 3)
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number > 0, got 0\.0$"):
        sparse_kd_loss(s, *cache, mask, temperature=0.0)


# --------------------------------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_torch():
    s, _, mask = make_inputs(21)
    labels = np.random.default_rng(21).integers(0, V, size=(B, S))
    labels[~mask] = -100
    settings = [(eps, chunk) for eps in (0.0, 0.1, 0.3) for chunk in (None, 3)]

    @jax.jit
    def losses(x, y, m):
        return [cross_entropy_loss(x, y, m, label_smoothing=eps, chunk_size=chunk) for eps, chunk in settings]

    accuracy = (s.argmax(-1) == labels)[mask].mean()
    for (eps, chunk), (loss, metrics) in zip(settings, losses(s, labels, mask)):
        expected = F.cross_entropy(
            torch.tensor(s, dtype=torch.float64).reshape(-1, V),
            torch.tensor(labels).reshape(-1),
            ignore_index=-100,
            label_smoothing=eps,
        )
        np.testing.assert_allclose(loss, expected.item(), rtol=1e-5, err_msg=f"eps={eps} chunk={chunk}")
        np.testing.assert_allclose(metrics["distill/accuracy"], accuracy, rtol=1e-6)


def test_cross_entropy_chunked_grads_and_bf16():
    s, _, mask = make_inputs(22)
    labels = jnp.asarray(np.random.default_rng(22).integers(0, V, size=(B, S)))

    def f(x, chunk_size):
        return cross_entropy_loss(x, labels, jnp.asarray(mask), label_smoothing=0.1, chunk_size=chunk_size)[0]

    grad = jax.jit(jax.grad(f), static_argnums=1)
    np.testing.assert_allclose(grad(jnp.asarray(s), 3), grad(jnp.asarray(s), None), atol=1e-7)
    s16 = jnp.asarray(s, jnp.bfloat16)
    loss16 = jax.jit(f, static_argnums=1)(s16, 2)
    expected = F.cross_entropy(
        torch.tensor(np.asarray(s16.astype(jnp.float32)), dtype=torch.float64)[mask],
        torch.tensor(np.asarray(labels, np.int64))[mask],
        label_smoothing=0.1,
    )
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, expected.item(), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"^label_smoothing must be in \[0, 1\], got 1\.5$"):
        cross_entropy_loss(jnp.asarray(s), labels, jnp.asarray(mask), label_smoothing=1.5)


# --------------------------------------------------------------------------------------------------- fused KD + CE


def torch_kd_ce(student, teacher, labels, mask, temperature, kd_weight, ce_weight, eps):
    """Float64 torch autograd reference of `kd_weight · KL(p || q)·T² + ce_weight · CE`, and its gradient."""
    x = torch.tensor(np.asarray(student), dtype=torch.float64, requires_grad=True)
    t = torch.tensor(np.asarray(teacher), dtype=torch.float64)
    vocab = min(x.shape[-1], t.shape[-1])
    m = torch.tensor(np.asarray(mask), dtype=torch.float64)
    temp = torch.tensor(np.broadcast_to(np.asarray(temperature, np.float64), mask.shape).copy())[..., None]
    log_q = F.log_softmax(x[..., :vocab] / temp, -1)
    log_p = F.log_softmax(t[..., :vocab] / temp, -1)
    kd = ((log_p.exp() * (log_p - log_q)).sum(-1) * temp[..., 0] ** 2 * m).sum() / m.sum()
    y = torch.tensor(np.where(mask, labels, -100))
    ce = F.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1), ignore_index=-100, label_smoothing=eps)
    total = kd_weight * kd + ce_weight * ce
    total.backward()
    return total.item(), kd.item(), ce.item(), x.grad.numpy()


@pytest.mark.parametrize("teacher_vocab", [V, V - 3, V + 4])
def test_kd_ce_matches_torch_autograd(teacher_vocab):
    s, t, mask = make_inputs(31, teacher_vocab=teacher_vocab)
    labels = np.random.default_rng(31).integers(0, V, size=(B, S))
    temps = np.random.default_rng(32).uniform(0.5, 3.0, size=(B, S)).astype(np.float32)
    settings = [(2.0, 0.0, None), (1.0, 0.1, 3), (temps, 0.2, 2)]

    @jax.jit
    def run(x, t, y, m, temps):
        out = []
        for temperature, eps, chunk in settings:
            temperature = temps if isinstance(temperature, np.ndarray) else temperature

            def f(x):
                return kd_ce_loss(x, t, y, m, temperature=temperature, kd_weight=1.3, ce_weight=0.7,
                                  label_smoothing=eps, chunk_size=chunk)

            out.append(jax.value_and_grad(f, has_aux=True)(x))
        return out

    for (temperature, eps, chunk), ((loss, metrics), grad) in zip(settings, run(s, t, labels, mask, temps)):
        total, kd, ce, expected_grad = torch_kd_ce(s, t, labels, mask, temperature, 1.3, 0.7, eps)
        what = f"T={'per-token' if isinstance(temperature, np.ndarray) else temperature} eps={eps} chunk={chunk}"
        np.testing.assert_allclose(loss, total, rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(metrics["distill/kd"], kd, rtol=1e-5, atol=1e-7, err_msg=what)
        np.testing.assert_allclose(metrics["distill/ce"], ce, rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7, err_msg=what)
        assert np.all(np.asarray(grad)[~mask] == 0), what


def test_kd_ce_equals_separate_losses_and_objective_paths():
    """The fused loss gives the values and gradient of `kd_loss` + `cross_entropy_loss` (autodiff), and the
    objective takes either path with the same result."""
    from distill.config import DistillationParams, TemperatureConfig
    from distill.objective import Objective, TeacherOutputs, distill_loss
    from models import CausalLMOutput

    s, t, mask = make_inputs(33, teacher_vocab=V - 2)
    labels = jnp.asarray(np.random.default_rng(33).integers(0, V, size=(B, S)))

    def objective(x, fused, ce_weight):
        spec = Objective(DistillationParams(kd_weight=0.8, ce_weight=ce_weight, temperature=TemperatureConfig(start=2.0),
                                            label_smoothing=0.1, fused_logit_loss=fused))
        loss, metrics, _ = distill_loss(spec, CausalLMOutput(logits=x), TeacherOutputs(logits=jnp.asarray(t)),
                                        labels, jnp.asarray(mask), jnp.asarray(0), None, None)
        return loss, metrics

    for ce_weight in (0.0, 0.5):
        g = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=(1, 2))
        (fused, m_fused), g_fused = g(jnp.asarray(s), True, ce_weight)
        (plain, m_plain), g_plain = g(jnp.asarray(s), False, ce_weight)
        np.testing.assert_allclose(fused, plain, rtol=1e-6)
        np.testing.assert_allclose(g_fused, g_plain, rtol=1e-5, atol=1e-8)
        assert set(m_fused) == set(m_plain)
        for key in m_plain:
            np.testing.assert_allclose(m_fused[key], m_plain[key], rtol=1e-6, atol=1e-8, err_msg=key)


def test_kd_ce_masked_garbage_bf16_and_validation():
    s, t, mask = make_inputs(34)
    labels = np.random.default_rng(34).integers(0, V, size=(B, S))
    bad_s, bad_t, bad_labels = s.copy(), t.copy(), labels.copy()
    bad_s[~mask], bad_t[~mask], bad_labels[~mask] = np.nan, np.inf, -100

    def f(x, t, y):
        return kd_ce_loss(x, t, y, jnp.asarray(mask), temperature=2.0, kd_weight=1.0, ce_weight=0.5)[0]

    vg = jax.jit(jax.value_and_grad(f))
    (clean, g_clean), (dirty, g_dirty) = vg(s, t, labels), vg(bad_s, bad_t, bad_labels)
    assert clean == dirty
    np.testing.assert_array_equal(g_clean, g_dirty)
    loss16, g16 = vg(jnp.asarray(s, jnp.bfloat16), t, labels)
    assert loss16.dtype == jnp.float32 and g16.dtype == jnp.bfloat16
    expected, *_ = torch_kd_ce(np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32)), t, labels, mask, 2.0,
                               1.0, 0.5, 0.0)
    np.testing.assert_allclose(loss16, expected, rtol=1e-5)
    s, t, labels, mask = map(jnp.asarray, (s, t, labels, mask))
    with pytest.raises(ConfigError, match=r"^label_smoothing must be in \[0, 1\], got 2\.0$"):
        kd_ce_loss(s, t, labels, mask, temperature=1.0, kd_weight=1.0, ce_weight=1.0, label_smoothing=2.0)
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number > 0, got 0\.0$"):
        kd_ce_loss(s, t, labels, mask, temperature=0.0, kd_weight=1.0, ce_weight=1.0)
    with pytest.raises(ConfigError, match=r"^kd_weight and ce_weight must be >= 0, got -1\.0 and 1\.0$"):
        kd_ce_loss(s, t, labels, mask, temperature=1.0, kd_weight=-1.0, ce_weight=1.0)


@pytest.mark.parametrize("tied_vocab", [V, V + 3])
def test_linear_kd_ce_equals_unembed_then_kd_ce(tied_vocab):
    """With the LM head inside the loss: the values and the gradients with respect to the hidden states and the
    head equal those of `kd_ce_loss` on `hidden @ weight.T` (itself checked against torch above), for chunk
    sizes that divide the sequence, that do not (padding), and none; in fp32 and bf16."""
    rng = np.random.default_rng(41)
    hidden = jnp.asarray(rng.normal(size=(B, S, 6)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(tied_vocab, 6)) * 0.7, jnp.float32)
    _, t, mask = make_inputs(41)
    labels = jnp.asarray(rng.integers(0, V, size=(B, S)))
    t, mask = jnp.asarray(t), jnp.asarray(mask)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        for chunk in (None, 3, S):
            def reference(h, w):
                logits = jnp.einsum("bsd,vd->bsv", h.astype(dtype), w.astype(dtype))
                return kd_ce_loss(logits, t, labels, mask, temperature=1.5, kd_weight=0.9, ce_weight=0.4,
                                  label_smoothing=0.05, chunk_size=chunk)

            def fused(h, w):
                return linear_kd_ce_loss(h.astype(dtype), w, t, labels, mask, temperature=1.5, kd_weight=0.9,
                                         ce_weight=0.4, label_smoothing=0.05, chunk_size=chunk)

            grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
            (a, ma), (gha, gwa) = jax.jit(grad(reference))(hidden, weight)
            (b, mb), (ghb, gwb) = jax.jit(grad(fused))(hidden, weight)
            what = f"{jnp.dtype(dtype).name} chunk={chunk}"
            np.testing.assert_allclose(b, a, rtol=tol, err_msg=what)
            assert set(ma) == set(mb), what
            for key in ma:
                np.testing.assert_allclose(mb[key], ma[key], rtol=tol, atol=1e-7, err_msg=f"{what} {key}")
            scale_h, scale_w = float(jnp.max(jnp.abs(gha))), float(jnp.max(jnp.abs(gwa)))
            np.testing.assert_allclose(ghb, gha, rtol=tol, atol=tol * scale_h, err_msg=what)
            np.testing.assert_allclose(gwb, gwa, rtol=tol, atol=tol * scale_w, err_msg=what)
            assert gwb.dtype == weight.dtype


def test_chunks_stay_on_the_devices_that_hold_their_rows():
    """Rows sharded over 4 devices: each chunk is the same positions of every row, so a device works on its own
    rows' `[2, chunk, vocab]` logits. (Cutting the flat token axis put a whole chunk on one device, and the scan
    over chunks then had every device compute every chunk: XLA held a whole `[8, chunk, vocab]` chunk.)"""
    from jax.sharding import NamedSharding, PartitionSpec

    from vishwam.sharding import make_mesh

    mesh = make_mesh(1, 4, 1)
    rows, seq, dim, vocab, chunk = 8, 64, 32, 1000, 16

    def per_token(h, w):
        return chunked_map(lambda x: jax.nn.logsumexp(x @ w.T, axis=-1), (h,), chunk)

    h = jax.ShapeDtypeStruct((rows, seq, dim), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    w = jax.ShapeDtypeStruct((vocab, dim), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(per_token).lower(h, w).compile()
    whole_chunk = rows * chunk * vocab * 4  # one chunk's logits of all rows, fp32
    assert compiled.memory_analysis().temp_size_in_bytes < whole_chunk
    assert compiled.output_shardings.spec[0] == "fsdp"  # the per-token outputs stay with their rows
    hlo = compiled.as_text()
    assert f"f32[{rows // 4},{chunk},{vocab}]" in hlo and f"f32[{rows},{chunk},{vocab}]" not in hlo
