"""Evaluation against the teacher on `data.eval`: the student's and the teacher's loss, their KL, top-1 agreement.

One jitted program, `eval_sums`, computes a micro-batch's sums; `evaluate` runs it over `training.eval_batches`
batches (each split into micro-batches of the training step's size, so evaluation never holds more logits than
a training micro-batch does), adds the sums on the host and writes `eval.json`:

- `student_loss`, `teacher_loss`: mean next-token NLL over valid tokens (chat data: over the target tokens,
  `loss_mask`), `*_ppl = exp(loss)`;
- `kl`: mean KL(teacher ‖ student) at T = 1. Against a top-k cache it is the KL of the collapsed (top-k + tail)
  distributions, a lower bound of the full KL; the teacher's NLL is exact there (the cache holds the label's
  log-probability), and agreement is with the cached top-1;
- `top1_agreement`: the fraction of tokens where both models' most likely next token is the same;
- `student_bpb`, `teacher_bpb`: bits per UTF-8 byte, the summed NLL over the counted tokens divided by `ln 2` times
  the bytes their labels stand for (`byte_lengths`, a per-id table, `vishwam.data.cross.alignment.token_byte_lengths`;
  special tokens are 0 bytes, their NLL still counts). The only figures comparable across tokenizers; absent
  when no table is given (`.npy` data without a tokenizer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill.logits import align_vocab, chunked_map, sparse_kd_tokens
from distill.objective import TeacherOutputs
from models import CausalLM, cast_floating
from vishwam.data.windows import PackedDataset, eval_batches
from vishwam.io.files import atomic_write
from vishwam.sharding import global_batch, rows_sharding
from vishwam.teacher.sources import TeacherSource
from vishwam.tracking import strict_json


def _nll(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _token_stats(s_logits, t_logits, labels):
    """Per token of a dense teacher: the student's and the teacher's NLL, KL(teacher ‖ student), top-1 agreement."""
    s_logits, t_logits = s_logits.astype(jnp.float32), t_logits.astype(jnp.float32)
    teacher_nll = _nll(t_logits, labels)
    s, t = align_vocab(s_logits, t_logits)
    s_logp, t_logp = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    agree = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32)
    return _nll(s_logits, labels), teacher_nll, kl, agree


@functools.partial(jax.jit, static_argnames=("compute_dtype", "chunk_size", "activation_sharding"))
def eval_sums(teacher: CausalLM | None, student: CausalLM, batch: dict, teacher_out: TeacherOutputs | None, *,
              compute_dtype, chunk_size: int | None = None, activation_sharding=None) -> dict:
    """Sums over one micro-batch: `student_nll`, `teacher_nll`, `kl`, `agree`, `tokens` (valid tokens).

    The teacher is `teacher` run here (resident) or its precomputed `teacher_out`: full logits (streamed) or
    top-k cache rows. The logits are made and reduced `chunk_size` positions of every row at a time
    (`distill.logits.chunked_map`, as the training loss does): with a resident teacher both LM heads run inside
    the chunks, so no `[rows, seq, vocab]` array of either model exists; `None` does all positions at once.
    `activation_sharding`: the hidden states' sharding (their rows over the batch axes; see `CausalLM`)."""
    student = cast_floating(student, compute_dtype)
    counted = batch.get("loss_mask", batch["mask"])  # chat data: the target tokens
    mask = counted.astype(jnp.float32)
    segments = batch.get("segment_ids")
    s_hidden = student(batch["input_ids"], attention_mask=batch["mask"], segment_ids=segments,
                       output_logits=False, activation_sharding=activation_sharding).last_hidden
    labels = batch["labels"]
    if teacher_out is None:  # resident: the teacher's final hidden states, its head applied per chunk
        t_hidden = teacher(batch["input_ids"], attention_mask=batch["mask"], segment_ids=segments,
                           output_logits=False, activation_sharding=activation_sharding).last_hidden
        per_token = chunked_map(lambda h, g, y: _token_stats(student.unembed(h), teacher.unembed(g), y),
                                (s_hidden, t_hidden, labels), chunk_size)
    elif teacher_out.dense:
        per_token = chunked_map(lambda h, t, y: _token_stats(student.unembed(h), t, y),
                                (s_hidden, teacher_out.logits, labels), chunk_size)
    else:
        def cached(h, values, indices, tail, label_logprob, y, valid):
            s_logits = student.unembed(h).astype(jnp.float32)
            kl, agree, _ = sparse_kd_tokens(s_logits, values, indices, tail, valid)  # agreement: with the top-1
            return _nll(s_logits, y), -label_logprob, kl, agree

        per_token = chunked_map(cached, (s_hidden, teacher_out.topk_values, teacher_out.topk_indices,
                                         teacher_out.tail_logsumexp, teacher_out.label_logprob, labels,
                                         counted.astype(bool)), chunk_size)
    student_nll, teacher_nll, kl, agree = (jnp.sum(jnp.where(mask > 0, x, 0.0)) for x in per_token)
    return {"student_nll": student_nll, "teacher_nll": teacher_nll, "kl": kl, "agree": agree,
            "tokens": jnp.sum(mask)}


def evaluate(student: CausalLM, teacher: TeacherSource, data: PackedDataset, *, step: int, batch_size: int,
             micro_batch_size: int, num_batches: int, compute_dtype, batch_sharding, out_dir: Path | None,
             log: Callable[[str], None], chunk_size: int | None = None,
             byte_lengths: np.ndarray | None = None) -> dict:
    """Evaluate `student` against `teacher` on the first `num_batches` batches of `data`; write `eval.json` to
    `out_dir` (process 0) and return the result (see the module docstring)."""
    sums: dict[str, float] = {}
    activations = rows_sharding(batch_sharding.mesh, micro_batch_size, 3)
    for batch in eval_batches(data, batch_size, num_batches):
        for start in range(0, batch_size, micro_batch_size):
            micro = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
            t_out = teacher.outputs(micro, "eval")  # a cache reads the rows of micro["window"]
            micro.pop("window")
            if byte_lengths is not None:  # the labels' bytes, on the host
                counted = np.asarray(micro.get("loss_mask", micro["mask"])) != 0
                labels = np.clip(np.asarray(micro["labels"]), 0, len(byte_lengths) - 1)
                sums["bytes"] = sums.get("bytes", 0.0) + float(np.sum(byte_lengths[labels] * counted))
            out = jax.device_get(eval_sums(teacher.in_step, student, global_batch(micro, batch_sharding), t_out,
                                           compute_dtype=compute_dtype, chunk_size=chunk_size,
                                           activation_sharding=activations))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
    n = max(sums.get("tokens", 0.0), 1.0)
    result = {"student_loss": sums["student_nll"] / n, "teacher_loss": sums["teacher_nll"] / n, "kl": sums["kl"] / n,
              "top1_agreement": sums["agree"] / n, "step": step}
    result["student_ppl"] = math.exp(min(result["student_loss"], 50.0))
    result["teacher_ppl"] = math.exp(min(result["teacher_loss"], 50.0))
    if byte_lengths is not None:
        n_bytes = max(sums.get("bytes", 0.0), 1.0)
        result["student_bpb"] = sums["student_nll"] / (math.log(2.0) * n_bytes)
        result["teacher_bpb"] = sums["teacher_nll"] / (math.log(2.0) * n_bytes)
    if out_dir is not None and jax.process_index() == 0:
        atomic_write(out_dir / "eval.json", strict_json(result, indent=2) + "\n")
    log(f"eval @ {step}: student loss {result['student_loss']:.4f} (ppl {result['student_ppl']:.2f}), teacher "
        f"{result['teacher_loss']:.4f}, kl {result['kl']:.4f}, top-1 agree {result['top1_agreement']:.3f}")
    return result


def cross_evaluate(sums_of: Callable[[dict], dict], data, *, step: int, batch_size: int, micro_batch_size: int,
                   num_batches: int, out_dir: Path | None, log: Callable[[str], None]) -> dict:
    """A cross-tokenizer run's evaluation on `data` (a `vishwam.data.cross.windows.CrossDataset`): `sums_of(micro)`
    (`vishwam.train.cross_eval.cross_eval_sums` of a host micro-batch, which it places) added over `num_batches`
    batches.

    `eval.json`: `student_bpb` and `teacher_bpb` (each side's summed NLL over its own label tokens, divided by
    `ln 2` times the bytes those tokens stand for: the figures comparable across tokenizers), `student_loss` and
    `teacher_loss` (per token of each side's own tokenizer: not comparable with each other), `chunk_kl` (ALM's
    binarised KL per counted chunk, the loss's divergence) and `chunk_logp_gap` (mean |log p_c − log q_c| in nats
    over the chunks both windows hold whole), `chunks` (how many were counted)."""
    sums: dict[str, float] = {}
    for batch in eval_batches(data, batch_size, num_batches):
        for start in range(0, batch_size, micro_batch_size):
            micro = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
            for k, v in jax.device_get(sums_of(micro)).items():
                sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
    per = lambda k, n: sums[k] / max(sums[n], 1.0)  # noqa: E731
    result = {"student_loss": per("student_nll", "student_tokens"), "teacher_loss": per("teacher_nll", "teacher_tokens"),
              "student_bpb": per("student_nll", "student_bytes") / math.log(2.0),
              "teacher_bpb": per("teacher_nll", "teacher_bytes") / math.log(2.0),
              "chunk_kl": per("chunk_kl", "chunks"), "chunk_logp_gap": per("chunk_gap", "chunks"),
              "chunks": int(sums["chunks"]), "step": step}
    if out_dir is not None and jax.process_index() == 0:
        atomic_write(out_dir / "eval.json", strict_json(result, indent=2) + "\n")
    log(f"eval @ {step}: student {result['student_bpb']:.4f} bits/byte, teacher {result['teacher_bpb']:.4f}, "
        f"chunk kl {result['chunk_kl']:.4g} over {result['chunks']} chunks")
    return result


__all__ = ["cross_evaluate", "eval_sums", "evaluate"]
