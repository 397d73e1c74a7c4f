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

`ObjectiveSpec` is static (hashable: it keys the jit cache); the arrays it needs at run time (projections, the
balancer's running magnitudes) live in the train state and come in as arguments.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .attention import attention_kl_loss, relation_loss
from .eplb import LossBalancer, ProgressiveSchedule, balance
from .features import FeatureProjections, mapped_feature_losses
from .logits import align_vocab, cross_entropy_loss, kd_ce_loss, kd_loss, linear_kd_ce_loss, sparse_kd_loss
from .temperature import TemperatureSchedule, adaptive_temperature

Pairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """Everything static about the objective."""

    kd_weight: float = 1.0
    ce_weight: float = 0.0
    feature_weight: float = 0.0
    attention_weight: float = 0.0
    kd_kind: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature_schedule: str = "constant"  # constant | linear | cosine | adaptive
    temperature_start: float = 2.0
    temperature_end: float = 1.0
    temperature_min: float = 0.5
    temperature_max: float = 4.0
    total_steps: int = 1
    label_smoothing: float = 0.0
    chunk_size: int | None = None
    fused_logit_loss: bool = True  # forward-KL KD + CE through `kd_ce_loss` (closed-form gradient)
    feature_pairs: Pairs = ()
    feature_kind: str = "mse"
    feature_normalize: bool = True
    attention_pairs: Pairs = ()
    attention_kind: str = "kl"  # kl | relation
    head_mapping: str = "group_average"
    relation_heads: int = 8
    eplb: bool = False
    eplb_stages: int = 1
    eplb_stage_steps: int = 0
    eplb_ramp_steps: int = 0
    eplb_balance: bool = True

    @property
    def uses_features(self) -> bool:
        return self.feature_weight > 0 and len(self.feature_pairs) > 0

    @property
    def uses_attention(self) -> bool:
        return self.attention_weight > 0 and len(self.attention_pairs) > 0

    @property
    def needs_teacher_logits(self) -> bool:
        return self.kd_weight > 0 or self.temperature_schedule == "adaptive"

    def schedule(self) -> TemperatureSchedule | None:
        if self.temperature_schedule == "adaptive":
            return None
        return TemperatureSchedule(self.temperature_schedule, self.temperature_start, self.temperature_end,
                                   max(self.total_steps, 1))

    def progressive(self) -> ProgressiveSchedule:
        return ProgressiveSchedule(len(self.feature_pairs), num_stages=self.eplb_stages,
                                   stage_steps=self.eplb_stage_steps, ramp_steps=self.eplb_ramp_steps)

    def fuses_logit_losses(self, dense_teacher: bool) -> bool:
        """Whether KD and CE run as one fused loss (`kd_ce_loss` / `linear_kd_ce_loss`): forward-KL KD against
        the teacher's full logits (`dense_teacher`: not a top-k cache), `fused_logit_loss` on."""
        return bool(self.fused_logit_loss and self.kd_weight > 0 and dense_teacher
                    and (self.kd_kind == "forward_kl" or (self.kd_kind == "jsd" and self.jsd_beta == 0.0)))

    def fuses_lm_head(self, dense_teacher: bool) -> bool:
        """Whether the fused loss also takes the student's LM head (`linear_kd_ce_loss`), so that the student's
        logits are never materialised: when the logits are not needed for anything else (adaptive temperature)."""
        return self.fuses_logit_losses(dense_teacher) and self.temperature_schedule != "adaptive"

    def with_feature_pairs(self, pairs: Pairs) -> "ObjectiveSpec":
        return dataclasses.replace(self, feature_pairs=tuple(tuple(p) for p in pairs))


class TeacherOutputs(eqx.Module):
    """What the objective needs from the teacher for one batch (each None when unused).

    `topk_values/topk_indices/tail_logsumexp` replace `logits` when the teacher runs from a top-k cache.
    """

    logits: Float[Array, "batch seq vocab"] | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    qkv: tuple[tuple[Array, Array, Array], ...] | None = None
    topk_values: Float[Array, "batch seq k"] | None = None
    topk_indices: Int[Array, "batch seq k"] | None = None
    tail_logsumexp: Float[Array, "batch seq"] | None = None

    @property
    def dense(self) -> bool:
        """The teacher's full logits are here (not a top-k cache)."""
        return self.logits is not None and self.topk_values is None


def teacher_outputs(teacher, input_ids, mask, spec: ObjectiveSpec) -> TeacherOutputs:
    """Run a resident teacher for the objective (under stop_gradient: the teacher is never differentiated)."""
    teacher = jax.lax.stop_gradient(teacher)
    out = teacher(input_ids, attention_mask=mask, output_hidden_states=spec.uses_features,
                  output_attentions=spec.uses_attention and spec.attention_kind == "kl",
                  output_qkv=spec.uses_attention and spec.attention_kind == "relation")
    return jax.lax.stop_gradient(TeacherOutputs(logits=out.logits, hidden_states=out.hidden_states,
                                                attentions=out.attentions, qkv=out.qkv))


def distill_loss(
    spec: ObjectiveSpec,
    student_out,
    teacher: TeacherOutputs,
    labels: Int[Array, "batch seq"],
    mask: Array,
    step: Int[Array, ""],
    projections: FeatureProjections | None,
    balancer: LossBalancer | None,
    head_weight: Array | None = None,
):
    """**Returns:** `(loss, metrics, new_balancer)`; metrics are namespaced (`distill/kd`, `distill/ce`,
    `distill/feature/layer_3`, `distill/temperature`, `eplb/...`).

    `student_out.logits` may be None when `spec.fuses_lm_head(teacher.dense)`: the loss then unembeds
    `student_out.last_hidden` with `head_weight` (the student's `unembedding_weight()`) chunk by chunk."""
    if student_out.logits is None and not (spec.fuses_lm_head(teacher.dense) and head_weight is not None):
        raise ValueError("distill_loss needs the student's logits, or its last_hidden and head_weight when the "
                         "objective fuses the LM head (spec.fuses_lm_head)")
    metrics: dict[str, Array] = {}
    zero = jnp.zeros((), jnp.float32)
    s_logits = student_out.logits

    # Temperature: scheduled over training progress, or per token from the two models' confidence.
    if spec.temperature_schedule == "adaptive" and teacher.logits is not None:
        s, t = align_vocab(s_logits, teacher.logits)
        temperature = adaptive_temperature(s, t, base=spec.temperature_start, min_t=spec.temperature_min,
                                           max_t=spec.temperature_max, chunk_size=spec.chunk_size)
        valid = mask.astype(jnp.float32)
        metrics["distill/temperature"] = jnp.sum(temperature * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    else:
        schedule = spec.schedule() or TemperatureSchedule("constant", spec.temperature_start, spec.temperature_start, 1)
        temperature = schedule(step)
        metrics["distill/temperature"] = temperature

    kd = zero
    ce = zero
    fused = spec.fuses_logit_losses(teacher.dense)
    if fused:
        # KD and CE in one pass over the logits, with their closed-form gradient (see `kd_ce_loss`); without the
        # student's logits, through its LM head too (`linear_kd_ce_loss`).
        args = dict(temperature=temperature, kd_weight=spec.kd_weight, ce_weight=spec.ce_weight,
                    label_smoothing=spec.label_smoothing, chunk_size=spec.chunk_size)
        if s_logits is None:
            logit_loss, m = linear_kd_ce_loss(student_out.last_hidden, head_weight, teacher.logits, labels, mask,
                                              **args)
        else:
            logit_loss, m = kd_ce_loss(s_logits, teacher.logits, labels, mask, **args)
        metrics.update(m)
        kd, ce = m["distill/kd"], m.get("distill/ce", zero)
    elif spec.kd_weight > 0:
        if teacher.topk_values is not None:
            kd, m = sparse_kd_loss(s_logits, teacher.topk_values, teacher.topk_indices, teacher.tail_logsumexp, mask,
                                   temperature=temperature, chunk_size=spec.chunk_size)
        else:
            kd, m = kd_loss(s_logits, teacher.logits, mask, temperature=temperature, kind=spec.kd_kind,
                            beta=spec.jsd_beta, chunk_size=spec.chunk_size)
        metrics.update(m)

    if spec.ce_weight > 0 and not fused:
        ce, m = cross_entropy_loss(s_logits, labels, mask, label_smoothing=spec.label_smoothing,
                                   chunk_size=spec.chunk_size)
        metrics.update(m)

    feature = zero
    new_balancer = balancer
    if spec.uses_features:
        pair_losses, m = mapped_feature_losses(
            student_out.hidden_states, teacher.hidden_states, mask, spec.feature_pairs, projections,
            kind=spec.feature_kind, normalize=spec.feature_normalize,
        )
        metrics.update(m)
        if spec.eplb:
            weights = spec.progressive().weights(step)
            if spec.eplb_balance and balancer is not None:
                feature, new_balancer, m = balance(balancer, pair_losses, weights, kd)
                metrics.update(m)
            else:
                feature = jnp.sum(weights * pair_losses) / jnp.maximum(jnp.sum(weights), 1.0)
            for p in range(len(spec.feature_pairs)):
                metrics[f"eplb/stage_weight/pair_{p}"] = weights[p]
        else:
            feature = jnp.mean(pair_losses)
        metrics["distill/feature"] = feature

    attention = zero
    if spec.uses_attention:
        losses = []
        for s_layer, t_layer in spec.attention_pairs:
            prefix = f"distill/attention/layer_{s_layer}"
            if spec.attention_kind == "kl":
                loss, m = attention_kl_loss(student_out.attentions[s_layer], teacher.attentions[t_layer], mask,
                                            head_mapping=spec.head_mapping, prefix=prefix)
            else:
                loss, m = relation_loss(student_out.qkv[s_layer], teacher.qkv[t_layer], mask,
                                        num_relation_heads=spec.relation_heads, prefix=prefix)
            losses.append(loss)
            metrics.update(m)
        attention = jnp.mean(jnp.stack(losses))
        metrics["distill/attention"] = attention

    if not fused:
        logit_loss = spec.kd_weight * kd + spec.ce_weight * ce
    total = logit_loss + spec.feature_weight * feature + spec.attention_weight * attention
    metrics["distill/kd"] = kd
    metrics["distill/ce"] = ce
    metrics["loss"] = total
    return total, metrics, new_balancer
