"""The cross-tokenizer train step (vishwam.train.cross_step): the pysrc teacher (2,048-token byte-level BPE) into
a tiny student with its own 512-token tokenizer, trained on Python source: ALM brings the chunk likelihoods
together, and every loss part is finite. The fused step (both LM heads inside the losses, a chunk at a time)
equals `cross_loss` on whole logits in value and gradient; two micro-batches equal one big batch; a streamed
teacher's log-probabilities equal the resident teacher's, and so do the steps."""

import dataclasses
import json
import os
import string

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import vishwam
from distill.cross_tokenizer import complete_chunks, token_logprobs
from models import ModelConfig, init_model
from vishwam.data.cross.alignment import shared_vocab
from vishwam.data.cross.windows import build_cross_windows
from vishwam.errors import ConfigError
from vishwam.teacher.streamed import StreamedTeacher
from vishwam.train.cross_eval import cross_eval_sums
from vishwam.train.cross_step import CrossStepConfig, cross_loss, make_cross_train_step
from vishwam.train.step import init_state, make_optimizer

TEACHER_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher")


def _texts():
    return [open(m.__file__, encoding="utf-8").read()[:6000] for m in (json.decoder, string, os, json.encoder)]


def _student_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|eos|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def setup():
    texts = _texts()
    teacher_tok = Tokenizer.from_file(os.path.join(TEACHER_DIR, "tokenizer.json"))
    student_tok = _student_tokenizer(texts)
    windows = build_cross_windows(texts, student_tok, teacher_tok, seq_len=64, teacher_seq_len=64, student_eos=0,
                                  teacher_eos=0)
    teacher = vishwam.load_pretrained(TEACHER_DIR, dtype=jnp.float32)
    cfg = ModelConfig(model_type="qwen2", vocab_size=student_tok.get_vocab_size(), hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=32)
    student = init_model(cfg, key=jax.random.key(0))
    return windows, teacher, student, tuple(jnp.asarray(x) for x in shared_vocab(student_tok, teacher_tok))


def test_alm_steps_bring_the_chunk_likelihoods_together(setup):
    windows, teacher, student, shared = setup
    optimizer, schedule = make_optimizer(learning_rate=3e-3, warmup_steps=0, total_steps=40, weight_decay=0.0,
                                         grad_clip=1.0)
    state = init_state(_copy(student), None, None, optimizer, jax.random.key(1), [])
    step = make_cross_train_step(CrossStepConfig(num_chunks=windows.num_chunks, ce_weight=0.0, shared_kl_weight=1.0,
                                                 chunk_size=16), optimizer, schedule, shared=shared)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(40):
        batch = windows.batch(rng.choice(len(windows), 4, replace=False))
        state, metrics = step(teacher, state, {k: jnp.asarray(v) for k, v in batch.items()}, None)
        history.append({k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert history[0]["distill/chunks"] > 0.3 and history[0]["distill/shared_positions"] > 0.05
    first = np.mean([h["distill/chunk_logp_gap"] for h in history[:5]])
    last = np.mean([h["distill/chunk_logp_gap"] for h in history[-5:]])
    assert last < 0.9 * first, (first, last)  # measured: 5.33 -> 4.58 nats per chunk in 40 steps
    assert np.mean([h["distill/alm"] for h in history[-5:]]) < np.mean([h["distill/alm"] for h in history[:5]])


# ------------------------------------------------------------------------------------ the fused step against references


def _recording():
    """An "optimizer" that applies nothing and keeps the step's gradient as its state: the gradient exactly."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _batch(windows, rows):
    return {k: jnp.asarray(v) for k, v in windows.batch(np.asarray(rows)).items()}


def _chat_like(batch, seed=0):
    """`batch` with CE labels on a random ~60% of each side's labels (chat rows count their assistant tokens
    alone: `loss_mask`, `teacher_loss_mask`); the attention masks stay whole."""
    rng = np.random.default_rng(seed)
    out = dict(batch)
    for key, of in (("loss_mask", "mask"), ("teacher_loss_mask", "teacher_mask")):
        keep = rng.random(batch[of].shape) < 0.6
        out[key] = jnp.asarray(np.asarray(batch[of]).astype(bool) & keep).astype(batch[of].dtype)
    return out


def _copy(tree):
    """A copy of `tree`'s arrays: the step donates the state's buffers, the fixture's model must outlive it."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _run_step(cfg, teacher, student, batch, shared, teacher_out=None):
    optimizer = _recording()
    state = init_state(_copy(student), None, None, optimizer, jax.random.key(1), [])
    step = make_cross_train_step(cfg, optimizer, optax.constant_schedule(1e-3), shared=shared)
    new_state, metrics = step(teacher, state, batch, teacher_out)
    return new_state.opt_state[0], {k: float(v) for k, v in metrics.items()}


def _close(got, want, rtol=1e-5):
    """fp32 rounding apart (the same sums in another order: chunked heads, micro-batches); gradient entries near 0
    held against the largest of their tensor."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(float(np.max(np.abs(w))), 1e-30))


CFG = CrossStepConfig(num_chunks=65, alm_weight=1.0, ce_weight=0.5, shared_kl_weight=0.5, kd_temperature=2.0,
                      chunk_size=16)


def test_the_fused_step_equals_the_logits_loss_in_value_and_gradient(setup):
    """Both heads inside the losses, 16 positions at a time, against `cross_loss` on whole logits; CE over the
    batch's `loss_mask` (chat rows' assistant tokens), not every label."""
    windows, teacher, student, shared = setup
    batch = _chat_like(_batch(windows, [0, 3, 5, 7]))
    grads, metrics = _run_step(CFG, teacher, student, batch, shared)

    def reference(s):
        return cross_loss(s, teacher, batch, shared, CFG)

    (_, want), want_grads = eqx.filter_value_and_grad(reference, has_aux=True)(student)
    assert set(want) <= set(metrics)
    assert {"grad_norm", "lr", "skipped", "nonfinite_run"} <= set(metrics) and metrics["skipped"] == 0
    _close([metrics[k] for k in sorted(want)], [float(want[k]) for k in sorted(want)])
    assert want["distill/shared_kl"] > 0 and want["distill/alm"] > 0
    _close(eqx.filter(grads, eqx.is_inexact_array), eqx.filter(want_grads, eqx.is_inexact_array))
    # CE is the mean NLL of the `loss_mask` labels alone (float64 NumPy from the whole logits).
    counted = np.asarray(batch["loss_mask"], bool)
    logp = _np_logp(student(batch["input_ids"], attention_mask=batch["mask"]).logits, batch["labels"], counted)
    np.testing.assert_allclose(metrics["distill/ce"], -logp[counted].mean(), rtol=1e-5)


def test_grad_accumulation_equals_one_big_batch(setup):
    """Four rows as two micro-batches of two: each part of the loss is divided by the whole batch's count, so the
    gradient and the metrics are the big batch's (the micro-batches count different numbers of chunks)."""
    windows, teacher, student, shared = setup
    batch = _batch(windows, [1, 2, 4, 6])
    one = _run_step(CFG, teacher, student, batch, shared)
    two = _run_step(dataclasses.replace(CFG, grad_accum_steps=2), teacher, student, batch, shared)
    ok = np.asarray(complete_chunks(batch["student_chunk"], batch["mask"], batch["teacher_chunk"],
                                    batch["teacher_mask"], 65, batch["chunk_mask"]))
    assert ok[0::2].sum() != ok[1::2].sum()  # a per-micro-batch mean would weigh the chunks differently
    _close(two[1], one[1])
    _close(two[0], one[0])


@pytest.fixture(scope="module")
def streamed():
    teacher = StreamedTeacher(vishwam.open_pretrained(TEACHER_DIR), dtype=jnp.float32, max_resident_shards=2)
    assert len(teacher.groups) > 1
    yield teacher
    teacher.close()


def test_a_streamed_teacher_gives_the_resident_ones_token_logprobs_and_step(setup, streamed):
    windows, teacher, student, _ = setup
    batch = _batch(windows, [0, 1, 2, 3])
    out = streamed.cross_outputs(batch, chunk_size=16)
    logits = teacher(batch["teacher_input_ids"], attention_mask=batch["teacher_input_mask"]).logits
    want = token_logprobs(logits, batch["teacher_labels"], batch["teacher_mask"])
    assert out["teacher_token_logp"].shape == batch["teacher_labels"].shape
    _close(out["teacher_token_logp"], want)
    cfg = dataclasses.replace(CFG, shared_kl_weight=0.0, grad_accum_steps=2)
    resident = _run_step(cfg, teacher, student, batch, None)
    streamed_step = _run_step(dataclasses.replace(cfg, teacher_loading="streamed"), None, student, batch, None, out)
    _close(streamed_step[1], resident[1])
    _close(streamed_step[0], resident[0])


def test_the_shared_kl_needs_a_resident_teacher_and_the_shared_vocabulary(setup):
    shared = setup[3]
    with pytest.raises(ConfigError, match="distillation_params.shared_kl_weight"):
        make_cross_train_step(dataclasses.replace(CFG, teacher_loading="streamed"), _recording(),
                              optax.constant_schedule(0.0), shared=shared)
    with pytest.raises(ConfigError, match="distillation_params.shared_kl_weight"):
        make_cross_train_step(CFG, _recording(), optax.constant_schedule(0.0), shared=None)


# ------------------------------------------------------------------------------------ evaluation


def _np_logp(logits, labels, mask):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = np.take_along_axis(x, np.asarray(labels)[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    return np.where(np.asarray(mask, bool), logp, 0.0)


def _np_binarised_kl(log_p, log_q, tau, eps=1e-6):
    a, b = min(log_p, 0.0) / tau - eps, min(log_q, 0.0) / tau - eps
    pa, pb = np.exp(a), np.exp(b)
    return pa * (a - b) + (1 - pa) * (np.log1p(-pa) - np.log1p(-pb))


@pytest.mark.parametrize("chunk_size", [None, 24])
def test_cross_eval_sums_match_a_numpy_reference(setup, chunk_size):
    """Every sum against float64 NumPy from the models' whole logits, chunk by chunk in Python loops; the chunked
    heads (24 positions: not dividing 64) change nothing. Each side's NLL, tokens and bytes are over its
    `loss_mask` (chat rows: its assistant tokens); the chunks over the chunk mask."""
    windows, teacher, student, _ = setup
    batch = _chat_like(_batch(windows, [2, 5, 6]), seed=1)
    rng = np.random.default_rng(0)
    s_table = rng.integers(0, 6, student.config.vocab_size).astype(np.int32)
    t_table = rng.integers(0, 6, teacher.config.vocab_size).astype(np.int32)
    got = cross_eval_sums(student, teacher, batch, num_chunks=65, alm_temperature=10.0, chunk_size=chunk_size,
                          compute_dtype=jnp.float32, student_bytes=jnp.asarray(s_table),
                          teacher_bytes=jnp.asarray(t_table))
    b = {k: np.asarray(v) for k, v in batch.items()}
    s_logp = _np_logp(student(batch["input_ids"], attention_mask=batch["mask"]).logits, b["labels"], b["mask"])
    t_logp = _np_logp(teacher(batch["teacher_input_ids"], attention_mask=batch["teacher_input_mask"]).logits,
                      b["teacher_labels"], b["teacher_mask"])
    s_mask, t_mask = b["mask"].astype(bool), b["teacher_mask"].astype(bool)
    s_ce, t_ce = b["loss_mask"].astype(bool), b["teacher_loss_mask"].astype(bool)
    assert 0 < s_ce.sum() < s_mask.sum() and 0 < t_ce.sum() < t_mask.sum()
    want = {"student_nll": -s_logp[s_ce].sum(), "student_tokens": s_ce.sum(),
            "student_bytes": s_table[b["labels"]][s_ce].sum(),
            "teacher_nll": -t_logp[t_ce].sum(), "teacher_tokens": t_ce.sum(),
            "teacher_bytes": t_table[b["teacher_labels"]][t_ce].sum(), "chunk_kl": 0.0, "chunk_gap": 0.0, "chunks": 0}
    for r in range(len(s_logp)):
        for c in range(65):
            s_at, t_at = b["student_chunk"][r] == c, b["teacher_chunk"][r] == c
            if not (b["chunk_mask"][r, c] and s_at.any() and t_at.any() and s_mask[r][s_at].all()
                    and t_mask[r][t_at].all()):
                continue
            log_q, log_p = s_logp[r][s_at].sum(), t_logp[r][t_at].sum()
            want["chunks"] += 1
            want["chunk_gap"] += abs(log_p - log_q)
            want["chunk_kl"] += _np_binarised_kl(log_p, log_q, 10.0)
    assert set(got) == set(want) and want["chunks"] > 50
    for k in ("student_tokens", "student_bytes", "teacher_tokens", "teacher_bytes", "chunks"):
        assert float(got[k]) == want[k], k
    # fp32 sums of a few hundred fp32 terms against float64: n·eps ~ 1e-5 at most (measured ~1e-7)
    for k in ("student_nll", "teacher_nll", "chunk_gap", "chunk_kl"):
        np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-5, err_msg=k)
