"""Attention-pattern matching between a student and a teacher layer, aware of grouped-query attention.

Two losses:

- `attention_kl_loss`: KL(teacher || student) between per-head attention probabilities (TinyBERT, Jiao et al.,
  2020, matches attention maps; MiniLM, Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation", uses the
  KL form used here). Head counts may differ; see `reduce_teacher_heads` for the correspondence.
- `relation_loss`: MiniLMv2's self-attention relations (Wang et al., 2021, "MiniLMv2: Multi-Head Self-Attention
  Relation Distillation for Compressing Pretrained Transformers"), which needs no head correspondence at all.

Both compute in float32 with the teacher behind `stop_gradient`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .errors import ConfigError

TokenMask = Bool[Array, "batch seq"] | Int[Array, "batch seq"] | Float[Array, "batch seq"]

HEAD_MAPPINGS = ("group_average", "head_wise")
RELATIONS = tuple(a + b for a in "qkv" for b in "qkv")

_EPS = 1e-8


def reduce_teacher_heads(
    teacher_attn: Float[Array, "batch teacher_heads seq seq"], student_heads: int, *, head_mapping: str
) -> Float[Array, "batch student_heads seq seq"]:
    """The teacher's attention distributions, one per student head.

    With `Ht` teacher and `Hs` student heads:

    - `Ht == Hs`: head `j` <-> head `j`.
    - `Ht > Hs` (`Ht % Hs == 0`, `g = Ht / Hs`): the teacher heads are partitioned into `Hs` contiguous groups,
      group `j` = teacher heads `[j*g, (j+1)*g)`.
      - `group_average`: student head `j` matches the mean of its group's distributions (a mean of
        distributions over the same keys is a distribution).
      - `head_wise`: student head `j` matches teacher head `j*g`, the first head of its group.
      GQA: a teacher with `Gt` kv heads groups its query heads contiguously too (query head `h` reads kv head
      `h // (Ht/Gt)`). When `Hs` is a multiple of `Gt`, `g` divides `Ht/Gt`, so every student group lies inside
      one teacher kv group: each student head averages query heads that share keys and values.
    - `Hs > Ht` (`Hs % Ht == 0`, `r = Hs / Ht`): student heads `[i*r, (i+1)*r)` all match teacher head `i`
      (both modes).

    **Arguments:**

    - `teacher_attn`: `[batch, teacher_heads, seq, seq]` attention probabilities.
    - `student_heads`: `Hs`.
    - `head_mapping`: `"group_average"` or `"head_wise"`.

    **Returns:**

    `[batch, student_heads, seq, seq]`. Raises `ConfigError` when neither head count divides the other.
    """
    if head_mapping not in HEAD_MAPPINGS:
        raise ConfigError(
            f"attention loss: unknown head_mapping {head_mapping!r}; expected one of {', '.join(HEAD_MAPPINGS)}"
        )
    b, ht, s, _ = teacher_attn.shape
    hs = student_heads
    if ht == hs:
        return teacher_attn
    if ht > hs and ht % hs == 0:
        g = ht // hs
        if head_mapping == "group_average":
            return jnp.mean(teacher_attn.reshape(b, hs, g, s, s), axis=2)
        return teacher_attn[:, ::g]
    if hs > ht and hs % ht == 0:
        return jnp.repeat(teacher_attn, hs // ht, axis=1)
    raise ConfigError(
        f"attention loss: teacher heads ({ht}) and student heads ({hs}) must divide one another to be matched"
    )


def attention_kl_loss(
    student_attn: Float[Array, "batch student_heads seq seq"],
    teacher_attn: Float[Array, "batch teacher_heads seq seq"],
    mask: TokenMask,
    *,
    head_mapping: str,
    prefix: str = "distill/attention",
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """KL(teacher || student) between attention distributions, averaged over valid query rows and student heads.

    Per student head `j` and valid query row `q`: `sum_k p_t[k] * (log(p_t[k] + eps) - log(p_s[k] + eps))` over
    the valid keys `k` (`eps = 1e-8`), with `p_t` the teacher's distribution for head `j` as defined by
    `reduce_teacher_heads`. The models already give masked keys zero probability, so no renormalisation is done;
    masked keys are excluded from the sum and padded query rows (all-zero rows) from the mean.

    **Arguments:**

    - `student_attn`: `[batch, student_heads, seq, seq]` probabilities (rows over keys).
    - `teacher_attn`: `[batch, teacher_heads, seq, seq]` probabilities.
    - `mask`: `[batch, seq]`, 1 for real tokens (queries and keys).
    - `head_mapping`: `"group_average"` or `"head_wise"` (see `reduce_teacher_heads`).
    - `prefix`: the metrics namespace.

    **Returns:**

    `(loss, {prefix/kl: loss})`; the loss is 0 when no query row is valid.
    """
    if student_attn.shape[0] != teacher_attn.shape[0] or student_attn.shape[2:] != teacher_attn.shape[2:]:
        raise ConfigError(
            f"attention loss: student {student_attn.shape} and teacher {teacher_attn.shape} shapes do not match"
        )
    hs = student_attn.shape[1]
    p_s = student_attn.astype(jnp.float32)
    p_t = reduce_teacher_heads(jax.lax.stop_gradient(teacher_attn.astype(jnp.float32)), hs,
                               head_mapping=head_mapping)
    valid = mask.astype(bool)
    keys = valid[:, None, None, :]
    terms = p_t * (jnp.log(p_t + _EPS) - jnp.log(p_s + _EPS))
    row_kl = jnp.sum(jnp.where(keys, terms, 0.0), axis=-1)  # [b, hs, q]
    loss = _mean_over_rows(row_kl, valid)
    return loss, {f"{prefix}/kl": loss}


def relation_loss(
    student_qkv: tuple[
        Float[Array, "batch student_heads seq student_head_dim"],
        Float[Array, "batch student_kv_heads seq student_head_dim"],
        Float[Array, "batch student_kv_heads seq student_head_dim"],
    ],
    teacher_qkv: tuple[
        Float[Array, "batch teacher_heads seq teacher_head_dim"],
        Float[Array, "batch teacher_kv_heads seq teacher_head_dim"],
        Float[Array, "batch teacher_kv_heads seq teacher_head_dim"],
    ],
    mask: TokenMask,
    *,
    num_relation_heads: int,
    relations: Sequence[str] = ("qq", "kk", "vv"),
    causal: bool = False,
    prefix: str = "distill/relation",
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """MiniLMv2 self-attention relation distillation (Wang et al., 2021, eqs. 5-7).

    For each model and each of `q`, `k`, `v`: with GQA, `k` and `v` are first expanded to one head per query
    head by repeating each kv head `heads / kv_heads` times (query head `h` reads kv head `h // (heads/kv_heads)`,
    as in transformers' `repeat_kv`), so all three are laid out by query head. The heads are concatenated to
    `X [batch, seq, heads*head_dim]` and re-split into `R = num_relation_heads` relation heads of width
    `d_r = heads*head_dim / R`. For a relation `ab` (e.g. `qq`) and relation head `r`:

        rel_ab[r] = softmax(X_a[r] X_b[r]^T / sqrt(d_r))   over valid keys (and earlier keys if `causal`),

    and the loss of the relation is KL(teacher rel || student rel) summed over keys, averaged over valid query
    rows and relation heads. As in the paper the relation losses are summed (`L = L_qq + L_kk + L_vv`). The
    relations are `seq x seq` whatever the widths, so any head counts and head sizes work as long as both
    `heads*head_dim` are divisible by `R`.

    **Arguments:**

    - `student_qkv`, `teacher_qkv`: `(q, k, v)` of one layer, `q [batch, heads, seq, head_dim]`,
      `k`, `v` `[batch, kv_heads, seq, head_dim]` (after RoPE for q and k).
    - `mask`: `[batch, seq]`, 1 for real tokens.
    - `num_relation_heads`: `R`.
    - `relations`: which relations, two letters from `q`, `k`, `v` each; MiniLMv2 uses `qq`, `kk`, `vv`.
    - `causal`: also restrict each query row to keys at or before it (off in the paper, which is bidirectional).
    - `prefix`: the metrics namespace.

    **Returns:**

    `(loss, metrics)` with `metrics[prefix/ab]` the loss of each relation `ab`.
    """
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise ConfigError(f"relation loss: num_relation_heads must be a positive int, got {num_relation_heads!r}")
    if len(relations) == 0:
        raise ConfigError("relation loss: relations is empty")
    for rel in relations:
        if rel not in RELATIONS:
            raise ConfigError(f"relation loss: unknown relation {rel!r}; expected two letters of q, k, v")
    if len(set(relations)) != len(relations):
        raise ConfigError(f"relation loss: relations {tuple(relations)} repeat an entry")
    s_x = _relation_inputs(student_qkv, num_relation_heads, "student")
    t_x = _relation_inputs(teacher_qkv, num_relation_heads, "teacher")
    if s_x["q"].shape[:3] != t_x["q"].shape[:3] or s_x["q"].shape[2] != mask.shape[1]:
        raise ConfigError(
            f"relation loss: batch/seq of student {s_x['q'].shape[0], s_x['q'].shape[2]}, teacher "
            f"{t_x['q'].shape[0], t_x['q'].shape[2]} and mask {mask.shape} do not match"
        )
    valid = mask.astype(bool)
    seq = mask.shape[1]
    allowed = jnp.broadcast_to(valid[:, None, None, :], (mask.shape[0], 1, seq, seq))
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((seq, seq), bool))[None, None]

    total, metrics = jnp.zeros((), jnp.float32), {}
    for rel in relations:
        a, b = rel
        log_s = _log_relation(s_x[a], s_x[b], allowed)
        log_t = jax.lax.stop_gradient(_log_relation(t_x[a], t_x[b], allowed))
        terms = jnp.where(allowed, jnp.exp(log_t) * (log_t - log_s), 0.0)
        loss = _mean_over_rows(jnp.sum(terms, axis=-1), valid)
        metrics[f"{prefix}/{rel}"] = loss
        total = total + loss
    return total, metrics


def _relation_inputs(
    qkv: tuple[Array, Array, Array], num_relation_heads: int, side: str
) -> dict[str, Float[Array, "batch rel_heads seq rel_dim"]]:
    # q, k, v laid out by query head, concatenated, re-split into relation heads; float32.
    q, k, v = qkv
    b, h, s, d = q.shape
    g = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (s, d) or g < 1 or h % g != 0:
        raise ConfigError(
            f"relation loss: {side} q {q.shape}, k {k.shape}, v {v.shape} are not a GQA triple "
            "(heads must be a multiple of kv_heads)"
        )
    width = h * d
    if width % num_relation_heads != 0:
        raise ConfigError(
            f"relation loss: {side} heads*head_dim = {h}*{d} = {width} is not divisible by "
            f"num_relation_heads={num_relation_heads}"
        )
    dr = width // num_relation_heads

    def split(x):
        x = jnp.repeat(x, h // x.shape[1], axis=1)  # [b, h, s, d], query-head layout
        x = x.transpose(0, 2, 1, 3).reshape(b, s, num_relation_heads, dr)
        return x.transpose(0, 2, 1, 3).astype(jnp.float32)

    return {"q": split(q), "k": split(k), "v": split(v)}


def _log_relation(
    xa: Float[Array, "batch rel_heads seq rel_dim"],
    xb: Float[Array, "batch rel_heads seq rel_dim"],
    allowed: Bool[Array, "batch 1 seq seq"],
) -> Float[Array, "batch rel_heads seq seq"]:
    scores = jnp.einsum("brqd,brkd->brqk", xa, xb) / math.sqrt(xa.shape[-1])
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.log_softmax(scores, axis=-1)


def _mean_over_rows(row_values: Float[Array, "batch heads seq"], valid: Bool[Array, "batch seq"]) -> Float[Array, ""]:
    # Mean over heads and valid query rows; every head has the same valid rows, so this is also the mean over
    # heads of the per-head means.
    heads = row_values.shape[1]
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32) * heads
    return jnp.sum(jnp.where(valid[:, None, :], row_values, 0.0)) / count
