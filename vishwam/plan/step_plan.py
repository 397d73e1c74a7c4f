"""The train step's activations per device, as phases: what lives through the step, and the largest of what exists
at once while the teacher runs, while the loss runs over its chunks, and while the student's layers run backward.

Per micro-batch per device (`b` sequences of `S` tokens, `c` the compute dtype's bytes; heads, MLP width and
vocabulary divided by `tensor` where the rules shard them):

- living through the step: the student's weights cast to the compute dtype (sharded);
- saved by the student's forward for its backward: each layer's input, `(L+1)·b·S·D·c`, and without
  `training.remat` each layer's weight-matmul outputs (q, k, v, o, gate, up, down: the models' checkpoint policy
  saves these alone and recomputes the attention scores and elementwise work); attention maps or q/k/v returned
  for an attention loss;
- the teacher (resident: it runs in each micro-step, never differentiated): one layer's weights gathered by fsdp
  and its forward working set as XLA:TPU fuses it, while its outputs are written;
- the loss: the teacher's outputs (logits in the teacher dtype, the mapped layers' hidden states; for a streamed
  teacher the whole step's, an argument of the step; for a cached one its top-k rows and float32 hidden states),
  one chunk's logits (`distillation_params.logit_chunk_size`) and what their softmaxes keep for the backward:
  `[b, chunk, V]` twice in `c` and three times in float32. With the LM head fused into the loss the student's
  logits are never whole: the head gathered by fsdp, its float32 gradient (split like the head) and the hidden
  states' gradient instead; otherwise the logits and their gradient, whole, in `c`. Feature matching: two float32
  `[b, S, teacher_hidden]` arrays per mapped pair (the projected student, the normalised teacher);
- the backward through one student layer: its forward recomputed and its cotangents (matmul inputs and outputs
  twice), the largest causal block's scores and probabilities (`3·4 + c` bytes each, `models.causal_blocks`) for
  the values and the cotangents, the layer's weights gathered by fsdp, and the micro-batch's gradient being made
  (the float32 accumulator it is added to lives through the step: `vishwam.plan.planner`).

The peak is what lives through the step plus the largest phase (the loss and the backward both also hold what the
forward saved). Set against XLA:TPU's compiled steps by `benchmarks/plan_vs_xla.py` (`docs/scale.md`, "Memory at the
flagship's size").
"""

from __future__ import annotations

from models import ModelConfig, causal_blocks
from vishwam.config import specs
from vishwam.plan.shapes import (
    DTYPE_BYTES,
    axis_shards,
    gathered_layer_bytes,
    layer_forward_bytes,
    tree_bytes,
)


def step_activations(planner, setup) -> tuple[int, tuple[tuple[str, int], ...], int]:
    """`(peak activation bytes, parts, teacher outputs' bytes)` of one micro-batch on one device; `planner`: a
    `vishwam.plan.planner.Planner`, `setup`: its `Setup`. The parts are the peak's: what lives through, then the
    largest phase's own parts, labelled with its name (`teacher`, `loss` or `backward`)."""
    cfg, t_cfg, s_cfg, objective = planner.cfg, planner.t_config, planner.s_config, planner.objective
    tr, mesh, b, S = cfg.training, setup.mesh, setup.micro_per_device, setup.seq_len
    c, tb = DTYPE_BYTES[tr.compute_dtype], DTYPE_BYTES[cfg.distillation.teacher_model.dtype]

    def local(logical: str, size: int) -> int:
        return size // axis_shards(logical, size, mesh)

    def widths(m: ModelConfig):
        return (local("heads", m.num_attention_heads) * m.head_dim,
                local("kv_heads", m.num_key_value_heads) * m.head_dim, local("mlp", m.intermediate_size))

    def scores(m: ModelConfig, per_elem: int, block: bool = False) -> int:  # block: the largest causal block
        queries = -(-S // causal_blocks(S)) if block else S
        return b * local("heads", m.num_attention_heads) * queries * S * per_elem

    L, D = s_cfg.num_hidden_layers, s_cfg.hidden_size
    q, kv, f = widths(s_cfg)
    outputs, attention_pairs = objective.model_outputs(), objective.attention_pairs
    attn_kl, attn_rel = outputs["output_attentions"], outputs["output_qkv"]
    qkv = lambda m, nbytes: b * S * (widths(m)[0] + 2 * widths(m)[1]) * nbytes  # noqa: E731

    saved = (L + 1) * b * S * D * c
    if not setup.remat:
        saved += L * b * S * c * (q + 2 * kv + 2 * D + 2 * f)
    if attn_kl:
        saved += L * scores(s_cfg, 4)
    if attn_rel:
        saved += L * qkv(s_cfg, c)
    cast = tree_bytes(planner.student, mesh, tr.compute_dtype)[1] if tr.compute_dtype != tr.param_dtype else 0

    # The teacher's outputs: per micro-batch when the teacher runs in the step, for the whole step otherwise.
    rows = b if setup.loading == "resident" else b * setup.grad_accum_steps
    cross = specs.cross_tokenizer(cfg)
    T = specs.teacher_seq_len(cfg) if cross else S  # the teacher's tokens a row
    chunk = min(objective.params.logit_chunk_size or S, S)
    t_vocab = local("vocab", t_cfg.vocab_size)
    if cross:  # its log-probability of each label; with the shared KL, its last hidden state too
        teacher_out = rows * T * 4
        if specs.shared_kl_weight(cfg) > 0 and setup.loading == "resident":
            teacher_out += b * T * t_cfg.hidden_size * tb
    elif setup.loading == "cached":
        teacher_out = rows * S * (8 * cfg.distillation.teacher_model.top_k + 8)  # top-k values, ids, tail, label
        if objective.uses_features:  # the mapped layers' hidden states, as the cache holds them: float32
            teacher_out += len({t for _, t in objective.feature_pairs}) * rows * S * t_cfg.hidden_size * 4
    else:
        teacher_out = rows * S * t_vocab * tb if objective.needs_teacher_logits else 0
        t_hidden, t_attention = (len({t for _, t in p}) for p in (objective.feature_pairs, attention_pairs))
        if objective.uses_features:  # the mapped layers' alone (`Objective.teacher_model_outputs`)
            teacher_out += t_hidden * rows * S * t_cfg.hidden_size * tb
        if attn_kl:
            teacher_out += t_attention * scores(t_cfg, 4) * (rows // b)
        if attn_rel:
            teacher_out += t_attention * qkv(t_cfg, tb) * (rows // b)

    vocab = local("vocab", s_cfg.vocab_size)
    softmax = b * chunk * vocab * (2 * c + 3 * 4)
    if cross or objective.fuses_lm_head(dense_teacher=setup.loading != "cached"):
        head = vocab * D * c * (mesh.fsdp > 1) + vocab * local("embed", D) * 4 + b * S * D * c
        logit_label = f"LM head in the loss, {chunk}-token chunks"
    else:
        head = 2 * b * S * vocab * c
        logit_label = f"logits + gradient, softmax in {chunk}-token chunks"
    features = 2 * len(objective.feature_pairs) * b * S * t_cfg.hidden_size * 4 if objective.uses_features else 0

    t_layer = 0
    if setup.loading == "resident":
        shares = (local(a, n) for a, n in (("heads", t_cfg.num_attention_heads),
                                           ("kv_heads", t_cfg.num_key_value_heads), ("mlp", t_cfg.intermediate_size)))
        t_layer = gathered_layer_bytes(planner.teacher, t_cfg, mesh, cfg.distillation.teacher_model.dtype) \
            + layer_forward_bytes(t_cfg, b, T, tb, *shares)
        if cross:  # then its head over its last hidden state, a chunk of positions at a time
            t_head = b * T * t_cfg.hidden_size * tb + t_vocab * t_cfg.hidden_size * tb * (mesh.fsdp > 1) \
                + b * chunk * t_vocab * (tb + 2 * 4)
            t_layer = max(t_layer, t_head)
    layer_set = b * S * c * (6 * D + 3 * (q + kv) + 3 * f)
    backward = 2 * layer_set + 2 * scores(s_cfg, 3 * 4 + c, block=True) + scores(s_cfg, 1, block=True) // max(
        1, local("heads", s_cfg.num_attention_heads)) \
        + gathered_layer_bytes(planner.student, s_cfg, mesh, tr.compute_dtype)

    param = tr.param_dtype
    grads = tree_bytes(planner.student, mesh, param)[1] + (
        tree_bytes(planner.projections, mesh, param)[1] if planner.projections is not None else 0)

    saved_label = f"saved ({'layer inputs' if setup.remat else 'layer inputs, matmul outputs'})"
    teacher_label = f"teacher outputs ({setup.loading})"
    phases = {  # short names: the labels are prefixed with the peak's and printed in the plan's table
        "teacher": [(teacher_label, teacher_out), ("one teacher layer, gathered, running", t_layer)],
        "loss": [(saved_label, saved), (teacher_label, teacher_out), (logit_label, softmax + head),
                 *([(f"feature matching ({len(objective.feature_pairs)} pairs, fp32)", features)] if features else [])],
        "backward": [(saved_label, saved), ("one layer recomputed + cotangents", backward),
                     (f"the micro-batch's gradient ({param})", grads)],
    }
    if setup.loading != "resident":
        del phases["teacher"]
    peak = max(phases, key=lambda k: sum(n for _, n in phases[k]))
    parts = [("student weights in the compute dtype", cast)] if cast else []
    parts += [(f"{peak}: {label}", n) for label, n in phases[peak]]
    return sum(n for _, n in parts), tuple(parts), teacher_out
