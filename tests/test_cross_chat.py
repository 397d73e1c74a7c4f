"""Chat rows across tokenizers (`vishwam.data.cross.chat`): the demo chat teacher (its own 512-id tokenizer and
template) and a student with the pysrc tokenizer (2,048 ids) and a ChatML-like template of its own.

Held against references that share none of the alignment's code: the bytes of each side's tokens (the tokenizers'
vocabularies), the contents of the messages, and the one-tokenizer chat path's tokens and assistant targets
(`vishwam.data.chat_rows.encode_records`, held to transformers' `apply_chat_template` in tests/test_chat.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vishwam.data.chat import ChatTemplate, find_template
from vishwam.data.chat_rows import encode_records
from vishwam.data.cross.alignment import string_keys, token_bytes
from vishwam.data.cross.chat import SKIP, align_chat_records
from vishwam.data.text import load_tokenizer
from vishwam.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vishwam" / "assets" / "demo" / "chat_teacher"
PYSRC = ROOT / "benchmarks" / "assets" / "pysrc" / "teacher"
STUDENT_TEMPLATE = ("{% for m in messages %}<|pad|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|pad|>assistant\n{% endif %}")
# Each content first, template letters glued after it: the student's rendering starts with a content (where the
# teacher's `User: W` token holds template and content bytes) and tokens may straddle a content's end.
GLUED = ChatTemplate("glued.jinja", "{% for m in messages %}{{ m.content }}zq{{ m.role }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}{% endif %}")


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    student_dir = tmp_path_factory.mktemp("student_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PYSRC / name, student_dir / name)
    (student_dir / "chat_template.jinja").write_text(STUDENT_TEMPLATE)
    student, teacher = load_tokenizer(str(student_dir)), load_tokenizer(str(TEACHER))
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    return {"dir": student_dir, "student": student, "teacher": teacher,
            "s_template": find_template(None, student_dir), "t_template": find_template(None, TEACHER),
            "keys": string_keys(s_bytes, t_bytes), "s_bytes": s_bytes, "t_bytes": t_bytes}


def _rows():
    rows = [json.loads(line) for line in (ROOT / "vishwam/assets/demo/chat_train.jsonl").read_text().splitlines()[:30]]
    rows.append({"messages": [{"role": "user", "content": "Naïve café: 三 plus 四?"},
                              {"role": "assistant", "content": "Seven (七), naïvely."},
                              {"role": "user", "content": "And twice that?"},
                              {"role": "assistant", "content": "Fourteen."}]})
    rows.append({"prompt": "Two plus two is", "completion": " four."})
    return rows


def _align(sides, row, loss_on="assistant", s_template=None):
    return align_chat_records([("row", row)], sides["student"], sides["teacher"],
                              student_template=s_template or sides["s_template"], teacher_template=sides["t_template"],
                              loss_on=loss_on, student_eos=sides["student"].token_to_id("<|endoftext|>"),
                              teacher_eos=sides["teacher"].token_to_id("<|endoftext|>"), keys=sides["keys"])


def _text(table, ids) -> bytes:
    return b"".join(table[int(i)] or b"" for i in ids)


@pytest.mark.parametrize("template", ["own", "glued"])
@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_compared_chunks_are_the_same_content_bytes_on_both_sides(sides, loss_on, template):
    """Every compared chunk is the same bytes on both sides (each side's tokens spelled by its own vocabulary, no
    special token among them), and those bytes lie inside one target message's content; most of the targets'
    content bytes are compared. Template bytes never are, also where a token holds template and content bytes."""
    covered = total = 0
    for row in _rows():
        s, sc, _, t, tc, _, flags = _align(sides, row, loss_on, s_template=GLUED if template == "glued" else None)
        if "messages" in row:
            targets = [m["content"].encode() for m in row["messages"] if loss_on == "all" or m["role"] == "assistant"]
        else:
            targets = [row["completion"].encode()] + ([row["prompt"].encode()] if loss_on == "all" else [])
        total += sum(map(len, targets))
        for c in np.flatnonzero((flags & SKIP) == 0):
            s_ids, t_ids = s[sc == c], t[tc == c]
            if "prompt" in row and c == len(flags) - 1:  # the closing EOS pair
                assert s_ids.tolist() == [sides["student"].token_to_id("<|endoftext|>")]
                continue
            assert all(sides["s_bytes"][i] is not None for i in s_ids) and all(
                sides["t_bytes"][i] is not None for i in t_ids), (row, c)
            got = _text(sides["s_bytes"], s_ids)
            assert got == _text(sides["t_bytes"], t_ids) and got, (row, c)
            assert any(got in content for content in targets), (row, c, got)
            covered += len(got)
        # A chunk compared with one token a side of the same bytes is flagged one to one.
        for c in np.flatnonzero(flags & 1):
            assert _text(sides["s_bytes"], s[sc == c]) == _text(sides["t_bytes"], t[tc == c])
    assert covered > 0.7 * total, (covered, total)


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_each_sides_tokens_and_targets_are_its_own_chat_rows(sides, loss_on):
    """Each side's ids and targets are those the one-tokenizer chat path gives for that side alone: its own
    template's rendering, tokenized whole, its assistant tokens (or every token) the targets; a prompt +
    completion row's completion and EOS."""
    for row in _rows():
        s, _, s_target, t, _, t_target, _ = _align(sides, row, loss_on)
        for ids, target, tokenizer, template in ((s, s_target, sides["student"], sides["s_template"]),
                                                 (t, t_target, sides["teacher"], sides["t_template"])):
            [(want_ids, want_target)] = encode_records([("row", row)], tokenizer, template, loss_on=loss_on,
                                                       eos_id=tokenizer.token_to_id("<|endoftext|>"))
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(target, want_target)


def test_a_template_that_rewrites_a_content_is_refused_and_a_trimming_one_is_met(sides):
    row = {"messages": [{"role": "user", "content": "  What is two?  "}, {"role": "assistant", "content": "Two."}]}
    upper = ChatTemplate("upper.jinja", STUDENT_TEMPLATE.replace("m.content", "m.content | upper"))
    with pytest.raises(DataError, match=r"row: the content of message 0 is not in the student's chat template"):
        _align(sides, row, s_template=upper)
    trim = ChatTemplate("trim.jinja", STUDENT_TEMPLATE.replace("m.content", "m.content | trim"))
    s, sc, _, t, tc, _, flags = _align(sides, row, loss_on="all", s_template=trim)
    compared = [_text(sides["s_bytes"], s[sc == c]) for c in np.flatnonzero((flags & SKIP) == 0)]
    # The trimmed content is what both renderings share: compared chunks lie in it, never in the dropped spaces.
    assert all(c in b"What is two?" or c in b"Two." for c in compared)
    assert any(c in b"What is two?" and c not in b"Two." for c in compared)


def test_a_cross_run_on_chat_rows_trains_evaluates_and_exports_its_template(sides, tmp_path, monkeypatch):
    """run.py's code path on chat rows across tokenizers: a cross store of chat rows, ALM + CE on the assistant
    turns, bits per byte of each side's assistant tokens, and a student exported with its own template, which
    transformers renders as the run rendered its rows."""
    from vishwam.config.cli import load_config
    from vishwam.run.loop import Run

    monkeypatch.chdir(ROOT)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join((ROOT / "vishwam/assets/demo/chat_train.jsonl").read_text().splitlines()[:300]) + "\n")
    out = tmp_path / "run"
    run = Run(load_config(str(ROOT / "configs" / "chat.yaml"), [
        "--distillation.student-model.tokenizer", str(sides["dir"]), "--distillation-params.on-policy.fraction", "0",
        "--distillation-params.ce-weight", "1", "--data.train", str(data), "--data.eval",
        str(ROOT / "vishwam/assets/demo/chat_eval.jsonl"), "--data.store-dir", str(tmp_path / "store"),
        "--training.max-steps", "4", "--training.eval-every", "4", "--training.save-every", "4",
        "--training.eval-batches", "1", "--training.batch-size", "4", "--training.seq-len", "48",
        "--training.output-dir", str(out), "--tracking.aim", "false"]))
    ev = run.train()["eval"]
    assert 0 < ev["teacher_bpb"] < ev["student_bpb"] and ev["chunks"] > 0 and np.isfinite(ev["chunk_kl"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"distill/alm", "distill/ce"} <= set().union(*map(set, metrics))
    batch = run.train_data.batch(np.arange(4))
    assert 0 < batch["loss_mask"].sum() < batch["mask"].sum()  # the student's assistant tokens alone
    assert 0 < batch["chunk_mask"].sum() < (batch["student_chunk"].max(1) + 1).sum()  # template chunks left out
    student = out / "student"
    assert (student / "chat_template.jinja").read_text() == STUDENT_TEMPLATE
    from transformers import AutoTokenizer

    messages = json.loads((ROOT / "vishwam/assets/demo/chat_eval.jsonl").read_text().splitlines()[0])["messages"]
    hf = AutoTokenizer.from_pretrained(str(student))
    assert hf.apply_chat_template(messages, tokenize=False) == sides["s_template"].render(messages)
    assert os.path.isfile(student / "tokenizer.json")


def test_a_chat_store_holds_the_in_memory_alignment_across_shards(sides, tmp_path):
    """Chat rows prepared into a `cross` store (three files: three shards, whose chunk ids the reader offsets)
    give the windows that the in-memory streams of the same rows give, every key; the store records the chat
    flag, both templates and `loss_on` in its fingerprint."""
    from vishwam.config.sections import DataConfig
    from vishwam.data.cross.windows import KEYS, CrossDataset, Streams
    from vishwam.data.splits import CrossSides, load_splits
    from vishwam.data.store import TokenStore

    rows = _rows()
    files = []
    for f in range(3):
        path = tmp_path / f"part{f}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[f::3]))
        files.append(str(path))
    s_eos, t_eos = sides["student"].token_to_id("<|endoftext|>"), sides["teacher"].token_to_id("<|endoftext|>")
    d = DataConfig(train=tuple(files), store_dir=str(tmp_path / "store"), eval_fraction=0.0)
    train, _ = load_splits(d, seq_len=24, tokenizer_path=str(TEACHER), eos_id=t_eos, vocab_size=512,
                           log=lambda m: None, workers=1, cross=CrossSides(str(sides["dir"]), s_eos, 2048, 30))
    in_order = [r for f in range(3) for r in rows[f::3]]
    streams = Streams.of_chat(*align_chat_records(
        [("row", r) for r in in_order], sides["student"], sides["teacher"], student_template=sides["s_template"],
        teacher_template=sides["t_template"], loss_on="assistant", student_eos=s_eos, teacher_eos=t_eos,
        keys=sides["keys"]))
    expect = CrossDataset(streams, 0, streams.n_student, 24, 30, name="memory")
    assert len(train) == len(expect) > 10
    windows = np.arange(len(expect))
    got, want = train.batch(windows), expect.batch(windows)
    for key in KEYS:
        np.testing.assert_array_equal(np.asarray(got[key]).astype(np.int64), np.asarray(want[key]).astype(np.int64),
                                      err_msg=key)
    assert 0 < got["loss_mask"].sum() < got["mask"].sum() and 0 < got["teacher_loss_mask"].sum() < got[
        "teacher_mask"].sum()
    fingerprint = TokenStore(tmp_path / "store" / "train").fingerprint
    assert fingerprint["chat"] and fingerprint["loss_on"] == "assistant"
    assert fingerprint["chat_templates"] == [STUDENT_TEMPLATE, sides["t_template"].text]
