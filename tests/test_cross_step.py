"""The cross-tokenizer train step (vishwam.train.cross_step): the pysrc teacher (2,048-token byte-level BPE) into
a tiny student with its own 512-token tokenizer, trained on Python source: ALM brings the chunk likelihoods
together, and every loss part is finite."""

import json
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import vishwam
from models import ModelConfig, init_model
from vishwam.data.alignment import shared_vocab
from vishwam.data.cross_windows import build_cross_windows
from vishwam.train.cross_step import CrossStepConfig, make_cross_train_step
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
    optimizer, _ = make_optimizer(learning_rate=3e-3, warmup_steps=0, total_steps=40, weight_decay=0.0, grad_clip=1.0)
    state = init_state(student, None, None, optimizer, jax.random.key(1), [])
    step = make_cross_train_step(CrossStepConfig(num_chunks=windows.num_chunks, ce_weight=0.0, shared_kl_weight=1.0,
                                                 chunk_size=16), optimizer, shared=shared)
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
