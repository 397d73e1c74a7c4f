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
- gradients: the float32 accumulator the step sums micro-batch gradients into, plus one micro-batch's gradient
  in the param dtype.
- activations: one micro-batch per device (`batch_size / grad_accum_steps / (data·fsdp)` sequences).

Activations, per micro-batch per device (`b` sequences of `S` tokens, `c` the compute dtype's bytes, heads, MLP
width and vocabulary divided by `tensor` where the rules shard them):

- student layers: with `training.remat` the scan saves only the layer-boundary hidden states, `(L+1)·b·S·D·c`,
  and the layer being recomputed holds its matmul inputs and outputs twice (values and cotangents). Without
  remat every layer's intermediates are saved: `L` times one layer's working set.
- attention scores: the model runs causal query blocks (`models.attention.causal_blocks`), so the largest
  block's `b·H·(S/n)·S` scores and probabilities exist, `3·4 + c` bytes each; for the layer in flight and its
  cotangents (remat), for every layer without it. Attention maps returned for an attention loss
  (`attention_loss: kl`) are `L·b·H·S²` float32 per model on top.
- logits: the student's `b·S·V` logits and their cotangent in `c`, plus one float32 `[b, chunk, V]` array for
  the loss (XLA fuses the softmaxes into the logits' producers); `chunk` is `distillation_params.logit_chunk_size`
  (all of `S` when unset, which is why long sequences want it set). When the LM head is fused into the KD + CE
  loss (`fused_logit_loss`, forward KL, a scheduled temperature, a live teacher) only one chunk's logits and
  gradient exist, plus the hidden states' gradient `b·S·D·c` and the head's float32 gradient (split like the
  head).
- feature matching: two float32 `[b, S, teacher_hidden]` arrays per mapped pair (projected student, normalised
  teacher), saved for the backward pass.
- teacher outputs: the teacher's logits (and its hidden states for feature matching, its attention maps or q/k/v
  for an attention loss) in the teacher dtype. A resident teacher runs inside each micro-step; a streamed one
  runs ahead of the step, so its outputs for all `grad_accum_steps` micro-batches are held; a cached one gives
  top-k values, indices and the tail log-sum-exp.
- weights in flight: the student's weights cast to the compute dtype (sharded), and with `fsdp > 1` the
  all-gathered weights of the layer running, of each model in the step.
- the teacher's own forward working set (one layer; it is never differentiated) is freed before the student's
  forward begins, so the peak counts `max(teacher forward, student part)`, not their sum.

Weights, optimizer state and gradients are exact; activations are estimates on the high side (XLA fuses and
reuses buffers; set against XLA:TPU's compiled steps in README "Memory at the flagship's size").

Capacity: `device_bytes`, else `vishwam.capacity.device_capacity`. Whether a plan fits, and what would make it
fit: `vishwam.fit`. Architectures: `vishwam.specs` (bundled for hub ids, so a dry run works offline).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from distill.features import FeatureProjections
from models import CausalLM, ModelConfig, causal_blocks
from models.pytree import named_leaves

from . import specs
from .checkpoint import INDEX_FILE, SINGLE_FILE, LazyCheckpoint
from .config import ParallelismConfig, RunConfig
from .capacity import device_capacity
from .sharding import RULES, logical_axes, spec_for

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
#: Shard size assumed for a streamed teacher whose shard files are not local (transformers' default
#: `max_shard_size="5GB"`).
DEFAULT_SHARD_BYTES = 5 * 10**9
_LAYERS = "model.layers."


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig) -> CausalLM:
    """The model skeleton: `jax.ShapeDtypeStruct` leaves, nothing allocated."""
    return eqx.filter_eval_shape(CausalLM, config, key=jax.random.key(0))


# ---------------------------------------------------------------------------------------------- sharding


def _axis_shards(logical: str, size: int, mesh: ParallelismConfig) -> int:
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
    """Gradient accumulator (float32) plus one micro-batch's gradient on one device."""
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
            f"  {'gradients (fp32 accumulator + micro-batch)':<52}{gib(self.gradient_bytes)}",
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

    # -- activations

    def activations(self, setup: Setup) -> tuple[int, tuple[tuple[str, int], ...]]:
        tr, t_cfg, s_cfg, objective = self.cfg.training, self.t_config, self.s_config, self.objective
        mesh, b, S = setup.mesh, setup.micro_per_device, setup.seq_len
        c, tb = DTYPE_BYTES[tr.compute_dtype], DTYPE_BYTES[self.cfg.distillation.teacher_model.dtype]

        def local(logical: str, size: int) -> int:
            return size // _axis_shards(logical, size, mesh)

        def layer_set(m: ModelConfig, nbytes: int) -> int:  # one layer's matmul inputs and outputs
            h, g, f = (local(a, n) for a, n in zip(("heads", "kv_heads", "mlp"), (m.num_attention_heads,
                                                                           m.num_key_value_heads, m.intermediate_size)))
            return b * S * nbytes * (6 * m.hidden_size + 3 * (h + g) * m.head_dim + 3 * f)

        def scores(m: ModelConfig, per_elem: int, block: bool = False) -> int:  # block: the largest causal block
            queries = -(-S // causal_blocks(S)) if block else S
            return b * local("heads", m.num_attention_heads) * queries * S * per_elem

        L = s_cfg.num_hidden_layers
        boundary = (L + 1) * b * S * s_cfg.hidden_size * c
        # Saved per layer for the backward: scores, masked scores and probabilities in fp32, probabilities in c.
        saved = 3 * 4 + c
        if setup.remat:
            student_layers = boundary + 2 * layer_set(s_cfg, c)
            attention = 2 * scores(s_cfg, saved, block=True)
        else:
            student_layers = boundary + (L + 1) * layer_set(s_cfg, c)
            attention = (L + 1) * scores(s_cfg, saved, block=True)
        attention += scores(s_cfg, 1, block=True) // local("heads", s_cfg.num_attention_heads)  # the boolean mask
        outputs, attention_pairs = objective.model_outputs(), objective.attention_pairs
        attn_kl, attn_rel = outputs["output_attentions"], outputs["output_qkv"]
        qkv = lambda m, nbytes: b * S * (local("heads", m.num_attention_heads)  # noqa: E731
                                         + 2 * local("kv_heads", m.num_key_value_heads)) * m.head_dim * nbytes
        if attn_kl:
            attention += L * scores(s_cfg, 4)
        if attn_rel:
            attention += L * qkv(s_cfg, c)

        chunk = min(objective.params.logit_chunk_size or S, S)
        s_vocab, t_vocab = local("vocab", s_cfg.vocab_size), local("vocab", t_cfg.vocab_size)
        # With the LM head fused into the KD + CE loss (resident or streamed teacher, forward KL, scheduled
        # temperature) the student's logits are never whole: one chunk's logits and gradient in `c`, the hidden
        # states' gradient and the head's fp32 gradient accumulator instead.
        fused_head = objective.fuses_lm_head(dense_teacher=setup.loading != "cached")
        if fused_head:
            logits = (2 * b * chunk * s_vocab * c + b * S * s_cfg.hidden_size * c
                      + s_vocab * local("embed", s_cfg.hidden_size) * 4 + b * chunk * max(s_vocab, t_vocab) * 4)
        else:
            logits = 2 * b * S * s_vocab * c + b * chunk * max(s_vocab, t_vocab) * 4
        pairs = len(objective.feature_pairs)
        features = 2 * pairs * b * S * t_cfg.hidden_size * 4 if objective.uses_features else 0

        # Teacher outputs: per micro-batch when the teacher runs in the step, for the whole step otherwise.
        tb_rows = b if setup.loading == "resident" else b * setup.grad_accum_steps
        k = self.cfg.distillation.teacher_model.top_k
        if setup.loading == "cached":
            teacher_out = tb_rows * S * (8 * k + 8)  # top-k values and ids, tail logsumexp, label log-prob
        else:
            teacher_out = tb_rows * S * t_vocab * tb if objective.needs_teacher_logits else 0
            t_hidden, t_attention = (len({t for _, t in p}) for p in (objective.feature_pairs, attention_pairs))
            if objective.uses_features:  # the mapped layers' alone (`Objective.teacher_model_outputs`)
                teacher_out += t_hidden * tb_rows * S * t_cfg.hidden_size * tb
            if attn_kl:
                teacher_out += t_attention * scores(t_cfg, 4) * (tb_rows // b)
            if attn_rel:
                teacher_out += t_attention * qkv(t_cfg, tb) * (tb_rows // b)
        teacher_fwd = layer_set(t_cfg, tb) + scores(t_cfg, 3 * 4 + tb, block=True) if setup.loading == "resident" else 0

        # Weights in flight: the student cast to the compute dtype, and under fsdp each running model's layer.
        weights = 0
        if tr.compute_dtype != tr.param_dtype:
            weights += tree_bytes(self.student, mesh, tr.compute_dtype)[1]
        if mesh.fsdp > 1:
            gathered = ParallelismConfig(tensor=mesh.tensor)
            weights += split_layers(self.student, L, gathered, tr.compute_dtype)[0]
            if setup.loading == "resident":
                weights += split_layers(self.teacher, t_cfg.num_hidden_layers, gathered,
                                        self.cfg.distillation.teacher_model.dtype)[0]

        parts = [
            (f"student layers ({'remat: boundaries + 1 layer' if setup.remat else 'all layers saved'})",
             student_layers),
            ("attention scores + probs, fp32 (the largest causal block's)", attention),
            (f"{'LM head fused into the loss, ' if fused_head else ''}logits + loss in fp32 chunks of {chunk} tokens",
             logits),
        ]
        if features:
            parts.append((f"feature matching ({pairs} pairs, fp32)", features))
        if weights:
            parts.append(("weights in compute dtype / gathered by fsdp", weights))
        parts.append((f"teacher outputs ({setup.loading})", teacher_out))
        teacher_out += weights  # live through both the teacher's and the student's passes
        student_part = student_layers + attention + logits + features
        if teacher_fwd > student_part:
            parts.append(("teacher forward (exceeds the student part)", teacher_fwd - student_part))
        return teacher_out + max(student_part, teacher_fwd), tuple(parts)

    # -- the whole plan

    def plan(self, setup: Setup, capacity: int | None, source: str) -> MemoryPlan:
        tr, t = self.cfg.training, self.cfg.distillation.teacher_model
        pbytes = DTYPE_BYTES[tr.param_dtype]
        student_total, student = tree_bytes(self.student, setup.mesh, tr.param_dtype)
        projections = tree_bytes(self.projections, setup.mesh, tr.param_dtype)[1] if self.projections else 0
        trainable = student + projections
        optimizer = 2 * trainable
        gradients = trainable // pbytes * (4 + pbytes)
        teacher = self.teacher_bytes(setup)
        activations, parts = self.activations(setup)
        total = teacher + trainable + optimizer + gradients + activations
        notes = []
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
            student_total_bytes=student_total, notes=tuple(notes),
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
