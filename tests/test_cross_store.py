"""The cross-tokenizer token store (kind `cross`): both sides' ids and chunk ids written when the data is
prepared, read window by window; its windows equal the in-memory cutter's (`build_cross_windows`) over the same
documents, across shard boundaries and an eval split, and a bad input is one line."""

import json
import os
import random

import numpy as np
import pytest
from test_alignment import _random_text
from test_cross_step import _student_tokenizer
from tokenizers import Tokenizer

from vishwam.config.sections import DataConfig
from vishwam.data.cross.windows import KEYS, build_cross_windows
from vishwam.data.splits import CrossSides, load_splits
from vishwam.data.store import TokenStore
from vishwam.errors import DataError

TEACHER = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher", "tokenizer.json")
S_EOS, T_EOS = 0, 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("cross")
    files, docs = [], []
    for f in range(3):  # three files: three units, so three shards whose chunk ids the reader offsets
        texts = [_random_text(rng) + f"\ndef f{f}_{k}(x):\n    return x * {k}\n" for k in range(12)]
        path = root / f"part{f}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        files.append(str(path))
        docs += texts
    student = _student_tokenizer(docs)
    tok_dir = root / "student"
    tok_dir.mkdir()
    student.save(str(tok_dir / "tokenizer.json"))
    return root, files, docs, student, str(tok_dir / "tokenizer.json")


def _load(root, files, student_path, *, seq_len=24, teacher_seq_len=30, eval_fraction=0.0, name="s"):
    d = DataConfig(train=tuple(files), store_dir=str(root / name), eval_fraction=eval_fraction)
    cross = CrossSides(student_path, S_EOS, 512, teacher_seq_len)
    return load_splits(d, seq_len=seq_len, tokenizer_path=TEACHER, eos_id=T_EOS, vocab_size=2048, log=lambda m: None,
                       workers=1, cross=cross)


def test_store_windows_equal_the_in_memory_windows(corpus):
    root, files, docs, student, student_path = corpus
    teacher = Tokenizer.from_file(TEACHER)
    for seq_len, t_len in ((24, 30), (16, 12)):  # 12: many windows' teacher sides are truncated
        train, evaluation = _load(root, files, student_path, seq_len=seq_len, teacher_seq_len=t_len,
                                  name=f"s{seq_len}")
        assert evaluation is None
        expect = build_cross_windows(docs, student, teacher, seq_len=seq_len, teacher_seq_len=t_len,
                                     student_eos=S_EOS, teacher_eos=T_EOS)
        assert len(train) == len(expect)
        rows = np.arange(len(expect))
        got, want = train.batch(rows), expect.batch(rows)
        for key in KEYS:
            assert np.array_equal(np.asarray(got[key]).astype(np.int64), np.asarray(want[key]).astype(np.int64)), key
        assert TokenStore(root / f"s{seq_len}" / "train").kind == "cross"


def test_an_eval_split_is_the_tail_of_the_student_stream(corpus):
    root, files, docs, student, student_path = corpus
    train, evaluation = _load(root, files, student_path, eval_fraction=0.25, name="split")
    whole, _ = _load(root, files, student_path, name="split_whole")
    assert len(train) + len(evaluation) <= len(whole)
    b = evaluation.batch(np.arange(len(evaluation)))
    total = whole.streams.n_student
    cut = total - round(total * 0.25)
    ids = whole.streams.student(cut, total)[0]
    assert np.array_equal(b["input_ids"][0], ids[:24])
    assert b["chunk_mask"].any() and (b["teacher_mask"].sum() > 0)


def test_a_reopened_store_is_not_rebuilt_and_a_corrupt_chunk_block_is_one_error(corpus):
    root, files, docs, student, student_path = corpus
    _load(root, files, student_path, name="reuse")
    shard = root / "reuse" / "train" / "shards" / "00001.tchunk"
    before = shard.stat().st_mtime_ns
    train, _ = _load(root, files, student_path, name="reuse")
    assert shard.stat().st_mtime_ns == before
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF
    shard.write_bytes(bytes(data))
    train, _ = _load(root, files, student_path, name="reuse")
    with pytest.raises(DataError, match=r"00001\.tchunk is corrupt"):
        train.batch(np.arange(len(train)))


def test_npy_data_and_a_store_of_another_kind_are_one_error(corpus, tmp_path):
    root, files, docs, student, student_path = corpus
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(100, dtype=np.int32))
    with pytest.raises(DataError, match="needs text"):
        _load(tmp_path, [str(ids)], student_path, name="npy")
    d = DataConfig(train=tuple(files), store_dir=str(tmp_path / "plain"))
    load_splits(d, seq_len=24, tokenizer_path=TEACHER, eos_id=T_EOS, vocab_size=2048, log=lambda m: None, workers=1)
    with pytest.raises(DataError, match="holds text data, and this run distils across tokenizers"):
        _load(tmp_path, [str(tmp_path / "plain" / "train")], student_path, name="x")
