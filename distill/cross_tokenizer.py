"""Cross-tokenizer distillation: a teacher and a student with different tokenizers, compared chunk by chunk.

The host cuts each row's text into *chunks*, the coarsest segmentation both tokenizations share (a boundary
wherever both have a token boundary at the same byte; `vishwam.data.cross.alignment`), and gives every label position of
each side the id of its label token's chunk. Everything here is then a per-token pass over each side's logits
(chunked over the sequence like `distill.logits`) followed by `segment_sum`s over those ids: no
`[batch, tokens, chunks]` matrix exists.

- [`chunk_logprobs`][]: each model's log-likelihood of each chunk, the sum of its tokens' log-probabilities
  ([`token_logprobs`][] from logits; [`linear_token_logprobs`][] from the last hidden state and the LM head, one
  chunk's logits at a time, so no `[batch, seq, vocab]` tensor exists at a 128k or 152k vocabulary).
- [`alm_loss`][]: Approximate Likelihood Matching (Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation
  via Approximate Likelihood Matching"), the binarised divergence between the two chunk likelihoods
  ([`alm_divergence`][]: per chunk, from the per-token log-probabilities).
- [`shared_vocab_kl`][]: forward KL on the shared vocabulary (tokens whose strings are equal on both sides) at the
  chunks that are one token on each side, the exact-match part of GOLD / KDFlow ([`linear_shared_vocab_kl`][]:
  per position, with both LM heads inside, at [`shared_positions`][]).

Label-position convention (as `distill.logits`): position `i` of a side holds the logits that predict `labels[i]`;
`chunk[i]` is the chunk of `labels[i]`, `mask[i]` nonzero where that label counts. A chunk counts only where every
token of it is a counted label on both sides (a chunk cut by a window edge, or holding a prompt token, does not),
and where the host's `chunk_mask` allows it. Chunk ids outside `0 .. num_chunks-1` (padding) are dropped.

Imports `distill.logits` and `distill.errors` only.
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Shaped

from .errors import ConfigError
from .logits.chunks import (
    _as_valid,
    _check_chunk_size,
    _masked_mean,
    _token_temperature,
    chunked_map,
)
from .logits.dense import _kd_tokens
from .logits.fused import _first_argmax

Metrics = dict[str, Float[Array, ""]]


# --------------------------------------------------------------------------------------------------- likelihoods


def _logp_tokens(x, y, v, top1: bool = False):
    """Per token: `log softmax(x)[y]` in fp32, 0 where `v` is False (and, with `top1`, whether the argmax is `y`)."""
    x = jnp.where(v[..., None], x.astype(jnp.float32), 0.0)
    y = jnp.where(v, y, 0)
    logp = jnp.take_along_axis(x, y[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(x, axis=-1)
    logp = jnp.where(v, logp, 0.0)
    if not top1:
        return logp
    return logp, ((_first_argmax(x) == y) & v).astype(jnp.float32)


def token_logprobs(
    logits: Float[Array, "batch seq vocab"],
    labels: Int[Array, "batch seq"],
    mask: Shaped[Array, "batch seq"],
    *,
    chunk_size: int | None = None,
) -> Float[Array, "batch seq"]:
    """`log softmax(logits)[label]` per position in fp32 (0 where `mask` is 0), `chunk_size` positions at a time."""
    _check_chunk_size(chunk_size)
    return chunked_map(_logp_tokens, (logits, labels, _as_valid(mask)), chunk_size)


def linear_token_logprobs(
    hidden: Float[Array, "batch seq embed"],
    weight: Float[Array, "vocab embed"],
    labels: Int[Array, "batch seq"],
    mask: Shaped[Array, "batch seq"],
    *,
    chunk_size: int | None = None,
    top1: bool = False,
) -> Float[Array, "batch seq"] | tuple[Float[Array, "batch seq"], Float[Array, "batch seq"]]:
    """[`token_logprobs`][] of the logits `hidden @ weight.T`, the LM head applied one chunk at a time.

    Each chunk's logits are computed (in `hidden`'s dtype, as `CausalLM.unembed`) inside the chunk's
    `jax.checkpoint`, so neither pass holds a whole `[batch, seq, vocab]` tensor; the head's gradient is summed
    over the chunks by autodiff of the chunk loop (as `distill.logits.linear_kd_loss`). `hidden` is a model's
    `CausalLM(..., output_logits=False).last_hidden`, `weight` its `unembedding_weight()`. With `top1`, also
    whether each counted position's argmax is its label (1.0 or 0.0; no gradient).
    """
    _check_chunk_size(chunk_size)

    def tokens(h, y, v):
        return _logp_tokens(jnp.einsum("bsd,vd->bsv", h, weight.astype(h.dtype)), y, v, top1)

    out = chunked_map(tokens, (hidden, labels, _as_valid(mask)), chunk_size)
    return (out[0], jax.lax.stop_gradient(out[1])) if top1 else out


def _segment_sum(values: Array, ids: Array, num_chunks: int) -> Array:
    """Per-row `segment_sum` `[batch, seq] -> [batch, num_chunks]`; ids outside the range are dropped."""
    return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_chunks))(values, ids)


def chunk_logprobs(
    token_logp: Float[Array, "batch seq"], chunk: Int[Array, "batch seq"], num_chunks: int
) -> Float[Array, "batch chunks"]:
    """Each chunk's log-likelihood, the sum of its tokens' log-probabilities (so the chunks of a row telescope to
    the row's log-likelihood)."""
    return _segment_sum(token_logp, chunk, num_chunks)


def complete_chunks(
    student_chunk: Int[Array, "batch s_seq"],
    student_mask: Shaped[Array, "batch s_seq"],
    teacher_chunk: Int[Array, "batch t_seq"],
    teacher_mask: Shaped[Array, "batch t_seq"],
    num_chunks: int,
    chunk_mask: Bool[Array, "batch chunks"] | None = None,
) -> Bool[Array, "batch chunks"]:
    """The chunks that count: at least one token on each side, and every token of them a counted label."""
    ok = jnp.ones(student_chunk.shape[:1] + (num_chunks,), bool) if chunk_mask is None else chunk_mask.astype(bool)
    for chunk, mask in ((student_chunk, student_mask), (teacher_chunk, teacher_mask)):
        valid = _as_valid(mask)
        total = _segment_sum(jnp.ones(chunk.shape, jnp.int32), chunk, num_chunks)
        counted = _segment_sum(valid.astype(jnp.int32), chunk, num_chunks)
        ok = ok & (total > 0) & (counted == total)
    return ok


# --------------------------------------------------------------------------------------------------- ALM


def _log1mexp(x: Array) -> Array:
    """`log(1 - exp(x))` for `x < 0`, accurate on both sides of `log ½` (Mächler 2012)."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def binarised_kl(log_p: Array, log_q: Array, temperature: float | Array, epsilon: float = 1e-6) -> Array:
    """`KL(Bern(p^(1/τ)) || Bern(q^(1/τ)))` from log-likelihoods `log p` (teacher) and `log q` (student).

    ALM's binarised divergence: a chunk's likelihood `p` is read as the probability of a coin (the chunk happens or
    not), raised to `1/τ` so that long chunks' tiny likelihoods stay comparable, and the two coins are compared by
    KL. tokenkit's `binary_ce` is this plus the teacher coin's entropy, a constant for the student; the KL form
    is 0, and its gradient 0, where the likelihoods are equal. `epsilon` keeps `log1mexp` finite at `p = 1`.
    """
    a = jnp.minimum(log_p, 0.0) / temperature - epsilon
    b = jnp.minimum(log_q, 0.0) / temperature - epsilon
    return jnp.exp(a) * (a - b) + (-jnp.expm1(a)) * (_log1mexp(a) - _log1mexp(b))


def alm_loss(
    student_logits: Float[Array, "batch s_seq s_vocab"],
    student_labels: Int[Array, "batch s_seq"],
    student_mask: Shaped[Array, "batch s_seq"],
    student_chunk: Int[Array, "batch s_seq"],
    teacher_logits: Float[Array, "batch t_seq t_vocab"] | None,
    teacher_labels: Int[Array, "batch t_seq"],
    teacher_mask: Shaped[Array, "batch t_seq"],
    teacher_chunk: Int[Array, "batch t_seq"],
    *,
    num_chunks: int,
    temperature: float = 100.0,
    chunk_mask: Bool[Array, "batch chunks"] | None = None,
    chunk_size: int | None = None,
    teacher_token_logp: Float[Array, "batch t_seq"] | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Approximate Likelihood Matching between two models of different tokenizers.

    With `log p_c` and `log q_c` the teacher's and the student's log-likelihood of chunk `c` (the sum of the
    log-probabilities of its tokens, [`chunk_logprobs`][]), the loss is the mean over counted chunks of
    [`binarised_kl`][]`(log p_c, log q_c, τ)`.

    **Arguments:**

    - `student_*`, `teacher_*`: each side's logits, labels, mask and chunk ids per label position (see the module
        docstring). `teacher_logits` may be `None` when `teacher_token_logp` (a cached teacher's log-probability
        of each realised token) is given instead.
    - `num_chunks`: static, the chunk ids' range (at most `min(s_seq, t_seq) + 1` chunks per row).
    - `temperature`: ALM's binarisation temperature `τ > 0`.
    - `chunk_mask`: optional host mask of the chunks that may count.
    - `chunk_size`: sequence positions per chunk of the per-token pass (see `distill.logits.chunked_map`).

    **Returns:** `(loss, metrics)`: `distill/alm` (the loss), `distill/chunk_logp_gap` (mean `|log p_c - log q_c|`
    over counted chunks, in nats) and `distill/chunks` (the counted chunks' fraction of `num_chunks`).
    """
    check_alm_temperature(temperature)
    s_logp = token_logprobs(student_logits, student_labels, student_mask, chunk_size=chunk_size)
    if teacher_token_logp is None:
        teacher_token_logp = token_logprobs(teacher_logits, teacher_labels, teacher_mask, chunk_size=chunk_size)
    div, gap, ok = alm_divergence(s_logp, student_mask, student_chunk, teacher_token_logp, teacher_mask,
                                  teacher_chunk, num_chunks=num_chunks, temperature=temperature, chunk_mask=chunk_mask)
    loss = _masked_mean(div, ok)
    return loss, {"distill/alm": loss, "distill/chunk_logp_gap": _masked_mean(gap, ok),
                  "distill/chunks": jnp.mean(ok.astype(jnp.float32))}


def check_alm_temperature(temperature) -> float:
    """ALM's temperature as a float, or a `ConfigError` unless it is a number > 0."""
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"alm temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def alm_divergence(
    student_token_logp: Float[Array, "batch s_seq"],
    student_mask: Shaped[Array, "batch s_seq"],
    student_chunk: Int[Array, "batch s_seq"],
    teacher_token_logp: Float[Array, "batch t_seq"],
    teacher_mask: Shaped[Array, "batch t_seq"],
    teacher_chunk: Int[Array, "batch t_seq"],
    *,
    num_chunks: int,
    temperature: float = 100.0,
    chunk_mask: Bool[Array, "batch chunks"] | None = None,
) -> tuple[Float[Array, "batch chunks"], Float[Array, "batch chunks"], Bool[Array, "batch chunks"]]:
    """ALM per chunk from each side's per-token log-probabilities ([`token_logprobs`][] or
    [`linear_token_logprobs`][]; the teacher's behind `stop_gradient`): `(binarised KL, |log p_c - log q_c|,
    counted)`, the first two 0 at the chunks that do not count. [`alm_loss`][] is their mean over counted chunks."""
    temperature = check_alm_temperature(temperature)
    t_logp = jnp.where(_as_valid(teacher_mask), jax.lax.stop_gradient(teacher_token_logp).astype(jnp.float32), 0.0)
    q = chunk_logprobs(student_token_logp, student_chunk, num_chunks)
    p = chunk_logprobs(t_logp, teacher_chunk, num_chunks)
    ok = complete_chunks(student_chunk, student_mask, teacher_chunk, teacher_mask, num_chunks, chunk_mask)
    div = jnp.where(ok, binarised_kl(jnp.where(ok, p, -1.0), jnp.where(ok, q, -1.0), temperature), 0.0)
    return div, jnp.abs(jnp.where(ok, p - q, 0.0)), ok


# --------------------------------------------------------------------------------------------------- shared vocabulary


def shared_vocab_kl(
    student_logits: Float[Array, "batch s_seq s_vocab"],
    student_mask: Shaped[Array, "batch s_seq"],
    student_chunk: Int[Array, "batch s_seq"],
    teacher_logits: Float[Array, "batch t_seq t_vocab"],
    teacher_mask: Shaped[Array, "batch t_seq"],
    teacher_chunk: Int[Array, "batch t_seq"],
    one_to_one: Bool[Array, "batch chunks"],
    student_ids: Int[Array, " shared"],
    teacher_ids: Int[Array, " shared"],
    *,
    temperature: float | Float[Array, ""] = 1.0,
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Forward KL `KL(p || q)·T²` between the teacher's and the student's next-token distributions restricted (and
    renormalised) to the shared vocabulary, at each student position whose label is a chunk of one token on each
    side with the same string (`one_to_one`, from the host).

    The teacher position of such a chunk is found with a `segment_max` of positions over the teacher's chunk ids,
    and the teacher's logits there are gathered one sequence chunk of the student at a time, so no second
    `[batch, seq, vocab]` tensor exists. `student_ids[k]` and `teacher_ids[k]` are the ids of the `k`-th shared
    string. With identical tokenizers and `student_ids = teacher_ids = arange(vocab)` this is `kd_loss(...,
    kind="forward_kl")`.

    **Returns:** `(loss, metrics)`: `distill/shared_kl` (the mean over the positions used) and
    `distill/shared_positions` (their fraction of the student's counted positions).
    """
    _check_chunk_size(chunk_size)
    use, j = shared_positions(student_mask, student_chunk, teacher_mask, teacher_chunk, one_to_one)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    temperature = _token_temperature(temperature, student_mask.shape)
    rows = jnp.arange(student_chunk.shape[0])[:, None]

    def tokens(s, jj, temp, v):
        t = teacher_logits[rows, jj][..., teacher_ids]  # [batch, chunk, shared]: this chunk's teacher rows only
        return _kd_tokens(s[..., student_ids], t, temp, v, kind="forward_kl", beta=0.0)

    div, _ = chunked_map(tokens, (student_logits, j, temperature, use), chunk_size)
    loss = _masked_mean(div, use)
    return loss, {"distill/shared_kl": loss, "distill/shared_positions": _shared_fraction(use, student_mask)}


def _shared_fraction(use: Array, student_mask: Array) -> Array:
    valid = _as_valid(student_mask).astype(jnp.float32)
    return jnp.sum(use.astype(jnp.float32)) / jnp.maximum(jnp.sum(valid), 1.0)


def shared_positions(
    student_mask: Shaped[Array, "batch s_seq"],
    student_chunk: Int[Array, "batch s_seq"],
    teacher_mask: Shaped[Array, "batch t_seq"],
    teacher_chunk: Int[Array, "batch t_seq"],
    one_to_one: Bool[Array, "batch chunks"],
) -> tuple[Bool[Array, "batch s_seq"], Int[Array, "batch s_seq"]]:
    """`(use, j)`: the student positions whose label is a one-token-each-side chunk, and at each the teacher
    position of that chunk (its last counted position, a `segment_max` over the teacher's chunk ids; 0 elsewhere)."""
    num_chunks = one_to_one.shape[-1]
    t_len = teacher_chunk.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), teacher_chunk.shape)
    t_pos = jax.vmap(lambda v, i: jax.ops.segment_max(v, i, num_segments=num_chunks))(
        jnp.where(_as_valid(teacher_mask), positions, -1), teacher_chunk)
    in_range = (student_chunk >= 0) & (student_chunk < num_chunks)
    c = jnp.clip(student_chunk, 0, num_chunks - 1)
    use = _as_valid(student_mask) & in_range & jnp.take_along_axis(one_to_one.astype(bool), c, axis=1)
    j = jnp.take_along_axis(t_pos, c, axis=1)
    return use & (j >= 0), jnp.clip(j, 0, t_len - 1)


def linear_shared_vocab_kl(
    student_hidden: Float[Array, "batch s_seq s_embed"],
    student_weight: Float[Array, "s_vocab s_embed"],
    teacher_hidden: Float[Array, "batch t_seq t_embed"],
    teacher_weight: Float[Array, "t_vocab t_embed"],
    use: Bool[Array, "batch s_seq"],
    j: Int[Array, "batch s_seq"],
    student_ids: Int[Array, " shared"],
    teacher_ids: Int[Array, " shared"],
    *,
    temperature: float | Float[Array, ""] = 1.0,
    chunk_size: int | None = None,
) -> Float[Array, "batch s_seq"]:
    """[`shared_vocab_kl`][]'s per-position divergence (0 where `use` is False) from each side's last hidden
    states and LM head: per chunk of the student's positions, the student's logits and those of the teacher's
    hidden states at `j` (gathered for the chunk's positions alone) are made, then restricted to the shared ids.
    `(use, j)` are [`shared_positions`][]'; the masked mean over `use` is [`shared_vocab_kl`][]'s loss."""
    _check_chunk_size(chunk_size)
    teacher_hidden, teacher_weight = jax.lax.stop_gradient((teacher_hidden, teacher_weight))
    temperature = _token_temperature(temperature, use.shape)
    rows = jnp.arange(use.shape[0])[:, None]

    def tokens(h, jj, temp, v):
        s = jnp.einsum("bsd,vd->bsv", h, student_weight.astype(h.dtype))
        th = teacher_hidden[rows, jj]  # [batch, chunk, t_embed]
        t = jnp.einsum("bsd,vd->bsv", th, teacher_weight.astype(th.dtype))
        return _kd_tokens(s[..., student_ids], t[..., teacher_ids], temp, v, kind="forward_kl", beta=0.0)[0]

    return chunked_map(tokens, (student_hidden, j, temperature, use), chunk_size)


def bits_per_byte(nll_nats: Float[Array, ""] | float, n_bytes: int | float) -> float:
    """Bits per UTF-8 byte from a summed negative log-likelihood in nats: `nll / (ln 2 · bytes)`."""
    return float(nll_nats) / (math.log(2.0) * max(float(n_bytes), 1.0))
