"""The token store: windows equal to the in-memory readers' (text bitwise; chat rows checked against each row alone),
a killed build resumed to the same bytes, stale sources never read, corrupt shards named, vocabulary checked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vishwam.config.sections import DataConfig
from vishwam.data import prepare, splits
from vishwam.data.chat import find_template
from vishwam.data.chat_rows import encode_rows, pack_rows
from vishwam.data.store import TokenStore
from vishwam.data.text import load_token_stream, load_tokenizer, split_eval
from vishwam.data.windows import PackedDataset, batch_for_step
from vishwam.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "vishwam/assets/demo"
TOKENIZER = str(DEMO / "teacher/tokenizer.json")
CHAT_TOKENIZER = str(DEMO / "chat_teacher/tokenizer.json")
EOS = 0


def _log(lines):
    return lambda message: lines.append(message)


@pytest.fixture
def text_sources(tmp_path):
    """Several formats, one large enough to be cut into byte-range units, blank and empty documents among them."""
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:600]]
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps(r) for r in rows[:400]) + "\n\n" + json.dumps({"text": ""}) + "\n")
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n  \n".join(r["text"] for r in rows[400:560]) + "\n\n\n")
    npy = tmp_path / "ids.npy"
    np.save(npy, np.arange(2, 700, dtype=np.int64) % 200)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[560:]))
    return [str(big), str(txt), str(npy), str(small)]


def _store(files, directory, monkeypatch, *, unit_bytes=2000, vocab=None, **data):
    monkeypatch.setattr(prepare, "UNIT_BYTES", unit_bytes)
    d = DataConfig(train=tuple(files), store_dir=str(directory), **data)
    return splits.store_for(d.train, d, "train", tokenizer_path=TOKENIZER, eos_id=EOS, vocab_size=vocab,
                            log=lambda m: None, workers=1)


def test_text_store_windows_equal_the_in_memory_stream(text_sources, tmp_path, monkeypatch):
    store = _store(text_sources, tmp_path / "store", monkeypatch)
    assert len(store.shards) > len(text_sources)  # the large files were cut into several units
    stream = load_token_stream(text_sources, TOKENIZER, EOS)
    assert store.num_tokens == len(stream)
    assert np.array_equal(store.tokens(0, store.num_tokens), stream)
    for seq_len in (7, 64):
        ours = PackedDataset.from_store(store, 0, store.num_tokens, seq_len, name="data.train")
        reference = PackedDataset(stream, seq_len, name="data.train")
        assert np.array_equal(ours.windows, reference.windows)
        for step in (0, 3, 50):  # the batch at a step, epochs wrapping included
            a, b = (batch_for_step(x, seed=5, step=step, batch_size=4) for x in (ours, reference))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # data.eval_fraction: the same tail of the same stream
    d = DataConfig(train=tuple(text_sources), store_dir=str(tmp_path / "store"), eval_fraction=0.1)
    train, held = splits.load_splits(d, seq_len=16, tokenizer_path=TOKENIZER, eos_id=EOS, vocab_size=None,
                                     log=lambda m: None, workers=1)
    ref_train, ref_eval = split_eval(stream, 0.1)
    assert np.array_equal(train.windows, PackedDataset(ref_train, 16).windows)
    assert np.array_equal(held.windows, PackedDataset(ref_eval, 16).windows)


def _chat_config(tmp_path, **kw):
    return DataConfig(train=(str(DEMO / "chat_train.jsonl"),), eval=(str(DEMO / "chat_eval.jsonl"),),
                      store_dir=str(tmp_path / "chat"), **kw)


def test_chat_store_windows_equal_the_in_memory_packing(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "UNIT_BYTES", 50_000)  # several units of rows
    d = _chat_config(tmp_path)
    logs = []
    train, evaluation = splits.load_splits(d, seq_len=64, tokenizer_path=CHAT_TOKENIZER, eos_id=EOS,
                                           vocab_size=None, log=_log(logs), workers=1)
    tokenizer = load_tokenizer(CHAT_TOKENIZER)
    template = find_template(None, DEMO / "chat_teacher")
    for data, path in ((train, "chat_train.jsonl"), (evaluation, "chat_eval.jsonl")):
        rows = encode_rows(str(DEMO / path), tokenizer, template, loss_on="assistant", eos_id=EOS)
        reference = pack_rows(rows, 64, name=data.name, log=_log(logs))
        assert np.array_equal(data.windows, reference.windows)
        assert np.array_equal(data.segment_ids, reference.segment_ids)
        assert np.array_equal(data.targets, reference.targets)
    packed = [line for line in logs if "rows packed into" in line]
    assert len(packed) == 4 and packed[:2] == packed[2:]  # the stored plan logs what the in-memory packing does


def test_chat_rows_packed_in_blocks_match_each_row_alone(tmp_path, monkeypatch):
    """With packing bounded to blocks of rows, which rows share a window changes; every packed row still holds
    exactly its own tokens and targets, in one segment, and every row with a target is packed once."""
    monkeypatch.setattr("vishwam.data.windows.PLAN_BLOCK_ROWS", 37)
    d = _chat_config(tmp_path)
    train, _ = splits.load_splits(d, seq_len=200, tokenizer_path=CHAT_TOKENIZER, eos_id=EOS, vocab_size=None,
                                  log=lambda m: None, workers=1)
    rows = encode_rows(str(DEMO / "chat_train.jsonl"), load_tokenizer(CHAT_TOKENIZER),
                       find_template(None, DEMO / "chat_teacher"), loss_on="assistant", eos_id=EOS)
    width = 201
    expected = {}
    for i, (ids, targets) in enumerate(rows):
        ids, targets = ids[:width], targets[:width].copy()
        targets[0] = False
        if targets.any():
            expected[i] = (ids, targets)
    found = []
    for w, s, t in zip(train.windows, train.segment_ids, train.targets):
        for segment in np.unique(s[s > 0]):
            at = np.flatnonzero(s == segment)
            assert np.array_equal(at, np.arange(at[0], at[0] + len(at)))  # one contiguous run
            found.append((w[at], t[at]))
    assert len(found) == len(expected)
    # rows keep their order within a block's windows, so match them as a multiset of (tokens, targets)
    key = lambda x: (x[0].tobytes(), x[1].tobytes())  # noqa: E731
    assert sorted(map(key, found)) == sorted(map(key, expected.values()))
    # the blocks were in force: closing windows with each block leaves more of them than packing all rows at once
    monkeypatch.setattr("vishwam.data.windows.PLAN_BLOCK_ROWS", 1 << 16)
    assert train.num_windows > pack_rows(rows, 200, name="all at once", log=lambda m: None).num_windows


def test_a_killed_build_resumes_to_the_same_bytes(text_sources, tmp_path, monkeypatch):
    clean = _store(text_sources, tmp_path / "clean", monkeypatch, unit_bytes=1500)
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
              "from vishwam.data import prepare, splits\n"
              "from vishwam.config.sections import DataConfig\n"
              "prepare.UNIT_BYTES = 1500\n"
              "real = prepare.build_unit\n"
              "def slow(job):\n    out = real(job)\n    time.sleep(0.5)\n    return out\n"
              "prepare.build_unit = slow\n"
              f"d = DataConfig(train=tuple({text_sources!r}), store_dir={str(tmp_path / 'killed')!r})\n"
              f"splits.store_for(d.train, d, 'train', tokenizer_path={TOKENIZER!r}, eos_id={EOS}, vocab_size=None,"
              " log=print, workers=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed/train/shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.meta.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(shards.glob("*.meta.json")))
    assert 2 <= finished < len(clean.shards), finished  # killed mid-build
    assert not (tmp_path / "killed/train/manifest.json").exists()
    resumed = _store(text_sources, tmp_path / "killed", monkeypatch, unit_bytes=1500)

    def files(store):
        return {p.name: p.read_bytes() for p in sorted((store.directory / "shards").iterdir()) if p.name[0] != "."}

    assert files(resumed) == files(clean)
    assert (resumed.directory / "manifest.json").read_bytes() == (clean.directory / "manifest.json").read_bytes()
    assert not list(shards.glob(".*"))  # no half-written file left behind


def test_changed_sources_tokenizer_or_template_are_never_read(tmp_path, monkeypatch, text_sources):
    _store(text_sources, tmp_path / "s", monkeypatch)
    with open(text_sources[-1], "a") as f:  # one more document
        f.write(json.dumps({"text": "one more line"}) + "\n")
    with pytest.raises(DataError, match=r"token store .*/s/train was prepared from other data than data.train "
                                        r"\(source file small.jsonl changed"):
        _store(text_sources, tmp_path / "s", monkeypatch)
    # under the default root the fingerprint names the directory: the changed data is prepared anew
    monkeypatch.setattr(splits, "DEFAULT_ROOT", tmp_path / "root")
    d = DataConfig(train=tuple(text_sources))
    first = splits.store_for(d.train, d, "train", tokenizer_path=TOKENIZER, eos_id=EOS, vocab_size=None,
                             log=lambda m: None, workers=1)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text(Path(TOKENIZER).read_text().replace('"unk_token": null',
                                                                                      '"unk_token": null '))
    other = splits.store_for(d.train, d, "train", tokenizer_path=str(tokenizer_dir), eos_id=EOS, vocab_size=None,
                             log=lambda m: None, workers=1)
    assert other.directory != first.directory and other.fingerprint["tokenizer"] != first.fingerprint["tokenizer"]
    # a chat template given in data.chat_template is part of the fingerprint
    template = tmp_path / "template.jinja"
    template.write_text((DEMO / "chat_teacher/chat_template.jinja").read_text())
    _ = splits.load_splits(_chat_config(tmp_path, chat_template=str(template)), seq_len=64,
                           tokenizer_path=CHAT_TOKENIZER, eos_id=EOS, vocab_size=None, log=lambda m: None,
                           workers=1)
    template.write_text(template.read_text() + "\n")
    with pytest.raises(DataError, match=r"chat/train was prepared from other data than data.train \(chat_template"):
        splits.load_splits(_chat_config(tmp_path, chat_template=str(template)), seq_len=64,
                           tokenizer_path=CHAT_TOKENIZER, eos_id=EOS, vocab_size=None, log=lambda m: None,
                           workers=1)


def test_truncated_or_corrupt_shards_are_one_line_naming_them(text_sources, tmp_path, monkeypatch):
    store = _store(text_sources, tmp_path / "s", monkeypatch)
    victim = store.shards[1].path("ids")
    data = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(data[:-4]))
    with pytest.raises(DataError, match=rf"token store shard {victim} is truncated or corrupt: {len(data) - 4} bytes"):
        TokenStore(store.directory)
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    reopened = TokenStore(store.directory)  # same size: found where it is read
    with pytest.raises(DataError, match=rf"token store shard {victim} is corrupt: block 0"):
        reopened.tokens(0, reopened.num_tokens)


def test_vocabulary_range_is_checked_at_build(text_sources, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"big.jsonl \(tokenized with .*\) holds token id \d+, outside the model's "
                                        r"vocabulary of 50 ids"):
        _store(text_sources, tmp_path / "s", monkeypatch, vocab=50)
    store = _store(text_sources, tmp_path / "ok", monkeypatch)
    d = DataConfig(train=(str(store.directory),))  # a prepared store named directly
    with pytest.raises(DataError, match=rf"token store {store.directory} holds token id {store.max_id}, outside"):
        splits.store_for(d.train, d, "train", tokenizer_path=None, eos_id=EOS, vocab_size=store.max_id,
                         log=lambda m: None)
    assert splits.store_for(d.train, d, "train", tokenizer_path=None, eos_id=EOS, vocab_size=store.max_id + 1,
                            log=lambda m: None).num_tokens == store.num_tokens


def test_a_datasets_dataset_is_streamed_into_the_store(text_sources, tmp_path, monkeypatch):
    """`hf:NAME[:split]`: a local dataset directory read through `datasets.load_dataset(..., streaming=True)` gives
    the windows of the same rows as a .jsonl file; an unknown dataset is one line naming it."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(Path(text_sources[-1]).read_text())
    store = _store([f"hf:{folder}:train"], tmp_path / "hf", monkeypatch)
    reference = load_token_stream([text_sources[-1]], TOKENIZER, EOS)
    assert np.array_equal(store.tokens(0, store.num_tokens), reference)
    with pytest.raises(DataError, match=r"data entry hf:no-such-org/no-such-dataset: cannot load the dataset "
                                        r"'no-such-org/no-such-dataset' \(split 'train'\)"):
        _store(["hf:no-such-org/no-such-dataset"], tmp_path / "none", monkeypatch)
