"""Logit-level losses: knowledge distillation (dense and top-k sparse) and cross-entropy.

Every loss takes `[batch, seq, vocab]` logits and a `[batch, seq]` mask (bool or 0/1; padding and ignored labels
are 0) and returns `(loss, metrics)`: the loss is an fp32 scalar, the mean over valid tokens
(`sum / max(count, 1)`), and the metrics are fp32 scalars under `distill/...` keys. The math is fp32 whatever the
input dtype, run over sequence chunks (`chunk_size`) so that one chunk's fp32 `[batch, chunk, vocab]` tensors
exist at a time. Tokens whose mask is 0 are replaced by harmless values inside each chunk before any math, so
garbage there (huge, inf or NaN logits, `-100` labels, a zero temperature) changes neither the loss nor the
gradient.

- `chunks`: [`chunked_map`][] and the helpers every loss shares (chunk checks, masked mean, temperatures).
- `dense`: [`kd_loss`][] (forward/reverse KL, JSD, TV), [`linear_kd_loss`][] (the same with the LM head inside)
  and [`align_vocab`][].
- `sparse`: [`teacher_topk`][] (the top-k cache) and [`sparse_kd_loss`][] from it ([`sparse_kd_tokens`][]: per token).
- `ce`: [`cross_entropy_loss`][] with label smoothing.
- `fused`: [`kd_ce_loss`][] and [`linear_kd_ce_loss`][], forward KL + CE with a closed-form gradient.

Imports `models` and `distill.errors` only.
"""

from .ce import cross_entropy_loss
from .chunks import chunked_map
from .dense import KD_KINDS, align_vocab, kd_loss, linear_kd_loss
from .fused import kd_ce_loss, linear_kd_ce_loss
from .sparse import sparse_kd_loss, sparse_kd_tokens, teacher_topk

__all__ = [
    "KD_KINDS",
    "align_vocab",
    "chunked_map",
    "cross_entropy_loss",
    "kd_ce_loss",
    "kd_loss",
    "linear_kd_ce_loss",
    "linear_kd_loss",
    "sparse_kd_loss",
    "sparse_kd_tokens",
    "teacher_topk",
]
