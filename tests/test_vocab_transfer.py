"""FVT (vishwam.data.cross.vocab_transfer) against a direct re-tokenization through transformers' tokenizer wrapper."""

import os

import numpy as np
import pytest
from test_alignment import _bpe_byte_fallback
from tokenizers import Tokenizer

from vishwam.data.cross.alignment import token_bytes
from vishwam.data.cross.vocab_transfer import fvt_embeddings, fvt_sources

TEACHER_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher")


def test_fvt_rows_are_means_of_the_teacher_retokenization():
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(TEACHER_DIR, "tokenizer.json"))
    teacher = Tokenizer.from_file(os.path.join(TEACHER_DIR, "tokenizer.json"))
    student = _bpe_byte_fallback()
    rows = np.random.default_rng(0).normal(size=(2048, 8)).astype(np.float32)
    n_student = student.get_vocab_size()
    sources = fvt_sources(student, teacher, n_student, 2048)
    emb = fvt_embeddings(rows, sources)
    assert emb.shape == (n_student, 8)
    checked = 0
    for i, b in enumerate(token_bytes(student)):
        if b is None:
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(emb[i], rows[ids].mean(0), rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked > 200
    # a byte-fallback piece of a character: through the teacher's single-byte tokens
    byte_id = student.token_to_id("<0xF0>")
    t_vocab = teacher.get_vocab()
    np.testing.assert_allclose(emb[byte_id], rows[t_vocab["ð"]], rtol=1e-6)  # byte 0xF0 in the byte-level alphabet
    # identical tokenizers: every regular row is its own
    same = fvt_embeddings(rows, fvt_sources(teacher, teacher, 2048, 2048))
    regular = [i for i, b in enumerate(token_bytes(teacher)) if b is not None]
    np.testing.assert_allclose(same[regular], rows[regular])
