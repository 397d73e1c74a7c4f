"""The offline cache of a teacher's outputs, for teachers too big or too slow to run in the loop.

`TeacherCache` is a directory of sharded safetensors files, one row per training window: the teacher's top-k
  logits (values, indices) and the logsumexp of the other logits (so the tail mass is known), plus the label
  log-probability for evaluation and, when feature matching is on, the mapped layers' hidden states. An index
  records each shard's checksum and the cache's fingerprint (`vishwam.teacher.fingerprint`: the teacher, tokenizer,
  data and settings it was built from); shards are written atomically, an interrupted build resumes after the
  last finished shard, and a cache whose fingerprint differs from the run's is never reused.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from distill.logits import chunked_map, teacher_topk
from distill.objective import TeacherOutputs
from models import CausalLM
from vishwam.errors import DataError
from vishwam.io.files import atomic_write, sha256_file
from vishwam.io.safetensors_io import SafetensorsFile, write_file
from vishwam.sharding import global_batch, rows_sharding
from vishwam.teacher.fingerprint import describe_change

CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------- cache


def _write_index(directory: Path, index: dict):
    atomic_write(directory / "index.json", json.dumps(index, indent=1))


@functools.partial(jax.jit, static_argnames=("k", "vocab", "layers", "chunk_size", "activation_sharding"))
def cache_rows(teacher: CausalLM, batch: dict, *, k: int, vocab: int, layers: tuple[int, ...] = (),
               chunk_size: int | None = None, activation_sharding=None) -> dict:
    """The cache's rows for one batch of windows (`input_ids`, `labels`, `mask`, optional `segment_ids`): the
    teacher's top-k logits, the logsumexp of the rest and the label's log-probability, made `chunk_size`
    positions of every row at a time with the LM head inside the chunks (no `[rows, seq, vocab]` array), and the
    hidden states of `layers` (the mapped teacher layers' outputs) in float32. `activation_sharding`: the hidden
    states' sharding (see `CausalLM`)."""
    out = teacher(batch["input_ids"], attention_mask=batch["mask"], segment_ids=batch.get("segment_ids"),
                  output_hidden_states=tuple(layer + 1 for layer in layers) or False, output_logits=False,
                  activation_sharding=activation_sharding)

    def tokens(h, labels):
        logits = teacher.unembed(h).astype(jnp.float32)[..., :vocab]
        values, indices, tail = teacher_topk(logits, k)
        label_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
        return values, indices, tail, label_logp

    values, indices, tail, label_logp = chunked_map(tokens, (out.last_hidden, batch["labels"]), chunk_size)
    rows = {"topk_values": values, "topk_indices": indices, "tail_logsumexp": tail, "label_logprob": label_logp}
    for layer in layers:
        rows[f"hidden_{layer}"] = out.hidden_states[layer + 1].astype(jnp.float32)
    return rows


def _barrier(name: str) -> None:
    """Every process waits here for the others (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _host(rows: dict) -> dict[str, np.ndarray]:
    """The rows as numpy arrays, whole on every process: a multi-process teacher's outputs span devices of other
    processes (replicated or sharded), and are gathered (a collective: every process calls this)."""
    if all(x.is_fully_addressable for x in rows.values()):
        return {k: np.asarray(v) for k, v in jax.device_get(rows).items()}
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(rows, tiled=True).items()}


def _read_index(directory: Path) -> dict | None:
    try:
        index = json.loads((directory / "index.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return index if isinstance(index, dict) else None


def _resumable(directory: Path, header: dict, log) -> list[dict] | None:
    """The finished shards of an index built with this `header` (fingerprint included), in order, up to the first
    missing or corrupt one; None when there is no such index (none, unreadable, or built for something else)."""
    old = _read_index(directory)
    if old is None or {k: old.get(k) for k in header} != header:
        return None
    kept = []
    for shard in old.get("shards", []):
        f = directory / shard["file"]
        if not (f.is_file() and sha256_file(f) == shard["sha256"]):
            break
        kept.append(shard)
    if kept:
        log(f"teacher cache: resuming after {len(kept)} finished shard(s) in {directory}")
    return kept


def _clear(directory: Path, index: dict, keep: set[str]) -> None:
    """Make `index` (shards `keep`) the directory's index, then delete every other shard file: a build for a new
    fingerprint never resumes, nor leaves behind, an old build's shards."""
    _write_index(directory, index)
    for f in directory.glob("cache-*.safetensors"):
        if f.name not in keep:
            f.unlink()


def build_cache(teacher: CausalLM, dataset, directory: Path, *, top_k: int, vocab_size: int,
                hidden_layers: tuple[int, ...] = (), windows_per_shard: int = 256, batch_size: int = 8,
                meta: dict | None = None, fingerprint: dict | None = None, log=print, mesh=None,
                chunk_size: int | None = None) -> dict:
    """Run `teacher` once over every window of `dataset` and store its outputs in `directory` (see module doc).

    Resumable: shards already listed in `index.json` (and whose checksum still matches) are kept, the build goes
    on from the first missing one, provided the index was built with the same settings and `fingerprint`
    (`vishwam.teacher.fingerprint`, stored in the index); otherwise the cache is rebuilt from scratch, its old
    shards deleted. `meta` holds notes stored in the index (e.g. the teacher's path), not compared. Returns the
    index. The teacher runs on `batch_size` windows at a time (`cache_rows`), their rows spread over `mesh`'s batch
    axes when they divide them, its logits `chunk_size` positions at a time.

    Multi-process: every process runs the teacher (it is sharded over all of them) and must call this; process 0
    alone writes the shards and the index (each through a uniquely named temporary file renamed into place), and
    all processes meet at a barrier after each shard, so none reads a file before it is whole.
    """
    writer = jax.process_index() == 0
    n = dataset.num_windows
    header = {"version": CACHE_VERSION, "num_windows": n, "seq_len": dataset.seq_len, "top_k": top_k,
              "vocab_size": vocab_size, "hidden_layers": list(hidden_layers), "windows_per_shard": windows_per_shard,
              "fingerprint": fingerprint}
    header = json.loads(json.dumps(header))  # as it reads back
    index = {**json.loads(json.dumps(meta or {})), **header, "shards": []}  # `meta`: notes, not compared
    start = 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        kept = _resumable(directory, header, log)
        index["shards"] = kept or []
        start = len(index["shards"])
    if jax.process_count() > 1:  # every process computes the same shards; all have read what they need by now
        start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
    if writer:
        _clear(directory, index, {s["file"] for s in index["shards"]})
    num_shards = -(-n // windows_per_shard)
    for s in range(start, num_shards):
        first, last = s * windows_per_shard, min(n, (s + 1) * windows_per_shard)
        parts: dict[str, list[np.ndarray]] = {}
        for begin in range(first, last, batch_size):
            idx = np.arange(begin, min(last, begin + batch_size))
            pad = batch_size - len(idx)
            batch = dataset.batch(np.concatenate([idx, np.full(pad, idx[-1])]))
            batch.pop("window", None)
            activations = None
            if mesh is not None:
                batch = global_batch(batch, rows_sharding(mesh, batch_size))
                activations = rows_sharding(mesh, batch_size, 3)
            rows = cache_rows(teacher, batch, k=top_k, vocab=vocab_size, layers=tuple(hidden_layers),
                              chunk_size=chunk_size, activation_sharding=activations)
            for name, value in _host(rows).items():
                parts.setdefault(name, []).append(value[: len(idx)])
        if writer:
            tensors = {name: np.concatenate(v) for name, v in parts.items()}
            fname = f"cache-{s:05d}.safetensors"
            write_file(directory / fname, tensors, {"format": "vishwam-teacher-cache"})
            index["shards"].append({"file": fname, "first_window": first, "num_windows": last - first,
                                    "sha256": sha256_file(directory / fname)})
            _write_index(directory, index)
        _barrier(f"vishwam teacher cache shard {s}")
    if writer:
        tokens = n * dataset.seq_len
        index["bytes_per_token"] = (sum((directory / s["file"]).stat().st_size for s in index["shards"])
                                    / max(tokens, 1))
        _write_index(directory, index)
    _barrier("vishwam teacher cache index")
    return index if writer else _read_index(directory) or index


def stale_cache_message(directory: Path, change: str) -> str:
    """The one line that stops a run whose cache was built for something else (`change`)."""
    return (f"teacher cache {directory} was built for {change}; it is never reused for another run: rebuild it "
            f"with python -m vishwam.cache and this run's --config and flags")


def cache_mismatch(directory: Path, fingerprint: dict) -> str | None:
    """What the cache in `directory` was built for that differs from `fingerprint` (see
    `cache_fingerprint.describe_change`); None when it has no index yet, or one built for this fingerprint."""
    path = Path(directory) / "index.json"
    if not path.exists():
        return None
    index = _read_index(Path(directory))
    if index is None:
        return "an unknown run (its index.json is not a readable JSON object)"
    return describe_change(index.get("fingerprint"), json.loads(json.dumps(fingerprint)))


def cache_complete(directory: Path, fingerprint: dict | None = None) -> bool:
    """Whether `directory` holds a cache index covering all its windows (checksums are checked on read) and, when
    `fingerprint` is given, built for it."""
    index = _read_index(Path(directory))
    if index is None or (fingerprint is not None and cache_mismatch(directory, fingerprint) is not None):
        return False
    try:
        return sum(s["num_windows"] for s in index["shards"]) == index["num_windows"]
    except (KeyError, TypeError):
        return False


class TeacherCache:
    """Reads a cache built by `build_cache`; batches of windows come back as `TeacherOutputs`.

    Every shard's checksum is verified when it is first opened; a truncated file, a checksum mismatch or a cache
    built for other settings (or, when `fingerprint` is given, another fingerprint) is a `DataError` naming the
    file.
    """

    def __init__(self, directory: str | Path, *, seq_len: int, top_k: int | None = None, num_windows: int | None = None,
                 hidden_layers: tuple[int, ...] = (), fingerprint: dict | None = None, max_open: int = 4):
        self.directory = Path(directory)
        path = self.directory / "index.json"
        if not path.is_file():
            raise DataError(f"teacher cache index not found: {path} (build it with python -m vishwam.cache)")
        try:
            self.index = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"teacher cache index {path} is not valid JSON") from None
        if fingerprint is not None:
            change = describe_change(self.index.get("fingerprint"), json.loads(json.dumps(fingerprint)))
            if change is not None:
                raise DataError(stale_cache_message(self.directory, change))
        checks = {"seq_len": seq_len, "top_k": top_k, "num_windows": num_windows}
        for key, want in checks.items():
            if want is not None and self.index.get(key) != want:
                raise DataError(f"teacher cache {path} was built with {key}={self.index.get(key)}, the run needs {want}")
        missing = set(hidden_layers) - set(self.index.get("hidden_layers", []))
        if missing:
            raise DataError(f"teacher cache {path} holds no hidden states for teacher layers {sorted(missing)}")
        covered = sum(s["num_windows"] for s in self.index["shards"])
        if covered != self.index["num_windows"]:
            raise DataError(f"teacher cache {path} is incomplete: {covered} of {self.index['num_windows']} windows "
                            "(re-run the cache build to finish it)")
        self.hidden_layers = tuple(hidden_layers)
        self._open: OrderedDict[int, SafetensorsFile] = OrderedDict()
        self._verified: set[int] = set()
        self.max_open = max_open

    def _shard(self, s: int) -> SafetensorsFile:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        entry = self.index["shards"][s]
        path = self.directory / entry["file"]
        if not path.is_file():
            raise DataError(f"teacher cache shard missing: {path}")
        f = SafetensorsFile(path)  # header and sizes checked: a truncated file fails here, naming itself
        if s not in self._verified:
            if sha256_file(path) != entry["sha256"]:
                f.close()
                raise DataError(f"teacher cache shard {path} fails its checksum (corrupt or modified)")
            self._verified.add(s)
        self._open[s] = f
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return f

    def rows(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        per = self.index["windows_per_shard"]
        out: dict[str, list] = {}
        names = ["topk_values", "topk_indices", "tail_logsumexp", "label_logprob"]
        names += [f"hidden_{layer}" for layer in self.hidden_layers]
        for w in np.asarray(windows):
            s, r = divmod(int(w), per)
            f = self._shard(s)
            for name in names:
                out.setdefault(name, []).append(f.read(name, (slice(r, r + 1),))[0])
        return {k: np.stack(v) for k, v in out.items()}

    def outputs(self, batch, num_teacher_layers: int) -> TeacherOutputs:
        rows = self.rows(batch["window"])
        hidden = None
        if self.hidden_layers:
            # The objective indexes hidden_states[t + 1] for mapped teacher layers t only. The other slots hold a
            # reference to a cached array (the same buffer, no copy) so the tuple keeps the model's layout.
            cached = {layer + 1: jnp.asarray(rows[f"hidden_{layer}"]) for layer in self.hidden_layers}
            filler = next(iter(cached.values()))
            hidden = tuple(cached.get(i, filler) for i in range(num_teacher_layers + 1))
        return TeacherOutputs(topk_values=jnp.asarray(rows["topk_values"]),
                              topk_indices=jnp.asarray(rows["topk_indices"]),
                              tail_logsumexp=jnp.asarray(rows["tail_logsumexp"]),
                              label_logprob=jnp.asarray(rows["label_logprob"]), hidden_states=hidden)

    def close(self):
        for f in self._open.values():
            f.close()
        self._open.clear()


__all__ = ["CACHE_VERSION", "TeacherCache", "build_cache", "cache_complete", "cache_mismatch",
           "stale_cache_message"]
