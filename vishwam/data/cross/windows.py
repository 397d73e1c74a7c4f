"""Cross-tokenizer windows: documents tokenized by the student's and the teacher's tokenizers, aligned by bytes
(`vishwam.data.cross.alignment`), cut into static-shape windows for the train step.

Each document's text (put through the tokenizers' Unicode normal forms, `common_text`) is tokenized by both sides
and aligned into chunks; an EOS closes it on each side, a chunk of its own (`align_documents`). The documents form
one stream per side with a chunk id per token, nondecreasing. A token store of kind `cross` keeps these streams
(`vishwam.data.prepare` writes them with the rest of the data; `vishwam.data.store` reads them), so the alignment is
made once, when the data is prepared, never in the step.

The student's stream is cut into windows of `seq_len + 1` tokens, window `w` starting at token `w · seq_len`; a
window's teacher tokens are those of the chunks its student tokens touch, at most `teacher_seq_len + 1` of them (a
window whose teacher side is longer is truncated there; the chunks cut off do not count). Chunk ids are renumbered
per window from 0, so a window has at most `seq_len + 1` chunks: `num_chunks = seq_len + 1` is static.
`chunk_mask[w, c]` says chunk `c` of window `w` lies wholly inside both sides of the window and is not the window's
first chunk (whose first token on each side is an input with no label). The loss counts only those.

Cutting a window reads O(window) tokens of each stream and two positions found by binary search (`cut_window`),
so a dataset over a store of any size opens in O(1) (`CrossDataset`); `build_cross_windows` cuts every window of a
list of texts in memory (tests, benchmarks).

Imports `numpy`, `tokenizers` and `vishwam.data.cross.alignment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from vishwam.data.cross.alignment import align, common_text, encode_bytes_batch, string_keys, token_bytes
from vishwam.data.cross.chat import SKIP
from vishwam.errors import DataError

KEYS = ("input_ids", "labels", "mask", "loss_mask", "student_chunk", "teacher_input_ids", "teacher_labels",
        "teacher_mask", "teacher_loss_mask", "teacher_input_mask", "teacher_chunk", "one_to_one", "chunk_mask")
"""A cross-tokenizer batch's arrays (`CrossWindows.batch`), the train step's input."""


def align_documents(texts: Sequence[str], student: Tokenizer, teacher: Tokenizer, *, student_eos: int,
                    teacher_eos: int, keys: tuple[np.ndarray, np.ndarray] | None = None, name: str = "data",
                    first: int = 0) -> tuple[np.ndarray, ...]:
    """Both sides' streams of `texts`: `(student ids, student chunk ids, teacher ids, teacher chunk ids,
    one_to_one per chunk)`, chunk ids from 0 (int64). `keys`: both tokenizers' per-id string keys
    (`alignment.string_keys` of their `token_bytes`; computed when None). A text a tokenizer cannot encode, or
    whose byte offsets do not tile it, is a `DataError` naming document `first + k` of `name`."""
    s_keys, t_keys = keys if keys is not None else string_keys(token_bytes(student), token_bytes(teacher))
    common = [common_text(t, student, teacher) for t in texts]
    names = [f"{name}, document {first + k}" for k in range(len(texts))]
    s_enc = encode_bytes_batch(student, common, names=[f"student tokenizer ({n})" for n in names])
    t_enc = encode_bytes_batch(teacher, common, names=[f"teacher tokenizer ({n})" for n in names])
    s_ids, s_chunk, t_ids, t_chunk, one = [], [], [], [], []
    base = 0
    for s, t in zip(s_enc, t_enc):
        a = align(s, t, student_keys=s_keys[s.ids], teacher_keys=t_keys[t.ids])
        s_ids += [s.ids, np.asarray([student_eos], np.int32)]
        t_ids += [t.ids, np.asarray([teacher_eos], np.int32)]
        s_chunk += [a.student_chunk.astype(np.int64) + base, np.asarray([base + a.n_chunks], np.int64)]
        t_chunk += [a.teacher_chunk.astype(np.int64) + base, np.asarray([base + a.n_chunks], np.int64)]
        one += [a.one_to_one, np.zeros(1, bool)]  # the EOS pair: specials are not in the shared vocabulary
        base += a.n_chunks + 1
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
    return cat(s_ids, np.int32), cat(s_chunk, np.int64), cat(t_ids, np.int32), cat(t_chunk, np.int64), cat(one, bool)


class Streams:
    """Both sides' streams in memory (`align_documents`'s arrays), read as `cut_window` reads a store's."""

    def __init__(self, s_ids, s_chunk, t_ids, t_chunk, one, s_targets=None, t_targets=None):
        self.s_ids, self.s_chunk, self.t_ids, self.t_chunk, self.one_flags = s_ids, s_chunk, t_ids, t_chunk, one
        self.s_targets, self.t_targets = s_targets, t_targets
        self.n_student, self.n_teacher, self.n_chunks = len(s_ids), len(t_ids), len(one)

    @classmethod
    def of_chat(cls, s_ids, s_chunk, s_targets, t_ids, t_chunk, t_targets, flags) -> Streams:
        """`cross_chat.align_chat_records`'s arrays."""
        return cls(s_ids, s_chunk, t_ids, t_chunk, flags, s_targets, t_targets)

    def student(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.s_ids[lo:hi], self.s_chunk[lo:hi]

    def teacher(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.t_ids[lo:hi], self.t_chunk[lo:hi]

    def teacher_first(self, chunk: int) -> int:
        """The index of chunk `chunk`'s first teacher token (`n_teacher` past the last chunk)."""
        return int(np.searchsorted(self.t_chunk, chunk))

    def one(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.one_flags[lo:hi], np.uint8)

    def targets(self, lo: int, hi: int) -> np.ndarray:
        return np.ones(len(self.s_ids[lo:hi]), bool) if self.s_targets is None else self.s_targets[lo:hi]

    def teacher_targets(self, lo: int, hi: int) -> np.ndarray:
        return np.ones(len(self.t_ids[lo:hi]), bool) if self.t_targets is None else self.t_targets[lo:hi]


def cut_window(streams, lo: int, seq_len: int, teacher_seq_len: int) -> tuple[np.ndarray, ...]:
    """The window of student tokens `[lo, lo + seq_len + 1)` (see the module docstring): `(student ids, student
    chunk ids, teacher ids, teacher chunk ids (-1 on padding), one_to_one, chunk_mask, student targets, teacher
    targets)`, the chunk arrays `[seq_len + 1]`. `streams`: `Streams` or a cross token store's reader
    (`vishwam.data.store.CrossStreams`). A chunk flagged not compared (chat rows' template and non-target chunks,
    `cross_chat.SKIP`) is out of `chunk_mask` and `one_to_one`."""
    width, t_width = seq_len + 1, teacher_seq_len + 1
    before = 1 if lo > 0 else 0
    ids, chunk = streams.student(lo - before, lo + width + 1)  # one token each side: is a chunk cut by the edge?
    s, sc = ids[before:before + width], chunk[before:before + width]
    c0, c1 = int(sc[0]), int(sc[-1])
    n = c1 - c0 + 1
    t_lo, t_hi = streams.teacher_first(c0), streams.teacher_first(c1 + 1)
    t_take = min(t_hi - t_lo, t_width)
    t_ids, t_chunk = streams.teacher(t_lo, t_lo + t_take + (t_take < t_hi - t_lo))
    ok = np.ones(n, bool)
    ok[0] = False  # the window's first chunk: its first token on each side is an input with no label
    if len(chunk) > before + width and chunk[before + width] == c1:
        ok[-1] = False  # the last chunk goes on past the window
    if t_take < t_hi - t_lo:  # the teacher side is truncated: chunks from the one cut onwards are not whole
        ok[int(t_chunk[t_take]) - c0:] = False
    tc = np.full(t_width, -1, np.int32)
    tc[:t_take] = t_chunk[:t_take] - c0
    t = np.zeros(t_width, np.int32)
    t[:t_take] = t_ids[:t_take]
    flags = streams.one(c0, c1 + 1)
    ok &= (flags & SKIP) == 0
    chunk_mask = np.zeros(width, bool)
    chunk_mask[:n] = ok
    one = np.zeros(width, bool)
    one[:n] = ((flags & 1) != 0) & ok
    s_target = np.asarray(streams.targets(lo, lo + width), bool)
    t_target = np.zeros(t_width, bool)
    t_target[:t_take] = streams.teacher_targets(t_lo, t_lo + t_take)
    return (np.asarray(s, np.int32), np.asarray(sc - c0, np.int32), t, tc, one, chunk_mask, s_target, t_target)


def _batch(parts: list[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
    s, sc, t, tc, one, ok, st, tt = (np.stack(x) for x in zip(*parts))
    tv = tc >= 0
    return {"input_ids": s[:, :-1], "labels": s[:, 1:], "mask": np.ones(s[:, 1:].shape, np.int32),
            "loss_mask": st[:, 1:].astype(np.int32), "student_chunk": sc[:, 1:],
            "teacher_input_ids": t[:, :-1], "teacher_labels": t[:, 1:],
            "teacher_mask": tv[:, 1:].astype(np.int32), "teacher_loss_mask": (tv & tt)[:, 1:].astype(np.int32),
            "teacher_input_mask": tv[:, :-1].astype(np.int32),
            "teacher_chunk": tc[:, 1:], "one_to_one": one, "chunk_mask": ok}


def count_windows(tokens: int, seq_len: int, name: str) -> int:
    """Windows of `seq_len + 1` tokens at a stride of `seq_len` in `tokens` student tokens (none is an error)."""
    n = (tokens - 1) // seq_len if tokens > seq_len else 0
    if n == 0:
        raise DataError(f"{name}: {tokens} student tokens, fewer than one window of {seq_len + 1} (add data or "
                        f"lower training.seq_len)")
    return n


class CrossDataset:
    """The cross-tokenizer windows of student tokens `[start, stop)` of `streams` (a cross token store's, or in
    memory), served like `vishwam.data.windows.PackedDataset`: `num_windows`, `permutation(seed, epoch)` and
    `batch(indices)` (the train step's arrays, `KEYS`, and `window`), so `batch_for_step`, `StepReader` and the
    evaluation batches take it as they take a same-tokenizer dataset."""

    packed = False

    def __init__(self, streams, start: int, stop: int, seq_len: int, teacher_seq_len: int, *, name: str,
                 identity: dict | None = None):
        self.streams, self.start, self.name = streams, start, name
        self.seq_len, self.teacher_seq_len = seq_len, teacher_seq_len
        self.num_windows = count_windows(stop - start, seq_len, name)
        self.identity = identity
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_chunks(self) -> int:
        return self.seq_len + 1

    @property
    def batch_spec(self) -> dict[str, tuple[int | None, type]]:
        """Each key of `batch` with its width and dtype (`vishwam.data.windows.StepBatch` reads rows by them)."""
        s, t, c = self.seq_len, self.teacher_seq_len, self.seq_len + 1
        spec = {k: (s, np.int32) for k in ("input_ids", "labels", "mask", "loss_mask", "student_chunk")}
        spec.update({k: (t, np.int32) for k in ("teacher_input_ids", "teacher_labels", "teacher_mask",
                                                "teacher_loss_mask", "teacher_input_mask", "teacher_chunk")})
        return {**spec, "one_to_one": (c, bool), "chunk_mask": (c, bool), "window": (None, np.int64)}

    def teacher_side(self) -> TeacherSide:
        """The teacher's side of these windows as a one-tokenizer dataset (what a teacher cache is built over)."""
        return TeacherSide(self)

    def __len__(self) -> int:
        return self.num_windows

    def __repr__(self) -> str:
        return (f"CrossDataset({self.name!r}, num_windows={self.num_windows}, seq_len={self.seq_len}, "
                f"teacher_seq_len={self.teacher_seq_len})")

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        """The window order of one epoch: a function of `(seed, epoch)` only (as `PackedDataset.permutation`)."""
        key = (seed, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = np.random.default_rng([seed, epoch]).permutation(self.num_windows)
        return self._permutations[key]

    def batch(self, indices, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The arrays of windows `indices`; `mask` (`[n, seq_len]`, 0 for an evaluation batch's filler rows)
        zeroes every mask and chunk of those rows."""
        indices = np.asarray(indices, np.int64)
        out = _batch([cut_window(self.streams, self.start + int(w) * self.seq_len, self.seq_len,
                                 self.teacher_seq_len) for w in indices])
        if mask is not None:
            keep = np.asarray(mask).any(axis=1)
            for key in ("mask", "loss_mask", "teacher_mask", "teacher_loss_mask", "teacher_input_mask", "one_to_one",
                        "chunk_mask"):
                out[key] = out[key] * keep[:, None].astype(out[key].dtype)
        out["window"] = indices
        return out


class TeacherSide:
    """A `CrossDataset`'s teacher side, read as a one-tokenizer dataset: windows of `teacher_seq_len + 1` teacher
    tokens (`input_ids`, `labels`, `mask`: the teacher's input validity, `window`); a `cached` teacher's cache is
    built over it and keyed by the same window indices."""

    packed = False

    def __init__(self, data: CrossDataset):
        self.data, self.name = data, f"{data.name} (teacher side)"
        self.seq_len, self.num_windows = data.teacher_seq_len, data.num_windows
        self.identity = None if data.identity is None else {**data.identity, "side": "teacher"}

    def __len__(self) -> int:
        return self.num_windows

    def batch(self, indices, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        b = self.data.batch(indices)
        return {"input_ids": b["teacher_input_ids"], "labels": b["teacher_labels"], "mask": b["teacher_input_mask"],
                "window": b["window"]}


@dataclass(frozen=True)
class CrossWindows:
    """Every window of a list of texts in memory: `student` `[n, seq_len + 1]` ids and `student_chunk`,
    `teacher` `[n, teacher_seq_len + 1]` ids, `teacher_chunk` (-1 on padding) and `teacher_valid`; per chunk
    `[n, seq_len + 1]`: `one_to_one` and `chunk_mask`."""

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
        """The train step's arrays for `rows` (`KEYS`): each side's inputs, labels, label mask and label chunk
        ids, and the chunk arrays (label position `i` predicts token `i + 1` of the window)."""
        s, sc = self.student[rows], self.student_chunk[rows]
        t, tc, tv = self.teacher[rows], self.teacher_chunk[rows], self.teacher_valid[rows]
        return {
            "input_ids": s[:, :-1], "labels": s[:, 1:], "mask": np.ones(s[:, 1:].shape, bool),
            "loss_mask": np.ones(s[:, 1:].shape, bool), "student_chunk": sc[:, 1:],
            "teacher_input_ids": t[:, :-1], "teacher_labels": t[:, 1:], "teacher_mask": tv[:, 1:],
            "teacher_loss_mask": tv[:, 1:], "teacher_input_mask": tv[:, :-1], "teacher_chunk": tc[:, 1:],
            "one_to_one": self.one_to_one[rows], "chunk_mask": self.chunk_mask[rows],
        }


def build_cross_windows(texts: Sequence[str], student: Tokenizer, teacher: Tokenizer, *, seq_len: int,
                        teacher_seq_len: int, student_eos: int, teacher_eos: int, name: str = "data") -> CrossWindows:
    """Tokenize, align and cut every window of `texts` in memory; fewer than one window is a `DataError`."""
    streams = Streams(*align_documents(texts, student, teacher, student_eos=student_eos, teacher_eos=teacher_eos,
                                       name=name))
    n = count_windows(streams.n_student, seq_len, name)
    s, sc, t, tc, one, ok, _, _ = (np.stack(x) for x in zip(*[cut_window(streams, w * seq_len, seq_len,
                                                                         teacher_seq_len) for w in range(n)]))
    return CrossWindows(s, sc, t, tc, tc >= 0, one, ok)
