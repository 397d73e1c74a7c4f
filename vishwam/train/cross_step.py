"""The cross-tokenizer train step: a teacher and a student with different tokenizers.

The batch is `vishwam.data.cross.windows.CrossWindows.batch`'s: the student's `input_ids`/`labels`/`mask`/
`loss_mask` and `student_chunk` `[batch, S]`, the teacher's `teacher_input_ids`/`teacher_labels`/`teacher_mask`/
`teacher_loss_mask`/`teacher_input_mask` and `teacher_chunk` `[batch, T]`, and per chunk `one_to_one` and
`chunk_mask` `[batch, S + 1]`. `mask` is the student's attention mask, `loss_mask` its CE labels (chat rows: its
assistant tokens; text: every label); a batch without `loss_mask` counts every label of `mask`.
The loss is

    alm_weight · ALM + ce_weight · CE + shared_kl_weight · shared-vocabulary KL

(`distill.cross_tokenizer`), each part a sum over the whole step's batch divided by the whole batch's count (of
counted chunks, labels, shared positions), so that `grad_accum_steps` micro-batches give the gradient of one big
batch. Both models' LM heads run inside the losses one sequence chunk at a time (`logit_chunk_size`): neither the
student's `[batch, S, V_s]` nor the teacher's `[batch, T, V_t]` logits exist whole.

The step is `vishwam.train.step.make_train_step`'s sibling: the same calling convention, state, donation,
shardings, non-finite skip and metrics. [`cross_loss`][] is the same loss on whole logits, the reference the tests
hold the step to.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from distill.cross_tokenizer import (
    alm_divergence,
    alm_loss,
    check_alm_temperature,
    complete_chunks,
    linear_shared_vocab_kl,
    linear_token_logprobs,
    shared_positions,
    shared_vocab_kl,
)
from distill.logits import cross_entropy_loss
from models import cast_floating
from vishwam.config import specs
from vishwam.config.sections import RunConfig
from vishwam.errors import ConfigError
from vishwam.sharding import batch_sharding
from vishwam.train.step import TrainState, _tree_select, split_micro_batches

TEACHER_LOADINGS = ("resident", "streamed", "cached")


@dataclasses.dataclass(frozen=True)
class CrossStepConfig:
    """What the cross-tokenizer step is traced for: the `distillation_params` knobs it reads, the student's compute
    dtype, micro-batches per step, per-layer remat, both models' attention implementation, and how the teacher's
    outputs arrive (`resident`: the teacher runs in the step; `streamed`: its per-token log-probabilities are an
    argument, `StreamedTeacher.cross_outputs`)."""

    num_chunks: int
    alm_weight: float = 1.0
    alm_temperature: float = 100.0
    ce_weight: float = 0.0
    shared_kl_weight: float = 0.0
    kd_temperature: float = 1.0
    chunk_size: int | None = None
    compute_dtype: Any = jnp.float32
    grad_accum_steps: int = 1
    remat: bool = False
    attention_impl: str = "auto"
    teacher_loading: str = "resident"


def cross_step_config(cfg: RunConfig) -> CrossStepConfig:
    """A cross-tokenizer run's step config (`num_chunks`: `training.seq_len + 1`, as `CrossWindows` makes them)."""
    dp, tr = cfg.distillation_params, cfg.training
    return CrossStepConfig(num_chunks=tr.seq_len + 1, alm_weight=dp.alm_weight, alm_temperature=dp.alm_temperature,
                           ce_weight=dp.ce_weight, shared_kl_weight=specs.shared_kl_weight(cfg),
                           kd_temperature=dp.temperature.start, chunk_size=dp.logit_chunk_size,
                           compute_dtype=specs.DTYPES[tr.compute_dtype], grad_accum_steps=tr.grad_accum_steps,
                           remat=tr.remat, teacher_loading=cfg.distillation.teacher_model.loading)


def cross_loss(student, teacher, batch: dict, shared: tuple[jax.Array, jax.Array] | None,
               cfg: CrossStepConfig) -> tuple[jax.Array, dict]:
    """The weighted cross-tokenizer loss of one batch on whole logits, and its metrics (`loss` and each
    `distill/...` part): the reference of the fused step (small models only: both sides' logits exist whole)."""
    student_c = cast_floating(student, cfg.compute_dtype)
    s_logits = student_c(batch["input_ids"], attention_mask=batch["mask"]).logits
    t_logits = jax.lax.stop_gradient(
        teacher(batch["teacher_input_ids"], attention_mask=batch["teacher_input_mask"]).logits)
    loss, metrics = alm_loss(s_logits, batch["labels"], batch["mask"], batch["student_chunk"], t_logits,
                             batch["teacher_labels"], batch["teacher_mask"], batch["teacher_chunk"],
                             num_chunks=cfg.num_chunks, temperature=cfg.alm_temperature,
                             chunk_mask=batch["chunk_mask"], chunk_size=cfg.chunk_size)
    loss = cfg.alm_weight * loss
    if cfg.ce_weight > 0:
        ce, ce_metrics = cross_entropy_loss(s_logits, batch["labels"], loss_mask(batch), chunk_size=cfg.chunk_size)
        loss, metrics = loss + cfg.ce_weight * ce, {**metrics, **ce_metrics}
    if cfg.shared_kl_weight > 0:
        kl, kl_metrics = shared_vocab_kl(s_logits, batch["mask"], batch["student_chunk"], t_logits,
                                         batch["teacher_mask"], batch["teacher_chunk"], batch["one_to_one"],
                                         shared[0], shared[1], temperature=cfg.kd_temperature,
                                         chunk_size=cfg.chunk_size)
        loss, metrics = loss + cfg.shared_kl_weight * kl, {**metrics, **kl_metrics}
    return loss, {**metrics, "loss": loss}


def _check(cfg: CrossStepConfig, shared) -> None:
    check_alm_temperature(cfg.alm_temperature)
    if cfg.teacher_loading not in TEACHER_LOADINGS:
        raise ConfigError(f"config key 'distillation.teacher_model.loading' is {cfg.teacher_loading!r}: a "
                          f"cross-tokenizer step takes a teacher that is {' or '.join(TEACHER_LOADINGS)}")
    if cfg.shared_kl_weight > 0 and cfg.teacher_loading != "resident":
        raise ConfigError("config key 'distillation_params.shared_kl_weight' > 0 needs the teacher's hidden states "
                          f"inside the step: set it to 0 with a {cfg.teacher_loading} teacher, or make the teacher "
                          "resident")
    if cfg.shared_kl_weight > 0 and shared is None:
        raise ConfigError("config key 'distillation_params.shared_kl_weight' > 0 needs the shared vocabulary "
                          "(vishwam.data.cross.alignment.shared_vocab)")


def loss_mask(batch: dict) -> jax.Array:
    """The student's CE labels: `loss_mask`, else every label of `mask`."""
    return batch.get("loss_mask", batch["mask"])


def batch_counts(batch: dict, num_chunks: int, shared: bool) -> dict:
    """The whole step's counts the loss parts are divided by (float32): counted chunks, the student's counted
    labels, and (with `shared`) the shared-vocabulary positions."""
    ok = complete_chunks(batch["student_chunk"], batch["mask"], batch["teacher_chunk"], batch["teacher_mask"],
                         num_chunks, batch["chunk_mask"])
    count = lambda x: jnp.sum(x.astype(jnp.float32))
    out = {"chunks": count(ok), "tokens": count(loss_mask(batch).astype(bool))}
    if shared:
        out["shared"] = count(shared_positions(batch["mask"], batch["student_chunk"], batch["teacher_mask"],
                                               batch["teacher_chunk"], batch["one_to_one"])[0])
    return out


def make_cross_train_step(cfg: CrossStepConfig, optimizer: optax.GradientTransformation, schedule,
                          state_shardings=None, shared: tuple[jax.Array, jax.Array] | None = None):
    """The jitted step `(teacher, state, batch, teacher_out) -> (state, metrics)`, as `make_train_step`'s.

    `teacher_out` is None for a resident teacher (it runs in the step on `teacher_input_ids`, behind
    `stop_gradient`), else `{"teacher_token_logp": float32 [batch, T]}`, a streamed teacher's log-probability of
    each of its labels (`StreamedTeacher.cross_outputs`). `shared`: the shared vocabulary's `(student_ids,
    teacher_ids)` (`vishwam.data.cross.alignment.shared_vocab`), needed with `shared_kl_weight > 0` (a resident teacher
    only: a `ConfigError` names the key otherwise).

    The batch is split into `grad_accum_steps` micro-batches (`split_micro_batches`) scanned with gradients summed
    in float32; each part of the loss is divided by the whole batch's count, so the step's gradient is the one big
    batch's. The state is donated and constrained to `state_shardings`; the models' hidden states keep their rows
    on the batch axes. A non-finite loss or gradient norm leaves the parameters and optimizer state untouched and
    counts the skip. Metrics: `loss`, `distill/alm`, `distill/chunk_logp_gap`, `distill/chunks` (counted chunks'
    fraction), with CE `distill/ce` and `distill/accuracy`, with the shared KL `distill/shared_kl` and
    `distill/shared_positions`; `grad_norm`, `lr`, `skipped`, `nonfinite_run`.
    """
    _check(cfg, shared)
    accum, impl, chunk = cfg.grad_accum_steps, cfg.attention_impl, cfg.chunk_size
    use_shared = cfg.shared_kl_weight > 0
    act = None if state_shardings is None else batch_sharding(jax.tree.leaves(state_shardings)[0].mesh, 3)

    def teacher_side(teacher, micro, t_out):
        """The teacher's per-token log-probabilities (and, for the shared KL, its last hidden state and head)."""
        if t_out is not None:
            return {"logp": t_out["teacher_token_logp"]}
        teacher = jax.lax.stop_gradient(teacher)
        hidden = teacher(micro["teacher_input_ids"], attention_mask=micro["teacher_input_mask"], output_logits=False,
                         attention_impl=impl, activation_sharding=act).last_hidden
        weight = teacher.unembedding_weight()
        side = {"logp": linear_token_logprobs(hidden, weight, micro["teacher_labels"], micro["teacher_mask"],
                                              chunk_size=chunk)}
        if use_shared:
            side.update(hidden=hidden, weight=weight)
        return jax.lax.stop_gradient(side)

    def loss_fn(params, static, micro, side, counts):
        student = cast_floating(eqx.combine(params, static)[0], cfg.compute_dtype)
        hidden = student(micro["input_ids"], attention_mask=micro["mask"], remat=cfg.remat, output_logits=False,
                         attention_impl=impl, activation_sharding=act).last_hidden
        weight = student.unembedding_weight()
        s_logp = linear_token_logprobs(hidden, weight, micro["labels"], micro["mask"], chunk_size=chunk,
                                       top1=cfg.ce_weight > 0)
        if cfg.ce_weight > 0:
            s_logp, correct = s_logp
        div, gap, _ = alm_divergence(s_logp, micro["mask"], micro["student_chunk"], side["logp"],
                                     micro["teacher_mask"], micro["teacher_chunk"], num_chunks=cfg.num_chunks,
                                     temperature=cfg.alm_temperature, chunk_mask=micro["chunk_mask"])
        per = lambda x, n: jnp.sum(x) / jnp.maximum(counts[n], 1.0)
        alm = per(div, "chunks")
        loss = cfg.alm_weight * alm
        metrics = {"distill/alm": alm, "distill/chunk_logp_gap": jax.lax.stop_gradient(per(gap, "chunks"))}
        if cfg.ce_weight > 0:
            counted = loss_mask(micro).astype(bool)
            ce = per(jnp.where(counted, -s_logp, 0.0), "tokens")
            loss = loss + cfg.ce_weight * ce
            metrics.update({"distill/ce": ce, "distill/accuracy": per(jnp.where(counted, correct, 0), "tokens")})
        if use_shared:
            use, j = shared_positions(micro["mask"], micro["student_chunk"], micro["teacher_mask"],
                                      micro["teacher_chunk"], micro["one_to_one"])
            kl = per(linear_shared_vocab_kl(hidden, weight, side["hidden"], side["weight"], use, j, *shared,
                                            temperature=cfg.kd_temperature, chunk_size=chunk), "shared")
            loss = loss + cfg.shared_kl_weight * kl
            metrics["distill/shared_kl"] = kl
        return loss, {**metrics, "loss": loss}

    # Plain `jax.jit` as `make_train_step`'s (every leaf is an array); only the state is donated.
    @functools.partial(jax.jit, donate_argnums=(1,))
    def step_fn(teacher, state: TrainState, batch, teacher_out):
        params, static = eqx.partition((state.student, state.projections), eqx.is_inexact_array)
        counts = batch_counts(batch, cfg.num_chunks, use_shared)
        micro_batches = split_micro_batches(batch, accum)
        micro_teacher = None if teacher_out is None else split_micro_batches(teacher_out, accum)

        def micro_step(carry, inputs):
            micro, t_out = inputs
            side = teacher_side(teacher, micro, t_out)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, static, micro, side, counts)
            metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
            if carry is not None:  # the parts are shares of the batch's means: summed, not averaged
                grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[0], grads)
                metrics = jax.tree.map(lambda a, m: a + m, carry[1], metrics)
            return (grads, metrics), None

        if accum == 1:  # no accumulation loop, no float32 gradient buffers (as make_train_step)
            (grads, metrics), _ = micro_step(None, jax.tree.map(lambda x: x[0], (micro_batches, micro_teacher)))
        else:
            first = jax.tree.map(lambda x: x[0], (micro_batches, micro_teacher))
            side = jax.eval_shape(teacher_side, teacher, *first)
            shapes = jax.eval_shape(loss_fn, params, static, first[0], side, counts)[1]
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            metrics0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
            (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, metrics0), (micro_batches, micro_teacher))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

        grad_norm = optax.global_norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        params = _tree_select(ok, new_params, params)
        opt_state = _tree_select(ok, new_opt, state.opt_state)
        new_state = dataclasses.replace(state, step=state.step + 1, student=eqx.combine(params, static)[0],
                                        opt_state=opt_state, nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
                                        skipped=state.skipped + (~ok).astype(jnp.int32))
        if state_shardings is not None:
            new_state = eqx.filter_shard(new_state, state_shardings)
        metrics["distill/chunks"] = counts["chunks"] / (batch["chunk_mask"].size)
        if use_shared:
            positions = jnp.sum(batch["mask"].astype(bool).astype(jnp.float32))
            metrics["distill/shared_positions"] = counts["shared"] / jnp.maximum(positions, 1.0)
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), skipped=(~ok).astype(jnp.float32),
                       nonfinite_run=new_state.nonfinite.astype(jnp.float32))
        return new_state, metrics

    return step_fn


__all__ = ["CrossStepConfig", "batch_counts", "cross_loss", "cross_step_config", "make_cross_train_step"]
