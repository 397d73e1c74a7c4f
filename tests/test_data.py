"""Data pipeline: loading each format, errors that name the file and line, packing and the step-keyed order."""

import json
import os
import pickle
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vishwam.data.text import check_vocab, load_token_stream, split_eval
from vishwam.data.windows import PackedDataset, batch_for_step, eval_batches
from vishwam.errors import DataError

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "cats and dogs play"]
EOS = 1


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def _ids(tokenizer_path, text):
    return Tokenizer.from_file(tokenizer_path).encode(text, add_special_tokens=False).ids


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


# ---------------------------------------------------------------------------------------------------- loading


def test_jsonl_documents_joined_by_eos(tmp_path, tokenizer_path):
    path = _write_jsonl(tmp_path / "a.jsonl", SENTENCES[:2])
    tokens = load_token_stream(path, tokenizer_path, EOS)
    expected = _ids(tokenizer_path, SENTENCES[0]) + [EOS] + _ids(tokenizer_path, SENTENCES[1])
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, expected)


def test_txt_blank_lines_separate_documents(tmp_path, tokenizer_path):
    path = tmp_path / "a.txt"
    path.write_text(f"{SENTENCES[0]}\n{SENTENCES[1]}\n\n  \n{SENTENCES[2]}\n")
    tokens = load_token_stream(str(path), tokenizer_path, EOS)
    first = _ids(tokenizer_path, SENTENCES[0] + "\n" + SENTENCES[1])
    np.testing.assert_array_equal(tokens, first + [EOS] + _ids(tokenizer_path, SENTENCES[2]))


def test_npy_streams(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(2, 7, dtype=np.int64))
    np.save(tmp_path / "b.npy", np.array([9, 8], dtype=np.uint16))
    tokens = load_token_stream([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], None, EOS)
    np.testing.assert_array_equal(tokens, [2, 3, 4, 5, 6, EOS, 9, 8])
    assert tokens.dtype == np.int32


def test_tokenizer_directory(tmp_path, tokenizer_path):
    jsonl = _write_jsonl(tmp_path / "c.jsonl", [SENTENCES[3]])
    tokens = load_token_stream(jsonl, os.path.dirname(tokenizer_path), None)
    np.testing.assert_array_equal(tokens, _ids(tokenizer_path, SENTENCES[3]))


def test_glob_expands_sorted(tmp_path, tokenizer_path):
    for i, name in enumerate(["b", "a", "c"]):
        np.save(tmp_path / f"{name}.npy", np.full(2, 10 + i, dtype=np.int32))
    tokens = load_token_stream(str(tmp_path / "*.npy"), None, EOS)
    np.testing.assert_array_equal(tokens, [11, 11, EOS, 10, 10, EOS, 12, 12])  # a, b, c


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"text": "the cat"}\n{"text": "the dog"\n', ":2: invalid JSON"),
        ('{"text": "the cat"}\n\n["not", "an", "object"]\n', ":3: expected a JSON object"),
        ('{"body": "the cat"}\n', ":1: expected a JSON object with a 'text' field"),
        ('{"text": 3}\n', ":1: field 'text' must be a string"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_token_stream(str(path), tokenizer_path, EOS)
    assert f"{path}{fragment}" in str(info.value)


def test_missing_file_and_empty_glob(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match=f"data file not found: {re.escape(str(tmp_path / 'nope.jsonl'))}"):
        load_token_stream(str(tmp_path / "nope.jsonl"), tokenizer_path, EOS)
    with pytest.raises(DataError, match=re.escape(f"data glob '{tmp_path / '*.jsonl'}' matches no files")):
        load_token_stream([str(tmp_path / "*.jsonl")], tokenizer_path, EOS)


def test_text_without_tokenizer(tmp_path, tokenizer_path):
    path = _write_jsonl(tmp_path / "a.jsonl", SENTENCES)
    with pytest.raises(DataError, match=f"{re.escape(str(path))} holds text but no tokenizer"):
        load_token_stream(path, None, EOS)
    with pytest.raises(DataError, match=f"tokenizer file not found: {re.escape(str(tmp_path / 'missing.json'))}"):
        load_token_stream(path, str(tmp_path / "missing.json"), EOS)
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"cannot load tokenizer .*{re.escape(str(bad))}"):
        load_token_stream(path, str(bad), EOS)


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.array([[1, 2], [3, 4]]), "expected a 1-D token stream"),
        (np.array([1.5, 2.0]), "expected integer token ids"),
        (np.array([1, -2]), "token ids must lie in"),
        (np.array([{"a": 1}], dtype=object), "not a plain numeric .npy array"),
    ],
)
def test_bad_npy_names_file(tmp_path, array, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError) as info:
        load_token_stream(str(path), None, EOS)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_pickle_and_unknown_extension_rejected(tmp_path):
    path = tmp_path / "evil.npy"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_token_stream(str(path), None, EOS)
    other = tmp_path / "data.csv"
    other.write_text("1,2,3")
    with pytest.raises(DataError, match=re.escape(f"{other}: unsupported data file type '.csv'")):
        load_token_stream(str(other), None, EOS)


# ---------------------------------------------------------------------------------------------------- packing


def test_packing_shapes_and_shift():
    dataset = PackedDataset(np.arange(23, dtype=np.int32), seq_len=4)
    assert dataset.num_windows == 4  # 23 // 5, the 3-token tail dropped
    batch = batch_for_step(dataset, seed=0, step=0, batch_size=3)
    assert set(batch) >= {"input_ids", "labels", "mask"}
    for key in ("input_ids", "labels", "mask"):
        assert batch[key].shape == (3, 4) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"][:, 0], batch["window"] * 5)  # window i starts at 5 i
    np.testing.assert_array_equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    np.testing.assert_array_equal(batch["labels"][:, -1], batch["input_ids"][:, -1] + 1)
    assert (batch["input_ids"][:, 0] % 5 == 0).all()  # windows are non-overlapping, aligned at multiples of 5
    assert (batch["mask"] == 1).all()


def test_too_few_tokens_names_the_data():
    with pytest.raises(DataError, match=r"data\.eval has 4 tokens, fewer than one window of seq_len \+ 1 = 5"):
        PackedDataset(np.arange(4), seq_len=4, name="data.eval")


def _first_tokens(batch):
    return tuple(int(t) for t in batch["input_ids"][:, 0])


def test_batch_order_is_a_function_of_seed_and_step():
    dataset = PackedDataset(np.arange(10 * 5, dtype=np.int32), seq_len=4)  # 10 windows
    again = PackedDataset(np.arange(10 * 5, dtype=np.int32), seq_len=4)
    steps = [_first_tokens(batch_for_step(dataset, seed=3, step=s, batch_size=4)) for s in range(10)]
    # Same (seed, step) on a fresh dataset, in any order: the same batch (resume is exact).
    assert [_first_tokens(batch_for_step(again, seed=3, step=s, batch_size=4)) for s in reversed(range(10))] == \
        steps[::-1]
    assert steps[0] != steps[1]
    assert steps != [_first_tokens(batch_for_step(dataset, seed=4, step=s, batch_size=4)) for s in range(10)]
    # 10 steps x 4 = 4 epochs of 10 windows: each epoch (positions 10e..10e+9) visits every window once.
    flat = [t // 5 for batch in steps for t in batch]
    for epoch in range(4):
        assert sorted(flat[10 * epoch: 10 * epoch + 10]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch


def test_batch_larger_than_dataset_wraps_epochs():
    dataset = PackedDataset(np.arange(3 * 5, dtype=np.int32), seq_len=4)
    batch = batch_for_step(dataset, seed=0, step=1, batch_size=7)  # positions 7..13: epochs 2, 3, 4
    windows = [t // 5 for t in _first_tokens(batch)]
    assert sorted(windows[2:5]) == [0, 1, 2]


def test_eval_batches_in_order_with_masked_fill():
    dataset = PackedDataset(np.arange(5 * 5, dtype=np.int32), seq_len=4)  # 5 windows
    batches = eval_batches(dataset, batch_size=2, n=10)
    assert len(batches) == 3
    assert [_first_tokens(b) for b in batches] == [(0, 5), (10, 15), (20, 0)]
    np.testing.assert_array_equal(batches[2]["mask"], [[1] * 4, [0] * 4])
    assert len(eval_batches(dataset, batch_size=2, n=1)) == 1
    assert [_first_tokens(b) for b in eval_batches(dataset, 2, 2)] == [(0, 5), (10, 15)]


def test_split_eval_holds_out_the_tail():
    train, held = split_eval(np.arange(100), 0.1)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(held, np.arange(90, 100))
    with pytest.raises(DataError, match=re.escape("data.eval_fraction 0.01 of the 3 training tokens leaves an empty")):
        split_eval(np.arange(3), 0.01)


def test_check_vocab_names_the_data():
    check_vocab(np.array([0, 5, 9]), 10, "data.train")
    with pytest.raises(DataError, match="data.train holds token id 10, outside the model's vocabulary of 10"):
        check_vocab(np.array([0, 10, 3]), 10, "data.train")
