"""Cross-tokenizer windows (vishwam.data.cross.windows): every counted chunk is the same bytes on both sides."""

import os
import random

import jax.numpy as jnp
import numpy as np
import pytest
from test_alignment import _bpe_byte_fallback, _random_text
from tokenizers import Tokenizer

from distill.cross_tokenizer import alm_loss, complete_chunks
from vishwam.data.cross.alignment import token_bytes
from vishwam.data.cross.windows import build_cross_windows
from vishwam.errors import DataError

TEACHER = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher", "tokenizer.json")


@pytest.fixture(scope="module")
def windows():
    teacher, student = Tokenizer.from_file(TEACHER), _bpe_byte_fallback()
    rng = random.Random(0)
    texts = [_random_text(rng) + " def f(x):\n    return x + 1\n" for _ in range(40)]
    w = build_cross_windows(texts, student, teacher, seq_len=16, teacher_seq_len=20, student_eos=0, teacher_eos=0)
    return w, token_bytes(student), token_bytes(teacher)


def test_counted_chunks_are_the_same_bytes_on_both_sides(windows):
    w, s_tab, t_tab = windows
    b = w.batch(np.arange(len(w)))
    counted = 0
    for r in range(len(w)):
        for c in np.flatnonzero(b["chunk_mask"][r]):
            s_tok = b["labels"][r][b["student_chunk"][r] == c]
            t_tok = b["teacher_labels"][r][(b["teacher_chunk"][r] == c) & b["teacher_mask"][r]]
            assert len(s_tok) and len(t_tok)
            assert b"".join(s_tab[i] or b"" for i in s_tok) == b"".join(t_tab[i] or b"" for i in t_tok)
            if b["one_to_one"][r, c]:
                assert len(s_tok) == len(t_tok) == 1 and s_tab[s_tok[0]] == t_tab[t_tok[0]]
            counted += 1
    assert counted > 0.5 * int((b["student_chunk"] >= 0).sum() / 2)
    assert b["one_to_one"].any()


def test_the_loss_counts_exactly_the_masked_chunks(windows):
    w, _, _ = windows
    b = {k: jnp.asarray(v) for k, v in w.batch(np.arange(len(w))).items()}
    ok = complete_chunks(b["student_chunk"], b["mask"], b["teacher_chunk"], b["teacher_mask"], w.num_chunks,
                         b["chunk_mask"])
    assert np.array_equal(np.asarray(ok), w.chunk_mask)
    rng = np.random.default_rng(0)
    s_logits = jnp.asarray(rng.normal(size=b["labels"].shape + (600,)), jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=b["teacher_labels"].shape + (2048,)), jnp.float32)
    loss, metrics = alm_loss(s_logits, b["labels"], b["mask"], b["student_chunk"], t_logits, b["teacher_labels"],
                             b["teacher_mask"], b["teacher_chunk"], num_chunks=w.num_chunks,
                             chunk_mask=b["chunk_mask"], chunk_size=8)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert float(metrics["distill/chunks"]) == pytest.approx(w.chunk_mask.mean())


def test_too_little_data_is_one_error():
    teacher = Tokenizer.from_file(TEACHER)
    with pytest.raises(DataError, match="fewer than one window"):
        build_cross_windows(["hi"], teacher, teacher, seq_len=64, teacher_seq_len=64, student_eos=0, teacher_eos=0)
