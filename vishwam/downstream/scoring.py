"""The scoring program: each packed request's summed log-probability and greedy-match flag, in one jitted program.

`score_rows` runs a model over a `[rows, seq_len]` batch of packed requests (`vishwam.downstream.packing`) and
returns, for each row's segment `k`, the sum of the log-probabilities of its scored targets (`logprob[row, k-1]`)
and whether each of them is the model's most likely next token (`greedy[row, k-1]`): what lm-eval's
`loglikelihood` returns per request. The logits are made `chunk_size` positions at a time inside the program
(`distill.logits.chunked_map`), in float32 for the softmax, so no `[rows, seq, vocab]` float32 array exists; the
rows are spread over the mesh's batch axes as evaluation's are. The compile dry run compiles it
(`vishwam.compile.programs`: `downstream`, and `downstream_teacher` for a resident teacher).

`Scorer` packs a list of requests, runs the program batch by batch (the next batch is queued while the host reads
the last one's results) and hands back the results in the requests' order. Every process runs the same batches in
the same order and reads every result (a mesh over several hosts gathers them).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from distill.logits import chunked_map
from models import CausalLM, cast_floating, constrain
from vishwam.downstream.packing import pack
from vishwam.downstream.tokens import ScoredRequest
from vishwam.generation.sampler import prompt_bucket
from vishwam.sharding import global_batch, rows_per_device, rows_sharding

#: The float32 logits of one chunk stay under this many bytes a device when `Scorer` picks the chunk size.
CHUNK_BYTES = 256 * 2**20


@functools.partial(jax.jit, static_argnames=("compute_dtype", "chunk_size", "activation_sharding"))
def score_rows(model: CausalLM, batch: dict, *, compute_dtype, chunk_size: int | None = None,
               activation_sharding=None) -> dict:
    """Per segment of each row of `batch` (`input_ids`, `segment_ids`, `targets`, `scored`: `[rows, seq]` int32;
    segment ids 1, 2, ... and 0 for padding): `logprob` `[rows, seq]` float32, entry `k - 1` the summed
    log-probability of segment `k`'s scored targets, and `greedy` `[rows, seq]` bool, whether every one of them is
    the argmax of its position's logits. Entries past a row's last segment are 0 and True."""
    model = cast_floating(model, compute_dtype)
    segments = batch["segment_ids"]
    hidden = model(batch["input_ids"], attention_mask=segments > 0, segment_ids=segments, output_logits=False,
                   activation_sharding=activation_sharding).last_hidden

    def per_token(h, targets):
        # log_softmax at the target as torch computes it, (x_t - max) - log(sum(exp(x - max))), from three
        # reductions of the logits as the head makes them: XLA fuses the float32 upcast into each, so no float32
        # [rows, chunk, vocab] array is held, and a likely token's log-probability keeps its relative precision.
        logits = model.unembed(h)
        x = logits.astype(jnp.float32)
        top = jnp.max(x, axis=-1, keepdims=True)
        log_total = jnp.log(jnp.sum(jnp.exp(x - top), axis=-1))
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1).astype(jnp.float32)  # exact: as x's
        chosen = (target - top)[..., 0] - log_total
        return chosen, jnp.argmax(logits, axis=-1) == targets

    logp, greedy = chunked_map(per_token, (hidden, batch["targets"]), chunk_size)
    scored = batch["scored"] > 0
    seq = segments.shape[1]
    slot = jnp.where(scored, segments - 1, seq)  # out of range: dropped by segment_sum

    def per_row(values, index):
        return jax.ops.segment_sum(values, index, num_segments=seq)

    sums = jax.vmap(per_row)(jnp.where(scored, logp, 0.0), slot)
    misses = jax.vmap(per_row)((scored & ~greedy).astype(jnp.int32), slot)
    out = {"logprob": sums, "greedy": misses == 0}
    if activation_sharding is not None:  # the results' rows stay where the batch's rows are
        rows = NamedSharding(activation_sharding.mesh, PartitionSpec(activation_sharding.spec[0], None))
        out = {k: constrain(v, rows) for k, v in out.items()}
    return out


def auto_chunk(rows_on_device: int, seq_len: int, vocab_size: int) -> int | None:
    """The most positions a logit chunk may take so that its float32 logits stay under `CHUNK_BYTES` a device
    (a power of two; None when the whole sequence fits)."""
    per_position = max(rows_on_device, 1) * vocab_size * 4
    if per_position * seq_len <= CHUNK_BYTES:
        return None
    return max(1, 1 << int(math.log2(max(CHUNK_BYTES // per_position, 1))))


def _host(x) -> np.ndarray:
    """A program output on this host, gathered from every process when it spans several."""
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


class Scorer:
    """Scores token requests with a model at fixed shapes (see the module docstring).

    **Arguments:**

    - `rows`, `seq_len`: the batch shape every program call has (the training micro-batch in a run); `seq_len`
      None sizes each call's rows to its longest request (rounded up as generation rounds prompts, to
      `vishwam.generation.sampler.prompt_bucket`).
    - `compute_dtype`: the dtype the model runs in (the softmax is float32 whatever it is).
    - `mesh`: the mesh the model lives on (rows spread over its batch axes); None on one device.
    - `chunk_size`: logit positions per chunk; None picks one for `vocab_size` (`auto_chunk`; all positions at
      once without it).
    - `progress`: show a progress bar on stderr (when it is a terminal).
    """

    def __init__(self, *, rows: int, seq_len: int | None, compute_dtype, mesh: Mesh | None = None,
                 chunk_size: int | None = None, vocab_size: int | None = None, progress: bool = False):
        self.rows, self.seq_len, self.compute_dtype, self.mesh = rows, seq_len, compute_dtype, mesh
        self.chunk_size, self.vocab_size, self.progress = chunk_size, vocab_size, progress
        self.sharding = None if mesh is None else rows_sharding(mesh, rows)
        self.activations = None if mesh is None else rows_sharding(mesh, rows, 3)
        self.last_fill = 0.0

    def _place(self, batch: dict) -> dict:
        if self.sharding is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return global_batch(batch, self.sharding)

    def score(self, model: CausalLM, requests: Sequence[ScoredRequest], *, desc: str = "score",
              on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """`(log-probability, greedy)` of each request (each at most `seq_len` tokens), in order."""
        if not requests:
            return []
        seq_len = self.seq_len or prompt_bucket(max(map(len, requests)))
        chunk_size = self.chunk_size
        if chunk_size is None and self.vocab_size is not None:
            local_rows = self.rows if self.mesh is None else rows_per_device(self.rows, self.mesh)
            chunk_size = auto_chunk(local_rows, seq_len, self.vocab_size)
        packed = pack(requests, rows=self.rows, seq_len=seq_len)
        self.last_fill = packed.fill
        per_batch = [0] * len(packed.batches)
        for b, _, _ in packed.where:
            per_batch[b] += 1
        bar = tqdm(total=len(requests), unit="req", desc=desc, file=sys.stderr, dynamic_ncols=True,
                   disable=None if self.progress else True)  # None: on a terminal only, as generate's
        results: list[dict | None] = [None] * len(packed.batches)
        pending = None
        for b, batch in enumerate([*packed.batches, None]):
            out = None
            if batch is not None:  # queued before the last batch's results are read
                out = score_rows(model, self._place(batch), compute_dtype=self.compute_dtype,
                                 chunk_size=chunk_size, activation_sharding=self.activations)
            if pending is not None:
                done, value = pending
                results[done] = {k: _host(v) for k, v in value.items()}
                bar.update(per_batch[done])
                if on_batch is not None:
                    on_batch(per_batch[done])
            pending = None if out is None else (b, out)
        bar.close()
        return [(float(results[b]["logprob"][r, k - 1]), bool(results[b]["greedy"][r, k - 1]))
                for b, r, k in packed.where]


__all__ = ["CHUNK_BYTES", "Scorer", "auto_chunk", "score_rows"]
