"""Text generation: `generate(model, input_ids, ...)` with a static KV cache, as two compiled programs.

A prefill program runs the left-padded prompts once and fills the cache (`models.decode.prefill`); one decode
program then advances every row a token per step inside a `lax.while_loop` (`models.decode.decode_step`,
`models.sampling.sample_tokens`) and stops as soon as every row has produced an end-of-sequence token. Prompt
lengths are rounded up to a bucket (`prompt_bucket`) by more left padding, so both programs are compiled once
per (batch, bucket, max_new_tokens) and reused by every later call of those shapes; temperature, top-k, top-p,
the key and the special token ids are traced values and never recompile.

On a mesh (the model's leaves placed by `vishwam.sharding`, e.g. `load_pretrained(path, mesh=...)`) the programs
run where the weights are: the cache is sharded like activations (batch over `data`/`fsdp`, kv heads over
`tensor`), so no device holds the whole model or the whole cache.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, PRNGKeyArray

from models import CausalLM, ModelConfig
from models.decode import KVCache, decode_step, prefill
from models.sampling import sample_tokens
from vishwam.errors import CheckpointError, ConfigError
from vishwam.sharding import rows_sharding, spec_for

#: Prompts up to this many tokens are padded to the next power of two, longer ones to a multiple of it.
PROMPT_BUCKET = 64
CACHE_AXES = ("layers", "batch", "kv_heads", "seq", None)


def prompt_bucket(length: int) -> int:
    """The padded prompt length programs are compiled for: 1, 2, 4, ..., 64, then multiples of 64."""
    if length <= PROMPT_BUCKET:
        return 1 << max(length - 1, 0).bit_length()
    return -(-length // PROMPT_BUCKET) * PROMPT_BUCKET


def model_mesh(model: CausalLM) -> Mesh | None:
    """The mesh the model's weights are placed on (`None` for a model on one device)."""
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


@functools.partial(jax.jit, static_argnames=("slots", "cache_sharding", "attention_impl"))
def _prefill(model, input_ids, attention_mask, *, slots, cache_sharding, attention_impl):
    return prefill(model, input_ids, attention_mask, slots, cache_sharding=cache_sharding,
                   attention_impl=attention_impl)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "cache_sharding"), donate_argnames=("cache",))
def _decode(model: CausalLM, cache: KVCache, logits, key, temperature, top_k, top_p, eos_ids, pad_id, *,
            max_new_tokens: int, cache_sharding):
    """The tokens `[batch, max_new_tokens]` after the prompts (`pad_id` after a row's end-of-sequence token), and
    the final cache."""
    batch = logits.shape[0]

    def choose(logits, step, done):
        token = sample_tokens(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        return token, done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)

    token, done = choose(logits, 0, jnp.zeros(batch, bool))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def running(state):
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(state):
        step, token, cache, done, out = state
        logits, cache = decode_step(model, cache, token, cache_sharding=cache_sharding)
        token, done = choose(logits, step, done)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        return step + 1, token, cache, done, out

    # The cache comes back so that the donated input buffers hold the loop's cache in place (no second copy).
    _, _, cache, _, out = jax.lax.while_loop(running, advance, (jnp.int32(1), token, cache, done, out))
    return out, cache


def _ids(value, name: str | None) -> list[int]:
    if value is None:
        return []
    ids = [int(value)] if np.isscalar(value) else [int(v) for v in value]
    if name and any(i < 0 for i in ids):
        raise ValueError(f"{name} must be non-negative token ids, got {value!r}")
    return ids


def _eos_array(eos: list[int]) -> Array:
    """The EOS ids padded with -1 (never a token) to a multiple of 8, so their number rarely recompiles."""
    return jnp.asarray(eos + [-1] * (max(8, -(-len(eos) // 8) * 8) - len(eos)), jnp.int32)


def _scalar(name: str, value, kinds: str):
    """`value` as a numpy scalar of one of the dtype `kinds` ('iu': integers, 'iuf': real numbers), finite."""
    arr = np.asarray(value)
    if arr.ndim or arr.dtype.kind not in kinds:
        raise TypeError(f"{name} must be {'an integer' if kinds == 'iu' else 'a real number'}, got {value!r}")
    if not np.isfinite(arr):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return arr[()]


def _check(ids: np.ndarray, mask: np.ndarray, vocab: int, max_new_tokens: int, temperature: float, top_k: int,
           top_p: float, key) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    temperature, top_p = _scalar("temperature", temperature, "iuf"), _scalar("top_p", top_p, "iuf")
    if not 0 <= _scalar("top_k", top_k, "iu") < 2**31:
        raise ValueError(f"top_k must be in [0, 2**31), got {top_k}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got shape {ids.shape}")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError("prompts must be left-padded: each row's attention_mask is 0...0 then 1...1, ending in 1")
    real = ids[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab):
        raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {vocab})")
    if not 1 <= max_new_tokens < 2**31:
        raise ValueError(f"max_new_tokens must be in [1, 2**31), got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: generate(..., key=jax.random.key(0))")


def _place(array: np.ndarray, mesh: Mesh | None):
    if mesh is None:
        return jnp.asarray(array)
    sharding = rows_sharding(mesh, array.shape[0], array.ndim)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def generate(model: CausalLM, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, key: PRNGKeyArray | None = None, attention_impl: str = "auto") -> Array:
    """Continue each prompt by up to `max_new_tokens` tokens.

    **Arguments:**

    - `model`: a `CausalLM`, on one device or sharded on a mesh.
    - `input_ids`, `attention_mask`: `[batch, prompt_len]` prompts, left-padded with mask 0 as transformers
      batches them (no mask: every token is real).
    - `temperature`: 0 is greedy (argmax); otherwise tokens are drawn from `softmax(logits / temperature)` after
      the `top_k` (0: off) and `top_p` (1: off) filters of `models.sampling`, with `key`.
    - `eos_token_id`: one id or several; a row ends at the first one it produces. `pad_token_id` fills the rest of
      an ended row (default: the first EOS id, else 0).

    **Returns:** `[batch, prompt_len + max_new_tokens]` int32: the prompts as given, then the new tokens.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    try:  # a static argument of the decode program: a Python int (np.int64(8) and the like become one)
        max_new_tokens = operator.index(max_new_tokens)
    except TypeError:
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}") from None
    _check(ids, mask, model.config.vocab_size, max_new_tokens, temperature, top_k, top_p, key)
    eos = _ids(eos_token_id, "eos_token_id")
    pad = _ids(pad_token_id, "pad_token_id") or eos[:1] or [0]
    batch, length = ids.shape
    bucket = prompt_bucket(length)
    padded_ids = np.pad(ids.astype(np.int32) * mask, ((0, 0), (bucket - length, 0)))
    padded_mask = np.pad(mask, ((0, 0), (bucket - length, 0)))
    slots = bucket + max_new_tokens - 1  # the last new token is never fed back
    mesh = model_mesh(model)
    cache_sharding = None
    if mesh is not None:
        shape = (model.config.num_hidden_layers, batch, model.config.num_key_value_heads, slots,
                 model.config.head_dim)
        cache_sharding = NamedSharding(mesh, spec_for(CACHE_AXES, shape, mesh))
    logits, cache = _prefill(model, _place(padded_ids, mesh), _place(padded_mask, mesh), slots=slots,
                             cache_sharding=cache_sharding, attention_impl=attention_impl)
    key = jax.random.key(0) if key is None else key
    new, _ = _decode(model, cache, logits, key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                  _eos_array(eos), jnp.int32(pad[0]), max_new_tokens=max_new_tokens,
                  cache_sharding=cache_sharding)
    if not new.is_fully_addressable:  # a mesh over several processes: every process gets every row
        new = multihost_utils.process_allgather(new, tiled=True)
    return jnp.concatenate([jnp.asarray(ids, jnp.int32), jax.device_get(new)], axis=1)


def left_pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as a left-padded `[len(rows), longest]` int32 batch (pads are 0) and its boolean mask."""
    width = max(map(len, rows))
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, True
    return ids, mask


def until_eos(tokens: Sequence[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens before the first EOS id, and whether one came."""
    end = next((n for n, t in enumerate(tokens) if t in eos), None)
    return list(tokens if end is None else tokens[:end]), end is not None


def checkpoint_eos_ids(directory: Path, config: ModelConfig) -> list[int]:
    """The ids a checkpoint's generations end at: `generation_config.json`'s `eos_token_id` (which transformers'
    `generate` uses), else `config.json`'s. A `generation_config.json` that is not a JSON object, or whose ids are
    not token ids of `config`'s vocabulary, is a `CheckpointError` naming it."""
    generation = Path(directory) / "generation_config.json"
    if not generation.is_file():
        return list(config.eos_ids)
    try:
        settings = json.loads(generation.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{generation} is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{generation} must hold a JSON object, got {type(settings).__name__}")
    eos = settings.get("eos_token_id")
    if eos is None:
        return list(config.eos_ids)
    ids = [eos] if not isinstance(eos, list) else eos
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool):
            raise CheckpointError(f"{generation}: key 'eos_token_id' must be a token id or a list of them, got "
                                  f"{eos!r}")
        if not 0 <= token < config.vocab_size:
            raise CheckpointError(f"{generation}: eos_token_id {token} is outside the vocabulary [0, "
                                  f"vocab_size={config.vocab_size})")
    return list(ids)


def generation_programs(model: CausalLM, batch: int, prompt_len: int, max_new_tokens: int, mesh: Mesh,
                        attention_impl: str = "auto") -> dict:
    """`generate`'s two programs for `batch` prompts of up to `prompt_len` tokens on `mesh`, as `name -> (jitted
    function, abstract args, kwargs)` to lower and compile (the compile dry run): `prefill` and `decode`, with the
    shapes and shardings `generate` gives them. `model` may be abstract (`ShapeDtypeStruct` leaves)."""
    c = model.config
    bucket = prompt_bucket(prompt_len)
    slots = bucket + max_new_tokens - 1
    shape = (c.num_hidden_layers, batch, c.num_key_value_heads, slots, c.head_dim)
    cache_sharding = NamedSharding(mesh, spec_for(CACHE_AXES, shape, mesh))
    rows = rows_sharding(mesh, batch)
    ids = jax.ShapeDtypeStruct((batch, bucket), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, bucket), bool, sharding=rows)
    prefill_kw = dict(slots=slots, cache_sharding=cache_sharding, attention_impl=attention_impl)
    logits, cache = jax.eval_shape(functools.partial(_prefill, **prefill_kw), model, ids, mask)
    # k, v, key_valid, positions, length (a KVCache of shardings would fail its own field types)
    placed = (cache_sharding, cache_sharding, rows, rows_sharding(mesh, batch, 1),
              NamedSharding(mesh, jax.sharding.PartitionSpec()))
    leaves, treedef = jax.tree.flatten(cache)
    cache = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
                                         for x, sh in zip(leaves, placed, strict=True)])
    logits = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=rows_sharding(mesh, batch, logits.ndim))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    decode_args = (model, cache, logits, jax.random.key(0), scalar(jnp.float32), scalar(jnp.int32),
                   scalar(jnp.float32), _eos_array([]), scalar(jnp.int32))
    return {"prefill": (_prefill, (model, ids, mask), prefill_kw),
            "decode": (_decode, decode_args, dict(max_new_tokens=max_new_tokens, cache_sharding=cache_sharding))}


def cache_bytes(config: ModelConfig, rows: int, slots: int, mesh, itemsize: int) -> int:
    """Bytes on one device of `generate`'s KV cache, keys and values `[layers, rows, kv heads, slots, head_dim]`
    each, sharded as `generate` shards it on `mesh` (a `Mesh` or anything with its `shape`, e.g. the
    `parallelism` section; None: one device)."""
    shape = (config.num_hidden_layers, rows, config.num_key_value_heads, slots, config.head_dim)
    local = list(shape)
    if mesh is not None:
        for i, entry in enumerate(spec_for(CACHE_AXES, shape, mesh)):
            for name in () if entry is None else ((entry,) if isinstance(entry, str) else entry):
                local[i] //= mesh.shape[name]
    return 2 * math.prod(local) * itemsize


def check_generation(models: Mapping[str, tuple[ModelConfig, int]], *, rows: int, prompt_len: int,
                     max_new_tokens: int, mesh, capacity: int | None, resident_bytes: int, what: str) -> None:
    """Raise a one-line `ConfigError` naming `what` (the key or flag that asks for `max_new_tokens`) when
    `generate` cannot continue `rows` prompts of up to `prompt_len` tokens by `max_new_tokens` tokens with a model
    of `models` (its name -> `(config, bytes per cache element)`): when the sequence runs past the model's
    `max_position_embeddings`, or when its KV cache, written by the prefill program and copied once as it is
    placed (`vishwam.plan.program_plan` plans `on_policy_prefill` so), does not fit in `capacity` bytes per device
    beside the `resident_bytes` held there already (on `mesh`; unchecked when the capacity is unknown)."""
    slots = prompt_bucket(prompt_len) + max_new_tokens - 1
    for name, (config, itemsize) in models.items():
        if prompt_len + max_new_tokens > config.max_position_embeddings:
            raise ConfigError(f"{what} is {max_new_tokens}: after a prompt of {prompt_len} tokens that runs to "
                              f"position {prompt_len + max_new_tokens}, past the {name}'s max_position_embeddings "
                              f"({config.max_position_embeddings})")
        need = 2 * cache_bytes(config, rows, slots, mesh, itemsize)
        if capacity is not None and resident_bytes + need > capacity:
            raise ConfigError(f"{what} is {max_new_tokens}: the {name}'s KV cache for {rows} prompt(s) of up to "
                              f"{prompt_len} tokens needs {_gib(need)}/device as it is written, beside "
                              f"{_gib(resident_bytes)} already there, and a device holds {_gib(capacity)}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def compiled_programs() -> dict[str, int]:
    """How many prefill and decode programs have been compiled in this process (one per shape bucket)."""
    return {"prefill": _prefill._cache_size(), "decode": _decode._cache_size()}


__all__ = ["PROMPT_BUCKET", "cache_bytes", "check_generation", "checkpoint_eos_ids", "compiled_programs", "generate",
           "generation_programs", "left_pad", "model_mesh", "prompt_bucket", "until_eos"]
