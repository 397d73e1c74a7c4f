"""The train state, the optimizer, and the jitted distillation step."""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Int

from distill.eplb import LossBalancer
from distill.features import FeatureProjections
from distill.objective import Objective, distill_loss, teacher_outputs
from models import CausalLM, cast_floating
from vishwam.config.sections import RunConfig
from vishwam.generation.on_policy import Rollout
from vishwam.sharding import batch_sharding


class TrainState(eqx.Module):
    """Everything a step changes, as one pytree (checkpointed whole).

    `student` and `projections` are trained; `balancer` holds EPLB's running loss magnitudes; `key` is the run's
    random key (the raw key data; `rng(purpose)` derives a key from it); `mapping` is the current layer mapping,
    the checkpointed record that EPLB re-mapping rewrites and a resumed run reads the objective's pairs back from;
    `nonfinite` counts consecutive skipped steps; `rollout` holds the on-policy rows in use
    (`vishwam.generation.on_policy.Rollout`; None without on-policy distillation).
    """

    step: Int[Array, ""]
    student: CausalLM
    projections: FeatureProjections | None
    balancer: LossBalancer | None
    opt_state: optax.OptState
    key: Array
    mapping: Int[Array, "pairs 2"]
    nonfinite: Int[Array, ""]
    skipped: Int[Array, ""]
    rollout: Rollout | None = None

    @property
    def trainable(self):
        return eqx.filter((self.student, self.projections), eqx.is_inexact_array)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """The layer mapping as host integers."""
        return tuple((int(a), int(b)) for a, b in jax.device_get(self.mapping))

    def rng(self, purpose: int) -> Array:
        """A key for one use (`purpose`, e.g. the step of an EPLB re-mapping) derived from the run's key."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), purpose)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   grad_clip: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay to 10%, global-norm clipping, no decay on vectors."""
    warmup = max(0, min(warmup_steps, total_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else learning_rate, peak_value=learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=learning_rate * 0.1,
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def init_state(student, projections, balancer, optimizer, key, mapping, rollout: Rollout | None = None) -> TrainState:
    trainable = eqx.filter((student, projections), eqx.is_inexact_array)
    return TrainState(
        step=jnp.zeros((), jnp.int32), student=student, projections=projections, balancer=balancer,
        opt_state=optimizer.init(trainable), key=jax.random.key_data(key),
        mapping=jnp.asarray(mapping if len(mapping) else [[0, 0]], jnp.int32).reshape(-1, 2),
        nonfinite=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32), rollout=rollout,
    )


def _tree_select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step is traced for: the objective, the student's compute dtype, micro-batches per step,
    per-layer remat, and the attention implementation of both models (`models.attention`: "auto", "xla",
    "cudnn")."""

    objective: Objective
    compute_dtype: object
    grad_accum_steps: int
    remat: bool
    attention_impl: str = "auto"


def make_train_step(cfg: StepConfig, optimizer: optax.GradientTransformation, schedule, state_shardings=None):
    """The jitted step `(teacher, state, batch, teacher_out) -> (state, metrics)`.

    The batch holds `input_ids`, `labels`, `mask` and, for chat data (`vishwam.data.text.batch_for_step`),
    `segment_ids` (packed rows: both models' attention stays within a row) and `loss_mask` (the losses count
    its positions; without it they count `mask`'s).

    The teacher is an argument that is never differentiated (stop_gradient) and never donated; the state's
    buffers are donated. `teacher_out` carries precomputed teacher outputs (streamed or cached teachers)
    split like the batch; it is None for a resident teacher, which runs inside the step. The batch is split
    into `grad_accum_steps` micro-batches scanned with gradients summed in float32. A non-finite loss or
    gradient norm leaves the parameters and optimizer state untouched and counts the skip.
    """
    objective = cfg.objective
    accum = cfg.grad_accum_steps
    impl = cfg.attention_impl
    # The models' hidden states keep their rows on the batch axes (`CausalLM`'s `activation_sharding`); left to
    # itself XLA took the fsdp-split hidden axis of the embedding table for theirs and ran every row on every
    # device (mid-size step on tpu:v5p-8: temporaries 194 -> 106 MiB with the constraint).
    act = None if state_shardings is None else batch_sharding(jax.tree.leaves(state_shardings)[0].mesh, 3)

    def loss_fn(trainable, static, balancer, step, micro, t_out):
        student, projections = eqx.combine(trainable, static)
        student_c = cast_floating(student, cfg.compute_dtype)
        # With the LM head fused into the loss the student's [batch, seq, vocab] logits are never built.
        fuse_head = objective.fuses_lm_head(t_out.dense)
        out = student_c(micro["input_ids"], attention_mask=micro["mask"], **objective.model_outputs(),
                        remat=cfg.remat, output_logits=not fuse_head, attention_impl=impl,
                        segment_ids=micro.get("segment_ids"), activation_sharding=act)
        # Chat data: the losses count the target tokens (`loss_mask`), attention sees every real one (`mask`).
        loss, metrics, new_balancer = distill_loss(objective, out, t_out, micro["labels"],
                                                   micro.get("loss_mask", micro["mask"]), step, projections, balancer,
                                                   head_weight=student_c.unembedding_weight() if fuse_head else None,
                                                   attention_mask=micro["mask"])
        return loss, (metrics, new_balancer)

    # Every leaf of the teacher, the state and the batch is an array, so plain `jax.jit` takes them as they are,
    # at two thirds of `eqx.filter_jit`'s per-call cost (demo step: 1.5 -> 0.9 ms of Python before it runs). Only
    # the state is donated: no output could reuse the batch's or the teacher outputs' buffers.
    @functools.partial(jax.jit, donate_argnums=(1,))
    def step_fn(teacher, state: TrainState, batch, teacher_out):
        params, static = eqx.partition((state.student, state.projections), eqx.is_inexact_array)
        micro_batches = split_micro_batches(batch, accum)
        micro_teacher = None if teacher_out is None else split_micro_batches(teacher_out, accum)

        def micro_step(carry, inputs):
            micro, t_out = inputs
            if t_out is None:
                t_out = teacher_outputs(teacher, micro["input_ids"], micro["mask"], objective, attention_impl=impl,
                                        activation_sharding=act,
                                        segment_ids=micro.get("segment_ids"))
            balancer = state.balancer if carry is None else carry[1]
            (_, (metrics, balancer)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
                params, static, balancer, state.step, micro, t_out
            )
            metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
            if carry is not None:
                grads_acc, _, metrics_acc = carry
                grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
                metrics = jax.tree.map(lambda a, m: a + m, metrics_acc, metrics)
            return (grads, balancer, metrics), None

        if accum == 1:
            # One micro-batch: no accumulation loop (a while loop around the whole step blocks XLA's scheduling
            # across it and copies the carried gradients), no fp32 gradient buffers.
            only = jax.tree.map(lambda x: x[0], (micro_batches, micro_teacher))
            (grads, balancer, metrics), _ = micro_step(None, only)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            first = jax.tree.map(lambda x: x[0], (micro_batches, micro_teacher))
            if first[1] is None:
                first = (first[0], teacher_outputs(teacher, first[0]["input_ids"], first[0]["mask"], objective,
                                                   activation_sharding=act,
                                                   attention_impl=impl, segment_ids=first[0].get("segment_ids")))
            metric_shapes = eqx.filter_eval_shape(loss_fn, params, static, state.balancer, state.step, *first)[1][0]
            metrics0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
            (grads, balancer, metrics), _ = jax.lax.scan(
                micro_step, (zeros, state.balancer, metrics0), (micro_batches, micro_teacher)
            )
            grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
            metrics = jax.tree.map(lambda m: m / accum, metrics)

        grad_norm = optax.global_norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        params = _tree_select(ok, new_params, params)
        opt_state = _tree_select(ok, new_opt, state.opt_state)
        if balancer is not None:
            balancer = _tree_select(ok, balancer, state.balancer)
        student, projections = eqx.combine(params, static)
        new_state = dataclasses.replace(
            state, step=state.step + 1, student=student, projections=projections, balancer=balancer,
            opt_state=opt_state, nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        if state_shardings is not None:
            new_state = eqx.filter_shard(new_state, state_shardings)
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), skipped=(~ok).astype(jnp.float32),
                       nonfinite_run=new_state.nonfinite.astype(jnp.float32))
        return new_state, metrics

    return step_fn


def split_micro_batches(tree, accum: int):
    """`[batch, ...]` leaves -> `[accum, batch / accum, ...]`: micro-batch `m` is rows `m, m + accum, m + 2·accum,
    ...`. A batch's rows sit on the devices in contiguous blocks, so every device holds its share of every
    micro-batch. (Contiguous rows would put micro-batch `m` on the devices of block `m` alone: each micro-step
    would move its rows, a streamed teacher's logits for the whole step among them, across the mesh.)"""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), tree)


def interleave_micro_batches(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """A host batch of `accum` consecutive micro-batches laid out as the train step reads them: row `i` of
    micro-batch `m` at position `i·accum + m` (`split_micro_batches` takes every `accum`-th row from `m`)."""
    return {k: np.ascontiguousarray(np.swapaxes(v.reshape((accum, v.shape[0] // accum) + v.shape[1:]), 0, 1)
                                    .reshape(v.shape)) for k, v in batch.items()}


def optimizer_of(cfg: RunConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    tr = cfg.training
    return make_optimizer(learning_rate=tr.learning_rate, warmup_steps=tr.warmup_steps, total_steps=tr.max_steps,
                          weight_decay=tr.weight_decay, grad_clip=tr.grad_clip)


__all__ = ["StepConfig", "TrainState", "init_state", "interleave_micro_batches", "make_optimizer", "make_train_step", "optimizer_of",
           "split_micro_batches"]
