"""Evaluation against the teacher on `data.eval`: the student's and the teacher's loss, their KL, top-1 agreement.

One jitted program, `eval_sums`, computes a micro-batch's sums; `evaluate` runs it over `training.eval_batches`
batches (each split into micro-batches of the training step's size, so evaluation never holds more logits than
a training micro-batch does), adds the sums on the host and writes `eval.json`:

- `student_loss`, `teacher_loss`: mean next-token NLL over valid tokens (chat data: over the target tokens,
  `loss_mask`), `*_ppl = exp(loss)`;
- `kl`: mean KL(teacher ‖ student) at T = 1. Against a top-k cache it is the KL of the collapsed (top-k + tail)
  distributions, a lower bound of the full KL; the teacher's NLL is exact there (the cache holds the label's
  log-probability), and agreement is with the cached top-1;
- `top1_agreement`: the fraction of tokens where both models' most likely next token is the same.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill.logits import align_vocab, sparse_kd_loss
from distill.objective import TeacherOutputs
from models import CausalLM, cast_floating

from .data import PackedDataset, eval_batches
from .files import atomic_write
from .sharding import global_batch
from .teachers import TeacherSource


def _nll(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def eval_sums(teacher: CausalLM | None, student: CausalLM, batch: dict, teacher_out: TeacherOutputs | None, *,
              compute_dtype) -> dict:
    """Sums over one micro-batch: `student_nll`, `teacher_nll`, `kl`, `agree`, `tokens` (valid tokens).

    The teacher is `teacher` run here (resident) or its precomputed `teacher_out`: full logits (streamed) or
    top-k cache rows."""
    student = cast_floating(student, compute_dtype)
    counted = batch.get("loss_mask", batch["mask"])  # chat data: the target tokens
    mask = counted.astype(jnp.float32)
    segments = batch.get("segment_ids")
    s_logits = student(batch["input_ids"], attention_mask=batch["mask"], segment_ids=segments).logits
    s_logits = s_logits.astype(jnp.float32)
    if teacher_out is None:
        teacher_out = TeacherOutputs(logits=teacher(batch["input_ids"], attention_mask=batch["mask"],
                                                    segment_ids=segments).logits)
    tokens = jnp.sum(mask)
    if teacher_out.dense:
        t_logits = teacher_out.logits.astype(jnp.float32)
        teacher_nll = _nll(t_logits, batch["labels"])
        s, t = align_vocab(s_logits, t_logits)
        s_logp, t_logp = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
        kl = jnp.sum(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * mask)
        t_top1 = jnp.argmax(t, -1)
        s_top1 = jnp.argmax(s, -1)
    else:
        teacher_nll = -teacher_out.label_logprob
        kl_mean, _ = sparse_kd_loss(s_logits, teacher_out.topk_values, teacher_out.topk_indices,
                                    teacher_out.tail_logsumexp, counted, temperature=1.0)
        kl = kl_mean * tokens
        t_top1 = teacher_out.topk_indices[..., 0]
        s_top1 = jnp.argmax(s_logits, -1)
    agree = (s_top1 == t_top1).astype(jnp.float32)
    return {"student_nll": jnp.sum(_nll(s_logits, batch["labels"]) * mask), "teacher_nll": jnp.sum(teacher_nll * mask),
            "kl": kl, "agree": jnp.sum(agree * mask), "tokens": tokens}


def evaluate(student: CausalLM, teacher: TeacherSource, data: PackedDataset, *, step: int, batch_size: int,
             micro_batch_size: int, num_batches: int, compute_dtype, batch_sharding, out_dir: Path | None,
             log: Callable[[str], None]) -> dict:
    """Evaluate `student` against `teacher` on the first `num_batches` batches of `data`; write `eval.json` to
    `out_dir` (process 0) and return the result (see the module docstring)."""
    sums: dict[str, float] = {}
    for batch in eval_batches(data, batch_size, num_batches):
        for start in range(0, batch_size, micro_batch_size):
            micro = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
            t_out = teacher.outputs(micro, "eval")  # a cache reads the rows of micro["window"]
            micro.pop("window")
            out = jax.device_get(eval_sums(teacher.in_step, student, global_batch(micro, batch_sharding), t_out,
                                           compute_dtype=compute_dtype))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
    n = max(sums.get("tokens", 0.0), 1.0)
    result = {"student_loss": sums["student_nll"] / n, "teacher_loss": sums["teacher_nll"] / n, "kl": sums["kl"] / n,
              "top1_agreement": sums["agree"] / n, "step": step}
    result["student_ppl"] = math.exp(min(result["student_loss"], 50.0))
    result["teacher_ppl"] = math.exp(min(result["teacher_loss"], 50.0))
    if out_dir is not None and jax.process_index() == 0:
        atomic_write(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    log(f"eval @ {step}: student loss {result['student_loss']:.4f} (ppl {result['student_ppl']:.2f}), teacher "
        f"{result['teacher_loss']:.4f}, kl {result['kl']:.4f}, top-1 agree {result['top1_agreement']:.3f}")
    return result


__all__ = ["eval_sums", "evaluate"]
