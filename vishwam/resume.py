"""Checkpoints of the train state, and resuming from them.

The whole `TrainState` is saved with orbax as a flat dict of arrays named by pytree path, beside a small JSON
`meta` (the step and the resolved config). Saves are asynchronous and atomic (orbax writes a temporary directory
and renames it when complete), so a run killed mid-save leaves only complete checkpoints behind; re-running the
same command restores the newest of them, and because the batch order is a pure function of `(seed, step)` the
resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import orbax.checkpoint as ocp

from models.pytree import named_leaves

from .train_state import TrainState


class Checkpointer:
    """Orbax checkpoints of the whole TrainState (saved as a flat dict of arrays named by pytree path).

    Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when complete), so a
    run killed mid-save leaves only complete checkpoints behind; re-running restores the newest of them.
    """

    def __init__(self, directory: Path, keep: int):
        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict):
        """Start an asynchronous save of `state` at `step` (the caller decides when: `training.save_every`)."""
        arrays = dict(named_leaves(eqx.filter(state, eqx.is_array)))
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(arrays),
                                       meta=self.ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like: TrainState, shardings) -> tuple[TrainState, dict]:
        arrays, static = eqx.partition(like, eqx.is_array)
        names = named_leaves(arrays)
        shard_named = dict(named_leaves(shardings))
        abstract = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard_named[n]) for n, a in names}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                       meta=self.ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        new_leaves = [restored["state"][n] for n, _ in names]
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, new_leaves), static), dict(restored["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


__all__ = ["Checkpointer"]
