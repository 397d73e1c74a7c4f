"""The planner's figures for the run's other programs: bytes per device of everything the compile dry run compiles
besides the train step (`vishwam.plan.planner` plans that one), from abstract inputs alone, before any compile.

Each program is planned as XLA reports it: argument + output + temporary bytes − aliased bytes on one device.

- Arguments are exact: each abstract input's bytes on one device (the shard shape its sharding gives), less the
  arguments XLA drops because the program never reads them (an LM head a probe does not use).
- Outputs are exact: each output's bytes on one device as the program places it (the pruned student in its
  training sharding, a KV cache in its own, rows spread as the input rows are, sums and statistics whole).
- Temporaries are the largest of the program's phases plus what lives through all of them, per device (`b` rows
  of `S` tokens, `w` bytes an element):
  - the embedding lookup (fsdp splits the table's hidden axis, so the lookup gathers it);
  - one decoder layer: its weights gathered by fsdp, the residual, and the larger of the attention half (q, k, v,
    the heads' output, the largest causal block's float32 scores) and the MLP half (its normed input and the gated
    product), as XLA:TPU fuses them;
  - one logit chunk: the logits and the float32 arrays of their softmaxes, `[b, chunk, vocab]` each (`eval`,
    `cache_build`, with the top-k's sort; `downstream`, `downstream_teacher`);
  - living through: final hidden states, the student cast to the compute dtype (`eval`), every layer's hidden
    states and the Gram matrices of the probe's tokens (`eplb_probe`), the sliced student before it is placed
    (`prune_slice`), the KV cache as it is written and what every decoding step reads alike (`on_policy_*`, and the
    samples' `sample_*`, `teacher_sample_*`).

How close this comes to XLA:TPU, program by program, is measured by `benchmarks/plan_vs_xla.py` and held by
`tests/test_program_plan.py`; XLA:CPU keeps more temporaries (it computes bfloat16 work in float32 and schedules
for speed), so its figures run higher than these.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from models import ModelConfig
from vishwam.config import specs
from vishwam.config.sections import ParallelismConfig
from vishwam.plan.planner import Planner
from vishwam.plan.shapes import (
    DTYPE_BYTES,
    gathered_layer_bytes,
    layer_forward_bytes,
    tree_bytes,
)
from vishwam.sharding import batch_shards, rows_per_device


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One program's planned bytes per device."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    parts: tuple[tuple[str, int], ...]
    """The temporaries' parts, `(label, bytes)`."""

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def device_bytes(tree) -> int:
    """Bytes on one device of the abstract leaves of `tree` (a leaf without a sharding is whole on every device)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
            total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


class ProgramPlanner:
    """Plans the programs of one run (`planner`: its train-step planner, holding both architectures)."""

    def __init__(self, planner: Planner, mesh: ParallelismConfig):
        self.p, self.mesh = planner, mesh
        cfg = planner.cfg
        self.c = DTYPE_BYTES[cfg.training.compute_dtype]
        self.pb = DTYPE_BYTES[cfg.training.param_dtype]
        self.tb = DTYPE_BYTES[cfg.distillation.teacher_model.dtype]
        self.batch_shards = batch_shards(mesh)

    # -- the parts every forward pass has

    def local(self, n: int) -> int:
        """Per device of `n` heads / MLP units, split over `tensor` when they divide."""
        return n // self.mesh.tensor if n % self.mesh.tensor == 0 else n

    def _model(self, model: str):
        return (self.p.student, self.p.s_config) if model == "student" else (self.p.teacher, self.p.t_config)

    def gathered(self, model: str, nbytes: int) -> int:
        """One decoder layer's weights as fsdp gathers them for the layer being run (nothing without fsdp)."""
        return gathered_layer_bytes(*self._model(model), self.mesh, _DTYPE[nbytes])

    def embedding(self, model: str, nbytes: int) -> int:
        """The embedding table as the token lookup gathers it (fsdp splits its hidden axis), before the layers."""
        if self.mesh.fsdp == 1:
            return 0
        _, config = self._model(model)
        return self.local(config.vocab_size) * config.hidden_size * nbytes

    def forward(self, m: ModelConfig, b: int, S: int, w: int) -> int:
        """One layer's forward working set (`vishwam.plan.shapes.layer_forward_bytes`)."""
        return layer_forward_bytes(m, b, S, w, *(self.local(n) for n in (m.num_attention_heads,
                                                                          m.num_key_value_heads, m.intermediate_size)))

    def rows_per_device(self, rows: int) -> int:
        return rows_per_device(rows, self.mesh)

    # -- the programs

    def plan(self, name: str, args, kwargs, outputs) -> ProgramPlan | None:
        """The plan of program `name` (the dry run's names) called with abstract `args`, `kwargs`; `outputs`: its
        abstract outputs as the program places them. None for a program this planner does not model (the train
        step: `vishwam.plan.planner`)."""
        if specs.cross_tokenizer(self.p.cfg) and name in ("eval", "streamed_head"):  # both sides' windows
            name = "cross_" + name
        method = getattr(self, "_" + name, None)
        if method is None:
            return None
        unused, alias, phases, parts = method(args, kwargs)
        out = device_bytes(outputs)
        phase = max(phases.values()) if phases else 0
        live = sum(n for _, n in parts)
        label = max(phases, key=phases.get) if phases else ""
        return ProgramPlan(device_bytes((args, kwargs)) - unused, out, alias, phase + live,
                           tuple((k, n) for k, n in [(f"peak phase: {label}", phase), *parts] if n))

    # Each program below returns `(unused argument bytes, aliased bytes, {phase: bytes}, [(live part, bytes)])`:
    # the temporaries are the largest phase plus what lives through all of them. XLA drops arguments a program
    # never reads (LM heads a probe does not use, hidden states evaluation does not read).

    def _eval(self, args, kwargs):
        teacher, _, batch, teacher_out = args
        c, tb = self.c, self.tb
        s, t = self.p.s_config, self.p.t_config
        b, S = self.rows_per_device(batch["input_ids"].shape[0]), batch["input_ids"].shape[1]
        chunk = min(kwargs.get("chunk_size") or S, S)
        layers = self.gathered("student", c) + self.forward(s, b, S, c)
        logits = b * chunk * self.local(s.vocab_size) * (c + _SOFTMAX)
        embed = self.embedding("student", c)
        live = [("final hidden states", b * S * s.hidden_size * c), ("student weights in the compute dtype",
                                                                     self.cast_student())]
        unused = 0
        if teacher is not None:
            layers = max(layers, self.gathered("teacher", tb) + self.forward(t, b, S, tb))
            logits += b * chunk * self.local(t.vocab_size) * (tb + _SOFTMAX)
            embed = max(embed, self.embedding("teacher", tb))
            live[0] = ("final hidden states", live[0][1] + b * S * t.hidden_size * tb)
        else:
            unused = device_bytes(teacher_out.hidden_states)
            if not teacher_out.dense:  # the top-k collapse: a float32 copy of the student's, the membership mask
                logits += b * chunk * self.local(s.vocab_size) * (4 + 1)
        phases = {"embedding lookup": embed, "one layer of the larger model": layers,
                  f"one chunk's logits and float32 softmaxes ({chunk} positions)": logits}
        return unused, 0, phases, live

    def _cross_eval(self, args, kwargs):
        """`cross_eval_sums` (`vishwam.train.cross_eval`): each model's forward on its own tokens, then its labels'
        log-probabilities a chunk of positions at a time, as `_eval`'s passes."""
        _, teacher, batch = args
        c, tb, s, t = self.c, self.tb, self.p.s_config, self.p.t_config
        b, S = self.rows_per_device(batch["input_ids"].shape[0]), batch["input_ids"].shape[1]
        T, chunk = batch["teacher_input_ids"].shape[1], min(kwargs.get("chunk_size") or S, S)
        layers = self.gathered("student", c) + self.forward(s, b, S, c)
        logits = b * chunk * self.local(s.vocab_size) * (c + _SOFTMAX)
        embed = self.embedding("student", c)
        live = [("final hidden states", b * S * s.hidden_size * c),
                ("student weights in the compute dtype", self.cast_student())]
        if teacher is not None:
            layers = max(layers, self.gathered("teacher", tb) + self.forward(t, b, T, tb))
            logits = max(logits, b * min(chunk, T) * self.local(t.vocab_size) * (tb + _SOFTMAX))
            embed = max(embed, self.embedding("teacher", tb))
            live[0] = ("final hidden states", live[0][1] + b * T * t.hidden_size * tb)
        phases = {"embedding lookup": embed, "one layer of the larger model": layers,
                  f"one chunk's logits and float32 softmaxes ({chunk} positions)": logits}
        return 0, 0, phases, live

    def _downstream(self, args, kwargs):
        return self._scoring("student", self.c, args, kwargs)

    def _downstream_teacher(self, args, kwargs):
        return self._scoring("teacher", self.tb, args, kwargs)

    def _scoring(self, model: str, w: int, args, kwargs):
        """`score_rows` (`vishwam.downstream.scoring`): one model's forward over packed requests and, per logit chunk,
        the target's log-probability and the argmax; per row the segments' sums (`[b, S]`, as small as the ids)."""
        batch = args[1]
        _, config = self._model(model)
        b, S = self.rows_per_device(batch["input_ids"].shape[0]), batch["input_ids"].shape[1]
        chunk = min(kwargs.get("chunk_size") or S, S)
        phases = {"embedding lookup": self.embedding(model, w),
                  f"one {model} layer": self.gathered(model, w) + self.forward(config, b, S, w),
                  f"one chunk's logits and float32 softmax ({chunk} positions)":
                      b * chunk * self.local(config.vocab_size) * (w + _SOFTMAX)}
        live = [("final hidden states", b * S * config.hidden_size * w)]
        if model == "student":
            live.append(("student weights in the compute dtype", self.cast_student()))
        return 0, 0, phases, live

    def cast_student(self) -> int:
        """The student's weights cast to the compute dtype, when it is not the parameters' dtype."""
        tr = self.p.cfg.training
        return tree_bytes(self.p.student, self.mesh, tr.compute_dtype)[1] if tr.compute_dtype != tr.param_dtype else 0

    def _eplb_probe(self, args, kwargs):
        student, teacher, ids, _ = args
        streamed = isinstance(teacher, tuple)  # `student_similarity`: the teacher's hidden states are arguments
        tb, pb = self.tb, self.pb
        s, t = self.p.s_config, self.p.t_config
        rows, S = ids.shape
        b = self.rows_per_device(rows)
        n = b * S
        # Rows that do not divide over the batch axes run whole on every device, and XLA keeps the layers' outputs
        # split over their hidden axis as the embedding table is (fsdp); rows that do stay on their devices.
        split = self.mesh.fsdp if b == rows and self.batch_shards > 1 else 1
        hidden = n * (s.num_hidden_layers + 1) * s.hidden_size * pb // split
        layers = self.gathered("student", pb) + self.forward(s, b, S, pb)
        embed = self.embedding("student", pb)
        if not streamed:
            hidden += n * (t.num_hidden_layers + 1) * t.hidden_size * tb // split
            layers = max(layers, self.gathered("teacher", tb) + self.forward(t, b, S, tb))
            embed = max(embed, self.embedding("teacher", tb))
        # The Gram matrices are [tokens, tokens] over the whole probe, their rows on the devices of their tokens.
        grams = (s.num_hidden_layers + 1) * n * rows * S * 4
        phases = {"embedding lookup": embed, "one layer of the larger model": layers,
                  f"CKA: {s.num_hidden_layers} student Gram matrices of {n} × {rows * S} float32 and one teacher's":
                      grams}
        # The embeddings' entry of the teacher's hidden states is never read (CKA compares layer outputs).
        unused = _head_bytes(student) + (device_bytes(teacher[0]) if streamed else _head_bytes(teacher))
        return unused, 0, phases, [("every layer's hidden states", hidden)]

    def _prune_importance(self, args, kwargs):
        t, tb = self.p.t_config, self.tb
        resident = len(args) == 3  # (teacher, ids, valid); streamed: (group, h, cos, sin, mask, valid)
        ids = args[1]
        b, S = self.rows_per_device(ids.shape[0]), ids.shape[1]
        # The activation magnitudes fuse into their token means: nothing of [b, S, mlp] in float32 is kept.
        phases = {"one teacher layer": self.gathered("teacher", tb) + self.forward(t, b, S, tb)}
        if resident:
            phases["embedding lookup"] = self.embedding("teacher", tb)
        return _head_bytes(args[0]) if resident else 0, 0, phases, []

    def _prune_slice(self, args, kwargs):
        return 0, 0, {}, [("one teacher layer gathered", self.gathered("teacher", self.tb)),
                          ("the student's leaves as sliced, before they are placed", self._student_bytes())]

    def _student_bytes(self) -> int:
        return tree_bytes(self.p.student, self.mesh, self.p.cfg.training.param_dtype)[1]

    def _streamed_group(self, args, kwargs):
        h = args[1]
        b, S = self.rows_per_device(h.shape[0]), h.shape[1]
        return 0, 0, {"one teacher layer": self.gathered("teacher", self.tb) + self.forward(
            self.p.t_config, b, S, self.tb)}, []

    def _streamed_head(self, args, kwargs):
        h, t = args[2], self.p.t_config
        b, S = self.rows_per_device(h.shape[0]), h.shape[1]
        head = t.vocab_size * t.hidden_size * self.tb if kwargs.get("whole_weight") is not None else 0
        return 0, 0, {"the final norm in float32": b * S * t.hidden_size * 4,
                      "the LM head gathered whole": head}, []

    def _cross_streamed_head(self, args, kwargs):
        """`head_token_logprobs`: the final norm, then the head and the labels' log-probabilities a chunk at a time."""
        h, t = args[2], self.p.t_config
        b, T = self.rows_per_device(h.shape[0]), h.shape[1]
        chunk = min(kwargs.get("chunk_size") or T, T)
        head = t.vocab_size * t.hidden_size * self.tb if kwargs.get("whole_weight") is not None else 0
        return 0, 0, {"one chunk's logits and float32 softmax": b * chunk * t.vocab_size * (self.tb + _SOFTMAX)}, [
            ("the final norm's output", b * T * t.hidden_size * self.tb), ("the LM head gathered whole", head)]

    def _cache_build(self, args, kwargs):
        _, batch = args
        t, tb = self.p.t_config, self.tb
        b, S = self.rows_per_device(batch["input_ids"].shape[0]), batch["input_ids"].shape[1]
        chunk = min(kwargs.get("chunk_size") or S, S)
        layers = len(kwargs.get("layers", ()))
        phases = {"embedding lookup": self.embedding("teacher", tb),
                  "one teacher layer": self.gathered("teacher", tb) + self.forward(t, b, S, tb),
                  f"one chunk's logits, float32 softmax and top-k ({chunk} positions)":
                      b * chunk * self.local(kwargs["vocab"]) * (tb + _SOFTMAX + 1 + 4 * 2)}  # + top-k's sort
        return 0, 0, phases, [("final and cached hidden states", b * S * t.hidden_size * tb * (1 + layers))]

    def _on_policy_prefill(self, args, kwargs):
        return self._prefill(args, kwargs, "student", self.c)

    def _on_policy_decode(self, args, kwargs):
        return self._decode(args, kwargs, "student", self.c)

    # The samples at each evaluation: the student's in the compute dtype, a resident teacher's in its own.
    _sample_prefill, _sample_decode = _on_policy_prefill, _on_policy_decode

    def _teacher_sample_prefill(self, args, kwargs):
        return self._prefill(args, kwargs, "teacher", self.tb)

    def _teacher_sample_decode(self, args, kwargs):
        return self._decode(args, kwargs, "teacher", self.tb)

    def _prefill(self, args, kwargs, model: str, c: int):
        """`generate`'s prefill over `model`'s prompts (`c` bytes an element)."""
        _, ids, _ = args
        _, s = self._model(model)
        b, P = self.rows_per_device(ids.shape[0]), ids.shape[1]
        cache = 2 * s.num_hidden_layers * b * self.local(s.num_key_value_heads) * kwargs["slots"] * s.head_dim * c
        return 0, 0, {"embedding lookup": self.embedding(model, c),
                      "one layer over the prompt": self.gathered(model, c) + self.forward(s, b, P, c)}, [
            ("the cache as the layers' scan writes it, and its copy before it is placed", 2 * cache)]

    def _decode(self, args, kwargs, model: str, c: int):
        """`generate`'s token loop for `model` (`c` bytes an element)."""
        weights, cache, logits = args[:3]
        _, s = self._model(model)
        b = self.rows_per_device(logits.shape[0])
        cache_bytes = device_bytes(cache)
        slots = cache.k.shape[3]
        step = self.gathered(model, c) + 2 * cache_bytes // s.num_hidden_layers \
            + b * self.local(s.num_attention_heads) * slots * 4 * 2
        # The token loop is one program: what every step reads alike is made once, before it, and lives through it.
        return 0, cache_bytes, {"one layer of one token": step}, [
            ("the embedding table, gathered once for every step's lookup", self.embedding(model, c)),
            ("this device's LM head, laid out once for every step's logits",
             device_bytes(weights.unembedding_weight())),
            ("the cache as the layers' scan writes it", cache_bytes),
            ("the sampling over the vocabulary, float32", b * s.vocab_size * 4 * 4)]


_DTYPE = {n: name for name, n in DTYPE_BYTES.items()}  # bytes -> dtype name


#: Bytes per `[rows, chunk, vocab]` element a logit chunk's softmax math holds beyond the logits themselves, as
#: XLA:TPU compiles it with the hidden states' rows kept on the batch axes: it fuses the float32 upcast and the
#: reductions into the LM head's output (measured at the mid-size config, benchmarks/plan_vs_xla.py).
_SOFTMAX = 2


def _head_bytes(model) -> int:
    """The LM head's bytes on one device, for a program that never reads it (XLA drops the argument)."""
    return 0 if model is None or getattr(model, "lm_head", None) is None else device_bytes(model.lm_head)


__all__ = ["ProgramPlan", "ProgramPlanner", "device_bytes"]
