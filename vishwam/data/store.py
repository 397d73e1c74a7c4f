"""The token store: a corpus tokenized once, on disk, read by memory map, so a run's start costs O(1) in its size.

A store is a directory (`vishwam.data.prepare` builds it, in parallel and resumably):

- `manifest.json`: the format and its version, the `kind` (`text` or `chat`), the fingerprint of what the store
  was made from (`source_fingerprint`: the source files' names, sizes and sampled bytes, the tokenizer files,
  the EOS id, the chat template and `loss_on`) and each shard's counts and checksums.
- `shards/NNNNN.ids`: one shard per unit of input (a file, or a byte range of a large `.jsonl`/`.txt`), the token
  ids as little-endian uint32. Text: each document's ids followed by the EOS id. Chat: each row's ids.
- `shards/NNNNN.crc`: the CRC-32 of every block of `BLOCK_TOKENS` ids (uint32 each). Reading verifies the blocks
  it touches, once, so a corrupted byte is found where it is read, without hashing the corpus at start-up.
- Chat only: `shards/NNNNN.targets` (one byte a token: 1 where the loss counts it), `shards/NNNNN.rows` (int64
  row starts, rows + 1 of them) and `shards/NNNNN.first` (int32: the first target after each row's first token,
  or the row's length when it has none; a row is kept in windows of `w` tokens when its first target is < w).
- Cross-tokenizer only (kind `cross`, `vishwam.data.cross.windows`): `ids` holds the student's ids (each
  document's, then the student's EOS; or each chat row's, `vishwam.data.cross.chat`), `tids` the teacher's;
  `schunk` and `tchunk` each token's chunk id (uint32, from 0 in each shard), `one` a flag byte per chunk (bit 0:
  one token each side, the same string; bit 1: not compared, chat rows only); `tids`, `schunk` and `tchunk` have
  CRC files of their own (`NNNNN.tids.crc`, ...). Chat rows (`"chat": true` in the fingerprint) add `targets` and
  `ttargets`, a byte per student and per teacher token (1: a target). `CrossStreams` reads them as one stream a side.

The logical streams are those of the in-memory readers (`vishwam.data.text.load_token_stream`,
`vishwam.data.chat_rows.encode_rows`): text is the concatenation of the shards less its final EOS (documents joined
with EOS between them), so window `w` of `seq_len + 1` tokens is the same slice of the same stream; chat rows are
in file order. Opening a store reads the manifest and checks each shard's file sizes: nothing grows with the corpus
but the shard list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vishwam.errors import DataError

FORMAT = "vishwam-token-store"
VERSION = 1
MANIFEST = "manifest.json"
BLOCK_TOKENS = 8192
SAMPLE_BYTES = 4096
CRC_FILES = {"ids": "crc", "tids": "tids.crc", "schunk": "schunk.crc", "tchunk": "tchunk.crc"}
"""Each checksummed uint32 array's CRC file (suffixes of `shards/NNNNN`)."""


def crc_blocks(ids: np.ndarray) -> np.ndarray:
    """The CRC-32 of each block of `BLOCK_TOKENS` little-endian uint32 ids (the last block may be short)."""
    data = np.ascontiguousarray(ids, dtype="<u4")
    return np.asarray([zlib.crc32(memoryview(data[i:i + BLOCK_TOKENS]).cast("B"))
                       for i in range(0, len(data), BLOCK_TOKENS)], dtype="<u4")


# ------------------------------------------------------------------------------------------------ fingerprint


def _sampled(path: Path, digest) -> int:
    """Feed `path`'s size and three `SAMPLE_BYTES` samples (start, middle, end) into `digest`; return the size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return size


def source_entry(path: str) -> dict:
    """A source's name, size and the sha256 of its sampled bytes (a `save_to_disk` directory: of each file in it):
    a few small reads, never the whole file. A copied or moved data set keeps its entry; an edited one changes
    its size or, almost always, a sample."""
    if path.startswith("hf:"):  # a datasets dataset: named, not sampled (name a revision to pin its content)
        return {"name": path, "size": None, "sampled_sha256": None}
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_dir():
        size = 0
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(str(f.relative_to(p)).encode() + b"\0")
            size += _sampled(f, digest)
    else:
        size = _sampled(p, digest)
    return {"name": p.name, "size": size, "sampled_sha256": digest.hexdigest()}


def source_fingerprint(files: list[str], *, kind: str, tokenizer_files: list[str], eos_id: int | None,
                       chat_template: str | None = None, loss_on: str | None = None) -> dict:
    """What a store's bytes are a function of (see the module docstring). Cost: O(files), a few reads each."""
    return {
        "format": FORMAT, "version": VERSION, "kind": kind,
        "sources": [source_entry(f) for f in files],
        "tokenizer": {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in tokenizer_files},
        "eos_id": eos_id,
        "chat_template": None if chat_template is None else hashlib.sha256(chat_template.encode()).hexdigest(),
        "loss_on": loss_on if kind == "chat" else None,
    }


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def describe_change(old: dict, new: dict) -> str:
    """A few words on what differs between two source fingerprints."""
    if old.get("version") != new.get("version") or old.get("format") != new.get("format"):
        return f"store format {old.get('format')} v{old.get('version')} -> v{new.get('version')}"
    for key in ("kind", "eos_id", "chat_template", "loss_on"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r} -> {new.get(key)!r}"
    if old.get("tokenizer") != new.get("tokenizer") or old.get("student_tokenizer") != new.get("student_tokenizer"):
        return "the tokenizer files changed"
    for key in ("student_eos_id", "alignment"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r} -> {new.get(key)!r}"
    a, b = old.get("sources", []), new.get("sources", [])
    if [s["name"] for s in a] != [s["name"] for s in b]:
        return f"the source files are {[s['name'] for s in b]}, the store was made from {[s['name'] for s in a]}"
    for x, y in zip(a, b):
        if x != y:
            return f"source file {y['name']} changed ({x['size']} -> {y['size']} bytes)"
    return "the fingerprint differs"


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Shard:
    """One shard of a store, its files memory-mapped on first use."""

    directory: Path
    name: str
    tokens: int
    rows: int

    def path(self, suffix: str) -> Path:
        return self.directory / "shards" / f"{self.name}.{suffix}"

    teacher_tokens: int = 0
    chunks: int = 0
    _mapped: dict = dataclasses.field(default_factory=dict)

    def length(self, suffix: str) -> int:
        return self.teacher_tokens if suffix in ("tids", "tchunk") else self.tokens

    def ids(self, suffix: str = "ids") -> np.ndarray:
        """The uint32 array `suffix` (`ids`; a cross store's `tids`, `schunk`, `tchunk`), memory-mapped."""
        if suffix not in self._mapped:
            n = self.length(suffix)
            array = np.memmap(self.path(suffix), dtype="<u4", mode="r", shape=(n,)) if n else np.zeros((0,), "<u4")
            crcs = np.fromfile(self.path(CRC_FILES[suffix]), dtype="<u4")
            self._mapped[suffix] = (array, crcs, np.zeros(len(crcs), bool))
        return self._mapped[suffix][0]

    def read(self, start: int, stop: int, suffix: str = "ids") -> np.ndarray:
        """Items `[start, stop)` of the uint32 array `suffix` as int64 (`ids`: int32), every block they touch
        verified against its CRC once."""
        array = self.ids(suffix)
        _, crcs, verified = self._mapped[suffix]
        dtype = np.int32 if suffix in ("ids", "tids") else np.int64
        if stop <= start:
            return np.zeros((0,), dtype)
        first, last = start // BLOCK_TOKENS, (stop - 1) // BLOCK_TOKENS
        for b in range(first, last + 1):
            if not verified[b]:
                block = np.ascontiguousarray(array[b * BLOCK_TOKENS:(b + 1) * BLOCK_TOKENS])
                if zlib.crc32(memoryview(block).cast("B")) != int(crcs[b]):
                    raise DataError(f"token store shard {self.path(suffix)} is corrupt: block {b} (items "
                                    f"{b * BLOCK_TOKENS}..{min(self.length(suffix), (b + 1) * BLOCK_TOKENS)}) fails "
                                    f"its checksum; rebuild the store (python -m vishwam.data)")
                verified[b] = True
        return np.asarray(array[start:stop], dtype=dtype)

    def array(self, suffix: str, dtype, count: int) -> np.ndarray:
        return np.memmap(self.path(suffix), dtype=dtype, mode="r", shape=(count,)) if count \
            else np.zeros((0,), dtype)


class TokenStore:
    """A built store, opened read-only: the manifest read, every shard file's size checked (a truncated shard is
    a one-line `DataError` naming it), nothing else read until asked."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{self.directory} is not a token store (no {MANIFEST}): prepare one with "
                            f"python -m vishwam.data --config C") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"token store manifest {path} is unreadable ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"{path} is not a vishwam token store manifest")
        if manifest.get("version") != VERSION:
            raise DataError(f"token store {self.directory} has format version {manifest.get('version')}, this "
                            f"vishwam reads version {VERSION}: prepare it again")
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.fingerprint: dict = manifest["fingerprint"]
        self.eos_id: int | None = manifest["fingerprint"].get("eos_id")
        self.max_id: int = manifest["max_id"]
        self.shards = [Shard(self.directory, s["name"], s["tokens"], s.get("rows", 0), s.get("teacher_tokens", 0),
                             s.get("chunks", 0)) for s in manifest["shards"]]
        for shard in self.shards:
            crc = lambda n: 4 * (-(-n // BLOCK_TOKENS))  # noqa: E731
            expect = {"ids": 4 * shard.tokens, "crc": crc(shard.tokens)}
            if self.kind == "chat":
                expect.update(targets=shard.tokens, rows=8 * (shard.rows + 1), first=4 * shard.rows)
            if self.kind == "cross":
                t, c = shard.teacher_tokens, shard.chunks
                expect.update({"tids": 4 * t, "tids.crc": crc(t), "schunk": 4 * shard.tokens,
                               "schunk.crc": crc(shard.tokens), "tchunk": 4 * t, "tchunk.crc": crc(t), "one": c})
                if self.fingerprint.get("chat"):
                    expect.update(targets=shard.tokens, ttargets=t)
            for suffix, size in expect.items():
                file = shard.path(suffix)
                try:
                    actual = file.stat().st_size
                except OSError:
                    raise DataError(f"token store shard {file} is missing: rebuild the store "
                                    f"(python -m vishwam.data)") from None
                if actual != size:
                    raise DataError(f"token store shard {file} is truncated or corrupt: {actual} bytes, the manifest "
                                    f"says {size}; rebuild the store (python -m vishwam.data)")
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards])
        self.teacher_starts = np.cumsum([0] + [s.teacher_tokens for s in self.shards])
        self.chunk_starts = np.cumsum([0] + [s.chunks for s in self.shards])
        self.teacher_eos_id: int | None = manifest["fingerprint"].get("teacher_eos_id")
        self.teacher_max_id: int = manifest.get("teacher_max_id", -1)
        self.row_starts = np.cumsum([0] + [s.rows for s in self.shards])
        self._row_arrays: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.directory)!r}, kind={self.kind!r}, tokens={self.num_tokens}, "
                f"rows={self.num_rows}, shards={len(self.shards)})")

    @property
    def key(self) -> str:
        """The sha256 of the fingerprint: the store's identity (a teacher cache records it for its rows)."""
        return fingerprint_key(self.fingerprint)

    @property
    def num_tokens(self) -> int:
        """Text: the length of the logical stream (the shards less the final EOS). Chat: all rows' tokens. Cross:
        the student's tokens, EOS included."""
        total = int(self.starts[-1])
        return total - 1 if self.kind == "text" and self.eos_id is not None and total else total

    @property
    def num_rows(self) -> int:
        return int(self.row_starts[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Ids `[start, stop)` of the concatenated shards, as int32."""
        return self.read("ids", start, stop)

    def read(self, suffix: str, start: int, stop: int) -> np.ndarray:
        """Items `[start, stop)` of the uint32 array `suffix` of the concatenated shards (`ids`, `tids`: int32;
        `schunk`, `tchunk`: int64 chunk ids made global by each shard's first chunk)."""
        starts = self.teacher_starts if suffix in ("tids", "tchunk") else self.starts
        start, stop = max(start, 0), min(stop, int(starts[-1]))
        i = int(np.searchsorted(starts, start, side="right")) - 1
        pieces = []
        while start < stop and i < len(self.shards):
            lo = int(starts[i])
            take_stop = min(stop, int(starts[i + 1]))
            piece = self.shards[i].read(start - lo, take_stop - lo, suffix)
            pieces.append(piece + int(self.chunk_starts[i]) if suffix in ("schunk", "tchunk") else piece)
            start = take_stop
            i += 1
        if not pieces:
            return np.zeros((0,), np.int32 if suffix in ("ids", "tids") else np.int64)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _rows_of(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._row_arrays:
            shard = self.shards[i]
            self._row_arrays[i] = (shard.array("rows", "<i8", shard.rows + 1), shard.array("first", "<i4", shard.rows),
                                   shard.array("targets", "u1", shard.tokens))
        return self._row_arrays[i]

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Chat row `r` (in file order): `(ids int32, targets bool)`."""
        i = int(np.searchsorted(self.row_starts, r, side="right")) - 1
        starts, _, targets = self._rows_of(i)
        local = r - int(self.row_starts[i])
        a, b = int(starts[local]), int(starts[local + 1])
        return self.shards[i].read(a, b), np.asarray(targets[a:b], bool)

    def row_lengths(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Lengths and first-target positions of rows `[lo, hi)` (read from the small per-row arrays)."""
        lengths, firsts = [], []
        for i in range(len(self.shards)):
            a, b = max(lo, int(self.row_starts[i])), min(hi, int(self.row_starts[i + 1]))
            if a >= b:
                continue
            starts, first, _ = self._rows_of(i)
            off = int(self.row_starts[i])
            lengths.append(np.diff(np.asarray(starts[a - off:b - off + 1])))
            firsts.append(np.asarray(first[a - off:b - off]))
        if not lengths:
            return np.zeros((0,), np.int64), np.zeros((0,), np.int32)
        return np.concatenate(lengths), np.concatenate(firsts)


class CrossStreams:
    """A `cross` store's two streams, read as `vishwam.data.cross.windows.cut_window` reads them: slices of
    each side's ids and chunk ids, a chunk's first teacher token by binary search, the chunks' `one` flags."""

    def __init__(self, store: TokenStore):
        if store.kind != "cross":
            raise DataError(f"token store {store.directory} holds {store.kind} data, not a cross-tokenizer alignment")
        self.store = store
        self.n_student, self.n_teacher = int(store.starts[-1]), int(store.teacher_starts[-1])
        self.n_chunks = int(store.chunk_starts[-1])
        self.chat = bool(store.fingerprint.get("chat"))
        self._mapped: dict[tuple[str, int], np.ndarray] = {}

    def student(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.store.read("ids", lo, hi), self.store.read("schunk", lo, hi)

    def teacher(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.store.read("tids", lo, hi), self.store.read("tchunk", lo, hi)

    def teacher_first(self, chunk: int) -> int:
        """The index of chunk `chunk`'s first teacher token (`n_teacher` past the last chunk)."""
        store = self.store
        i = int(np.searchsorted(store.chunk_starts, chunk, side="right")) - 1
        if i >= len(store.shards):
            return self.n_teacher
        # The query in the array's own dtype: an int64 one would make NumPy convert the whole shard first.
        local = np.searchsorted(store.shards[i].ids("tchunk"), np.uint32(chunk - int(store.chunk_starts[i])))
        return int(store.teacher_starts[i]) + int(local)

    def one(self, lo: int, hi: int) -> np.ndarray:
        """Chunks `[lo, hi)`'s flag bytes (bit 0: one token each side, the same string; bit 1: not compared,
        `vishwam.data.cross.chat.SKIP`), uint8."""
        return self._bytes("one", self.store.chunk_starts, lo, hi)

    def targets(self, lo: int, hi: int) -> np.ndarray:
        """Whether student tokens `[lo, hi)` are targets (chat rows; every token of text is), bool."""
        if not self.chat:
            return np.ones(max(0, min(hi, self.n_student) - max(lo, 0)), bool)
        return self._bytes("targets", self.store.starts, lo, hi).astype(bool)

    def teacher_targets(self, lo: int, hi: int) -> np.ndarray:
        """Whether teacher tokens `[lo, hi)` are targets, bool."""
        if not self.chat:
            return np.ones(max(0, min(hi, self.n_teacher) - max(lo, 0)), bool)
        return self._bytes("ttargets", self.store.teacher_starts, lo, hi).astype(bool)

    def _bytes(self, suffix: str, starts: np.ndarray, lo: int, hi: int) -> np.ndarray:
        out = []
        lo, hi = max(lo, 0), min(hi, int(starts[-1]))
        i = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi and i < len(self.store.shards):
            shard = self.store.shards[i]
            if (suffix, i) not in self._mapped:
                self._mapped[suffix, i] = shard.array(suffix, "u1", int(starts[i + 1]) - int(starts[i]))
            take = min(hi, int(starts[i + 1]))
            out.append(np.asarray(self._mapped[suffix, i][lo - int(starts[i]): take - int(starts[i])], np.uint8))
            lo, i = take, i + 1
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)


def is_store(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


__all__ = ["BLOCK_TOKENS", "CRC_FILES", "CrossStreams", "FORMAT", "MANIFEST", "VERSION", "TokenStore", "crc_blocks", "describe_change",
           "fingerprint_key", "is_store", "source_entry", "source_fingerprint"]
