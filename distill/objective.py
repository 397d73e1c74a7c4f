"""The one distillation objective:

    loss = kd_weight · KD + ce_weight · CE + feature_weight · F + attention_weight · A

- KD: a logit loss (`distill.logits.kd_loss`: forward/reverse KL · T², JSD(β), TV) at the scheduled or adaptive
  temperature; against a top-k teacher cache it is `sparse_kd_loss` (tail mass accounted for).
- CE: label-smoothed cross-entropy on the hard next-token labels.
- F: feature matching over the mapped layer pairs (`distill.features`), each pair through its projection;
  with EPLB the per-pair losses are switched on progressively and balanced (`distill.eplb.balance`),
  otherwise averaged.
- A: attention-pattern KL (GQA-aware teacher-head grouping) or MiniLMv2 q/k/v relations over the attention
  pairs, averaged.

With on-policy distillation (`on_policy.fraction` > 0) the last `on_policy_rows` rows of each micro-batch are
the student's own completions of prompts: the loss there is the generalised JSD(β) between the teacher's and
the student's token distributions at T = 1 over the completion tokens (GKD), and the loss above is taken on the
other rows; the two are weighted by their shares of the rows.

`Objective` is built from the `distillation_params` config section as it is (`Objective.build`); it is static
(hashable: it keys the jit cache), and the arrays it needs at run time (projections, the balancer's running
magnitudes) live in the train state and come in as arguments.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .attention import attention_kl_loss, relation_loss
from .config import DistillationParams
from .eplb import LossBalancer, ProgressiveSchedule, balance
from .features import FeatureProjections, mapped_feature_losses
from .logits import (align_vocab, cross_entropy_loss, kd_ce_loss, kd_loss, linear_kd_ce_loss, linear_kd_loss,
                     sparse_kd_loss)
from .mapping import attention_pairs, layer_mapping
from .temperature import TemperatureSchedule, adaptive_temperature

Pairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Objective:
    """The objective of a run: the `distillation_params` config section as it is, plus what it resolves to for a
    pair of models (the layer pairs) and a run length (the temperature schedule's horizon).

    Static and hashable (it keys the jit cache); the arrays the objective needs at run time (projections, the
    balancer's running magnitudes) live in the train state and come in as arguments. The loss weights, kinds and
    settings are read from `params` where they are used, never copied into fields of their own.

    **Fields:**

    - `params`: the `DistillationParams` section (validated when it was built).
    - `feature_pairs`: the layer mapping, `(student_layer, teacher_layer)` pairs shallow to deep. It is the
        static copy of `TrainState.mapping` (the checkpointed one, which EPLB re-mapping rewrites): the loss
        indexes hidden states by these layer numbers, so they must be known when the step is traced.
    - `attention_pairs`: the pairs whose attention is matched.
    - `total_steps`: the run length (`training.max_steps`), over which the temperature schedule runs.
    - `on_policy_rows`: how many rows at the end of each micro-batch are on-policy (the student's completions);
        0 without on-policy distillation.
    """

    params: DistillationParams = dataclasses.field(default_factory=DistillationParams)
    feature_pairs: Pairs = ()
    attention_pairs: Pairs = ()
    total_steps: int = 1
    on_policy_rows: int = 0

    @classmethod
    def build(cls, params: DistillationParams, *, student_layers: int, teacher_layers: int,
              total_steps: int, micro_batch_size: int = 1) -> "Objective":
        """The objective of `params` for a student and a teacher of these depths: the layer mapping of
        `params.layer_mapping` and the attention pairs (`distill.mapping.attention_pairs`), checked against the
        depths; with EPLB on, the stage settings checked too; with on-policy distillation, its rows per
        micro-batch of `micro_batch_size` rows (`on_policy_rows`, `OnPolicyConfig.rows`)."""
        lm = params.layer_mapping
        pairs = layer_mapping(lm.strategy, student_layers=student_layers, teacher_layers=teacher_layers, k=lm.k,
                              pairs=lm.pairs or None)
        attention = attention_pairs(pairs, params.attention_layers, strategy=lm.strategy, k=lm.k,
                                    student_layers=student_layers, teacher_layers=teacher_layers)
        rows = params.on_policy.rows(micro_batch_size)
        objective = cls(params, tuple(pairs), tuple(attention), total_steps, rows)
        if objective.uses_eplb:
            objective.progressive()  # raises ConfigError for impossible stage settings, before anything runs
        return objective

    @property
    def uses_features(self) -> bool:
        return self.params.feature_weight > 0 and len(self.feature_pairs) > 0

    @property
    def uses_attention(self) -> bool:
        return self.params.attention_weight > 0 and len(self.attention_pairs) > 0

    @property
    def uses_eplb(self) -> bool:
        """EPLB stages, balances and re-maps the feature pairs, so it is on only when feature matching is."""
        return self.params.eplb.enabled and self.uses_features

    @property
    def eplb_stages(self) -> int:
        """The number of EPLB stages: `eplb.num_stages`, but never more than there are mapped pairs (each stage
        switches on at least one pair, so with fewer pairs than stages every pair is a stage of its own)."""
        return min(self.params.eplb.num_stages, len(self.feature_pairs))

    @property
    def balances(self) -> bool:
        """Whether EPLB's loss balancer runs (and a `LossBalancer` is part of the train state)."""
        return self.uses_eplb and self.params.eplb.balance

    @property
    def adaptive_temperature(self) -> bool:
        return self.params.temperature.schedule == "adaptive"

    @property
    def needs_teacher_logits(self) -> bool:
        return self.params.kd_weight > 0 or self.adaptive_temperature or self.on_policy_rows > 0

    def model_outputs(self) -> dict[str, bool]:
        """The keyword arguments that make a model (student or teacher) return what this objective reads."""
        attention = self.uses_attention
        return dict(output_hidden_states=self.uses_features,
                    output_attentions=attention and self.params.attention_loss == "kl",
                    output_qkv=attention and self.params.attention_loss == "relation")

    def teacher_model_outputs(self) -> dict:
        """`model_outputs` for the teacher, narrowed to the layers the losses read: the hidden states of the
        feature pairs' teacher layers (`hidden_states[t + 1]`) and the attention maps (or q/k/v) of the attention
        pairs' teacher layers, so the teacher's forward never holds the other layers' (`models.run_layers`)."""
        o = self.model_outputs()
        attention = tuple(sorted({t for _, t in self.attention_pairs}))
        return dict(output_hidden_states=tuple(sorted({t + 1 for _, t in self.feature_pairs}))
                    if o["output_hidden_states"] else False,
                    output_attentions=attention if o["output_attentions"] else False,
                    output_qkv=attention if o["output_qkv"] else False)

    def schedule(self) -> TemperatureSchedule:
        """The KD temperature over steps; with the adaptive schedule, the constant `start` it falls back to when
        there are no teacher logits to adapt to."""
        t = self.params.temperature
        if self.adaptive_temperature:
            return TemperatureSchedule("constant", t.start, t.start, 1)
        return TemperatureSchedule(t.schedule, t.start, t.end, max(self.total_steps, 1))

    def progressive(self) -> ProgressiveSchedule:
        e = self.params.eplb
        return ProgressiveSchedule(len(self.feature_pairs), num_stages=self.eplb_stages, stage_steps=e.stage_steps,
                                   ramp_steps=e.ramp_steps)

    def fuses_logit_losses(self, dense_teacher: bool) -> bool:
        """Whether KD and CE run as one fused loss (`kd_ce_loss` / `linear_kd_ce_loss`): forward-KL KD against
        the teacher's full logits (`dense_teacher`: not a top-k cache), `fused_logit_loss` on."""
        p = self.params
        forward_kl = p.kd_loss == "forward_kl" or (p.kd_loss == "jsd" and p.jsd_beta == 0.0)
        return bool(p.fused_logit_loss and p.kd_weight > 0 and dense_teacher and forward_kl)

    def fuses_lm_head(self, dense_teacher: bool) -> bool:
        """Whether the fused loss also takes the student's LM head (`linear_kd_ce_loss`), so that the student's
        logits are never materialised: when the logits are not needed for anything else (adaptive temperature)."""
        return self.fuses_logit_losses(dense_teacher) and not self.adaptive_temperature

    def with_feature_pairs(self, pairs: Pairs) -> "Objective":
        return dataclasses.replace(self, feature_pairs=tuple(tuple(map(int, p)) for p in pairs))


class TeacherOutputs(eqx.Module):
    """What the objective needs from the teacher for one batch (each None when unused).

    `topk_values/topk_indices/tail_logsumexp` replace `logits` when the teacher runs from a top-k cache, which
    also holds the teacher's log-probability of each label (`label_logprob`, for evaluation).
    """

    logits: Float[Array, "batch seq vocab"] | None = None
    hidden_states: tuple[Array | None, ...] | None = None
    attentions: tuple[Array | None, ...] | None = None
    qkv: tuple[tuple[Array, Array, Array] | None, ...] | None = None
    topk_values: Float[Array, "batch seq k"] | None = None
    topk_indices: Int[Array, "batch seq k"] | None = None
    tail_logsumexp: Float[Array, "batch seq"] | None = None
    label_logprob: Float[Array, "batch seq"] | None = None

    @property
    def dense(self) -> bool:
        """The teacher's full logits are here (not a top-k cache)."""
        return self.logits is not None and self.topk_values is None


def teacher_outputs(teacher, input_ids, mask, objective: Objective, **call) -> TeacherOutputs:
    """Run a teacher for the objective (under stop_gradient: the teacher is never differentiated); `call` goes to
    the teacher's `__call__` (e.g. `attention_impl`, `segment_ids`)."""
    teacher = jax.lax.stop_gradient(teacher)
    out = teacher(input_ids, attention_mask=mask, **objective.teacher_model_outputs(), **call)
    return jax.lax.stop_gradient(TeacherOutputs(logits=out.logits, hidden_states=out.hidden_states,
                                                attentions=out.attentions, qkv=out.qkv))


def distill_loss(
    objective: Objective,
    student_out,
    teacher: TeacherOutputs,
    labels: Int[Array, "batch seq"],
    mask: Array,
    step: Int[Array, ""],
    projections: FeatureProjections | None,
    balancer: LossBalancer | None,
    head_weight: Array | None = None,
    attention_mask: Array | None = None,
):
    """**Returns:** `(loss, metrics, new_balancer)`; metrics are namespaced (`distill/kd`, `distill/ce`,
    `distill/feature/layer_3`, `distill/temperature`, `eplb/...`; with on-policy rows `on_policy/loss`,
    `on_policy/top1_agreement` and `off_policy/loss`).

    `mask` is where the KD, CE and feature losses count (1 at the positions whose labels are targets);
    `attention_mask` (default `mask`) is the models' key validity, over which the attention losses average their
    query rows and keys: with chat data the losses count the assistant tokens, while attention patterns are
    matched at every real token.

    `student_out.logits` may be None when `objective.fuses_lm_head(teacher.dense)`: the loss then unembeds
    `student_out.last_hidden` with `head_weight` (the student's `unembedding_weight()`) chunk by chunk.

    With `objective.on_policy_rows` = m > 0, the last m rows are on-policy: their loss is the generalised
    JSD(`on_policy.beta`) at T = 1 over `mask`'s tokens (the student's completion), the rest of the objective
    is taken on the other rows (none of it on the on-policy rows), and the loss is the row-weighted mean of the
    two."""
    if student_out.logits is None and not (objective.fuses_lm_head(teacher.dense) and head_weight is not None):
        raise ValueError("distill_loss needs the student's logits, or its last_hidden and head_weight when the "
                         "objective fuses the LM head (Objective.fuses_lm_head)")
    m = objective.on_policy_rows
    if m == 0:
        return _data_loss(objective, student_out, teacher, labels, mask, step, projections, balancer, head_weight,
                          attention_mask)
    rows = labels.shape[0]
    if m > rows:
        raise ValueError(f"the objective has {m} on-policy rows per micro-batch, the batch {rows} rows")
    off = rows - m
    head, tail = (lambda x: x[:off]), (lambda x: x[off:])
    metrics: dict[str, Array] = {}
    data_loss, new_balancer = jnp.zeros((), jnp.float32), balancer
    if off:
        data_loss, metrics, new_balancer = _data_loss(
            objective, jax.tree.map(head, student_out), jax.tree.map(head, teacher), labels[:off], mask[:off], step,
            projections, balancer, head_weight, None if attention_mask is None else attention_mask[:off])
        metrics["off_policy/loss"] = data_loss
    s_on, t_logits = jax.tree.map(tail, student_out), teacher.logits[off:]
    args = dict(temperature=1.0, kind="jsd", beta=objective.params.on_policy.beta,
                chunk_size=objective.params.logit_chunk_size)
    if s_on.logits is None:
        gkd, m_on = linear_kd_loss(s_on.last_hidden, head_weight, t_logits, mask[off:], **args)
    else:
        gkd, m_on = kd_loss(s_on.logits, t_logits, mask[off:], **args)
    metrics["on_policy/loss"] = gkd
    metrics["on_policy/top1_agreement"] = m_on["distill/top1_agreement"]
    metrics["loss"] = (off * data_loss + m * gkd) / rows
    return metrics["loss"], metrics, new_balancer


def _data_loss(
    objective: Objective,
    student_out,
    teacher: TeacherOutputs,
    labels: Int[Array, "batch seq"],
    mask: Array,
    step: Int[Array, ""],
    projections: FeatureProjections | None,
    balancer: LossBalancer | None,
    head_weight: Array | None = None,
    attention_mask: Array | None = None,
):
    """The objective on data rows (`distill_loss` without on-policy rows)."""
    p = objective.params
    metrics: dict[str, Array] = {}
    zero = jnp.zeros((), jnp.float32)
    s_logits = student_out.logits

    # Temperature: scheduled over training progress, or per token from the two models' confidence.
    if objective.adaptive_temperature and teacher.logits is not None:
        s, t = align_vocab(s_logits, teacher.logits)
        temperature = adaptive_temperature(s, t, base=p.temperature.start, min_t=p.temperature.min,
                                           max_t=p.temperature.max, chunk_size=p.logit_chunk_size)
        valid = mask.astype(jnp.float32)
        metrics["distill/temperature"] = jnp.sum(temperature * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    else:
        temperature = objective.schedule()(step)
        metrics["distill/temperature"] = temperature

    kd = zero
    ce = zero
    fused = objective.fuses_logit_losses(teacher.dense)
    if fused:
        # KD and CE in one pass over the logits, with their closed-form gradient (see `kd_ce_loss`); without the
        # student's logits, through its LM head too (`linear_kd_ce_loss`).
        args = dict(temperature=temperature, kd_weight=p.kd_weight, ce_weight=p.ce_weight,
                    label_smoothing=p.label_smoothing, chunk_size=p.logit_chunk_size)
        if s_logits is None:
            logit_loss, m = linear_kd_ce_loss(student_out.last_hidden, head_weight, teacher.logits, labels, mask,
                                              **args)
        else:
            logit_loss, m = kd_ce_loss(s_logits, teacher.logits, labels, mask, **args)
        metrics.update(m)
        kd, ce = m["distill/kd"], m.get("distill/ce", zero)
    elif p.kd_weight > 0:
        if teacher.topk_values is not None:
            kd, m = sparse_kd_loss(s_logits, teacher.topk_values, teacher.topk_indices, teacher.tail_logsumexp, mask,
                                   temperature=temperature, chunk_size=p.logit_chunk_size)
        else:
            kd, m = kd_loss(s_logits, teacher.logits, mask, temperature=temperature, kind=p.kd_loss,
                            beta=p.jsd_beta, chunk_size=p.logit_chunk_size)
        metrics.update(m)

    if p.ce_weight > 0 and not fused:
        ce, m = cross_entropy_loss(s_logits, labels, mask, label_smoothing=p.label_smoothing,
                                   chunk_size=p.logit_chunk_size)
        metrics.update(m)

    feature = zero
    new_balancer = balancer
    if objective.uses_features:
        pair_losses, m = mapped_feature_losses(
            student_out.hidden_states, teacher.hidden_states, mask, objective.feature_pairs, projections,
            kind=p.feature_loss, normalize=p.feature_normalize,
        )
        metrics.update(m)
        if objective.uses_eplb:
            weights = objective.progressive().weights(step)
            if objective.balances and balancer is not None:
                feature, new_balancer, m = balance(balancer, pair_losses, weights, kd)
                metrics.update(m)
            else:
                feature = jnp.sum(weights * pair_losses) / jnp.maximum(jnp.sum(weights), 1.0)
            for i in range(len(objective.feature_pairs)):
                metrics[f"eplb/stage_weight/pair_{i}"] = weights[i]
        else:
            feature = jnp.mean(pair_losses)
        metrics["distill/feature"] = feature

    attention = zero
    if objective.uses_attention:
        valid = mask if attention_mask is None else attention_mask
        losses = []
        for s_layer, t_layer in objective.attention_pairs:
            prefix = f"distill/attention/layer_{s_layer}"
            if p.attention_loss == "kl":
                loss, m = attention_kl_loss(student_out.attentions[s_layer], teacher.attentions[t_layer], valid,
                                            head_mapping=p.attention_head_mapping, prefix=prefix)
            else:
                loss, m = relation_loss(student_out.qkv[s_layer], teacher.qkv[t_layer], valid,
                                        num_relation_heads=p.relation_heads, prefix=prefix)
            losses.append(loss)
            metrics.update(m)
        attention = jnp.mean(jnp.stack(losses))
        metrics["distill/attention"] = attention

    if not fused:
        logit_loss = p.kd_weight * kd + p.ce_weight * ce
    total = logit_loss + p.feature_weight * feature + p.attention_weight * attention
    metrics["distill/kd"] = kd
    metrics["distill/ce"] = ce
    metrics["loss"] = total
    return total, metrics, new_balancer


__all__ = ["Objective", "TeacherOutputs", "distill_loss", "teacher_outputs"]
