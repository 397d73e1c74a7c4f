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
from vishwam.config.sections import RunConfig, config_to_dict
from vishwam.errors import ConfigError
from vishwam.train.step import TrainState

#: Config keys a resumed run may change: where it writes, how long it runs, how often it reports, on what. Every other
#: key (the models, the objective, the data, the optimizer, the batch) must equal the checkpoint's.
RESUME_MAY_CHANGE = ("training.output_dir", "training.max_steps", "training.log_every", "training.eval_every",
                     "training.eval_batches", "training.save_every", "training.keep_checkpoints",
                     "training.max_nonfinite_steps", "training.dry_run", "training.remat", "training.sample_prompts",
                     "training.sample_prompts_file", "training.sample_max_new_tokens", "training.downstream.", "data.eval", "parallelism.",
                     "distributed.", "tracking.")


class Checkpointer:
    """Orbax checkpoints of the whole TrainState (saved as a flat dict of arrays named by pytree path).

    Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when complete), so a
    run killed mid-save leaves only complete checkpoints behind; re-running restores the newest of them.
    """

    def __init__(self, directory: Path, keep: int):
        self.ocp = ocp
        self.directory = directory
        self.keep = keep
        self._manager = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        """The orbax manager, made on first use: the directory is created by the first save, not by looking."""
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=1,
                                                   enable_async_checkpointing=True, create=True)
            self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
        return self._manager

    def latest(self) -> int | None:
        return self.manager.latest_step() if self.directory.is_dir() else None

    def save(self, step: int, state: TrainState, meta: dict):
        """Start an asynchronous save of `state` at `step` (the caller decides when: `training.save_every`)."""
        arrays = dict(named_leaves(eqx.filter(state, eqx.is_array)))
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(arrays),
                                       meta=self.ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like: TrainState, shardings) -> tuple[TrainState, dict]:
        """Checkpoint `step` as a `TrainState` shaped like `like` (arrays or ShapeDtypeStructs), on `shardings`."""
        arrays, static = eqx.partition(like, lambda x: isinstance(x, (jax.Array, jax.ShapeDtypeStruct)))
        names = named_leaves(arrays)
        shard_named = dict(named_leaves(shardings))
        abstract = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard_named[n]) for n, a in names}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                       meta=self.ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        new_leaves = [restored["state"][n] for n, _ in names]
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, new_leaves), static), dict(restored["meta"])

    def meta(self, step: int) -> dict:
        """The JSON written beside the arrays of checkpoint `step` (no array is read)."""
        restored = self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def check_resumable(self, step: int, cfg: RunConfig) -> None:
        """Raise a one-line `ConfigError` when `cfg` changes a key the checkpoint at `step` fixed (see
        `RESUME_MAY_CHANGE`): the key, its saved value and its new value."""
        saved = self.meta(step).get("config")
        if saved is None:
            return
        old, new = _flatten(saved), _flatten(config_to_dict(cfg))
        for key in sorted(old.keys() | new.keys()):
            if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE):
                continue
            if old.get(key) != new.get(key):
                raise ConfigError(
                    f"config key '{key}' is {new.get(key)!r}, but the checkpoint {self.directory / str(step)} was "
                    f"written with {old.get(key)!r}: resume with the saved value, or use a new training.output_dir")

    def wait(self):
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self):
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["RESUME_MAY_CHANGE", "Checkpointer"]
