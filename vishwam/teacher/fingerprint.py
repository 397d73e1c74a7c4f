"""The fingerprint of a teacher cache: what its rows were computed from, so a cache is never read for another run.

A cache's rows are a function of the teacher (its weights and `config.json`), the windows' tokens (the data files,
the tokenizer, the split, `seq_len`), `top_k`, the shared vocabulary, the cached hidden layers, the teacher's
dtype and the cache's format version. `fingerprint(...)` records each of them, cheaply, in a JSON dict that
`build_cache` stores in the split's `index.json`; `describe_change(old, new)` says in a few words what differs.

- Weights: for each safetensors file the checkpoint uses, its name, its size, the sha256 of its header (the
  8-byte length and the JSON header: every tensor's name, dtype, shape and offsets) and the sha256 of three 4 KiB
  samples of its data (at its start, middle and end). That is a few small reads per file, never the whole file;
  the samples tell apart two checkpoints of the same shapes (a fine-tuned one and its base), whose headers and
  sizes are identical.
- `config.json` and the tokenizer files (those of `data.tokenizer`, else the teacher's): sha256 of their bytes.
- Data: windows read from a token store (`vishwam.data.store`, what a run reads) are named by the store's
  fingerprint (its sources' names, sizes and sampled bytes, the tokenizer, the EOS id, the chat template), the
  split's range and `seq_len` (`PackedDataset.identity`): nothing is hashed per window, so the check costs O(1) in
  the corpus. Windows in memory (built by hand) are hashed: the sha256 of their int32 token ids (and, for packed
  chat rows, their segment ids). Either way the number of windows is recorded, and the data files' names and
  sizes beside it (not compared) to say which file changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from vishwam.config.sections import RunConfig
from vishwam.data.text import expand_paths
from vishwam.data.windows import PackedDataset
from vishwam.errors import DataError
from vishwam.io.checkpoint import TOKENIZER_FILES, LazyCheckpoint
from vishwam.io.files import sha256_file

SAMPLE_BYTES = 4096
#: The fields compared, in the order a change is reported.
FIELDS = ("version", "teacher_weights", "teacher_config", "tokenizer", "data", "seq_len", "top_k", "vocab_size",
          "hidden_layers", "teacher_dtype")


def safetensors_entry(path: str | os.PathLike) -> dict:
    """`{size, header_sha256, data_sha256}` of one safetensors file from its header and three data samples."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = head + f.read(min(n, max(size - 8, 0)))
        start, data = len(header), hashlib.sha256()
        for offset in sorted({start, start + max(size - start - SAMPLE_BYTES, 0) // 2,
                              max(size - SAMPLE_BYTES, start)}):
            f.seek(offset)
            data.update(f.read(SAMPLE_BYTES))
    return {"size": size, "header_sha256": hashlib.sha256(header).hexdigest(), "data_sha256": data.hexdigest()}


def tokenizer_files(cfg: RunConfig, teacher_dir: Path) -> list[Path]:
    """The tokenizer files the run's tokenizer comes from: `data.tokenizer` (a file, or the tokenizer files of its
    directory), else the teacher directory's tokenizer files (`vishwam.run.build` tokenizes with its tokenizer.json)."""
    names = [n for n in TOKENIZER_FILES if n != "generation_config.json"]
    given = cfg.data.tokenizer
    if given and not os.path.isdir(given):
        return [Path(given)] if os.path.isfile(given) else []
    directory = Path(given) if given else teacher_dir
    return [directory / n for n in names if (directory / n).is_file()]


def _data_files(cfg: RunConfig, split: str) -> list[str]:
    d = cfg.data
    paths = d.eval if split == "eval" and d.eval else d.train
    try:
        return expand_paths(paths)
    except DataError:  # only a note beside the windows' hash (the data itself was loaded already)
        return []


def fingerprint(cfg: RunConfig, lazy: LazyCheckpoint, split: str, data: PackedDataset, *, top_k: int,
                vocab_size: int, hidden_layers: tuple[int, ...], version: int) -> dict:
    """The fingerprint of split `split`'s cache (see the module docstring), as it reads back from JSON."""
    weights = {os.path.basename(p): safetensors_entry(p) for p in sorted(set(lazy.weight_map.values()))}
    if data.identity is not None:  # a token store's windows: its fingerprint names them, nothing is hashed
        windows = hashlib.sha256(json.dumps(data.identity, sort_keys=True).encode())
    else:
        windows = hashlib.sha256(memoryview(np.ascontiguousarray(data.windows, dtype=np.int32)).cast("B"))
        if data.packed:  # packed chat rows: the teacher's outputs depend on where each row starts
            windows.update(memoryview(np.ascontiguousarray(data.segment_ids, dtype=np.int32)).cast("B"))
    out = {
        "version": version,
        "teacher_weights": weights,
        "teacher_config": sha256_file(lazy.directory / "config.json"),
        "tokenizer": {p.name: sha256_file(p) for p in tokenizer_files(cfg, lazy.directory)},
        "data": {"windows_sha256": windows.hexdigest(),
                 "num_windows": int(data.num_windows),
                 "files": [[os.path.basename(f), os.path.getsize(f)] for f in _data_files(cfg, split)]},
        "seq_len": int(data.seq_len),
        "top_k": int(top_k),
        "vocab_size": int(vocab_size),
        "hidden_layers": [int(i) for i in hidden_layers],
        "teacher_dtype": cfg.distillation.teacher_model.dtype,
    }
    return json.loads(json.dumps(out))


def _files_change(old: dict, new: dict, what: str) -> str:
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if gone or added:
        parts = [f"{', '.join(gone[:2])} removed"] if gone else []
        parts += [f"{', '.join(added[:2])} added"] if added else []
        return f"{what} ({'; '.join(parts)})"
    for name in sorted(old):
        a, b = old[name], new[name]
        if a == b:
            continue
        if not isinstance(a, dict):
            return f"{what} ({name} changed)"
        if a.get("size") != b.get("size"):
            return f"{what} ({name} size {a.get('size')} -> {b.get('size')})"
        return f"{what} ({name} {'header' if a.get('header_sha256') != b.get('header_sha256') else 'data'} changed)"
    return what


def _data_change(old: dict, new: dict) -> str:
    if old.get("num_windows") != new.get("num_windows"):
        return f"other data ({old.get('num_windows')} windows, the run has {new.get('num_windows')})"
    before, after = dict(map(tuple, old.get("files", []))), dict(map(tuple, new.get("files", [])))
    sizes = [f"{n} size {before[n]} -> {after[n]}" for n in sorted(set(before) & set(after)) if before[n] != after[n]]
    note = f"; {sizes[0]}" if sizes else ""
    return (f"other data (the windows' tokens changed: sha256 {str(old.get('windows_sha256'))[:12]} -> "
            f"{str(new.get('windows_sha256'))[:12]}{note})")


def describe_change(old: dict | None, new: dict) -> str | None:
    """None when `old` (a cache's stored fingerprint) equals `new` (the run's); else what differs, in words that
    follow 'was built for' (at most the first three differing fields)."""
    if not isinstance(old, dict):
        return "an unknown run (its index.json holds no fingerprint: an older vishwam built it)"
    changes = []
    for key in FIELDS:
        a, b = old.get(key), new.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            a, b = ({k: v for k, v in x.items() if k != "files"} for x in (a, b))  # the file list is only a note
        if a == b:
            continue
        if key == "teacher_weights" and isinstance(a, dict):
            changes.append(_files_change(a, b, "another teacher"))
        elif key == "teacher_config":
            changes.append("another teacher (config.json changed)")
        elif key == "tokenizer" and isinstance(a, dict):
            changes.append(_files_change(a, b, "another tokenizer"))
        elif key == "data" and isinstance(a, dict):
            changes.append(_data_change(old[key], new[key]))
        else:
            changes.append(f"{key}={json.dumps(a)} (the run has {json.dumps(b)})")
    return "; ".join(changes[:3]) if changes else None


__all__ = ["FIELDS", "describe_change", "fingerprint", "safetensors_entry", "tokenizer_files"]
