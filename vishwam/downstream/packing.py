"""Scored requests packed first-fit into `[rows, seq_len]` batches with segment ids.

Requests are taken longest first and each goes into the first row with room for it (first-fit decreasing, in
O(log rows) a request through a max-tree of the rows' free room), so a row holds several requests back to back.
Each request is its own segment (ids 1, 2, ... within a row; 0 is padding): the model's attention never crosses
segments and positions restart at each (`models.prepare_inputs`), so a request scores as it would alone in a
row of its own. The rows are then cut into batches of `rows` (the last one filled up with empty rows), every
batch of the same shape, so one compiled program serves them all.

A batch is the scoring program's input (`vishwam.downstream.scoring.score_rows`): `input_ids`, `segment_ids`,
`targets` (each position's next token in its request) and `scored` (the positions that predict a continuation
token), all `[rows, seq_len]` int32; `Packed.where[i]` is request `i`'s `(batch, row, segment)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vishwam.downstream.tokens import ScoredRequest


@dataclasses.dataclass(frozen=True)
class Packed:
    """Requests packed into batches (see the module docstring)."""

    batches: list[dict[str, np.ndarray]]
    where: list[tuple[int, int, int]]
    """Request `i` -> `(batch, row in the batch, segment id)`."""
    tokens: int
    """Real tokens in all (the rest of the `len(batches) x rows x seq_len` slots are padding)."""

    @property
    def fill(self) -> float:
        """The share of the batches' token slots that hold a request's token."""
        slots = sum(b["input_ids"].size for b in self.batches)
        return self.tokens / slots if slots else 0.0


def first_fit(lengths: Sequence[int], width: int) -> list[tuple[int, int]]:
    """First-fit decreasing: `(row, offset)` of each length in rows of `width` slots (each length <= width)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1 << max(len(lengths) - 1, 0).bit_length()
    room = [width] * (2 * size)  # room[node]: the most free slots of a row under it (unopened rows are empty)
    placed: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        need = lengths[i]
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        placed[i] = (node - size, width - room[node])
        room[node] -= need
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return placed


def pack(requests: Sequence[ScoredRequest], *, rows: int, seq_len: int) -> Packed:
    """`requests` (each at most `seq_len` tokens) packed into batches of `rows` x `seq_len` (module docstring)."""
    if any(len(r) > seq_len for r in requests):
        raise ValueError(f"a request of {max(map(len, requests))} tokens does not fit rows of {seq_len}")
    placed = first_fit([len(r) for r in requests], seq_len)
    used = 1 + max((row for row, _ in placed), default=-1)
    n_batches = max(1, -(-used // rows))
    arrays = {k: np.zeros((n_batches * rows, seq_len), np.int32)
              for k in ("input_ids", "segment_ids", "targets", "scored")}
    segments = np.zeros(n_batches * rows, np.int32)
    where = []
    # Segments are numbered in the order of their offsets, so ids rise along a row.
    for i in sorted(range(len(requests)), key=lambda i: placed[i]):
        row, start = placed[i]
        r, stop = requests[i], placed[i][1] + len(requests[i])
        segments[row] += 1
        arrays["input_ids"][row, start:stop] = r.tokens
        arrays["targets"][row, start:stop] = r.targets
        arrays["segment_ids"][row, start:stop] = segments[row]
        arrays["scored"][row, stop - r.scored:stop] = 1
        where.append((i, row // rows, row % rows, int(segments[row])))
    where.sort()
    batches = [{k: v[b * rows:(b + 1) * rows] for k, v in arrays.items()} for b in range(n_batches)]
    return Packed(batches, [w[1:] for w in where], sum(len(r) for r in requests))


__all__ = ["Packed", "first_fit", "pack"]
