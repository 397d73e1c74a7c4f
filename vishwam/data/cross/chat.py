"""Chat rows across tokenizers: both sides rendered from the same messages, each with its own chat template, aligned
on the bytes of the messages' contents (host side, NumPy).

Two templates wrap the same contents in different bytes (`<|im_start|>assistant\\n` on one side,
`<start_of_turn>model\\n` on the other), so the renderings share only the contents. Each side's rendering is
tokenized whole, as `apply_chat_template(tokenize=True)` tokenizes it (`vishwam.data.chat`), and its byte spans are
laid onto a common *virtual text*: every message's content in order, with one virtual byte standing for all the
template bytes between two contents (and before the first, and after the last). A token inside a content keeps its
offset in it; every token that touches template bytes lands on (or stretches over) that gap's byte. The two sides
are then aligned on the virtual text as text is (`vishwam.data.cross.alignment.align`): a chunk boundary where
both sides have a token boundary at the same virtual byte.

A chunk is *compared* (the ALM loss and the shared-vocabulary KL count it) when it holds no template byte on either
side, so the two models' likelihoods are of the same content bytes, and its content is a target: an assistant
message's (`data.loss_on: assistant`) or any message's (`all`). Each side's *targets* (its CE labels; its bits
per byte) are its own tokens that overlap an assistant turn as its own template renders it (the turn's closing
markers included; `ChatTemplate.assistant_spans`), or every token (`all`), as one-tokenizer chat rows' targets.

A content is found in a rendering by searching for it after the previous one; a template that trims contents (Llama
3's `| trim`) is met by searching for the trimmed content when the whole one is not in both renderings. A content
found in neither form is a `DataError` naming the row, the message and the side.

`prompt` + `completion` rows are plain text on both sides (never templated): prompt and completion are tokenized
apart on each side, aligned apart, then each side's EOS closes the row, a chunk of its own; the completion and the
EOS are the targets (`all`: every token) and every chunk of a target is compared.

Rows follow one another in each side's stream as documents do in a cross-tokenizer text store (a window may hold
the end of one row and the start of the next, and attends across them as text windows do).

Imports `numpy`, `jinja2`, `tokenizers` and vishwam's data modules.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer

from vishwam.data.chat import ChatTemplate
from vishwam.data.chat_rows import checked_messages, render_row, row_parts
from vishwam.data.cross.alignment import Alignment, Encoding, align, char_to_byte, common_text, encode_bytes_batch
from vishwam.errors import DataError

SKIP = 2
"""Bit 1 of a chunk's flag byte in a cross store (`one`): the chunk is not compared. Bit 0: one token each side,
the same string."""


def find_contents(where: str, contents: list[str], student_text: str, teacher_text: str) -> list[tuple[str, int, int]]:
    """For each content, `(found, student_char, teacher_char)`: the string found in order in both renderings (the
    content, else its trimmed form; `""` for an empty one) and where it starts in each."""
    out, cursor = [], [0, 0]
    for j, content in enumerate(contents):
        for candidate in dict.fromkeys((content, content.strip())):
            if not candidate:
                out.append(("", cursor[0], cursor[1]))
                break
            at = [text.find(candidate, c) for text, c in ((student_text, cursor[0]), (teacher_text, cursor[1]))]
            if min(at) >= 0:
                out.append((candidate, at[0], at[1]))
                cursor = [at[0] + len(candidate), at[1] + len(candidate)]
                break
        else:
            side = "student's" if student_text.find(content.strip(), cursor[0]) < 0 else "teacher's"
            raise DataError(f"{where}: the content of message {j} is not in the {side} chat template's rendering "
                            f"(the template changes it), so the two sides cannot be aligned on it")
    return out


def virtual_spans(spans: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """One side's byte `spans` `[n, 2]` laid on the virtual text (see the module docstring), given the contents'
    byte `starts` and `lengths` in this side's rendering: `(virtual spans [n, 2], touches_template [n] bool,
    content [n] int: the content a token lies in, -1 for one touching template bytes)`."""
    k = len(starts)
    ends = starts + lengths
    gap_at = np.arange(k + 1) + np.concatenate([[0], np.cumsum(lengths)])  # virtual byte of gap g

    def place(byte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Virtual position of each byte, and the content it is in (-1: a template byte)."""
        c = np.searchsorted(starts, byte, side="right") - 1  # the last content starting at or before it
        inside = (c >= 0) & (byte < np.where(c >= 0, ends[np.maximum(c, 0)], 0))
        gap = np.searchsorted(ends, byte, side="right")  # contents ending at or before it: the gap it is in
        pos = np.where(inside, gap_at[np.maximum(c, 0)] + 1 + byte - starts[np.maximum(c, 0)], gap_at[gap])
        return pos, np.where(inside, c, -1)

    s, e = spans[:, 0], spans[:, 1]
    width = e > s
    first, c_first = place(s)
    last, c_last = place(np.where(width, e - 1, s))
    virtual = np.stack([first, np.where(width, last + 1, first)], axis=1)
    content = np.where(width & (c_first == c_last), c_first, np.where(width, -1, c_first))
    return virtual, content < 0, content


def byte_targets(spans: np.ndarray, turns: list[tuple[int, int]]) -> np.ndarray:
    """`bool [n]`: the tokens whose byte span overlaps one of `turns` (byte `[start, end)`), as
    `vishwam.data.chat.token_mask` marks assistant tokens by characters."""
    out = np.zeros(len(spans), bool)
    for a, b in turns:
        out |= (spans[:, 1] > a) & (spans[:, 0] < b)
    return out


def align_rendered(student: Encoding, teacher: Encoding, s_starts, t_starts, lengths, targets: np.ndarray,
                   *, s_keys: np.ndarray, t_keys: np.ndarray) -> tuple[Alignment, np.ndarray]:
    """Align two renderings of one conversation on its contents (byte `s_starts`/`t_starts` and `lengths`);
    **returns** the alignment and each chunk's `compared` flag (`targets[k]`: content k is a target)."""
    sv, s_tpl, s_content = virtual_spans(student.spans, np.asarray(s_starts, np.int64), np.asarray(lengths, np.int64))
    tv, t_tpl, t_content = virtual_spans(teacher.spans, np.asarray(t_starts, np.int64), np.asarray(lengths, np.int64))
    a = align(Encoding(student.ids, sv), Encoding(teacher.ids, tv), student_keys=s_keys, teacher_keys=t_keys)
    n = a.n_chunks
    template = np.bincount(a.student_chunk, weights=s_tpl, minlength=n) + \
        np.bincount(a.teacher_chunk, weights=t_tpl, minlength=n)
    both = (np.bincount(a.student_chunk, minlength=n) > 0) & (np.bincount(a.teacher_chunk, minlength=n) > 0)
    content = np.full(n, -1, np.int64)
    chunks, first = np.unique(a.student_chunk, return_index=True)
    content[chunks] = s_content[first]  # the content of each chunk's first student token
    target = np.asarray(targets, bool)
    compared = (template == 0) & both & (content >= 0) & target[np.maximum(content, 0)]
    return a, compared


def align_chat_records(items: Iterable[tuple[str, object]], student: Tokenizer, teacher: Tokenizer, *,
                       student_template: ChatTemplate | None, teacher_template: ChatTemplate | None, loss_on: str,
                       student_eos: int, teacher_eos: int,
                       keys: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Both sides' streams of chat rows `(where, record)`: `(student ids, student chunk ids, student targets,
    teacher ids, teacher chunk ids, teacher targets, flags per chunk)` (chunk ids from 0; flags: bit 0 one token
    each side of the same string, bit 1 `SKIP`). A bad row is a `DataError` naming `where`."""
    s_keys, t_keys = keys
    rows = []  # per row: ("messages", where, s_text, t_text, s_turns, t_turns, found, roles) or ("plain", ...)
    for where, record in items:
        kind, parts = row_parts(where, record, teacher_template, tokenizer="the teacher's tokenizer")
        if kind == "messages":
            messages = [dict(m) for m in parts]
            checked_messages(where, messages, student_template)
            for m in messages:
                if isinstance(m.get("content"), str):
                    m["content"] = common_text(m["content"], student, teacher)
            (s_text, s_turns), (t_text, t_turns) = (render_row(where, messages, template, loss_on)
                                                    for template in (student_template, teacher_template))
            found = find_contents(where, [m.get("content") or "" for m in messages], s_text, t_text)
            rows.append(("messages", where, s_text, t_text, s_turns, t_turns, found,
                         [m["role"] for m in messages]))
            continue
        rows.append(("plain", where, *(common_text(x, student, teacher) for x in parts)))
    s_texts, t_texts, names = [], [], []
    for row in rows:
        if row[0] == "messages":
            s_texts.append(row[2])
            t_texts.append(row[3])
            names += [row[1]]
        else:
            s_texts += [row[2], row[3]]
            t_texts += [row[2], row[3]]
            names += [f"{row[1]} (prompt)", f"{row[1]} (completion)"]
    s_enc = iter(encode_bytes_batch(student, s_texts, names=[f"student tokenizer ({n})" for n in names]))
    t_enc = iter(encode_bytes_batch(teacher, t_texts, names=[f"teacher tokenizer ({n})" for n in names]))
    out = [[] for _ in range(7)]
    base = 0

    def emit(s: Encoding, t: Encoding, a: Alignment, s_target, t_target, flags):
        nonlocal base
        for i, x in enumerate((s.ids, a.student_chunk.astype(np.int64) + base, s_target, t.ids,
                               a.teacher_chunk.astype(np.int64) + base, t_target, flags)):
            out[i].append(x)
        base += a.n_chunks

    for row in rows:
        if row[0] == "messages":
            _, where, s_text, t_text, s_turns, t_turns, found, roles = row
            s, t = next(s_enc), next(t_enc)
            s_bytes, t_bytes = char_to_byte(s_text), char_to_byte(t_text)
            kept = [(f, a, b, r) for (f, a, b), r in zip(found, roles) if f]
            lengths = [len(f.encode("utf-8")) for f, _, _, _ in kept]
            targets = np.asarray([loss_on == "all" or r == "assistant" for *_, r in kept], bool)
            a, compared = align_rendered(s, t, [s_bytes[x] for _, x, _, _ in kept],
                                         [t_bytes[x] for _, _, x, _ in kept], lengths, targets,
                                         s_keys=s_keys[s.ids], t_keys=t_keys[t.ids])
            s_target = np.ones(len(s.ids), bool) if s_turns is None else byte_targets(
                s.spans, [(s_bytes[x], s_bytes[y]) for x, y in s_turns])
            t_target = np.ones(len(t.ids), bool) if t_turns is None else byte_targets(
                t.spans, [(t_bytes[x], t_bytes[y]) for x, y in t_turns])
            emit(s, t, a, s_target, t_target, a.one_to_one.astype(np.uint8) | (~compared * SKIP).astype(np.uint8))
            continue
        for part in ("prompt", "completion"):
            s, t = next(s_enc), next(t_enc)
            a = align(s, t, student_keys=s_keys[s.ids], teacher_keys=t_keys[t.ids])
            on = part == "completion" or loss_on == "all"
            flags = a.one_to_one.astype(np.uint8) | np.uint8(0 if on else SKIP)
            emit(s, t, a, np.full(len(s.ids), on), np.full(len(t.ids), on), flags)
        eos = Encoding(np.asarray([student_eos], np.int32), np.zeros((1, 2), np.int64))
        t_eos = Encoding(np.asarray([teacher_eos], np.int32), np.zeros((1, 2), np.int64))
        emit(eos, t_eos, Alignment(np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, bool)),
             np.ones(1, bool), np.ones(1, bool), np.zeros(1, np.uint8))
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
    return (cat(out[0], np.int32), cat(out[1], np.int64), cat(out[2], bool), cat(out[3], np.int32),
            cat(out[4], np.int64), cat(out[5], bool), cat(out[6], np.uint8))


__all__ = ["SKIP", "align_chat_records", "align_rendered", "byte_targets", "find_contents", "virtual_spans"]
