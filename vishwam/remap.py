"""EPLB re-mapping in a run: at each stage boundary, the layer mapping re-derived from layer similarity.

`remap_steps` says at which steps it happens; `remap` measures linear CKA between every student and teacher layer
on a probe sample (`eplb.probe_batches` batches of the step's micro-batch size, drawn with seed + 1 so they are
not the next training batches), picks the best monotone assignment of the mapped student layers, and returns
the state with the new mapping and the changed pairs' projections re-initialised (`distill.eplb`). The rest of
the state (student, optimizer moments, the balancer's running magnitudes) is carried over as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from distill.eplb import best_monotone_assignment, cka_matrix, remap_pairs, replace_projections
from distill.objective import Objective
from models import cast_floating

from .config import RunConfig
from .data import PackedDataset, batch_for_step
from .train_state import TrainState


def remap_steps(cfg: RunConfig, objective: Objective, *, teacher_runs: bool,
                log: Callable[[str], None]) -> frozenset[int]:
    """The steps at which the mapping is re-derived: each EPLB stage boundary after the first stage, when
    re-mapping is on and a teacher model can be run for the probe (`teacher_runs`: not a cached teacher)."""
    e = cfg.distillation_params.eplb
    if not (objective.uses_eplb and e.remap):
        return frozenset()
    if not teacher_runs:
        log("EPLB re-mapping is off with a cached teacher (the cache holds only the mapped layers)")
        return frozenset()
    return frozenset(s * e.stage_steps for s in range(1, objective.eplb_stages))


def probe_batch(cfg: RunConfig, data: PackedDataset) -> dict[str, np.ndarray]:
    """The re-mapping probe: `eplb.probe_batches` batches of the step's micro-batch size (seed + 1)."""
    tr = cfg.training
    rows = min(tr.micro_batch_size, 8) * cfg.distillation_params.eplb.probe_batches
    batch = batch_for_step(data, seed=tr.seed + 1, step=0, batch_size=rows)
    batch.pop("window")
    return batch


def remap(state: TrainState, objective: Objective, teacher: Callable, probe: dict[str, np.ndarray], *,
          param_dtype, log: Callable[[str], None]) -> tuple[TrainState, np.ndarray]:
    """**Returns:** the state with the re-derived mapping (the changed pairs' projections re-initialised from
    `state.rng(step)`) and the CKA matrix `[student layers, teacher layers]` it was chosen by."""
    ids, mask = jnp.asarray(probe["input_ids"]), jnp.asarray(probe["mask"])
    s_h = state.student(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    t_h = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    sim = np.asarray(cka_matrix(s_h, t_h, mask))
    old = objective.feature_pairs
    new = tuple(best_monotone_assignment(sim, [s for s, _ in old]))
    step = int(state.step)
    log(f"EPLB re-mapping at step {step}: {list(old)} -> {list(new)}")
    changed = remap_pairs(old, new)
    if not changed:
        return state, sim
    projections = cast_floating(replace_projections(state.projections, changed, key=state.rng(step)), param_dtype)
    state = eqx.tree_at(lambda s: (s.projections, s.mapping), state, (projections, jnp.asarray(new, jnp.int32)))
    return state, sim


__all__ = ["probe_batch", "remap", "remap_steps"]
