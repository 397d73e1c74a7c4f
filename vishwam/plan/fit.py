"""Whether a run fits its devices, and what to change when it does not.

`check_fits(plan, cfg)` raises a one-line `ConfigError` naming the least disruptive change that would fit (remat,
a streamed teacher, another mesh over the same devices, more gradient accumulation, a cached teacher, more
devices), each alternative planned by `vishwam.plan.planner`. `print_plan` is the dry run's table;
`check_and_summarize` the check and the two summary lines together (a run's `prepare` checks before reading the
data and prints the summary after it, so a data error stays one line).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import TextIO

import jax

from models import ModelConfig
from vishwam.config.sections import ParallelismConfig, RunConfig
from vishwam.errors import ConfigError
from vishwam.plan.planner import GiB, MemoryPlan, Planner, Setup, plan


def _meshes(devices: int) -> Iterator[ParallelismConfig]:
    """Every `(data, fsdp, tensor)` with this many devices, most fsdp first, then least tensor."""
    shapes = [ParallelismConfig(d, f, devices // (d * f)) for d in range(1, devices + 1) for f in range(1, devices + 1)
              if devices % (d * f) == 0]
    yield from sorted(shapes, key=lambda m: (-m.fsdp, m.tensor))


def _alternatives(cfg: RunConfig, setup: Setup, uses_teacher_states: bool) -> Iterator[tuple[str, Setup]]:
    """Changes to try, least disruptive first: remat, streaming the teacher, another mesh over the same devices,
    smaller micro-batches, a cached teacher, then more devices."""

    def valid(s: Setup) -> bool:
        micro = s.batch_size // s.grad_accum_steps
        return s.batch_size % s.grad_accum_steps == 0 and micro % (s.mesh.data * s.mesh.fsdp) == 0

    def mesh_text(m: ParallelismConfig) -> str:
        changed = [f"parallelism.{k}={v}" for k, v in m.shape.items() if v != setup.mesh.shape[k]]
        return f"set {', '.join(changed)} ({m.size} devices)"

    base = setup
    if not setup.remat:
        base = dataclasses.replace(setup, remat=True)
        yield "set training.remat to true", base
    loadings = [setup.loading] + (["streamed"] if setup.loading == "resident" else [])
    for loading in loadings[1:]:
        yield f"switch distillation.teacher_model.loading to {loading}", dataclasses.replace(base, loading=loading)
    for loading in loadings:
        for mesh in _meshes(setup.mesh.size):
            alt = dataclasses.replace(base, mesh=mesh, loading=loading)
            if mesh != setup.mesh and valid(alt):
                how = "" if loading == setup.loading else f" with loading {loading}"
                yield f"{mesh_text(mesh)}{how}", alt
    for loading in loadings:
        accum = setup.grad_accum_steps * 2
        while accum <= setup.batch_size:
            alt = dataclasses.replace(base, grad_accum_steps=accum, loading=loading)
            if valid(alt):
                how = "" if loading == setup.loading else f" and loading {loading}"
                yield f"set training.grad_accum_steps={accum}{how} (micro-batches of {setup.batch_size // accum})", alt
            accum *= 2
    if setup.loading != "cached" and not uses_teacher_states:
        yield ("switch distillation.teacher_model.loading to cached (precompute the top-k cache first)",
               dataclasses.replace(base, loading="cached"))
    for factor in (2, 4, 8, 16, 32):
        for loading in loadings:
            for mesh in _meshes(setup.mesh.size * factor):
                alt = dataclasses.replace(base, mesh=mesh, loading=loading)
                if valid(alt):
                    how = "" if loading == setup.loading else f" with loading {loading}"
                    yield f"{mesh_text(mesh)}{how}", alt
                    break  # the most-fsdp valid mesh of this size


def check_fits(plan: MemoryPlan, cfg: RunConfig) -> None:
    """Raise `ConfigError` with one line naming a change that would fit when `plan` does not fit.

    Alternatives are tried in the order of `_alternatives` (remat, streamed teacher, mesh over the same devices,
    more gradient accumulation, cached teacher, more devices); the first that fits is named, or, when none does,
    the one that comes closest. A plan whose capacity is unknown is not checked.
    """
    if plan.fits is not False:
        return
    planner = plan.planner or Planner(cfg, plan.teacher_config)
    head = (f"memory plan: {plan.total_bytes / GiB:.2f} GiB/device needed with parallelism {plan.setup.mesh} and "
            f"teacher loading {plan.setup.loading}, but a device holds {plan.capacity / GiB:.2f} GiB "
            f"({plan.capacity_source})")
    best: tuple[int, str] | None = None
    uses_states = planner.objective.uses_features or planner.objective.uses_attention
    for text, setup in _alternatives(cfg, plan.setup, uses_states):
        need = planner.plan(setup, plan.capacity, plan.capacity_source).total_bytes
        if need <= plan.capacity:
            raise ConfigError(f"{head}; {text} would need {need / GiB:.2f} GiB/device")
        if best is None or need < best[0]:
            best = (need, text)
    if best is None:
        raise ConfigError(f"{head}; no alternative to try")
    raise ConfigError(f"{head}; nothing tried fits: the closest, {best[1]}, would still need "
                      f"{best[0] / GiB:.2f} GiB/device")


def print_plan(cfg: RunConfig, file: TextIO | None = None) -> MemoryPlan:
    """The dry run: resolve the teacher's architecture, print the plan's table, raise `ConfigError` if it does
    not fit (see `check_fits`)."""
    result = plan(cfg)
    print(result.render(), file=file or sys.stdout, flush=True)
    check_fits(result, cfg)
    return result


def check_and_summarize(cfg: RunConfig, teacher_config: ModelConfig, file: TextIO | None = None) -> MemoryPlan:
    """Before a run: raise `check_fits`'s one-line error when the plan does not fit, else print the plan's
    two-line summary (process 0 only) to `file` (default stderr)."""
    result = plan(cfg, teacher_config)
    check_fits(result, cfg)
    if jax.process_index() == 0:
        print(result.summary(), file=file or sys.stderr, flush=True)
    return result


__all__ = ["check_and_summarize", "check_fits", "print_plan"]
