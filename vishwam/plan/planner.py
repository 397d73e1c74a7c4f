"""The memory planner: per-device bytes of a run, from the configs alone, before anything is allocated.

`plan(cfg)` builds both models as abstract pytrees (`eqx.filter_eval_shape`: shapes, no arrays), shards every
leaf by the rule table in `vishwam.sharding` on the configured mesh shape, and adds up per device:

- teacher: `resident`: every weight, sharded, in the teacher dtype. `streamed`: `max_resident_shards` shard
  files' worth of layers (the largest group of `LazyCheckpoint.layer_groups` when the checkpoint is local, else
  shards of `DEFAULT_SHARD_BYTES`), plus embeddings, final norm and head. `cached`: nothing (the top-k cache is
  read from disk).
- student params: every student weight, sharded, in `training.param_dtype`.
- feature projections: one `[teacher_hidden, student_hidden]` matrix per mapped pair with feature matching on.
- optimizer state: AdamW's two moments per trainable weight, in the weights' dtype (optax keeps `mu`/`nu` in
  the params' dtype: float32 for the default `param_dtype`).
- gradients: the float32 accumulator the step sums micro-batch gradients into (none with `grad_accum_steps: 1`);
  one micro-batch's gradient is counted with the activations, in the phase that makes it.
- activations: one micro-batch per device (`batch_size / grad_accum_steps / (data·fsdp)` sequences).

Activations: the train step's peak, by phase (`vishwam.plan.step_plan`); with a streamed teacher the plan is the larger
of the step (the groups released, only the embeddings, final norm and head held) and the teacher's pass (its
groups and the step's teacher outputs). The other programs of a run: `vishwam.plan.program_plan`. Weights, optimizer
state and gradients are exact; activations are estimates, set against XLA:TPU's compiled programs by
`benchmarks/plan_vs_xla.py` (`docs/scale.md`, "Memory at the flagship's size").

Capacity: `device_bytes`, else `vishwam.plan.capacity.device_capacity`. Whether a plan fits, and what would make it
fit: `vishwam.plan.fit`. Architectures: `vishwam.config.specs` (bundled for hub ids, so a dry run works offline).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import jax

from distill.features import FeatureProjections
from models import ModelConfig
from vishwam.config import specs
from vishwam.config.sections import ParallelismConfig, RunConfig
from vishwam.io.checkpoint import INDEX_FILE, SINGLE_FILE, LazyCheckpoint
from vishwam.plan.capacity import device_capacity
from vishwam.plan.shapes import DTYPE_BYTES, abstract_model, split_layers, tree_bytes
from vishwam.plan.step_plan import step_activations

GiB = 2**30
#: Shard size assumed for a streamed teacher whose shard files are not local (transformers' default
#: `max_shard_size="5GB"`).
DEFAULT_SHARD_BYTES = 5 * 10**9


# ---------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Setup:
    """The knobs of a run that the plan depends on (alternatives are tried by changing these)."""

    loading: str
    mesh: ParallelismConfig
    batch_size: int
    grad_accum_steps: int
    seq_len: int
    remat: bool

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Setup":
        p, tr = cfg.parallelism, cfg.training
        return cls(cfg.distillation.teacher_model.loading, p, tr.batch_size,
                   tr.grad_accum_steps, tr.seq_len, tr.remat)

    @property
    def micro_per_device(self) -> int:
        batch_devices = self.mesh.data * self.mesh.fsdp
        return max(1, -(-(self.batch_size // self.grad_accum_steps) // batch_devices))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one run, by category (see the module docstring for how each is estimated)."""

    teacher_bytes: int
    """Teacher weights on one device (0 for a cached teacher)."""
    student_bytes: int
    """Student weights on one device, in `training.param_dtype`."""
    projection_bytes: int
    """Feature-matching projections on one device (0 without feature matching)."""
    optimizer_bytes: int
    """AdamW moments of the student and the projections on one device."""
    gradient_bytes: int
    """The float32 gradient accumulator on one device (0 without gradient accumulation)."""
    activation_bytes: int
    """Peak activations of one micro-batch on one device."""
    activation_parts: tuple[tuple[str, int], ...]
    """The activation estimate's parts, `(label, bytes)`; their sum, or with the teacher's forward, is the peak."""
    total_bytes: int
    """Everything above."""
    capacity: int | None
    """Bytes one device holds; None when unknown for this mesh on this host."""
    capacity_source: str
    """Where `capacity` came from."""
    fits: bool | None
    """`total_bytes <= capacity`; None when the capacity is unknown (not checked)."""
    setup: Setup
    teacher_config: ModelConfig
    student_config: ModelConfig
    teacher_name: str
    teacher_dtype: str
    param_dtype: str
    compute_dtype: str
    teacher_total_bytes: int
    """All teacher weights in the teacher dtype, unsharded."""
    student_total_bytes: int
    """All student weights in the param dtype, unsharded."""
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        """The plan as a table (GiB per device)."""
        s, t, st = self.setup, self.teacher_config, self.student_config
        gib = lambda n: f"{n / GiB:9.2f}"  # noqa: E731
        lines = [
            "vishwam memory plan (per device; from the configs' shapes, nothing allocated)",
            f"  teacher  {self.teacher_name}: {_arch(t)}; {self.teacher_dtype}, loading={s.loading}",
            f"  student  {_arch(st)}; params {self.param_dtype}, compute {self.compute_dtype}",
            f"  mesh     {s.mesh} ({s.mesh.size} device{'s' if s.mesh.size > 1 else ''}); {s.micro_per_device} x "
            f"{s.seq_len} tokens per micro-batch per device, grad_accum_steps={s.grad_accum_steps}, "
            f"remat={'on' if s.remat else 'off'}",
            "",
            f"  {'category':<52}{'GiB/device':>10}",
            f"  {'-' * 62}",
            f"  {'teacher weights (' + s.loading + ')':<52}{gib(self.teacher_bytes)}",
            f"  {'student params (' + self.param_dtype + ')':<52}{gib(self.student_bytes)}",
        ]
        if self.projection_bytes:
            lines.append(f"  {'feature projections (' + self.param_dtype + ')':<52}{gib(self.projection_bytes)}")
        lines += [
            f"  {'optimizer state (AdamW, 2 moments)':<52}{gib(self.optimizer_bytes)}",
            f"  {'gradient accumulator (fp32)':<52}{gib(self.gradient_bytes)}",
            f"  {'activations (peak of one micro-batch)':<52}{gib(self.activation_bytes)}",
        ]
        lines += [f"    {label:<50}{gib(n)}" for label, n in self.activation_parts]
        lines += [f"  {'-' * 62}", f"  {'total':<52}{gib(self.total_bytes)}"]
        if self.capacity is None:
            lines.append(f"  {'capacity':<52}{'unknown':>10}  ({self.capacity_source})")
            lines.append(f"  {'fits':<52}{'unchecked':>10}  (set VISHWAM_DEVICE_MEMORY, e.g. 80GiB, to check)")
        else:
            lines.append(f"  {'capacity':<52}{gib(self.capacity)}  ({self.capacity_source})")
            verdict = (f"yes ({(self.capacity - self.total_bytes) / GiB:.2f} GiB spare)" if self.fits
                       else f"NO (short by {(self.total_bytes - self.capacity) / GiB:.2f} GiB)")
            lines.append(f"  {'fits':<52}{verdict:>10}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def summary(self) -> str:
        """Two lines for the start of a run."""
        s = self.setup
        cap = "capacity unknown" if self.capacity is None else f"of {self.capacity / GiB:.1f} GiB"
        fits = "" if self.fits is None else (", fits" if self.fits else ", DOES NOT FIT")
        return (f"memory plan: {self.total_bytes / GiB:.2f} GiB/device {cap}{fits} (mesh {s.mesh}, teacher "
                f"{s.loading})\n  teacher {self.teacher_bytes / GiB:.2f} + student {self.student_bytes / GiB:.2f} "
                f"+ projections {self.projection_bytes / GiB:.2f} + optimizer {self.optimizer_bytes / GiB:.2f} + "
                f"gradients {self.gradient_bytes / GiB:.2f} + activations {self.activation_bytes / GiB:.2f} GiB")
    planner: "Planner | None" = dataclasses.field(default=None, repr=False, compare=False)
    """The planner that made this plan, so the fit check's alternatives and the compile check re-use its abstract
    models instead of planning anew."""


def _arch(c: ModelConfig) -> str:
    return (f"{c.architecture} {c.num_parameters() / 1e9:.2f}B params, {c.num_hidden_layers} layers, hidden "
            f"{c.hidden_size}, heads {c.num_attention_heads}/{c.num_key_value_heads} kv, mlp {c.intermediate_size}, "
            f"vocab {c.vocab_size}")


class Planner:
    """Everything fixed across the alternatives tried: the two architectures and the objective's shape."""

    def __init__(self, cfg: RunConfig, teacher_config: ModelConfig):
        self.cfg = cfg
        self.t_config = teacher_config
        self.s_config = specs.student_config(cfg, teacher_config)
        self.objective = specs.objective(cfg, self.s_config, teacher_config)
        self.teacher = abstract_model(teacher_config)
        self.student = abstract_model(self.s_config)
        self.projections = None
        if self.objective.uses_features:
            self.projections = eqx.filter_eval_shape(FeatureProjections, self.objective.feature_pairs,
                                                     self.s_config.hidden_size,
                                                     teacher_config.hidden_size, key=jax.random.key(0))
        self._group_layers: int | None = None

    # -- teacher weights

    def streamed_layers(self) -> int:
        """Layers a streamed teacher holds at once: the largest group touching `max_resident_shards` shards."""
        if self._group_layers is None:
            t = self.cfg.distillation.teacher_model
            n = self.t_config.num_hidden_layers
            if any((Path(t.path).expanduser() / f).is_file() for f in (INDEX_FILE, SINGLE_FILE)):  # weights here
                ckpt = LazyCheckpoint(t.path, self.t_config)
                try:
                    self._group_layers = max(stop - start for start, stop in ckpt.layer_groups(t.max_resident_shards))
                finally:
                    ckpt.close()
            else:
                per_layer, _ = split_layers(self.teacher, n, ParallelismConfig(), t.dtype)
                per_shard = max(1, DEFAULT_SHARD_BYTES // max(1, per_layer))
                self._group_layers = min(n, t.max_resident_shards * per_shard)
        return self._group_layers

    def teacher_bytes(self, setup: Setup) -> int:
        dtype = self.cfg.distillation.teacher_model.dtype
        if setup.loading == "cached":
            return 0
        if setup.loading == "resident":
            return tree_bytes(self.teacher, setup.mesh, dtype)[1]
        layer, outside = split_layers(self.teacher, self.t_config.num_hidden_layers, setup.mesh, dtype)
        return self.streamed_layers() * layer + outside

    def cache_bytes_per_token(self) -> int:
        """A teacher cache's bytes per token (`vishwam.teacher.cache.cache_rows`): top-k float32 values and int32
        ids, the float32 tail logsumexp and label log-probability, and each mapped layer's float32 hidden state."""
        layers = len({t for _, t in self.objective.feature_pairs}) if self.objective.uses_features else 0
        return 8 * self.cfg.distillation.teacher_model.top_k + 8 + 4 * self.t_config.hidden_size * layers

    # -- activations

    def activations(self, setup: Setup) -> tuple[int, tuple[tuple[str, int], ...], int]:
        """The step's peak activations per device, their parts and the teacher outputs' bytes
        (`vishwam.plan.step_plan`)."""
        return step_activations(self, setup)

    # -- the whole plan

    def plan(self, setup: Setup, capacity: int | None, source: str) -> MemoryPlan:
        tr, t = self.cfg.training, self.cfg.distillation.teacher_model
        pbytes = DTYPE_BYTES[tr.param_dtype]
        student_total, student = tree_bytes(self.student, setup.mesh, tr.param_dtype)
        projections = tree_bytes(self.projections, setup.mesh, tr.param_dtype)[1] if self.projections else 0
        trainable = student + projections
        optimizer = 2 * trainable
        # The float32 accumulator over micro-batches (one micro-batch's own gradient is an activation: it exists
        # while the student's layers run backward, `vishwam.plan.step_plan`).
        gradients = trainable // pbytes * 4 if setup.grad_accum_steps > 1 else 0
        teacher = self.teacher_bytes(setup)
        activations, parts, teacher_out = self.activations(setup)
        total = teacher + trainable + optimizer + gradients + activations
        if setup.loading == "streamed":
            # The groups run ahead of the step and are released before it: the step holds the embeddings, final
            # norm and head; the teacher's pass, its groups and the step's teacher outputs.
            outside = split_layers(self.teacher, self.t_config.num_hidden_layers, setup.mesh, t.dtype)[1]
            total = max(total - teacher + outside, teacher + trainable + optimizer + teacher_out)
        notes = []
        per_token = self.cache_bytes_per_token()
        run_tokens = tr.max_steps * tr.batch_size * tr.seq_len
        hidden = ", mapped hidden states" if self.objective.uses_features else ""
        notes.append(f"an offline teacher cache (loading: cached) holds {per_token:,} bytes per token (top-{t.top_k} "
                     f"values and ids, tail and label log-probabilities{hidden}): {_size(per_token * run_tokens)} for "
                     f"the {run_tokens:,} tokens of max_steps x batch_size x seq_len")
        if setup.loading == "cached":
            notes.append(f"the teacher's top-k logits are read from {t.cache_dir or 'cache_dir'} on disk")
            if self.objective.uses_features or self.objective.uses_attention:
                notes.append("a top-k cache holds logits only: feature and attention losses need a live teacher")
        if setup.loading == "streamed":
            notes.append(f"streamed teacher holds {self.streamed_layers()} of {self.t_config.num_hidden_layers} "
                         f"layers at once (max_resident_shards={t.max_resident_shards})")
        if self.objective.params.logit_chunk_size is None and setup.seq_len >= 1024:
            notes.append("distillation_params.logit_chunk_size is unset: the loss holds all logits in fp32 at once")
        return MemoryPlan(
            teacher_bytes=teacher, student_bytes=student, projection_bytes=projections, optimizer_bytes=optimizer,
            gradient_bytes=gradients, activation_bytes=activations, activation_parts=parts, total_bytes=total,
            capacity=capacity, capacity_source=source, fits=None if capacity is None else total <= capacity,
            setup=setup, teacher_config=self.t_config, student_config=self.s_config, teacher_name=t.path,
            teacher_dtype=t.dtype, param_dtype=tr.param_dtype, compute_dtype=tr.compute_dtype,
            teacher_total_bytes=tree_bytes(self.teacher, ParallelismConfig(), t.dtype)[0],
            student_total_bytes=student_total, notes=tuple(notes), planner=self,
        )


def plan(cfg: RunConfig, teacher_config: ModelConfig | None = None, *, device_count: int | None = None,
         device_bytes: int | None = None) -> MemoryPlan:
    """The per-device memory plan of `cfg`, from shapes alone (nothing is allocated).

    **Arguments:**

    - `cfg`: the run config.
    - `teacher_config`: the teacher's architecture; default `specs.resolve_architecture(teacher path)`.
    - `device_count`: devices on this host (default: JAX's local device count), for the host-RAM capacity.
    - `device_bytes`: bytes one device holds (default: see `device_capacity`).

    **Returns:** a `MemoryPlan`.
    """
    if teacher_config is None:
        teacher_config = specs.resolve_architecture(cfg.distillation.teacher_model.path)
    setup = Setup.from_config(cfg)
    if device_bytes is not None:
        capacity, source = int(device_bytes), "given"
    else:
        capacity, source = device_capacity(setup.mesh.size, device_count)
    return Planner(cfg, teacher_config).plan(setup, capacity, source)


__all__ = ["DEFAULT_SHARD_BYTES", "GiB", "MemoryPlan", "Setup", "abstract_model", "plan", "split_layers", "tree_bytes"]


def _size(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"
