"""Tables as data: `.parquet` files and `datasets.save_to_disk` directories, written by HF `datasets` itself, read
to the same tokens, targets and packed windows as the same rows in a `.jsonl` file; their errors name the file and
row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vishwam.config.sections import DataConfig
from vishwam.data.chat import ChatTemplate
from vishwam.data.chat_rows import encode_rows, is_chat, load_chat_splits
from vishwam.data.text import expand_paths, load_token_stream, load_tokenizer
from vishwam.errors import DataError

datasets = pytest.importorskip("datasets")

DEMO = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo" / "teacher"
TEMPLATE = """{% for m in messages %}{{ m.role | capitalize }}{% if m.name is defined %} ({{ m.name }}){% endif %}: \
{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}\
{% if add_generation_prompt %}Assistant: {% endif %}"""


def _conversations(n: int = 24) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
                 {"role": "assistant", "content": f"It is {a + b}."}]
        if i % 3 == 0:  # a key only some messages have: Arrow stores null in the others (rendered as absent)
            turns[0]["name"] = "ana"
        if i % 2:
            turns = [{"role": "system", "content": "Be brief."}] + turns
        rows.append({"messages": turns})
    return rows


def _write(rows: list[dict], d: Path, shards: int = 2) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(d / "rows.parquet"))
    table.save_to_disk(str(d / "saved"), num_shards=shards)  # several .arrow files, read in order
    return {"jsonl": d / "rows.jsonl", "parquet": d / "rows.parquet", "saved": d / "saved"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(DEMO))


def test_text_tables_give_the_jsonl_token_stream(tmp_path):
    rows = [{"text": f"document {i}: " + " ".join(["word"] * (i % 5 + 1))} for i in range(9)] + [{"text": ""}]
    paths = _write(rows, tmp_path)
    expected = load_token_stream(str(paths["jsonl"]), str(DEMO), eos_id=0)
    assert expected.size > 50
    for kind in ("parquet", "saved"):
        np.testing.assert_array_equal(load_token_stream(str(paths[kind]), str(DEMO), eos_id=0), expected)
    assert not is_chat(str(paths["saved"])) and not is_chat(str(paths["parquet"]))


def test_chat_tables_give_the_jsonl_rows(tmp_path, tokenizer):
    rows = _conversations()
    paths = _write(rows, tmp_path)
    template = ChatTemplate("test", TEMPLATE, (("eos_token", "<|endoftext|>"), ("bos_token", "")))
    for loss_on in ("assistant", "all"):
        expected = encode_rows(str(paths["jsonl"]), tokenizer, template, loss_on=loss_on, eos_id=0)
        assert sum(t.sum() for _, t in expected) > 0
        for kind in ("parquet", "saved"):
            assert is_chat(str(paths[kind]))
            got = encode_rows(str(paths[kind]), tokenizer, template, loss_on=loss_on, eos_id=0)
            assert len(got) == len(expected)
            for (ids, targets), (want_ids, want_targets) in zip(got, expected):
                np.testing.assert_array_equal(ids, want_ids)
                np.testing.assert_array_equal(targets, want_targets)


def test_prompt_completion_table_and_packed_splits(tmp_path):
    rows = [{"prompt": f"Q{i}: {i} times two?", "completion": f" {2 * i}."} for i in range(30)]
    paths = _write(rows, tmp_path)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    packed = {}
    for kind in ("jsonl", "saved"):
        d = DataConfig(train=[str(paths[kind])], eval_fraction=0.2, chat_template=str(tmp_path / "t.jinja"))
        packed[kind] = load_chat_splits(d, seq_len=32, tokenizer_path=str(DEMO), eos_id=0, vocab_size=None,
                                        log=lambda _: None)
    for a, b in zip(packed["jsonl"], packed["saved"]):
        np.testing.assert_array_equal(a.windows, b.windows)
        np.testing.assert_array_equal(a.segment_ids, b.segment_ids)
        np.testing.assert_array_equal(a.targets, b.targets)


def test_table_errors_name_the_file_and_row(tmp_path, tokenizer):
    rows = _conversations(4)
    rows[2] = {"messages": [{"role": "user", "content": "hello"}]}  # no assistant turn
    paths = _write(rows, tmp_path)
    template = ChatTemplate("test", TEMPLATE, (("eos_token", "<|endoftext|>"), ("bos_token", "")))
    with pytest.raises(DataError, match=r"rows\.parquet row 2: the conversation has no assistant turn"):
        encode_rows(str(paths["parquet"]), tokenizer, template, loss_on="assistant", eos_id=0)

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"saved DatasetDict with splits test, train; name one split's directory"):
        expand_paths(str(tmp_path / "dict"))
    assert expand_paths(str(tmp_path / "dict" / "train")) == [str(tmp_path / "dict" / "train")]

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_token_stream(str(tmp_path / "bad.parquet"), str(DEMO), eos_id=0)

    state = json.loads((paths["saved"] / "state.json").read_text())
    state["_data_files"].append({"filename": "data-00009-of-00009.arrow"})
    (paths["saved"] / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"state\.json lists data-00009-of-00009\.arrow, which is not in"):
        is_chat(str(paths["saved"]))


def test_without_pyarrow_one_line_names_the_extra(tmp_path, monkeypatch):
    paths = _write([{"text": "a b c"}], tmp_path, shards=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(DataError, match=r"rows\.parquet: reading \.parquet files .* needs pyarrow \(pip install "
                                        r"'vishwam\[data\]'\)"):
        load_token_stream(str(paths["parquet"]), str(DEMO), eos_id=0)
