"""HF checkpoints out: `save_pretrained` writes a model (gathered across processes) as an HF directory that
`transformers` loads, sharded safetensors with an index, written beside the target and renamed into place; and
the clean-up of what an export killed mid-way left behind (`remove_stale_exports`).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from models import CausalLM
from models.pytree import named_leaves
from vishwam.errors import CheckpointError, ConfigError
from vishwam.io.checkpoint import INDEX_FILE, SINGLE_FILE, STACKED, TOKENIZER_FILES, check_float_dtype, hf_names
from vishwam.io.safetensors_io import write_file


def _host_array(x) -> np.ndarray:
    """A numpy copy of a (possibly sharded, possibly multi-host) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ConfigError(f"cannot parse size {size!r} (use e.g. '2GB')")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def _export_target(out_dir: str | os.PathLike) -> Path:
    """The absolute directory `save_pretrained` writes (`.` names the working directory), checked replaceable."""
    out = Path(os.path.abspath(os.fspath(out_dir)))
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise CheckpointError(f"save_pretrained: {out_dir} is the working directory or holds it; name a directory "
                              "for the checkpoint (it is written beside the target and renamed into place)")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise CheckpointError(f"save_pretrained: {out} exists and is not a directory; name a new directory or "
                                  "an earlier export to replace")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise CheckpointError(f"save_pretrained: {out} is a directory that holds no checkpoint (no config.json); "
                                  "only an earlier export or an empty directory is replaced")
    return out


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this host (one of another user's counts: it may not be signalled)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_exports(out_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """Clear what an export to `out_dir` (`save_pretrained`) killed mid-way left beside it: each
    `NAME.tmp-<pid>` (a half-written export) of a process no longer running is removed; a `NAME.old-<pid>` (the
    previous export, moved aside just before the new one took its place) is removed when `out_dir` exists, and put
    back as `out_dir` when it does not. The leftovers of a running process are left alone. **Returns:** each path
    cleared, with what was done ("removed", "put back")."""
    out = Path(out_dir)
    found = []
    for path in sorted(out.parent.glob(f"{glob.escape(out.name)}.*-*")) if out.parent.is_dir() else []:
        m = re.fullmatch(re.escape(out.name) + r"\.(tmp|old)-(\d+)", path.name)
        if m is None or _running(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and not out.is_symlink():
            path.rename(out)  # killed between moving the old export aside and moving the new one in
            found.append((path, f"put back as {out}"))
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        found.append((path, "removed"))
    return found


def save_pretrained(model: CausalLM, out_dir: str | os.PathLike, *, dtype=None,
                    max_shard_size: int | str = "2GB", tokenizer_from: str | os.PathLike | None = None,
                    chat_template: str | None = None) -> Path:
    """Export `model` in HF format: `config.json`, safetensors (sharded with an index above `max_shard_size`),
    and the tokenizer files of `tokenizer_from` when given (a directory's, or a tokenizer file, saved as
    `tokenizer.json`, with the others beside it), and `chat_template` as `chat_template.jinja` (else the one beside
    `tokenizer_from`, when there is one). `transformers.AutoModelForCausalLM` loads it.

    The directory is written beside the target and renamed into place, so an interrupted export never leaves a
    half-written model where a good one was. What it replaces must be a checkpoint (a directory with a
    `config.json`) or an empty directory: a file, another directory, or the working directory (or one that holds
    it) is a `CheckpointError`, and nothing is touched. In a multi-process run every process must call this
    (sharded arrays are gathered); only process 0 writes.
    """
    check_float_dtype(dtype)
    out = _export_target(out_dir)
    config = model.config
    n = config.num_hidden_layers
    limit = _parse_size(max_shard_size)
    params = eqx.filter(model, eqx.is_array)
    entries = []  # (hf name, leaf path, layer index or None, nbytes)
    for path, leaf in named_leaves(params):
        item = np.dtype(dtype or leaf.dtype).itemsize
        per = math.prod(leaf.shape[1:] if path.startswith(STACKED) else leaf.shape) * item
        for i, name in enumerate(hf_names(path, n)):
            entries.append((name, path, i if path.startswith(STACKED) else None, per))
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[3]

    writer = jax.process_index() == 0
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    leaves = dict(named_leaves(params))
    weight_map, total = {}, 0
    stored_dtype = np.dtype(dtype or next(iter(leaves.values())).dtype)
    for k, shard in enumerate(shards):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        host: dict[str, np.ndarray] = {}
        cache: dict[str, np.ndarray] = {}
        for name, path, layer, nbytes in shard:
            if path not in cache:
                cache = {path: _host_array(leaves[path])}
            arr = cache[path] if layer is None else cache[path][layer]
            host[name] = arr.astype(dtype) if dtype is not None else arr
            weight_map[name] = fname
            total += nbytes
        if writer:
            write_file(tmp / fname, host, {"format": "pt"})
    if writer:
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        hf = config.to_hf(dtype=str(jnp.dtype(stored_dtype).name))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_from is not None:
            source = Path(tokenizer_from)
            if source.is_file():  # a tokenizer file, whatever its name: it goes in as tokenizer.json
                shutil.copy2(source, tmp / "tokenizer.json")
                source = source.parent
            for fname in TOKENIZER_FILES + ("chat_template.jinja",):
                src = source / fname
                if src.is_file() and not (tmp / fname).exists():
                    shutil.copy2(src, tmp / fname)
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        old = out.with_name(out.name + f".old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["remove_stale_exports", "save_pretrained"]
