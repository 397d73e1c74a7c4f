"""The cross-tokenizer train step: a teacher and a student with different tokenizers (resident teacher).

The batch is `vishwam.data.cross_windows.CrossWindows.batch`'s: the student's `input_ids`/`labels`/`mask` and
`student_chunk`, the teacher's `teacher_input_ids`/`teacher_labels`/`teacher_mask`/`teacher_input_mask` and
`teacher_chunk`, and per chunk `one_to_one` and `chunk_mask`. The loss is

    alm_weight · ALM + ce_weight · CE + shared_kl_weight · shared-vocabulary KL

(`distill.cross_tokenizer`). The teacher runs inside the step on its own ids, behind `stop_gradient`; the
student's state is a `TrainState` like the same-tokenizer step's, so checkpoints and the optimizer are shared.
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
    alm_loss,
    binarised_kl,
    chunk_logprobs,
    complete_chunks,
    shared_vocab_kl,
    token_logprobs,
)
from distill.logits import cross_entropy_loss
from models import cast_floating
from vishwam.train.step import TrainState, _tree_select


@dataclasses.dataclass(frozen=True)
class CrossStepConfig:
    """What the cross-tokenizer step is traced for (the `distillation_params` knobs it reads)."""

    num_chunks: int
    alm_weight: float = 1.0
    alm_temperature: float = 100.0
    ce_weight: float = 0.0
    shared_kl_weight: float = 0.0
    kd_temperature: float = 1.0
    chunk_size: int | None = None
    compute_dtype: Any = jnp.float32


def cross_loss(student, teacher, batch: dict, shared: tuple[jax.Array, jax.Array] | None,
               cfg: CrossStepConfig) -> tuple[jax.Array, dict]:
    """The weighted cross-tokenizer loss of one batch and its metrics (`loss` and each `distill/...` part)."""
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
        ce, ce_metrics = cross_entropy_loss(s_logits, batch["labels"], batch["mask"], chunk_size=cfg.chunk_size)
        loss, metrics = loss + cfg.ce_weight * ce, {**metrics, **ce_metrics}
    if cfg.shared_kl_weight > 0 and shared is not None:
        kl, kl_metrics = shared_vocab_kl(s_logits, batch["mask"], batch["student_chunk"], t_logits,
                                         batch["teacher_mask"], batch["teacher_chunk"], batch["one_to_one"],
                                         shared[0], shared[1], temperature=cfg.kd_temperature,
                                         chunk_size=cfg.chunk_size)
        loss, metrics = loss + cfg.shared_kl_weight * kl, {**metrics, **kl_metrics}
    return loss, {**metrics, "loss": loss}


def make_cross_train_step(cfg: CrossStepConfig, optimizer: optax.GradientTransformation, schedule=None,
                          state_shardings=None, *, shared=None):
    """The jitted step `(teacher, state, batch, shared) -> (state, metrics)`; `shared` is the shared vocabulary's
    `(student_ids, teacher_ids)` (`vishwam.data.alignment.shared_vocab`) or None. A non-finite loss or gradient
    leaves the parameters untouched and counts the skip, as the same-tokenizer step does."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step_fn(teacher, state: TrainState, batch, teacher_out):
        params, static = eqx.partition(state.student, eqx.is_inexact_array)

        def loss_fn(p):
            return cross_loss(eqx.combine(p, static), teacher, batch, shared, cfg)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.global_norm(grads)
        trainable = (params, None)
        updates, new_opt = optimizer.update((grads, None), state.opt_state, trainable)
        new_params = eqx.apply_updates(trainable, updates)[0]
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        params = _tree_select(ok, new_params, params)
        opt_state = _tree_select(ok, new_opt, state.opt_state)
        new_state = dataclasses.replace(state, step=state.step + 1, student=eqx.combine(params, static),
                                        opt_state=opt_state, nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
                                        skipped=state.skipped + (~ok).astype(jnp.int32))
        lr = schedule(state.step) if schedule is not None else jnp.zeros(())
        return new_state, dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32), lr=lr,
                               nonfinite_run=new_state.nonfinite.astype(jnp.float32))

    return step_fn


@functools.partial(jax.jit, static_argnames=("num_chunks", "alm_temperature", "chunk_size", "compute_dtype"))
def cross_eval_sums(student, teacher, batch, teacher_out, *, num_chunks, alm_temperature, chunk_size, compute_dtype,
                    student_bytes, teacher_bytes):
    """Sums over one micro-batch (unfused, temporary)."""
    s_logits = cast_floating(student, compute_dtype)(batch["input_ids"], attention_mask=batch["mask"]).logits
    t_logits = teacher(batch["teacher_input_ids"], attention_mask=batch["teacher_input_mask"]).logits
    s_lp = token_logprobs(s_logits, batch["labels"], batch["mask"], chunk_size=chunk_size)
    t_lp = token_logprobs(t_logits, batch["teacher_labels"], batch["teacher_mask"], chunk_size=chunk_size)
    sm, tm = batch["mask"] > 0, batch["teacher_mask"] > 0
    ok = complete_chunks(batch["student_chunk"], batch["mask"], batch["teacher_chunk"], batch["teacher_mask"],
                         num_chunks, batch["chunk_mask"])
    q, p = chunk_logprobs(s_lp, batch["student_chunk"], num_chunks), chunk_logprobs(t_lp, batch["teacher_chunk"],
                                                                                   num_chunks)
    kl = binarised_kl(jnp.where(ok, p, -1.0), jnp.where(ok, q, -1.0), alm_temperature)
    f = lambda x, m: jnp.sum(jnp.where(m, x, 0.0))  # noqa: E731
    return {"student_nll": -f(s_lp, sm), "student_tokens": f(1.0, sm),
            "student_bytes": f(student_bytes[batch["labels"]].astype(jnp.float32), sm),
            "teacher_nll": -f(t_lp, tm), "teacher_tokens": f(1.0, tm),
            "teacher_bytes": f(teacher_bytes[batch["teacher_labels"]].astype(jnp.float32), tm),
            "chunk_kl": f(kl, ok), "chunk_gap": f(jnp.abs(p - q), ok), "chunks": f(1.0, ok)}


__all__ = ["CrossStepConfig", "cross_eval_sums", "cross_loss", "make_cross_train_step"]
