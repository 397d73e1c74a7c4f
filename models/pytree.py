"""Pytree utilities: dotted leaf names, parameter counts and a readable summary for IPython."""

from __future__ import annotations

from collections import defaultdict

import jax
import numpy as np


def _key_name(k) -> str:
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_name(path) -> str:
    """`model.layers.self_attn.q_proj.weight` for a pytree key path."""
    return ".".join(_key_name(k) for k in path)


def named_leaves(tree) -> list[tuple[str, object]]:
    """`(dotted path, leaf)` for every leaf of `tree`, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_name(p), leaf) for p, leaf in flat]


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def count_parameters(tree) -> int:
    """Total number of elements over the array leaves of `tree`."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if _is_array_like(x))


def parameter_counts(tree, depth: int = 2) -> dict[str, int]:
    """Parameter count per module, grouped by the first `depth` components of each leaf's path."""
    counts: dict[str, int] = defaultdict(int)
    for name, leaf in named_leaves(tree):
        if _is_array_like(leaf):
            counts[".".join(name.split(".")[:depth])] += int(np.prod(leaf.shape))
    return dict(counts)


def _sharding_str(x) -> str:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        return "abstract"
    spec = getattr(sharding, "spec", None)
    if spec is not None:
        return f"{tuple(spec)} over {dict(sharding.mesh.shape)}"
    devices = getattr(sharding, "device_set", None)
    if devices is not None and len(devices) == 1:
        return str(next(iter(devices)))
    return type(sharding).__name__


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def summary(tree, title: str | None = None) -> str:
    """A table of every array leaf: path, shape, dtype, sharding, and per-module / total parameter counts."""
    rows = [(n, leaf) for n, leaf in named_leaves(tree) if _is_array_like(leaf)]
    width = max([len(n) for n, _ in rows] + [4])
    lines = [title] if title else []
    total_bytes = 0
    for name, leaf in rows:
        shape = "[" + ",".join(str(d) for d in leaf.shape) + "]"
        dtype = np.dtype(leaf.dtype).name
        total_bytes += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        lines.append(f"  {name:<{width}}  {shape:<20} {dtype:<9} {_sharding_str(leaf)}")
    lines.append("  parameters by module:")
    for module, n in parameter_counts(tree).items():
        lines.append(f"    {module:<{width - 2}}  {_human(n)}")
    lines.append(f"  total: {_human(count_parameters(tree))} parameters, {total_bytes / 2**20:.1f} MiB")
    return "\n".join(lines)
