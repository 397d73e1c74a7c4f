"""Sharding: one table from logical axis names to mesh axes.

Every parameter gets logical axes from its HF-style name (`_PARAM_AXES`, data in one place), and `RULES` maps
logical axes to the mesh axes `data`, `fsdp`, `tensor`. Changing a parallelism strategy is changing `RULES`.
A logical axis whose size does not divide by its mesh axes is replicated instead (a 2-head model on a
4-way tensor axis still runs), and a mesh axis is never used twice within one array.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.pytree import named_leaves
from vishwam.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

#: logical axis -> mesh axes (a tuple shards over several, None replicates).
RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "proj_in": None,
    "proj_out": "fsdp",
}

# (regex on the parameter's dotted path, logical axes of one layer's tensor). First match wins.
_PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed_tokens\.weight$", ("vocab", "embed")),
    (r"lm_head\.weight$", ("vocab", "embed")),
    (r"q_proj\.weight$", ("heads", "embed")),
    (r"[kv]_proj\.weight$", ("kv_heads", "embed")),
    (r"q_proj\.bias$", ("heads",)),
    (r"[kv]_proj\.bias$", ("kv_heads",)),
    (r"o_proj\.weight$", ("embed", "heads")),
    (r"(gate|up)_proj\.weight$", ("mlp", "embed")),
    (r"(gate|up)_proj\.bias$", ("mlp",)),
    (r"down_proj\.weight$", ("embed", "mlp")),
    (r"(norm|layernorm)\.weight$", ("norm",)),
    (r"projections.*\.weight$", ("proj_out", "proj_in")),
]


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at dotted path `name` with `ndim` dimensions. Stacked decoder-layer
    leaves (`...layers.` in the path with one extra leading dim) get a leading `layers` axis."""
    for pattern, axes in _PARAM_AXES:
        if re.search(pattern, name):
            if ndim == len(axes) + 1 and ".layers." in f".{name}":
                return ("layers",) + axes
            if ndim == len(axes):
                return axes
    return (None,) * ndim


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over the first `data·fsdp·tensor` devices."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * fsdp * tensor
    if min(data, fsdp, tensor) < 1:
        raise ConfigError(f"parallelism sizes must be >= 1, got data={data} fsdp={fsdp} tensor={tensor}")
    if need > len(devices):
        raise ConfigError(
            f"parallelism data={data} x fsdp={fsdp} x tensor={tensor} needs {need} devices, {len(devices)} available"
        )
    return Mesh(np.asarray(devices[:need]).reshape(data, fsdp, tensor), MESH_AXES)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, tuple[str, ...] | str | None] = RULES) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes and shape on `mesh` (see module docstring)."""
    used: set[str] = set()
    out = []
    for axis, size in zip(axes, shape):
        target = rules.get(axis) if axis is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
        n_shards = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if not names or size % n_shards:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def param_sharding(name: str, shape: Sequence[int], mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes(name, len(shape)), shape, mesh, rules))


def tree_shardings(tree, mesh: Mesh, rules=RULES):
    """A pytree of `NamedSharding`s for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    names = [n for n, _ in named_leaves(tree)]
    if len(names) != len(leaves):
        raise ValueError("tree has non-array leaves; filter it first")
    return jax.tree_util.tree_unflatten(
        treedef, [param_sharding(n, leaf.shape, mesh, rules) for n, leaf in zip(names, leaves)]
    )


def shard_tree(tree, mesh: Mesh, rules=RULES):
    """Place every array leaf of `tree` by the rule table (non-array leaves untouched)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    placed = jax.device_put(arrays, tree_shardings(arrays, mesh, rules))
    return eqx.combine(placed, static)


def _batch_axes(mesh, rules=RULES) -> tuple[str, ...]:
    """The mesh axes `batch` maps to that `mesh` has (a `Mesh`, or anything with its `shape` mapping)."""
    target = rules["batch"]
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(n for n in names if n in mesh.shape)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=RULES) -> NamedSharding:
    """Batches: leading axis over `batch`'s mesh axes, the rest replicated."""
    names = _batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(names if names else None, *([None] * (ndim - 1))))


def batch_shards(mesh, rules=RULES) -> int:
    """How many ways the batch axes split an array's rows on `mesh` (a `Mesh`, or anything with its `shape`
    mapping, such as a `ParallelismConfig`)."""
    return math.prod(mesh.shape[n] for n in _batch_axes(mesh, rules))


def rows_per_device(rows: int, mesh, rules=RULES) -> int:
    """Rows of a `rows`-row array on one device as `rows_sharding` places it: split over the batch axes when they
    divide, else all of them."""
    shards = batch_shards(mesh, rules)
    return rows // shards if rows % shards == 0 else rows


def rows_sharding(mesh: Mesh, rows: int, ndim: int = 2, rules=RULES) -> NamedSharding:
    """`batch_sharding` for an array of `rows` rows when they divide over the batch axes, else replicated (a
    probe or a prompt batch of any size)."""
    split = rows % batch_shards(mesh, rules) == 0
    return batch_sharding(mesh, ndim, rules) if split else NamedSharding(mesh, PartitionSpec())


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """A host batch as global arrays: every process holds the same global batch (a pure function of seed and
    step) and hands JAX the slice each of its devices owns."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def detected_cluster() -> tuple[str, int] | None:
    """`(scheduler, processes)` when the environment names a multi-process job that `jax.distributed` can join
    by itself (SLURM, Open MPI, a TPU pod's worker list), else None."""
    env = os.environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        found = ("SLURM", int(env["SLURM_NTASKS"]))
    elif "OMPI_MCA_orte_hnp_uri" in env and "OMPI_COMM_WORLD_SIZE" in env:
        found = ("Open MPI", int(env["OMPI_COMM_WORLD_SIZE"]))
    elif env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES"):
        hosts = env.get("TPU_PROCESS_ADDRESSES") or env["TPU_WORKER_HOSTNAMES"]
        found = ("TPU pod", len(hosts.split(",")))
    else:
        return None
    return found if found[1] > 1 else None


def setup_distributed(d) -> None:
    """Join the multi-host job: at `distributed.coordinator_address` when it is set; otherwise, when the
    environment names a cluster job (`detected_cluster`) or `num_processes > 1`, through JAX's own cluster
    detection (SLURM, Open MPI, Cloud TPU, Kubernetes), which reads the coordinator, process count and id from
    the scheduler. `d`: the run's `distributed` section (`coordinator_address`, `num_processes`, `process_id`)."""
    if d.coordinator_address:
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)
        return
    cluster = detected_cluster()
    if cluster is None and d.num_processes == 1:
        return
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"config key 'distributed.coordinator_address' is unset and JAX detects no cluster for "
                          f"{d.num_processes} processes ({' '.join(str(e).split())[:200]}): set it to process 0's "
                          f"host:port") from None
    if d.num_processes > 1 and jax.process_count() != d.num_processes:
        raise ConfigError(f"config key 'distributed.num_processes' is {d.num_processes}, but the "
                          f"{cluster[0] if cluster else 'detected'} job has {jax.process_count()} processes")
