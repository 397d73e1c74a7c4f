"""Checkpoints of the train state, and resuming from them.

The whole `TrainState` is saved with orbax as a flat dict of arrays named by pytree path, beside a small JSON
`meta` (the step and the resolved config). Saves are asynchronous and atomic (orbax writes a temporary directory
and renames it when complete), so a run killed mid-save leaves only complete checkpoints behind; re-running the
same command restores the newest of them, and because the batch order is a pure function of `(seed, step)` the
resumed run ends bitwise equal to an uninterrupted one.

A complete checkpoint that has since been damaged (its `meta` or its arrays' metadata no longer parses) is skipped
for the newest readable one before anything is loaded, with a warning naming it (`Checkpointer.resumable`); once
the run starts writing it is set aside as `N.unreadable`, kept for a look and out of the way of the run's own
save of that step (`Checkpointer.set_aside`).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from models.pytree import named_leaves
from vishwam.config.sections import RunConfig, config_to_dict
from vishwam.errors import CheckpointError, ConfigError
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
        self.skipped: list[int] = []
        """The unreadable checkpoints `resumable` skipped, newest first (`set_aside` moves them)."""

    @property
    def manager(self) -> ocp.CheckpointManager:
        """The orbax manager, made on first use: the directory is created by the first save, not by looking."""
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=1,
                                                   enable_async_checkpointing=True, create=True)
            self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
        return self._manager

    def resumable(self, cfg: RunConfig, log: Callable[[str], None]) -> int | None:
        """The checkpoint to resume from: the newest whose `meta` and arrays' metadata read back, its saved config
        compared with `cfg` (`check_resumable`), or None when there is none. Newer unreadable ones are skipped with
        a warning naming each (`skipped`); when none is readable, a one-line `CheckpointError`. Reads no array."""
        self.skipped = []
        if not self.directory.is_dir():
            return None
        problems = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self._unreadable(step)
            if problem is None:
                break
            self.skipped.append(step)
            problems.append(f"{self.directory / str(step)} ({problem})")
        else:
            if problems:
                raise CheckpointError(f"no checkpoint in {self.directory} can be read: {'; '.join(problems)}; move "
                                      "them aside to start afresh, or use a new training.output_dir")
            return None
        if problems:
            log(f"warning: skipping the unreadable checkpoint {'; '.join(problems)}: resuming from checkpoint {step} "
                f"instead (kept, renamed {', '.join(f'{s}.unreadable' for s in self.skipped)}, once the run goes on)")
        self.check_resumable(step, cfg)
        return step

    def _unreadable(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be resumed from without reading its arrays (its `meta`, or the metadata of
        its arrays, does not parse), or None."""
        try:
            meta = self.meta(step)
            if not isinstance(meta.get("step"), int):
                return "meta holds no step"
            self.ocp.StandardCheckpointHandler().metadata(self.directory.absolute() / str(step) / "state")
        except Exception as error:  # orbax and the JSON and tensorstore readers below it raise many kinds
            return _reason(error)
        return None

    def set_aside(self) -> list[Path]:
        """Rename the checkpoints `resumable` skipped to `N.unreadable` (process 0; orbax ignores such names), so
        that the run can save those steps again. Called once the run writes (never for a run a check stops).
        **Returns:** the new paths."""
        moved = []
        for step in self.skipped:
            target = self.directory / f"{step}.unreadable"
            n = 1
            while target.exists():
                n += 1
                target = self.directory / f"{step}.unreadable-{n}"
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(target)
            moved.append(target)
        if moved:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("vishwam checkpoints set aside")
            self.manager.reload()
        self.skipped = []
        return moved

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
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as error:  # a damaged array: tensorstore raises a bare Exception, orbax ValueErrors
            _drop_failed_reads()
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored ({_reason(error)})") \
                from error
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        new_leaves = [restored["state"][n] for n, _ in names]
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, new_leaves), static), dict(restored["meta"])

    def restore_newest(self, step: int, like: TrainState, shardings, cfg: RunConfig,
                       log: Callable[[str], None]) -> TrainState:
        """`restore(step, ...)` of `resumable`'s checkpoint; when its arrays cannot be read, the newest older one
        that can, with a warning naming what was skipped (set aside once the run goes on, as `resumable`'s) and
        its config compared with `cfg`. None left is a one-line `CheckpointError`."""
        while True:
            try:
                return self.restore(step, like, shardings)[0]
            except CheckpointError as error:
                self.skipped.append(step)
                older = sorted((s for s in self.manager.all_steps() if s < step), reverse=True)
                found = None
                for candidate in older:
                    if self._unreadable(candidate) is None:
                        found = candidate
                        break
                    self.skipped.append(candidate)
                if found is None:
                    raise CheckpointError(f"{error}, and no older checkpoint can be read: move them aside to start "
                                          "afresh, or use a new training.output_dir") from None
                log(f"warning: skipping the checkpoint {self.directory / str(step)}, whose arrays cannot be read "
                    f"({_reason(error.__cause__ or error)}): resuming from checkpoint {found} instead (kept, renamed "
                    f"{step}.unreadable, once the run goes on)")
                self.check_resumable(found, cfg)
                step = found

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


def _drop_failed_reads() -> None:
    """Collect the reads orbax left pending when one of a restore's failed: each would otherwise print its own
    traceback ("Exception ignored in: <coroutine ...>") whenever it is collected, at the latest at exit."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _reason(error: Exception) -> str:
    """An error on one short line: its type and the start of its message's first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["RESUME_MAY_CHANGE", "Checkpointer"]
