"""Windows: a token stream (or packed rows) cut into windows of `seq_len + 1` tokens, served in an order that is a
function of `(seed, step)`.

A `PackedDataset` reads its windows from one of three places, behind one interface (`read(indices)`):

- an in-memory stream or in-memory packed rows (`PackedDataset(tokens, ...)`, `PackedDataset.of_rows(...)`);
- a token store's text stream (`PackedDataset.from_store`): window `w` is ids `[start + w (S+1), start + (w+1)(S+1))`
  of the store's stream, read from the memory map when asked;
- a token store's chat rows and a packing plan (`PackedDataset.from_plan`, `pack_plan`): each window's rows read
  from the store and laid out as the plan says.

The batch at a step is a pure function of `(seed, step)` (`batch_for_step`), so resuming at step `k` needs no
data-loader state, and a process reads only the windows it asks for.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Mapping

import numpy as np

from vishwam.errors import DataError

PLAN_BLOCK_ROWS = 1 << 16
"""Chat rows are packed first-fit within blocks of this many rows (windows opened in a block close with it), so
planning is one pass with memory bounded by the block at any corpus size."""


def pack_plan(lengths: np.ndarray, firsts: np.ndarray, width: int, *, block_rows: int | None = None):
    """Greedy first-fit packing of rows into windows of `width` tokens, in order, within blocks of `block_rows` rows
    (default `PLAN_BLOCK_ROWS`).

    **Arguments:** each row's length and first target position after its first token (the row's length when it
    has none). A row longer than `width` is truncated to it; a row with no target within its first `width` tokens
    is dropped.

    **Returns:** `(rows, starts, sizes, window_starts, truncated)`: the kept rows' indices, their offsets in their
    window and their (truncated) lengths, in window order; `window_starts[w]` is the first placement of window
    `w` (`num_windows + 1` entries); and how many rows were truncated.
    """
    block_rows = block_rows or PLAN_BLOCK_ROWS
    lengths = np.asarray(lengths, np.int64)
    sizes_all = np.minimum(lengths, width)
    kept = np.flatnonzero(np.asarray(firsts) < sizes_all)
    out_rows, out_starts, out_window = [], [], []
    windows_before = 0
    for block in range(0, len(kept), block_rows):
        rows = kept[block:block + block_rows]
        size = 1 << max(len(rows) - 1, 0).bit_length()
        room = [width] * (2 * size)  # a max-tree over the block's windows' free room: O(log) a row
        for r in rows:
            need = int(sizes_all[r])
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            out_rows.append(r)
            out_window.append(windows_before + node - size)
            out_starts.append(width - room[node])
            room[node] -= need
            while node > 1:
                node //= 2
                room[node] = max(room[2 * node], room[2 * node + 1])
        if len(rows):
            windows_before = 1 + max(out_window[-len(rows):])
    rows, window, starts = (np.asarray(a, np.int64) for a in (out_rows, out_window, out_starts))
    order = np.lexsort((starts, window))
    rows, window, starts = rows[order], window[order], starts[order]
    window_starts = np.searchsorted(window, np.arange(windows_before + 1))
    return rows, starts, sizes_all[rows], window_starts, int((lengths > width).sum())


class PackedDataset:
    """Windows of `seq_len + 1` tokens (see the module docstring).

    **Arguments** (the in-memory stream): `tokens`, the 1-D token stream (the tail that does not fill a window is
    dropped); `seq_len`, tokens per training sequence; `name`, what the data is called in errors ('data.train').
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, name: str = "data"):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        num_windows = _count_windows(len(tokens), seq_len, name)
        windows = tokens[: num_windows * (seq_len + 1)].astype(np.int32).reshape(num_windows, seq_len + 1)
        self._setup(name, seq_len, num_windows, lambda idx: (windows[idx], None, None), packed=False)
        self._arrays = (windows, None, None)

    def _setup(self, name, seq_len, num_windows, read, *, packed: bool, identity: dict | None = None):
        self.name, self.seq_len, self.num_windows = name, seq_len, num_windows
        self._read, self.packed, self.identity = read, packed, identity
        self._arrays: tuple | None = None
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def of_rows(cls, windows: np.ndarray, segment_ids: np.ndarray, targets: np.ndarray, *,
                name: str = "data") -> PackedDataset:
        """Windows packed from rows in memory (`vishwam.data.chat_rows.pack_rows`), `[windows, seq_len + 1]` each:
        the tokens, each token's row within its window (1, 2, ...; 0 for padding) and whether it is a target (a
        token the loss counts as a label; never a row's first)."""
        if not (windows.ndim == 2 and windows.shape == segment_ids.shape == targets.shape and len(windows)):
            raise ValueError(f"need equal non-empty [windows, seq_len + 1] arrays, got {windows.shape}, "
                             f"{segment_ids.shape}, {targets.shape}")
        arrays = (windows.astype(np.int32), segment_ids.astype(np.int32), targets.astype(bool))
        self = cls.__new__(cls)
        self._setup(name, windows.shape[1] - 1, len(windows), lambda idx: tuple(a[idx] for a in arrays), packed=True)
        self._arrays = arrays
        return self

    @classmethod
    def from_store(cls, store, start: int, stop: int, seq_len: int, *, name: str) -> PackedDataset:
        """The windows of ids `[start, stop)` of a text token store's stream (`vishwam.data.store.TokenStore`)."""
        width = seq_len + 1
        num_windows = _count_windows(stop - start, seq_len, name)

        def read(idx):
            idx = np.asarray(idx, np.int64)
            out = np.empty((len(idx), width), np.int32)
            for i, w in enumerate(idx):
                out[i] = store.tokens(start + int(w) * width, start + (int(w) + 1) * width)
            return out, None, None

        self = cls.__new__(cls)
        self._setup(name, seq_len, num_windows, read, packed=False,
                    identity={"store": store.key, "tokens": [start, stop], "seq_len": seq_len})
        return self

    @classmethod
    def from_plan(cls, store, plan, seq_len: int, *, name: str, rows: tuple[int, int]) -> PackedDataset:
        """The windows of a chat token store's rows `rows` packed by `plan` (`pack_plan`'s arrays)."""
        width = seq_len + 1
        row_ids, starts, sizes, window_starts = plan

        def read(idx):
            idx = np.asarray(idx, np.int64)
            ids = np.zeros((len(idx), width), np.int32)
            segments = np.zeros((len(idx), width), np.int32)
            targets = np.zeros((len(idx), width), bool)
            for i, w in enumerate(idx):
                for segment, k in enumerate(range(int(window_starts[w]), int(window_starts[w + 1])), start=1):
                    row, at, n = int(row_ids[k]), int(starts[k]), int(sizes[k])
                    tokens, target = store.row(row)
                    ids[i, at:at + n], segments[i, at:at + n] = tokens[:n], segment
                    targets[i, at + 1:at + n] = target[1:n]  # a row's first token is never a target
            return ids, segments, targets

        self = cls.__new__(cls)
        self._setup(name, seq_len, len(window_starts) - 1, read, packed=True,
                    identity={"store": store.key, "rows": list(rows), "seq_len": seq_len,
                              "plan_block_rows": PLAN_BLOCK_ROWS})
        return self

    def read(self, indices) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Windows `indices`: `(tokens [n, seq_len + 1], segment ids or None, targets or None)`."""
        return self._read(np.asarray(indices, np.int64))

    def _all(self) -> tuple:
        """Every window in memory: O(the data). For small data and tools; a run reads windows as it needs them."""
        if self._arrays is None:
            self._arrays = self.read(np.arange(self.num_windows))
        return self._arrays

    @property
    def windows(self) -> np.ndarray:
        """All windows `[num_windows, seq_len + 1]` (in memory: O(the data))."""
        return self._all()[0]

    @property
    def segment_ids(self) -> np.ndarray | None:
        """Packed rows: each token's row in its window, all windows (O(the data)); None for a text stream."""
        return self._all()[1] if self.packed else None

    @property
    def targets(self) -> np.ndarray | None:
        """Packed rows: whether each token is a target, all windows (O(the data)); None for a text stream."""
        return self._all()[2] if self.packed else None

    def __len__(self) -> int:
        return self.num_windows

    def __repr__(self) -> str:
        return f"PackedDataset({self.name!r}, num_windows={self.num_windows}, seq_len={self.seq_len})"

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        """The window order of one epoch: a function of `(seed, epoch)` only."""
        key = (seed, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4:  # consecutive steps touch at most two epochs
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = np.random.default_rng([seed, epoch]).permutation(self.num_windows)
        return self._permutations[key]

    def batch(self, indices: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batch of the given window indices (see `batch_for_step` for the keys)."""
        windows, segments, targets = self.read(indices)
        if mask is None:
            mask = np.ones((len(indices), self.seq_len), dtype=np.int32)
        batch = {
            "input_ids": np.ascontiguousarray(windows[:, :-1]),
            "labels": np.ascontiguousarray(windows[:, 1:]),
            "mask": mask.astype(np.int32),
            "window": np.asarray(indices, dtype=np.int64),
        }
        if segments is not None:
            batch["mask"] = ((segments[:, :-1] > 0) & (mask > 0)).astype(np.int32)
            batch["segment_ids"] = np.ascontiguousarray(segments[:, :-1])
            batch["loss_mask"] = (targets[:, 1:] & (mask > 0)).astype(np.int32)
        return batch


def _count_windows(tokens: int, seq_len: int, name: str) -> int:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    num_windows = tokens // (seq_len + 1)
    if num_windows == 0:
        raise DataError(f"{name} has {tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1} (add data "
                        f"or lower training.seq_len)")
    return num_windows


def batch_for_step(dataset: PackedDataset, *, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The training batch of a step: a pure function of `(seed, step)`.

    Windows are visited in a fresh permutation each epoch (`np.random.default_rng([seed, epoch])`); the batch at
    `step` takes positions `step * batch_size ...` of the concatenated epoch orders, wrapping across epochs. So
    every window is seen once per epoch and a resumed run gets the same batches as an uninterrupted one.

    **Returns:** `input_ids`, `labels` (inputs shifted by one) and `mask` (1 where the loss counts), each an
    `int32` array `[batch_size, seq_len]`, and `window` (`[batch_size]`, the window indices: what a teacher
    cache is keyed by). Windows packed from chat rows add `segment_ids` (each position's row in its window, 0 for
    padding: attention stays within a row and positions restart with each) and `loss_mask` (1 where the label is
    a target token of the same row); their `mask` is 1 at every real token (attention's key validity), and the
    losses count `loss_mask`.
    """
    return dataset.batch(step_windows(dataset, seed=seed, step=step, batch_size=batch_size))


def step_windows(dataset: PackedDataset, *, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The window indices of `batch_for_step`'s batch (nothing read)."""
    if step < 0 or batch_size <= 0:
        raise ValueError(f"need step >= 0 and batch_size > 0, got step={step}, batch_size={batch_size}")
    return epoch_order(step, batch_size, dataset.num_windows, lambda epoch: dataset.permutation(seed, epoch))


def epoch_order(step: int, rows: int, count: int, permutation: Callable[[int], np.ndarray]) -> np.ndarray:
    """The items of a step of `rows`: positions `step * rows ...` of the concatenated epoch orders of `count`
    items (`permutation(epoch)`, a permutation of `range(count)`), wrapping across epochs."""
    epochs, offsets = np.divmod(step * rows + np.arange(rows), count)
    indices = np.empty(rows, dtype=np.int64)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        indices[at] = permutation(int(epoch))[offsets[at]]
    return indices


def eval_batches(dataset: PackedDataset, batch_size: int, n: int) -> list[dict[str, np.ndarray]]:
    """The first `n` batches of the windows in order, no shuffling, each window at most once.

    When the windows run out, the last batch is filled up with rows whose `mask` is 0 (so every batch keeps the
    shape `[batch_size, seq_len]`); there are fewer than `n` batches when the windows run out sooner.
    """
    if batch_size <= 0 or n < 0:
        raise ValueError(f"need batch_size > 0 and n >= 0, got batch_size={batch_size}, n={n}")
    batches = []
    for start in range(0, min(n * batch_size, dataset.num_windows), batch_size):
        indices = np.arange(start, start + batch_size)
        valid = indices < dataset.num_windows
        mask = np.repeat(valid[:, None], dataset.seq_len, axis=1).astype(np.int32)
        batches.append(dataset.batch(np.where(valid, indices, 0), mask))
    return batches


class StepBatch(Mapping):
    """A step's batch as rows of windows, read only where asked (`batch_for_step`'s keys and layout).

    `batch[key]` is a `Rows` view with the array's `shape` and `dtype`; indexing it (`rows[i:j, :]`, which is what
    `jax.make_array_from_callback` does for each device this process addresses) reads those windows alone, once
    for every key. So each process of a multi-host job reads the rows of its own devices, and `prefetch` reads
    them ahead on another thread. `np.asarray(batch[key])` reads every row.
    """

    def __init__(self, dataset: PackedDataset, windows: np.ndarray):
        self.dataset, self.windows = dataset, np.asarray(windows, np.int64)
        spec = getattr(dataset, "batch_spec", None)  # a cross-tokenizer dataset's keys, widths and dtypes
        keys = list(spec) if spec else ["input_ids", "labels", "mask", "window"] + (
            ["segment_ids", "loss_mask"] if dataset.packed else [])
        self._keys = keys
        self._read: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()
        self.rows_read = 0
        """How many rows this process has read (a multi-host test counts them)."""

    def __getitem__(self, key: str) -> Rows:
        if key not in self._keys:
            raise KeyError(key)
        return Rows(self, key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The batch's rows `[start, stop)`, every key, read once."""
        with self._lock:
            if (start, stop) not in self._read:
                self._read[(start, stop)] = self.dataset.batch(self.windows[start:stop])
                self.rows_read += stop - start
            return self._read[(start, stop)]

    def prefetch(self, row_ranges) -> None:
        for start, stop in row_ranges:
            self.rows(start, stop)


class Rows:
    """One key of a `StepBatch`: `shape`, `dtype`, and rows read when indexed (see `StepBatch`)."""

    def __init__(self, batch: StepBatch, key: str):
        self.batch, self.key = batch, key
        n, seq = len(batch.windows), batch.dataset.seq_len
        spec = getattr(batch.dataset, "batch_spec", None)
        width, dtype = spec[key] if spec else (None if key == "window" else seq, np.int64 if key == "window"
                                               else np.int32)
        self.shape = (n,) if width is None else (n, width)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0] if isinstance(index[0], slice) else slice(None)
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("a StepBatch is read by ranges of rows")
        part = self.batch.rows(start, stop)[self.key]
        rest = index[1:] if isinstance(index[0], slice) else index
        return part[(slice(None),) + tuple(rest)] if rest else part

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class StepReader:
    """The training batches of a run as `StepBatch`es of this process's rows (see `StepBatch`), the next step's
    read on a background thread while the current step runs.

    **Arguments:** the dataset; the batch's sharding (its addressable devices say which rows this process reads);
    `seed`, `rows` (the batch size) and `accum` (micro-batches: the rows laid out as the train step splits them,
    `vishwam.train.step.interleave_micro_batches`).
    """

    def __init__(self, dataset: PackedDataset, sharding, *, seed: int, rows: int, accum: int):
        self.dataset, self.seed, self.rows, self.accum = dataset, seed, rows, accum
        shape = (rows, dataset.seq_len)
        self.local = sorted({(i[0].indices(rows)[0], i[0].indices(rows)[1])
                             for i in sharding.addressable_devices_indices_map(shape).values()})
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vishwam-batch")
        self._ahead: tuple[int, StepBatch, concurrent.futures.Future] | None = None

    def batch(self, step: int) -> StepBatch:
        windows = step_windows(self.dataset, seed=self.seed, step=step, batch_size=self.rows)
        # row i of micro-batch m at i * accum + m (the train step takes every accum-th row from m)
        windows = np.ascontiguousarray(windows.reshape(self.accum, -1).T.reshape(-1))
        return StepBatch(self.dataset, windows)

    def get(self, step: int) -> StepBatch:
        if self._ahead is not None and self._ahead[0] == step:
            _, batch, future = self._ahead
            self._ahead = None
            if future.exception() is None:
                return batch
        return self.batch(step)  # read here (a read error raises here, where the loop reports it)

    def ahead(self, step: int) -> None:
        batch = self.batch(step)
        self._ahead = (step, batch, self._pool.submit(batch.prefetch, self.local))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


__all__ = ["PLAN_BLOCK_ROWS", "PackedDataset", "Rows", "StepBatch", "StepReader", "batch_for_step", "epoch_order",
           "eval_batches", "pack_plan", "step_windows"]
