"""Byte alignment of two tokenizations (vishwam.data.cross.alignment) against a brute-force oracle and TRL.

The oracle never looks at offsets: it decodes each token's bytes from its vocabulary string (byte-level alphabet,
`<0xAB>` byte fallback, `▁` for a space), checks that they concatenate to the text, and intersects the two sets
of cumulative byte positions.
"""

import os
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vishwam.data.cross.alignment import align, common_text, encode_bytes, shared_vocab, token_bytes
from vishwam.errors import DataError

TEACHER = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher", "tokenizer.json")

CORPUS = [
    "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog 12345.",
    "naïve café, über straße; 東京 and 日本語", "emoji 😀 and 💩, digits 2024-12-07 3.14159",
    "    indented\n\n\n\ttabs  and   spaces", "class A:\n    pass\n",
] * 20


def _bpe_byte_fallback(vocab_size=300, bos=False):
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<s>"] + bytes_,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"), limit_alphabet=40)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def _byte_level(vocab_size=400, digits=True):
    tok = Tokenizer(models.BPE())
    pre = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizers_():
    teacher = Tokenizer.from_file(TEACHER)
    return {"teacher": teacher, "fallback": _bpe_byte_fallback(), "fallback_bos": _bpe_byte_fallback(bos=True),
            "bytelevel": _byte_level()}


def _random_text(rng: random.Random) -> str:
    pieces = ["a", "b", "the", " ", "  ", "   ", "\n", "\n\n", "\t", "é", "ü", "ß", "東", "語", "😀", "💩", "🇮🇳",
              "0", "12", "3456789", "()", ":", "def", " return", "ǅ", "\u0301", "ﬁ", "𝔘"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))


def _oracle_cuts(tokenizer, ids, text):
    """Cumulative byte positions after each token, from the tokens' own bytes; asserts they spell the text."""
    table = token_bytes(tokenizer)
    pieces = [table[i] or b"" for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    return set(np.cumsum([len(p) for p in pieces]).tolist())


def _chunk_ends(enc, chunk):
    return {int(enc.spans[chunk == c, 1].max()) for c in np.unique(chunk)}


PAIRS = [("teacher", "fallback"), ("teacher", "fallback_bos"), ("bytelevel", "teacher"), ("fallback", "bytelevel"),
         ("teacher", "teacher")]


@pytest.mark.parametrize("pair", PAIRS)
def test_alignment_equals_brute_force_intersection(tokenizers_, pair):
    rng = random.Random(hash(pair) % 1000)
    s_tok, t_tok = tokenizers_[pair[0]], tokenizers_[pair[1]]
    for _ in range(150):
        text = common_text(_random_text(rng), s_tok, t_tok)
        s = encode_bytes(s_tok, text, add_special_tokens=True)
        t = encode_bytes(t_tok, text, add_special_tokens=True)
        a = align(s, t)
        oracle = _oracle_cuts(s_tok, s.ids, text) & _oracle_cuts(t_tok, t.ids, text)
        # every positive common boundary, and byte 0 only where both sides open with a zero-width token
        oracle = {b for b in oracle if b > 0 or (s.spans[0, 1] == 0 and t.spans[0, 1] == 0)}
        assert _chunk_ends(s, a.student_chunk) == oracle, text
        assert _chunk_ends(t, a.teacher_chunk) == oracle, text
        # the chunks tile the text: chunk c is the same bytes on both sides, and chunks are contiguous
        assert np.all(np.diff(a.student_chunk) >= 0) and np.all(np.diff(a.teacher_chunk) >= 0)
        for c in range(a.n_chunks):
            s_span = s.spans[a.student_chunk == c]
            t_span = t.spans[a.teacher_chunk == c]
            assert (s_span[:, 0].min(), s_span[:, 1].max()) == (t_span[:, 0].min(), t_span[:, 1].max())
        if pair[0] == pair[1]:
            assert a.n_chunks == len(s.ids) and a.one_to_one.all()


def test_byte_fallback_splits_a_character_into_byte_tokens(tokenizers_):
    # A 4-byte character the training corpus never holds, so it is no token of the vocabulary (the corpus's own
    # emoji may or may not enter the 40-character alphabet: the trainer breaks frequency ties either way).
    fallback = tokenizers_["fallback"]
    assert "𓂀" not in "".join(CORPUS) and fallback.token_to_id("𓂀") is None
    s = encode_bytes(fallback, "a𓂀b")
    assert fallback.encode("a𓂀b").tokens[1:5] == ["<0xF0>", "<0x93>", "<0x82>", "<0x80>"]
    assert s.spans.tolist()[:6] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6]]


@pytest.mark.parametrize("pair", PAIRS)
def test_alignment_equals_trl(tokenizers_, pair):
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    rng = random.Random(7)
    s_tok, t_tok = tokenizers_[pair[0]], tokenizers_[pair[1]]
    for _ in range(100):
        text = common_text(_random_text(rng), s_tok, t_tok)
        s = encode_bytes(s_tok, text, add_special_tokens=True)
        t = encode_bytes(t_tok, text, add_special_tokens=True)
        a = align(s, t)
        s_groups, t_groups = gold.ULDLoss._align_by_byte_offsets(s.spans.tolist(), t.spans.tolist())
        ours_s = [np.flatnonzero(a.student_chunk == c).tolist() for c in range(a.n_chunks)]
        ours_t = [np.flatnonzero(a.teacher_chunk == c).tolist() for c in range(a.n_chunks)]
        assert (ours_s, ours_t) == (s_groups, t_groups), text


def test_offsets_that_do_not_tile_are_one_error():
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces
    with pytest.raises(DataError, match="student tokenizer: byte offsets do not tile the text"):
        encode_bytes(tok, "a b", name="student tokenizer")


def test_a_text_the_tokenizer_cannot_encode_is_one_error():
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "[UNK]": 2}, merges=[], unk_token="[UNK]"))
    with pytest.raises(DataError, match=r"student tokenizer cannot encode the text: unknown token '\[UNK\]' at "
                                        r"byte 2 \('é'\)"):
        encode_bytes(tok, "abéa", name="student tokenizer")
    assert encode_bytes(tok, "abba", name="student tokenizer").ids.tolist() == [0, 1, 1, 0]


def test_shared_vocab_pairs_equal_strings(tokenizers_):
    s_ids, t_ids = shared_vocab(tokenizers_["bytelevel"], tokenizers_["teacher"])
    s_bytes, t_bytes = token_bytes(tokenizers_["bytelevel"]), token_bytes(tokenizers_["teacher"])
    assert len(s_ids) > 200
    assert all(s_bytes[i] == t_bytes[j] for i, j in zip(s_ids, t_ids))
    same_s, same_t = shared_vocab(tokenizers_["teacher"], tokenizers_["teacher"])
    assert np.array_equal(same_s, same_t)
