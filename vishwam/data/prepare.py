"""Building a token store (`vishwam.data.store`): once, in parallel, resumably, in memory of one shard.

The sources are cut into units: a file, or a byte range of a `.jsonl` (at a line start) or `.txt` (after a blank
line) file larger than `UNIT_BYTES`, so one big file still spreads over the workers. Each unit is read as a
stream, tokenized by a worker process with its own tokenizer (`tokenizers`' batch call barely scales with threads:
parallelism comes from processes) and written as one shard, every file of it atomically and its `.meta.json`
last: a unit whose meta matches is finished, so a build killed at any moment and run again redoes only the
unfinished units and ends with the same bytes. Several processes of a `jax.distributed` job split the units;
process 0 writes the manifest (another process writes it too when its filesystem is not shared).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vishwam.data.chat import ChatTemplate
from vishwam.data.chat_rows import encode_records
from vishwam.data.cross.streams import chat_streams, text_streams
from vishwam.data.store import CRC_FILES, MANIFEST, TokenStore, crc_blocks, fingerprint_key
from vishwam.data.tables import hf_records, is_hf, is_table
from vishwam.data.text import BLANK_LINES, check_vocab, load_tokenizer, npy_tokens, parse_jsonl, record_text, records
from vishwam.errors import DataError
from vishwam.io.files import atomic_write

UNIT_BYTES = 32 << 20
"""Large `.jsonl`/`.txt` files are cut into units of about this many bytes."""
ENCODE_BATCH = 1024
"""Documents (rows) tokenized per `encode_batch` call, at most."""
ENCODE_CHARS = 1 << 20
"""Characters of text tokenized per `encode_batch` call, about (a document longer than this is one call)."""
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a split's sources become tokens: everything a worker needs, picklable."""

    kind: str  # "text" | "chat" | "cross"
    tokenizer_path: str | None
    eos_id: int | None
    vocab_size: int | None
    template: tuple | None = None  # (source, text, variables) of the chat template
    loss_on: str = "assistant"
    student_tokenizer_path: str | None = None  # cross: the student's side (the fields above are the teacher's)
    student_eos_id: int | None = None
    student_vocab_size: int | None = None
    student_template: tuple | None = None  # cross chat rows: the student's chat template (source, text, variables)
    chat: bool = False  # cross: the sources are chat rows (`vishwam.data.cross.chat`), not text


# ------------------------------------------------------------------------------------------------ units


def _format(path: str) -> str:
    if is_hf(path):
        return "hf"
    if is_table(path):
        return "table"
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".txt", ".npy"):
        return extension[1:]
    raise DataError(f"{path}: unsupported data file type '{extension}' (use .jsonl, .txt, .npy, .parquet or a "
                    f"datasets save_to_disk directory)")


def _cut(path: str, fmt: str, size: int) -> list[tuple[int, int, int]]:
    """`(start, stop, first line number)` byte ranges of `path`, cut at record boundaries."""
    if fmt not in ("jsonl", "txt") or size <= UNIT_BYTES:
        return [(0, size, 1)]
    ranges, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            target = start + UNIT_BYTES
            if target >= size:
                stop = size
            else:
                f.seek(target)
                tail = b""
                stop = size
                while True:  # the first boundary at or after target
                    chunk = f.read(1 << 16)
                    if not chunk:
                        break
                    tail += chunk
                    found = tail.find(b"\n") if fmt == "jsonl" else -1
                    if fmt == "txt":
                        m = _BLANK_LINE.search(tail)
                        found = -1 if m is None else m.end() - 1
                    if found >= 0:
                        stop = target + found + 1
                        break
                    if fmt == "txt":
                        tail = tail[-(1 << 12):]  # a blank line straddling chunks: keep the end
                        target = f.tell() - len(tail)
            f.seek(start)
            lines = f.read(stop - start).count(b"\n")
            ranges.append((start, stop, line))
            start, line = stop, line + lines
    return ranges


def units(files: list[str]) -> list[dict]:
    """The units of `files`, in stream order (see the module docstring)."""
    out = []
    for path in files:
        fmt = _format(path)
        size = 0 if fmt in ("table", "hf") else os.path.getsize(path)
        for start, stop, line in _cut(path, fmt, size):
            out.append({"path": path, "format": fmt, "start": start, "stop": stop, "line": line})
    return out


# ------------------------------------------------------------------------------------------------ reading


def _jsonl(path: str, start: int, stop: int, line: int) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    for number, record in parse_jsonl(path, data, first_line=line):
        yield f"{path}:{number}", record


def _records(unit: dict) -> Iterator[tuple[str, object]]:
    if unit["format"] == "jsonl":
        yield from _jsonl(unit["path"], unit["start"], unit["stop"], unit["line"])
    elif unit["format"] == "hf":
        yield from hf_records(unit["path"])
    else:
        yield from records(unit["path"])


def _documents(unit: dict) -> Iterator[str]:
    """The text documents of a text unit (as `vishwam.data.text` reads them: empty ones skipped)."""
    path = unit["path"]
    if unit["format"] == "txt":
        with open(path, "rb") as f:
            f.seek(unit["start"])
            data = f.read(unit["stop"] - unit["start"])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 (byte {unit['start'] + error.start})") from None
        yield from (d.strip() for d in BLANK_LINES.split(text) if d.strip())
        return
    table = unit["format"] in ("table", "hf")
    texts = (record_text(where, record, table=table) for where, record in _records(unit))
    yield from (text for text in texts if text)


def _batches(items: Iterator, n: int, max_chars: int | None = None) -> Iterator[list]:
    """Lists of up to `n` items; with `max_chars`, (string) items also up to about that many characters a list: a
    tokenizer's encodings of a batch hold ~100 bytes a token, so a batch of 1,024 large documents would hold the
    whole unit's (1.4 GiB at 9M tokens) where a bounded batch holds tens of MiB."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item) if max_chars is not None else 0
        if len(batch) == n or (max_chars is not None and chars >= max_chars):
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------ a unit


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(recipe: Recipe, path: str, which: str | None = None):
    which = which or recipe.tokenizer_path
    if which is None:
        raise DataError(f"{path} holds text but no tokenizer is given (set data.tokenizer)")
    if which not in _TOKENIZERS:
        _TOKENIZERS[which] = load_tokenizer(which)
    return _TOKENIZERS[which]


def _cross_streams(unit: dict, recipe: Recipe) -> dict[str, np.ndarray]:
    """A unit's documents, or chat rows, in both sides' streams (`vishwam.data.cross.streams`)."""
    path = unit["path"]
    if unit["format"] == "npy":
        raise DataError(f"{path}: token ids of one tokenizer; a cross-tokenizer run (distillation.student_model."
                        "tokenizer) needs text, which both tokenizers read")
    sides = (_tokenizer(recipe, path, recipe.student_tokenizer_path), _tokenizer(recipe, path))
    if recipe.chat:
        return chat_streams(_batches(_records(unit), ENCODE_BATCH), *sides, recipe, path)
    return text_streams(_batches((d for d in _documents(unit) if d), ENCODE_BATCH, ENCODE_CHARS), *sides, recipe,
                        path)


def _check_vocab(ids: np.ndarray, recipe: Recipe, what: str) -> None:
    if recipe.vocab_size is not None:
        check_vocab(ids, recipe.vocab_size, what)


def _text_pieces(unit: dict, recipe: Recipe) -> Iterator[np.ndarray]:
    path = unit["path"]
    if unit["format"] == "npy":
        ids = npy_tokens(path)
        _check_vocab(ids, recipe, path)
        yield ids
        return
    tokenizer = _tokenizer(recipe, path)
    for docs in _batches(_documents(unit), ENCODE_BATCH, ENCODE_CHARS):
        pieces = [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
        if pieces:
            _check_vocab(np.concatenate(pieces), recipe, f"{path} (tokenized with {recipe.tokenizer_path})")
        yield from pieces


def _chat_rows(unit: dict, recipe: Recipe) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    path = unit["path"]
    if recipe.tokenizer_path is None:
        raise DataError(f"{path} holds chat rows but no tokenizer is given (set data.tokenizer)")
    tokenizer = _tokenizer(recipe, path)
    template = None if recipe.template is None else ChatTemplate(*recipe.template)
    for batch in _batches(_records(unit), ENCODE_BATCH):
        rows = encode_records(batch, tokenizer, template, loss_on=recipe.loss_on, eos_id=recipe.eos_id)
        if rows:
            _check_vocab(np.concatenate([ids for ids, _ in rows]), recipe,
                         f"{path} (tokenized with {recipe.tokenizer_path})")
        yield from rows


def _write(path: Path, array: np.ndarray) -> str:
    """Write `array`'s bytes to `path` atomically; return their sha256."""
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    atomic_write(path, bytes(data))
    return hashlib.sha256(data).hexdigest()


def build_unit(job: tuple[int, dict, Recipe, str, str]) -> dict:
    """Tokenize one unit into shard `index` of `directory`; **returns** its meta (written last, atomically)."""
    index, unit, recipe, directory, key = job
    shards = Path(directory) / "shards"
    name = f"{index:05d}"
    t0 = time.perf_counter()
    eos = [] if recipe.eos_id is None else [recipe.eos_id]
    meta = {"unit": unit, "store": key, "name": name}
    if recipe.kind == "text":
        pieces = [part for piece in _text_pieces(unit, recipe) if piece.size for part in (piece, eos)]
        ids = np.concatenate(pieces).astype("<u4") if pieces else np.zeros((0,), "<u4")
        meta.update(docs=len(pieces) // 2 if eos else len(pieces), rows=0)
        files = {"ids": ids}
    elif recipe.kind == "cross":
        files = _cross_streams(unit, recipe)
        ids = files["ids"]
        meta.update(docs=files.pop("docs", 0), rows=0, teacher_tokens=int(len(files["tids"])),
                    chunks=int(len(files["one"])),
                    teacher_max_id=int(files["tids"].max()) if len(files["tids"]) else -1)
        for suffix in ("tids", "schunk", "tchunk"):
            files[CRC_FILES[suffix]] = crc_blocks(files[suffix])
    else:
        rows = list(_chat_rows(unit, recipe))
        ids = np.concatenate([r for r, _ in rows]).astype("<u4") if rows else np.zeros((0,), "<u4")
        targets = np.concatenate([t for _, t in rows]).astype("u1") if rows else np.zeros((0,), "u1")
        lengths = np.asarray([len(r) for r, _ in rows], np.int64)
        firsts = np.asarray([1 + int(np.argmax(t[1:])) if t[1:].any() else len(t) for _, t in rows], "<i4")
        meta.update(rows=len(rows))
        files = {"ids": ids, "targets": targets, "rows": np.concatenate([[0], np.cumsum(lengths)]).astype("<i8"),
                 "first": firsts}
    files["crc"] = crc_blocks(ids)
    meta.update(tokens=int(len(ids)), max_id=int(ids.max()) if len(ids) else -1,
                sha256={suffix: _write(shards / f"{name}.{suffix}", array) for suffix, array in files.items()})
    atomic_write(shards / f"{name}.meta.json", json.dumps(meta, sort_keys=True) + "\n")
    meta["seconds"] = time.perf_counter() - t0
    return meta


def _finished(shards: Path, name: str, unit: dict, key: str) -> dict | None:
    try:
        meta = json.loads((shards / f"{name}.meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("unit") != unit or meta.get("store") != key:
        return None
    for suffix in meta.get("sha256", {}):
        if not (shards / f"{name}.{suffix}").is_file():
            return None
    return meta


def _run(jobs: list, workers: int, on_done: Callable[[dict], None]) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_done(build_unit(job))
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX's threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(build_unit, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                on_done(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def build_store(files: list[str], recipe: Recipe, fingerprint: dict, directory: str | os.PathLike, *,
                workers: int = 1, log: Callable[[str], None] = print, process_index: int = 0,
                process_count: int = 1, barrier: Callable[[str], None] | None = None) -> TokenStore:
    """Build (or finish building) the store of `files` in `directory` and open it.

    **Arguments:** `recipe`: how the files become tokens; `fingerprint`: `store.source_fingerprint` of them;
    `workers`: tokenizer processes; `process_index`/`process_count`/`barrier`: a multi-process job's share of
    the units (process `p` builds units `p, p + count, ...`) and its synchronisation (`barrier(name)` returns when
    every process called it).
    """
    directory = Path(directory)
    shards = directory / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as lock:
        if process_count == 1:
            # One builder at a time (two runs starting on the same data wait for one build); the holder owns every
            # temporary file, so those left by a killed build can go.
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in shards.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        return _build(files, recipe, fingerprint, directory, workers=workers, log=log, process_index=process_index,
                      process_count=process_count, barrier=barrier)


def _build(files, recipe, fingerprint, directory: Path, *, workers, log, process_index, process_count,
           barrier) -> TokenStore:
    shards = directory / "shards"
    key = fingerprint_key(fingerprint)
    todo = units(files)
    metas: dict[str, dict] = {}
    jobs = []
    for i, unit in enumerate(todo):
        name = f"{i:05d}"
        done = _finished(shards, name, unit, key)
        if done is not None:
            metas[name] = done
        elif i % process_count == process_index:
            jobs.append((i, unit, recipe, str(directory), key))
    total_bytes = sum(j[1]["stop"] - j[1]["start"] for j in jobs)
    # The bar shows after a second: a build that fails at once (a bad row, an id outside the vocabulary) says only
    # its one error line.
    progress = _Progress(len(jobs), total_bytes, f"token store {directory.name}: {len(jobs)} of {len(todo)} units, "
                         f"{min(workers, len(jobs))} worker{'s' if min(workers, len(jobs)) > 1 else ''}")

    def done(meta: dict):
        metas[meta["name"]] = meta
        progress.update(meta)

    try:
        _run(jobs, workers, done)
    finally:
        progress.close()
    if barrier is not None:
        barrier("vishwam_store_units")
        for i, unit in enumerate(todo):  # a filesystem not shared between processes: build the rest here too
            name = f"{i:05d}"
            if name not in metas:
                metas[name] = _finished(shards, name, unit, key) or build_unit((i, unit, recipe, str(directory), key))
    ordered = [metas[f"{i:05d}"] for i in range(len(todo))]
    if process_index == 0:
        _write_manifest(directory, fingerprint, ordered)
    if barrier is not None:
        barrier("vishwam_store_manifest")
        if not (directory / MANIFEST).is_file():  # this process's filesystem is not process 0's
            _write_manifest(directory, fingerprint, ordered)
    if jobs:
        log(f"token store {directory}: {len(jobs)} of {len(todo)} units tokenized, {progress.tokens:,} tokens in "
            f"{progress.seconds():.1f}s ({progress.tokens / max(progress.seconds(), 1e-9):,.0f} tokens/s)")
    return TokenStore(directory)


def _write_manifest(directory: Path, fingerprint: dict, metas: list[dict]) -> None:
    cross = fingerprint["kind"] == "cross"
    shards = [{"name": m["name"], "source": m["unit"]["path"], "range": [m["unit"]["start"], m["unit"]["stop"]],
               "tokens": m["tokens"], "rows": m["rows"], "sha256": m["sha256"],
               **({"teacher_tokens": m["teacher_tokens"], "chunks": m["chunks"]} if cross else {})} for m in metas]
    manifest = {"format": fingerprint["format"], "version": fingerprint["version"], "kind": fingerprint["kind"],
                "fingerprint": fingerprint, "max_id": max([m["max_id"] for m in metas], default=-1),
                "tokens": sum(m["tokens"] for m in metas), "rows": sum(m["rows"] for m in metas), "shards": shards}
    if cross:
        manifest.update(teacher_max_id=max([m["teacher_max_id"] for m in metas], default=-1),
                        teacher_tokens=sum(m["teacher_tokens"] for m in metas),
                        chunks=sum(m["chunks"] for m in metas))
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


class _Progress:
    """A progress bar over the units' bytes with tokens/s and the ETA (tqdm), on stderr."""

    def __init__(self, units: int, total_bytes: int, what: str):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, disable=units == 0,
                        dynamic_ncols=True, mininterval=1.0, delay=1.0)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, meta: dict):
        self.tokens += meta["tokens"]
        self.bar.set_postfix_str(f"{self.tokens / max(self.seconds(), 1e-9):,.0f} tok/s", refresh=False)
        self.bar.update(meta["unit"]["stop"] - meta["unit"]["start"])

    def close(self):
        self.bar.close()


__all__ = ["ENCODE_BATCH", "UNIT_BYTES", "Recipe", "build_store", "build_unit", "units"]
