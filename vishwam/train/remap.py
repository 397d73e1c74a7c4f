"""EPLB re-mapping in a run: at each stage boundary, the layer mapping re-derived from layer similarity.

`remap_steps` says at which steps it happens; `remap` measures linear CKA between every student and teacher layer
on a probe sample (`probe_batch`: `eplb.probe_tokens` tokens, at least one sequence, drawn with seed + 1 so they
are not the next training batches; `probe_similarity` is the one jitted program that runs both models and the
CKA, its memory bounded by the sample: `(student layers + 1)` Gram matrices of `tokens²` floats; a streamed
teacher's hidden states come group by group first and `student_similarity` runs the rest), picks the best
monotone assignment of the mapped student layers, and returns the state with the new mapping and the changed
pairs' projections re-initialised (`distill.eplb`).

What a changed pair's state means changes with it, so it starts over: its projection is re-initialised, AdamW's
moments of that projection are zeroed (the shared step count, and so the bias correction, go on: the new
projection's first updates are a warm restart's, about half a fresh Adam step and rising), and the balancer's
running magnitude and count of that pair are zeroed (its loss is now measured against another teacher layer). The
student, its moments, and every unchanged pair's projection, moments and magnitude are carried over as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from distill.eplb import best_monotone_assignment, cka_matrix, remap_pairs, replace_projections
from distill.objective import Objective
from models import cast_floating
from models.pytree import path_name
from vishwam.config.sections import RunConfig
from vishwam.data.windows import PackedDataset, batch_for_step
from vishwam.sharding import global_batch, rows_sharding
from vishwam.train.step import TrainState


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
    """The re-mapping probe: `eplb.probe_tokens // seq_len` sequences (at least one), seed + 1, step 0."""
    tr = cfg.training
    rows = max(1, cfg.distillation_params.eplb.probe_tokens // tr.seq_len)
    batch = batch_for_step(data, seed=tr.seed + 1, step=0, batch_size=rows)
    batch.pop("window")
    return batch


def _student_similarity(student, teacher_hiddens, input_ids, mask, activation_sharding=None):
    s_h = student(input_ids, attention_mask=mask, output_hidden_states=True,
                  activation_sharding=activation_sharding).hidden_states
    return cka_matrix(s_h, teacher_hiddens, mask)


@functools.partial(jax.jit, static_argnames="activation_sharding")
def probe_similarity(student, teacher, input_ids, mask, activation_sharding=None):
    """`[student layers, teacher layers]` linear CKA of the two models' layer outputs on the probe tokens;
    `activation_sharding`: both models' hidden states, their rows over the batch axes (see `CausalLM`)."""
    t_h = teacher(input_ids, attention_mask=mask, output_hidden_states=True,
                  activation_sharding=activation_sharding).hidden_states
    return _student_similarity(student, t_h, input_ids, mask, activation_sharding)


# With a streamed teacher, its hidden states come group by group first; the student and the CKA are one program.
student_similarity = jax.jit(_student_similarity, static_argnames="activation_sharding")


def remap(state: TrainState, objective: Objective, teacher: Callable, probe: dict[str, np.ndarray], *,
          param_dtype, log: Callable[[str], None], mesh=None) -> tuple[TrainState, np.ndarray]:
    """**Returns:** the state with the re-derived mapping (the changed pairs' projections re-initialised from
    `state.rng(step)`) and the CKA matrix `[student layers, teacher layers]` it was chosen by. A teacher that is
    a pytree (resident) runs inside `probe_similarity`; a streamed one runs group by group first. On `mesh` the
    probe's rows are spread over the batch axes (when they divide) and stay there through both models."""
    rows = len(probe["input_ids"])
    if mesh is None:
        ids, mask, pin = jnp.asarray(probe["input_ids"]), jnp.asarray(probe["mask"]), None
    else:
        placed = global_batch({k: probe[k] for k in ("input_ids", "mask")}, rows_sharding(mesh, rows))
        ids, mask, pin = placed["input_ids"], placed["mask"], rows_sharding(mesh, rows, 3)
    if isinstance(teacher, eqx.Module):
        sim = np.asarray(probe_similarity(state.student, teacher, ids, mask, activation_sharding=pin))
    else:
        t_h = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        sim = np.asarray(student_similarity(state.student, t_h, ids, mask, activation_sharding=pin))
    old = objective.feature_pairs
    new = tuple(best_monotone_assignment(sim, [s for s, _ in old]))
    step = int(state.step)
    log(f"EPLB re-mapping at step {step}: {list(old)} -> {list(new)}")
    changed = remap_pairs(old, new)
    if not changed:
        return state, sim
    projections = cast_floating(replace_projections(state.projections, changed, key=state.rng(step)), param_dtype)
    state = eqx.tree_at(lambda s: (s.projections, s.mapping, s.opt_state), state,
                        (projections, jnp.asarray(new, jnp.int32), _forget_moments(state.opt_state, changed)))
    if state.balancer is not None:
        keep = jnp.ones_like(state.balancer.count).at[jnp.asarray(changed)].set(0)
        state = eqx.tree_at(lambda s: (s.balancer.magnitude, s.balancer.count), state,
                            (state.balancer.magnitude * keep, state.balancer.count * keep))
    return state, sim


def _forget_moments(opt_state, changed: tuple[int, ...]):
    """The optimizer state with every leaf of the changed pairs' projections zeroed. The moments mirror the
    trainable tree `(student, projections)`, so projection `p`'s leaves sit under `1.projections.{p}.`."""
    marks = tuple(f".1.projections.{p}." for p in changed)

    def forget(path, leaf):
        name = "." + path_name(path) + "."
        return jnp.zeros_like(leaf) if eqx.is_array(leaf) and any(m in name for m in marks) else leaf

    return jax.tree_util.tree_map_with_path(forget, opt_state)


__all__ = ["probe_batch", "probe_similarity", "remap", "remap_steps", "student_similarity"]
