"""Cross-tokenizer windows: documents tokenized by the student's and the teacher's tokenizers, aligned by bytes
(`vishwam.data.alignment`), packed into static-shape windows for the train step.

Each document's text (put through the tokenizers' Unicode normal forms, `common_text`) is tokenized by both sides
and aligned into chunks; an EOS closes it on each side, a chunk of its own. The documents are joined into one
stream per side with one global chunk id per token. The student's stream is cut into non-overlapping windows of
`seq_len + 1` tokens, as `PackedDataset` cuts a same-tokenizer stream; a window's teacher tokens are those of the
chunks its student tokens touch, at most `teacher_seq_len + 1` of them (a window whose teacher side is longer is
truncated there; the chunks cut off do not count). Chunk ids are renumbered per window from 0, so a window has at
most `seq_len + 1` chunks: `num_chunks = seq_len + 1` is static.

`chunk_mask[w, c]` says chunk `c` of window `w` lies wholly inside both sides of the window and is not the
window's first chunk (whose first token on each side is an input with no label). The loss counts only those.

Alignment here is per window on the host when the windows are built (the token store keeps one tokenizer's ids;
storing the alignment beside them is not done yet).

Imports `numpy`, `tokenizers` and `vishwam.data.alignment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from vishwam.data.alignment import align, common_text, encode_bytes, token_bytes
from vishwam.errors import DataError


@dataclass(frozen=True)
class CrossWindows:
    """Windows of both sides: `student` `[n, seq_len + 1]` ids and `student_chunk` (its chunk ids), `teacher`
    `[n, teacher_seq_len + 1]` ids, `teacher_chunk` (-1 on padding) and `teacher_valid`; per chunk `[n, seq_len +
    1]`: `one_to_one` (one token each side, the same string) and `chunk_mask` (the chunk counts)."""

    student: np.ndarray
    student_chunk: np.ndarray
    teacher: np.ndarray
    teacher_chunk: np.ndarray
    teacher_valid: np.ndarray
    one_to_one: np.ndarray
    chunk_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.student)

    @property
    def num_chunks(self) -> int:
        return self.student.shape[1]

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The train step's arrays for `rows`: each side's inputs, labels, label mask and label chunk ids, and the
        chunk arrays (label position `i` predicts token `i + 1` of the window, as in `PackedDataset`)."""
        s, sc = self.student[rows], self.student_chunk[rows]
        t, tc, tv = self.teacher[rows], self.teacher_chunk[rows], self.teacher_valid[rows]
        return {
            "input_ids": s[:, :-1], "labels": s[:, 1:], "mask": np.ones(s[:, 1:].shape, bool),
            "student_chunk": sc[:, 1:],
            "teacher_input_ids": t[:, :-1], "teacher_labels": t[:, 1:], "teacher_mask": tv[:, 1:],
            "teacher_input_mask": tv[:, :-1], "teacher_chunk": tc[:, 1:],
            "one_to_one": self.one_to_one[rows], "chunk_mask": self.chunk_mask[rows],
        }


def _streams(texts, student, teacher, student_eos, teacher_eos):
    s_tab, t_tab = token_bytes(student), token_bytes(teacher)
    s_ids, s_chunk, t_ids, t_chunk, one = [], [], [], [], []
    base = 0
    for k, raw in enumerate(texts):
        text = common_text(raw, student, teacher)
        s = encode_bytes(student, text, name=f"student tokenizer (document {k})")
        t = encode_bytes(teacher, text, name=f"teacher tokenizer (document {k})")
        a = align(s, t, student_strings=[s_tab[i] for i in s.ids], teacher_strings=[t_tab[i] for i in t.ids])
        s_ids += [s.ids, np.asarray([student_eos], np.int32)]
        t_ids += [t.ids, np.asarray([teacher_eos], np.int32)]
        s_chunk += [a.student_chunk + base, np.asarray([base + a.n_chunks], np.int32)]
        t_chunk += [a.teacher_chunk + base, np.asarray([base + a.n_chunks], np.int32)]
        one += [a.one_to_one, np.zeros(1, bool)]  # the EOS pair: specials are not in the shared vocabulary
        base += a.n_chunks + 1
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
    return cat(s_ids, np.int32), cat(s_chunk, np.int64), cat(t_ids, np.int32), cat(t_chunk, np.int64), cat(one, bool)


def build_cross_windows(texts: Sequence[str], student: Tokenizer, teacher: Tokenizer, *, seq_len: int,
                        teacher_seq_len: int, student_eos: int, teacher_eos: int, name: str = "data") -> CrossWindows:
    """Tokenize, align and window `texts` (see the module docstring); fewer than one window is a `DataError`."""
    s_ids, s_chunk, t_ids, t_chunk, one = _streams(texts, student, teacher, student_eos, teacher_eos)
    n = (len(s_ids) - 1) // seq_len if len(s_ids) > seq_len else 0
    if n == 0:
        raise DataError(f"{name}: {len(s_ids)} student tokens, fewer than one window of {seq_len + 1}")
    width, t_width = seq_len + 1, teacher_seq_len + 1
    out = {k: [] for k in ("s", "sc", "t", "tc", "tv", "one", "ok")}
    s_first = np.searchsorted(s_chunk, np.arange(s_chunk[-1] + 2))  # the first student token of each chunk
    t_first = np.searchsorted(t_chunk, np.arange(s_chunk[-1] + 2))
    for w in range(n):
        lo = w * seq_len
        sc = s_chunk[lo: lo + width]
        c0, c1 = int(sc[0]), int(sc[-1])
        t_lo, t_hi = int(t_first[c0]), int(t_first[c1 + 1])
        t_take = min(t_hi - t_lo, t_width)
        tc = np.full(t_width, -1, np.int64)
        tc[:t_take] = t_chunk[t_lo: t_lo + t_take] - c0
        t = np.zeros(t_width, np.int32)
        t[:t_take] = t_ids[t_lo: t_lo + t_take]
        chunks = np.arange(c0, c0 + width)
        inside = chunks <= c1
        s_whole = inside & (s_first[np.minimum(chunks, c1)] >= lo) & (s_first[np.minimum(chunks, c1) + 1] <= lo + width)
        t_whole = inside & (t_first[np.minimum(chunks, c1) + 1] <= t_lo + t_take)
        ok = s_whole & t_whole
        ok[0] = False
        one_w = np.zeros(width, bool)
        one_w[: c1 - c0 + 1] = one[c0: c1 + 1]
        for key, value in (("s", s_ids[lo: lo + width]), ("sc", sc - c0), ("t", t), ("tc", tc),
                           ("tv", tc >= 0), ("one", one_w & ok), ("ok", ok)):
            out[key].append(value)
    stack = lambda key, dtype: np.stack(out[key]).astype(dtype)  # noqa: E731
    return CrossWindows(stack("s", np.int32), stack("sc", np.int32), stack("t", np.int32), stack("tc", np.int32),
                        stack("tv", bool), stack("one", bool), stack("ok", bool))
