"""Evaluation of a cross-tokenizer run: one jitted program, `cross_eval_sums`, over one micro-batch of
`vishwam.data.cross.windows.CrossWindows.batch`'s arrays.

Each side is scored on its own tokens of the same text: its summed NLL over its counted labels, their count, and
the UTF-8 bytes those labels stand for (a per-id table, `vishwam.data.cross.alignment.token_byte_lengths`), so that bits
per byte (`nll / (ln 2 · bytes)`, `distill.cross_tokenizer.bits_per_byte`) compare the two models across
tokenizers. Over the counted chunks (`distill.cross_tokenizer.complete_chunks`), the sum of ALM's binarised KL at
`alm_temperature` and of `|log p_c - log q_c|`. Both LM heads run a sequence chunk at a time
(`distill.cross_tokenizer.linear_token_logprobs`), as in the train step: no `[batch, seq, vocab]` tensor exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from distill.cross_tokenizer import alm_divergence, linear_token_logprobs
from models import CausalLM, cast_floating

SUMS = ("student_nll", "student_tokens", "student_bytes", "teacher_nll", "teacher_tokens", "teacher_bytes",
        "chunk_kl", "chunk_gap", "chunks")


def _token_logp(model: CausalLM, ids, input_mask, labels, mask, chunk_size, activation_sharding):
    hidden = model(ids, attention_mask=input_mask, output_logits=False,
                   activation_sharding=activation_sharding).last_hidden
    return linear_token_logprobs(hidden, model.unembedding_weight(), labels, mask, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("num_chunks", "alm_temperature", "chunk_size", "compute_dtype",
                                             "activation_sharding"))
def cross_eval_sums(student: CausalLM, teacher: CausalLM | None, batch: dict, *, num_chunks: int,
                    alm_temperature: float, chunk_size: int | None, compute_dtype, student_bytes: Int[Array, " s_vocab"],
                    teacher_bytes: Int[Array, " t_vocab"], activation_sharding=None) -> dict:
    """float32 sums over one micro-batch (`SUMS`):

    - `student_nll`, `student_tokens`, `student_bytes`: the student's NLL in nats over its counted labels
      (`loss_mask`, else `mask`: chat rows count each side's assistant tokens), their count, and
      `student_bytes[label]` summed over them;
    - `teacher_nll`, `teacher_tokens`, `teacher_bytes`: the same for the teacher over its labels
      (`teacher_loss_mask`, else `teacher_mask`);
    - `chunk_kl`, `chunk_gap`, `chunks`: over the counted chunks, ALM's binarised KL at `alm_temperature`, `|log p_c
      - log q_c|` (nats), and their count.

    The student runs in `compute_dtype`, the teacher in its own. `teacher` may be None when `batch` carries a
    streamed teacher's `teacher_token_logp` (`StreamedTeacher.cross_outputs`). `activation_sharding`: the hidden
    states' rows over the batch axes (see `CausalLM`).
    """
    student = cast_floating(student, compute_dtype)
    s_mask, t_mask = batch["mask"].astype(bool), batch["teacher_mask"].astype(bool)
    s_logp = _token_logp(student, batch["input_ids"], batch["mask"], batch["labels"], s_mask, chunk_size,
                         activation_sharding)
    if teacher is None:
        t_logp = jnp.where(t_mask, batch["teacher_token_logp"].astype(jnp.float32), 0.0)
    else:
        t_logp = _token_logp(teacher, batch["teacher_input_ids"], batch["teacher_input_mask"],
                             batch["teacher_labels"], t_mask, chunk_size, activation_sharding)
    div, gap, ok = alm_divergence(s_logp, s_mask, batch["student_chunk"], t_logp, t_mask, batch["teacher_chunk"],
                                  num_chunks=num_chunks, temperature=alm_temperature, chunk_mask=batch["chunk_mask"])

    def side(logp, labels, mask, table):
        n_bytes = jnp.where(mask, jnp.take(table, jnp.where(mask, labels, 0)), 0)
        return -jnp.sum(logp), jnp.sum(mask.astype(jnp.float32)), jnp.sum(n_bytes.astype(jnp.float32))

    s_count = s_mask & batch.get("loss_mask", s_mask).astype(bool)
    t_count = t_mask & batch.get("teacher_loss_mask", t_mask).astype(bool)
    values = (*side(jnp.where(s_count, s_logp, 0.0), batch["labels"], s_count, student_bytes),
              *side(jnp.where(t_count, t_logp, 0.0), batch["teacher_labels"], t_count, teacher_bytes),
              jnp.sum(div), jnp.sum(gap), jnp.sum(ok.astype(jnp.float32)))
    return {k: v.astype(jnp.float32) for k, v in zip(SUMS, values)}


__all__ = ["SUMS", "cross_eval_sums"]
