"""Known answers for the cross-tokenizer losses (distill.cross_tokenizer).

Tolerances: the losses are fp32 sums of O(seq) terms of size O(1-10), so a few ulps of the sum (~1e-6 relative)
where the reference is the same math in another order; an independent re-score through transformers (another
implementation of the teacher, fp32 matmuls in another order) agrees to ~1e-4 nats per token.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

import vishwam
from distill.cross_tokenizer import (
    alm_divergence,
    alm_loss,
    binarised_kl,
    chunk_logprobs,
    complete_chunks,
    linear_shared_vocab_kl,
    linear_token_logprobs,
    shared_positions,
    shared_vocab_kl,
    token_logprobs,
)
from distill.logits import kd_loss
from vishwam.data.cross.alignment import Encoding, align, encode_bytes

TEACHER_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher")


def _case(seed=0, batch=2, seq=12, vocab=37):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(batch, seq, vocab)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, size=(batch, seq)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, seq)) > 0.2)
    return rng, logits, labels, mask


def _random_chunks(rng, batch, seq):
    """Nondecreasing chunk ids per row with chunks of 1-3 tokens."""
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=seq // 2, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(seq), side="right")
    return jnp.asarray(out)


def test_identical_tokenizers_shared_kl_equals_forward_kl():
    rng, s, labels, mask = _case()
    t = jnp.asarray(rng.normal(size=s.shape) * 3, jnp.float32)
    batch, seq, vocab = s.shape
    chunk = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))  # every chunk one token
    ids = jnp.arange(vocab, dtype=jnp.int32)
    ones = jnp.ones((batch, seq), bool)
    for temperature, chunk_size in ((1.0, None), (2.0, 5)):
        ours, _ = shared_vocab_kl(s, mask, chunk, t, mask, chunk, ones, ids, ids, temperature=temperature,
                                  chunk_size=chunk_size)
        ref, _ = kd_loss(s, t, mask, temperature=temperature, kind="forward_kl")
        np.testing.assert_allclose(float(ours), float(ref), rtol=2e-6)


def test_identical_tokenizer_alignment_is_one_token_per_chunk():
    tok = Tokenizer.from_file(os.path.join(TEACHER_DIR, "tokenizer.json"))
    text = "def f(x):\n    return x ** 2  # ünïcode 😀\n"
    e = encode_bytes(tok, text)
    a = align(e, e)
    assert a.n_chunks == len(e.ids) and a.one_to_one.all()
    assert np.array_equal(a.student_chunk, np.arange(len(e.ids)))


def test_teacher_equals_student_alm_and_gradient_zero():
    rng, logits, labels, mask = _case(1)
    chunk = _random_chunks(rng, *labels.shape)
    n = labels.shape[1]

    def loss(s):
        return alm_loss(s, labels, mask, chunk, logits, labels, mask, chunk, num_chunks=n, chunk_size=5)[0]

    value, grad = jax.jit(jax.value_and_grad(loss))(logits)
    # 0 up to the rounding of two separately compiled (fused) log-softmax passes: a 1-ulp difference of a chunk
    # log-likelihood (~1e-6 nats) divided by τ = 100 moves the binary KL by ~1e-8 at most.
    assert abs(float(value)) < 1e-8
    assert float(jnp.max(jnp.abs(grad))) < 1e-7
    # and it is not 0 once the student differs
    other = logits + jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
    assert float(loss(other)) > 1e-4
    # a cached teacher's per-token log-probabilities in place of its logits: the same loss
    cached = token_logprobs(logits, labels, mask)
    from_cache = alm_loss(other, labels, mask, chunk, None, labels, mask, chunk, num_chunks=n, chunk_size=5,
                          teacher_token_logp=cached)[0]
    np.testing.assert_allclose(float(from_cache), float(loss(other)), rtol=1e-5)


def test_binarised_kl_matches_numpy_and_is_a_divergence():
    rng = np.random.default_rng(3)
    log_p, log_q = -rng.random(50) * 30, -rng.random(50) * 30
    for tau in (1.0, 100.0):
        a, b = log_p / tau - 1e-6, log_q / tau - 1e-6
        pa, pb = np.exp(a), np.exp(b)
        ref = pa * np.log(pa / pb) + (1 - pa) * np.log((1 - pa) / (1 - pb))
        ours = np.asarray(binarised_kl(jnp.asarray(log_p, jnp.float32), jnp.asarray(log_q, jnp.float32), tau))
        np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-6)
        assert np.all(ours >= -1e-7)


def test_chunk_logprobs_telescope_to_the_sequence():
    rng, logits, labels, mask = _case(2)
    chunk = _random_chunks(rng, *labels.shape)
    token = token_logprobs(logits, labels, mask, chunk_size=4)
    x = np.asarray(logits, np.float64)
    ref = np.take_along_axis(x, np.asarray(labels)[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    ref = np.where(np.asarray(mask), ref, 0.0)
    np.testing.assert_allclose(np.asarray(token), ref, rtol=1e-5, atol=1e-5)
    chunks = chunk_logprobs(token, chunk, labels.shape[1])
    np.testing.assert_allclose(np.asarray(chunks).sum(-1), ref.sum(-1), rtol=1e-5)


def test_incomplete_chunks_do_not_count():
    chunk = jnp.asarray([[0, 0, 1, 2, 2, 9]])
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1]])  # chunk 0 has an uncounted token; id 9 is out of range (padding)
    ok = complete_chunks(chunk, mask, chunk, mask, 4)
    assert ok.tolist() == [[False, True, True, False]]


def _head_case(seed=4, batch=2, seq=12, embed=8, vocab=37):
    """Hidden states and an LM head whose logits `h @ W.T` are O(3), as `_case`'s."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, embed)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(vocab, embed)) * 3 / np.sqrt(embed), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, size=(batch, seq)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, seq)) > 0.2)
    return rng, hidden, weight, labels, mask


def _close(a, b, rtol=1e-5):
    """fp32 rounding apart: the same sums (of `embed` products per logit, of `vocab` exponentials per token) in
    another order, a few ulps (~1e-6) relative; entries near 0 held against the largest."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(float(np.max(np.abs(b))), 1e-30))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_fused_head_token_logprobs_equal_the_logits_ones_in_value_and_gradient(chunk_size):
    _, hidden, weight, labels, mask = _head_case()
    w_out = jnp.asarray(np.random.default_rng(9).normal(size=labels.shape), jnp.float32)  # a generic cotangent

    def fused(h, w):
        return jnp.sum(w_out * linear_token_logprobs(h, w, labels, mask, chunk_size=chunk_size))

    def reference(h, w):
        return jnp.sum(w_out * token_logprobs(jnp.einsum("bsd,vd->bsv", h, w), labels, mask))

    got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, weight) for f in (fused, reference))
    _close(got[0], want[0])
    for g, r in zip(got[1], want[1]):
        _close(g, r)
    assert float(jnp.max(jnp.abs(got[1][1]))) > 0.1  # the head does get a gradient
    logp, top1 = linear_token_logprobs(hidden, weight, labels, mask, chunk_size=chunk_size, top1=True)
    logits = np.asarray(jnp.einsum("bsd,vd->bsv", hidden, weight))
    np.testing.assert_array_equal(np.asarray(top1), (logits.argmax(-1) == np.asarray(labels)) & np.asarray(mask))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_fused_shared_vocab_kl_equals_the_logits_one_in_value_and_gradient(chunk_size):
    rng, hidden, weight, labels, mask = _head_case(5, vocab=23)
    t_hidden = jnp.asarray(rng.normal(size=(2, 15, 6)), jnp.float32)
    t_weight = jnp.asarray(rng.normal(size=(29, 6)) * 3 / np.sqrt(6), jnp.float32)
    s_chunk = _random_chunks(rng, 2, 12)
    t_chunk = jnp.asarray(np.sort(rng.integers(0, 12, size=(2, 15)), axis=1), jnp.int32)  # several per chunk
    t_mask = jnp.asarray(rng.random((2, 15)) > 0.1)
    one = jnp.asarray(rng.random((2, 12)) > 0.3)
    s_ids, t_ids = (jnp.asarray(rng.permutation(n)[:17], jnp.int32) for n in (23, 29))
    use, j = shared_positions(mask, s_chunk, t_mask, t_chunk, one)
    assert 0 < int(use.sum()) < int(mask.sum())

    def fused(h, w):
        div = linear_shared_vocab_kl(h, w, t_hidden, t_weight, use, j, s_ids, t_ids, temperature=2.0,
                                     chunk_size=chunk_size)
        return jnp.sum(div) / jnp.sum(use)

    def reference(h, w):
        t_logits = jnp.einsum("bsd,vd->bsv", t_hidden, t_weight)
        return shared_vocab_kl(jnp.einsum("bsd,vd->bsv", h, w), mask, s_chunk, t_logits, t_mask, t_chunk, one,
                               s_ids, t_ids, temperature=2.0)[0]

    got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, weight) for f in (fused, reference))
    assert float(want[0]) > 1e-3
    _close(got[0], want[0])
    for g, r in zip(got[1], want[1]):
        _close(g, r)


def test_alm_divergence_is_alm_loss_per_chunk():
    rng, logits, labels, mask = _case(6)
    t_logits = jnp.asarray(rng.normal(size=logits.shape) * 3, jnp.float32)
    chunk = _random_chunks(rng, *labels.shape)
    n = labels.shape[1]
    loss, metrics = alm_loss(logits, labels, mask, chunk, t_logits, labels, mask, chunk, num_chunks=n)
    div, gap, ok = alm_divergence(token_logprobs(logits, labels, mask), mask, chunk,
                                  token_logprobs(t_logits, labels, mask), mask, chunk, num_chunks=n)
    assert int(ok.sum()) > 2 and not np.any(np.asarray(div)[~np.asarray(ok)])
    _close(jnp.sum(div) / jnp.sum(ok), loss)
    _close(jnp.sum(gap) / jnp.sum(ok), metrics["distill/chunk_logp_gap"])


@pytest.fixture(scope="module")
def teacher():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32).eval()
    return hf, vishwam.load_pretrained(TEACHER_DIR, dtype=jnp.float32), Tokenizer.from_file(
        os.path.join(TEACHER_DIR, "tokenizer.json"))


def test_chunk_teacher_loglik_equals_an_independent_rescore(teacher):
    import torch

    hf, model, tok = teacher
    text = "import os\n\ndef main(argv):\n    for i in range(10):\n        print(i, argv[i])\n"
    # a student tokenization that cuts the text elsewhere: whole runs of word characters, of spaces, of the rest
    t = encode_bytes(tok, text)
    runs = [m.span() for m in re.finditer(r"\w+|\s+|[^\w\s]+", text)]  # ASCII text: chars are bytes
    s = Encoding(np.arange(len(runs), dtype=np.int32), np.asarray(runs, np.int64))
    a = align(s, t)
    ids = jnp.asarray(t.ids)[None]
    logits = model(ids[:, :-1]).logits
    labels = ids[:, 1:]
    chunk = jnp.asarray(a.teacher_chunk[1:])[None]
    per_chunk = np.asarray(chunk_logprobs(token_logprobs(logits, labels, jnp.ones_like(labels)), chunk,
                                          a.n_chunks))[0]
    assert a.n_chunks < len(t.ids)  # some chunks hold several teacher tokens
    for c in range(1, a.n_chunks):
        members = np.flatnonzero(a.teacher_chunk == c)
        first, last = int(members[0]), int(members[-1])
        with torch.no_grad():  # re-score: the chunk's tokens given the prefix, from the prefix + chunk alone
            out = hf(torch.tensor([t.ids[: last + 1]])).logits[0].double().log_softmax(-1)
        ref = sum(float(out[k - 1, t.ids[k]]) for k in range(first, last + 1))
        np.testing.assert_allclose(per_chunk[c], ref, atol=2e-4 * len(members), rtol=1e-5)
