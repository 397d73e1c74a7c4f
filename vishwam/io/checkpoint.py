"""HF checkpoints in: lazy, partitioned loading straight from safetensors (export: `vishwam.io.export`).

Loading is a walk over the model skeleton's pytree paths (`eqx.filter_eval_shape`, nothing allocated): each
leaf's path names its checkpoint tensor (`model.layers.self_attn.q_proj.weight` with the stacked layer axis
↔ `model.layers.{i}.self_attn.q_proj.weight`), every shape is checked against the config before a byte is
read, and each leaf is built with `jax.make_array_from_callback`, whose callback reads from disk only the slice
the receiving device owns. No full host copy of the model is ever made.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import snapshot_download
from jax.sharding import Mesh, SingleDeviceSharding

from models import CausalLM, DecoderLayer, ModelConfig
from models.pytree import named_leaves
from vishwam.errors import CheckpointError, ConfigError
from vishwam.io.safetensors_io import SafetensorsFile, aligned_empty
from vishwam.sharding import RULES, param_sharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")
STACKED = "model.layers."
# Tensors some checkpoints carry that are not parameters (old transformers saved RoPE buffers).
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def hf_names(path: str, num_layers: int) -> list[str]:
    """The checkpoint tensor names behind one leaf: one per layer for stacked decoder-layer leaves."""
    if path.startswith(STACKED):
        rest = path[len(STACKED):]
        return [f"{STACKED}{i}.{rest}" for i in range(num_layers)]
    return [path]


def resolve_checkpoint_dir(path_or_id: str | os.PathLike) -> Path:
    """A local HF-format directory, or a hub id resolved (config, safetensors and tokenizer files only)
    through huggingface-hub. A path that does not exist and cannot be fetched is a `CheckpointError`."""
    p = Path(os.fspath(path_or_id)).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"checkpoint path is not a directory: {p}")
        return p
    text = os.fspath(path_or_id)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith(".")
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint directory not found: {text}")
    try:
        local = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"], etag_timeout=10
        )
    except Exception as e:  # offline, unreachable, gated or missing repo: one clear line
        raise CheckpointError(
            f"checkpoint {text!r} is not a local directory and the Hugging Face hub could not provide it "
            f"({hub_failure(e)})"
        ) from None
    return Path(local)


def hub_failure(error: Exception) -> str:
    """One line saying why a hub download failed (huggingface-hub's messages run over several lines)."""
    text = str(error).strip()
    reason = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {reason[:200]}" if reason else type(error).__name__


def read_config(directory: Path) -> ModelConfig:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"config.json not found in checkpoint directory {directory}")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    try:
        return ModelConfig.from_hf(hf, source=str(cfg_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_weight_map(directory: Path) -> dict[str, str]:
    """Tensor name → shard path, from `model.safetensors.index.json` or a single `model.safetensors`."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map)") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> shard file, got "
                                  f"{type(weight_map).__name__}")
        for name, f in weight_map.items():
            if not isinstance(f, str) or not _inside(f):
                raise CheckpointError(f"{index}: weight_map entry {name!r} must name a shard file inside the "
                                      f"checkpoint directory, got {f!r}")
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0]} which is not in {directory}")
        return {name: str(directory / f) for name, f in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        with SafetensorsFile(single) as f:
            return {name: str(single) for name in f.keys()}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only PyTorch pickle weights; vishwam loads safetensors only (pickles are never "
            "loaded): convert with transformers' save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint directory {directory}")


def _inside(relative: str) -> bool:
    """Whether an index's shard path stays inside the checkpoint directory: relative, no `..`. Judged on the
    name, not on where links lead (a hub snapshot's files are links into its blob store)."""
    path = PurePosixPath(relative)
    return bool(relative) and "\0" not in relative and not path.is_absolute() and ".." not in path.parts


class LazyCheckpoint:
    """An opened HF checkpoint whose tensors are read only when asked for.

    `abstract` is the model skeleton (`jax.ShapeDtypeStruct` leaves). `load()` materialises the whole model;
    `load_layers(start, stop)`, `load_embed()`, `load_final_norm()` and `load_lm_head()` materialise a part,
    which is what streamed teachers run on. `layer_groups(n)` splits the layers into consecutive groups that
    each touch at most `n` shard files.
    """

    def __init__(self, path_or_id: str | os.PathLike, config: ModelConfig | None = None):
        self.directory = resolve_checkpoint_dir(path_or_id)
        self.config = read_config(self.directory) if config is None else config
        self.weight_map = read_weight_map(self.directory)
        self._files: dict[str, SafetensorsFile] = {}
        self.abstract = eqx.filter_eval_shape(CausalLM, self.config, key=jax.random.key(0))
        self._validate()

    def __repr__(self):
        files = len(set(self.weight_map.values()))
        return f"LazyCheckpoint({str(self.directory)!r}, {self.config.architecture}, {files} shard(s))"

    def file(self, path: str) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _validate(self):
        """Every tensor the model needs is present with the shape the config implies; nothing unexpected."""
        n = self.config.num_hidden_layers
        self._check_layer_count()
        expected: set[str] = set()
        for path, leaf in named_leaves(self.abstract):
            shape = tuple(leaf.shape[1:]) if path.startswith(STACKED) else tuple(leaf.shape)
            for name in hf_names(path, n):
                expected.add(name)
                if name not in self.weight_map:
                    raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.directory}")
                info = self.file(self.weight_map[name]).info(name)
                if tuple(info.shape) != shape:
                    raise CheckpointError(
                        f"tensor {name!r} in {os.path.basename(self.weight_map[name])} has shape {tuple(info.shape)}, "
                        f"the config implies {shape}"
                    )
                if not (np.issubdtype(info.dtype, np.floating) or info.dtype.name == "bfloat16"):
                    raise CheckpointError(f"tensor {name!r} has non-float dtype {info.dtype}")
        for name, file in self.weight_map.items():
            if name in expected or _IGNORED.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still store the (identical) head
            raise CheckpointError(
                f"unexpected tensor {name!r} in {os.path.basename(file)}: not part of a "
                f"{self.config.architecture} with this config"
            )
        # Shard files named only by the index still must be readable and untruncated.
        for path in sorted(set(self.weight_map.values())):
            self.file(path)

    def _check_layer_count(self):
        """The config's layer count against the layers the checkpoint holds, before any per-layer name is listed:
        a `num_hidden_layers` far beyond the checkpoint fails at once, in memory bounded by the index."""
        held = {int(m.group(1)) for name in self.weight_map if (m := _LAYER.match(name))}
        first_missing = next(i for i in range(len(held) + 1) if i not in held)
        if first_missing < self.config.num_hidden_layers:
            leaf = next(path for path, _ in named_leaves(self.abstract) if path.startswith(STACKED))
            name = f"{STACKED}{first_missing}.{leaf[len(STACKED):]}"
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.directory} (its config.json has "
                                  f"num_hidden_layers={self.config.num_hidden_layers}, its weights hold "
                                  f"{len(held)} layers)")

    # ------------------------------------------------------------------------------------------- loading

    def _reader(self, names: list[str], stacked: bool, dtype) -> Callable:
        def read(index):
            index = tuple(index)
            if not stacked:
                arr = self.file(self.weight_map[names[0]]).read(names[0], index)
                if arr.dtype == dtype:
                    return arr
                out = aligned_empty(arr.shape, dtype)
                out[...] = arr
                return out
            rows = range(*index[0].indices(len(names)))
            out = None
            for k, i in enumerate(rows):  # one layer's slice in memory at a time beside the output
                part = self.file(self.weight_map[names[i]]).read(names[i], index[1:])
                if out is None:
                    out = aligned_empty((len(rows),) + part.shape, dtype)
                out[k] = part
            return out

        return read

    def _materialize(self, subtree, prefix: str, mesh: Mesh | None, dtype, rules, layer_range=None):
        """Build the arrays of `subtree` (a part of `abstract` found at `prefix`) from the checkpoint."""
        check_float_dtype(dtype)
        device = None if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        leaves, treedef = jax.tree_util.tree_flatten(subtree)
        out = []
        for rel, leaf in named_leaves(subtree):
            path = f"{prefix}.{rel}" if prefix else rel
            names = hf_names(path, self.config.num_hidden_layers)
            stacked = path.startswith(STACKED)
            shape = tuple(leaf.shape)
            if stacked and layer_range is not None:
                names = names[layer_range[0]:layer_range[1]]
                shape = (len(names),) + shape[1:]
            target = np.dtype(dtype) if dtype is not None else self.file(self.weight_map[names[0]]).info(names[0]).dtype
            sharding = device if mesh is None else param_sharding(path, shape, mesh, rules)
            out.append(jax.make_array_from_callback(shape, sharding, self._reader(names, stacked, target)))
        return jax.tree_util.tree_unflatten(treedef, out)

    def load(self, dtype=None, mesh: Mesh | None = None, rules=RULES) -> CausalLM:
        """The whole model; each leaf placed by `rules` on `mesh` (or on the first device)."""
        params, static = eqx.partition(self.abstract, _is_abstract)
        return eqx.combine(self._materialize(params, "", mesh, dtype, rules), static)

    def load_layers(self, start: int, stop: int, dtype=None, mesh: Mesh | None = None, rules=RULES) -> DecoderLayer:
        """Decoder layers `start:stop` as a stack (leading axis `stop - start`)."""
        n = self.config.num_hidden_layers
        if not 0 <= start < stop <= n:
            raise IndexError(f"layer range {start}:{stop} out of 0:{n}")
        params, static = eqx.partition(self.abstract.model.layers, _is_abstract)
        arrays = self._materialize(params, "model.layers", mesh, dtype, rules, layer_range=(start, stop))
        return eqx.combine(arrays, static)

    def load_embed(self, dtype=None, mesh=None, rules=RULES):
        return self._materialize(self.abstract.model.embed_tokens, "model.embed_tokens", mesh, dtype, rules)

    def load_final_norm(self, dtype=None, mesh=None, rules=RULES):
        return self._materialize(self.abstract.model.norm, "model.norm", mesh, dtype, rules)

    def load_lm_head(self, dtype=None, mesh=None, rules=RULES):
        if self.abstract.lm_head is None:
            return None
        return self._materialize(self.abstract.lm_head, "lm_head", mesh, dtype, rules)

    def shards_of_layers(self, start: int, stop: int) -> set[str]:
        """The shard files that hold any tensor of layers `start:stop`."""
        out = set()
        for name, file in self.weight_map.items():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m and start <= int(m.group(1)) < stop:
                out.add(file)
        return out

    def layer_groups(self, max_resident_shards: int) -> list[tuple[int, int]]:
        """Consecutive layer ranges, each touching at most `max_resident_shards` shard files (a single layer
        spread over more shards than that forms a group of its own)."""
        if max_resident_shards < 1:
            raise ConfigError(f"max_resident_shards must be >= 1, got {max_resident_shards}")
        groups, start = [], 0
        n = self.config.num_hidden_layers
        for stop in range(1, n + 1):
            if stop - start > 1 and len(self.shards_of_layers(start, stop)) > max_resident_shards:
                groups.append((start, stop - 1))
                start = stop - 1
        groups.append((start, n))
        return groups

    def nbytes(self) -> int:
        return sum(self.file(f).info(name).nbytes for name, f in self.weight_map.items())


def check_float_dtype(dtype) -> None:
    """Weights are held in a floating dtype: casting them to an integer or boolean one would silently destroy them."""
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, ...), got {jnp.dtype(dtype).name}")


def open_pretrained(path_or_id: str | os.PathLike) -> LazyCheckpoint:
    """Open an HF checkpoint lazily: config parsed, index and shard headers validated, no tensor read."""
    return LazyCheckpoint(path_or_id)


def load_pretrained(path_or_id: str | os.PathLike, dtype=None, mesh: Mesh | None = None, rules=RULES) -> CausalLM:
    """Load a Qwen2/Qwen2.5, Qwen3 or Llama HF checkpoint as a `CausalLM`.

    **Arguments:**

    - `path_or_id`: an HF-format directory (`config.json` + `model.safetensors` or a sharded set with
      `model.safetensors.index.json`), or a hub id resolved through huggingface-hub.
    - `dtype`: the dtype of every leaf (default: as stored).
    - `mesh`: a `jax.sharding.Mesh` with axes `data`, `fsdp`, `tensor`; each leaf is placed by `rules`, and each
      device reads from disk only its slice. Without a mesh, everything lands on the first device.

    **Returns:** the model, an `eqx.Module`.
    """
    check_float_dtype(dtype)  # before anything is opened
    ckpt = LazyCheckpoint(path_or_id)
    try:
        return ckpt.load(dtype=dtype, mesh=mesh, rules=rules)
    finally:
        ckpt.close()


__all__ = ["INDEX_FILE", "SINGLE_FILE", "STACKED", "TOKENIZER_FILES", "LazyCheckpoint", "check_float_dtype",
           "hf_names", "load_pretrained", "open_pretrained", "read_config", "read_weight_map", "resolve_checkpoint_dir"]
