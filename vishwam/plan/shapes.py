"""Bytes of abstract pytrees on a mesh: each leaf sharded by the rule table (`vishwam.sharding`) on a mesh shape
(a `ParallelismConfig` or a `Mesh`), so a mesh bigger than this host can be planned from the config alone."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import numpy as np

from models import CausalLM, ModelConfig, causal_blocks
from models.pytree import named_leaves
from vishwam.config.sections import ParallelismConfig
from vishwam.sharding import RULES, logical_axes, spec_for

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_LAYERS = "model.layers."


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig) -> CausalLM:
    """The model skeleton: `jax.ShapeDtypeStruct` leaves, nothing allocated."""
    return eqx.filter_eval_shape(CausalLM, config, key=jax.random.key(0))


def axis_shards(logical: str, size: int, mesh: ParallelismConfig) -> int:
    """How many ways an activation axis is split (the same rule `spec_for` applies to weights)."""
    spec = spec_for((logical,), (size,), mesh)  # type: ignore[arg-type]
    return size // _per_device_shape(spec, (size,), mesh)[0]


def _per_device_shape(spec, shape, mesh: ParallelismConfig) -> tuple[int, ...]:
    out = []
    for entry, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        out.append(size // math.prod(mesh.shape[n] for n in names))
    return tuple(out)


def tree_bytes(tree, mesh: ParallelismConfig, dtype: str | None = None, rules=RULES) -> tuple[int, int]:
    """`(total bytes, bytes on one device)` of the array leaves of `tree` (arrays or ShapeDtypeStructs), each
    sharded by `rules` on `mesh`; `dtype` overrides the leaves' own dtype."""
    total = per_device = 0
    for name, leaf in named_leaves(tree):
        if not isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
            continue
        itemsize = DTYPE_BYTES[dtype] if dtype is not None else np.dtype(leaf.dtype).itemsize
        spec = spec_for(logical_axes(name, len(leaf.shape)), leaf.shape, mesh, rules)  # type: ignore[arg-type]
        total += math.prod(leaf.shape) * itemsize
        per_device += math.prod(_per_device_shape(spec, leaf.shape, mesh)) * itemsize
    return total, per_device


def split_layers(tree, num_layers: int, mesh: ParallelismConfig, dtype: str) -> tuple[int, int]:
    """Per-device bytes of `(one decoder layer, everything outside the layers)` of a model skeleton."""
    layers = outside = 0
    for name, leaf in named_leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            part = tree_bytes({name: leaf}, mesh, dtype)[1]  # a dict key keeps the dotted name for the rules
            if name.startswith(_LAYERS):
                layers += part
            else:
                outside += part
    return layers // num_layers, outside



def gathered_layer_bytes(model, config: ModelConfig, mesh: ParallelismConfig, dtype: str) -> int:
    """One decoder layer of `model` as fsdp gathers it for the layer being run (split by `tensor` alone; nothing
    without fsdp)."""
    if mesh.fsdp == 1:
        return 0
    return split_layers(model, config.num_hidden_layers, ParallelismConfig(tensor=mesh.tensor), dtype)[0]


def layer_forward_bytes(m: ModelConfig, b: int, S: int, w: int, heads: int, kv_heads: int, mlp: int) -> int:
    """One layer's forward working set on one device as XLA:TPU fuses it, for `b` rows of `S` tokens of `w` bytes
    (`heads`, `kv_heads`, `mlp`: this device's share): the residual, and the larger of the attention half (q, k, v
    and the heads' output, the largest causal block's float32 scores) and the MLP half (its normed input and the
    gated product; gate, up and the activation fuse into their projections)."""
    attention = b * S * w * (2 * heads + 2 * kv_heads) * m.head_dim + b * heads * -(-S // causal_blocks(S)) * S * 4
    return b * S * w * m.hidden_size + max(attention, b * S * w * (m.hidden_size + mlp))


__all__ = ["DTYPE_BYTES", "abstract_model", "axis_shards", "gathered_layer_bytes", "layer_forward_bytes",
           "split_layers", "tree_bytes"]
