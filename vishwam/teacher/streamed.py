"""A teacher run from disk, layer group by layer group, for teachers bigger than device memory.

`StreamedTeacher` runs the forward pass group by group, each group touching a bounded number of safetensors
shards. The next group is read on a background thread while the current one computes, and a group is released
once used. Embeddings, final norm and head stay resident. For a cross-tokenizer step it hands on the
log-probability of each of its labels (`StreamedTeacher.cross_outputs`), its LM head applied a chunk at a time.
"""

from __future__ import annotations

import concurrent.futures
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from distill.cross_tokenizer import linear_token_logprobs
from distill.objective import Objective, TeacherOutputs
from distill.student_init import final_norm_stats, score_dict, stack_stats
from models import CausalLM, CausalLMOutput, constrain, prepare_inputs, run_layers
from vishwam.io.checkpoint import LazyCheckpoint
from vishwam.sharding import rows_sharding


@functools.partial(jax.jit, static_argnums=(5, 6, 7), static_argnames="activation_sharding")
def run_group(layers, h, cos, sin, mask, hidden, attentions, qkv, *, activation_sharding=None):
    """One layer group's forward (a plain `jax.jit`, so the compile dry run lowers it from abstract weights);
    `hidden`, `attentions`, `qkv`: True or the group's layer indices whose outputs to return;
    `activation_sharding`: the hidden states' rows over the batch axes (see `CausalLM`)."""
    return run_layers(layers, h, cos, sin, mask, output_hidden_states=hidden, output_attentions=attentions,
                      output_qkv=qkv, activation_sharding=activation_sharding)


def _chosen(request, n: int) -> frozenset[int]:
    return frozenset(range(n)) if request is True else frozenset(request or ())


# One group's importance statistics for pruning: a plain `jax.jit` too, the program the compile dry run compiles.
group_stats = jax.jit(stack_stats, static_argnames="activation_sharding")
_final_norm_stats = eqx.filter_jit(final_norm_stats)


@eqx.filter_jit
def _embed(embed, config, ids, attention_mask, segment_ids=None, activation_sharding=None):
    mask, cos, sin = prepare_inputs(config, ids, attention_mask, segment_ids=segment_ids)
    return constrain(embed(ids), activation_sharding), mask, cos, sin


@functools.partial(jax.jit, static_argnames="whole_weight")
def head_logits(norm, head_weight, h, *, whole_weight=None):
    """The streamed teacher's last program: its final norm and LM head over the step's hidden states.
    `whole_weight`: a replicated sharding to gather the head to first, so that each device makes its own rows'
    logits whole (left to itself, XLA multiplied the fsdp-split hidden axis and summed `[rows, seq, vocab]`
    partial logits: a second copy of the step's logits, 9.3 GiB a chip at the flagship's size)."""
    normed, head_weight = norm(h), constrain(head_weight, whole_weight)
    return normed, jnp.einsum("bsd,vd->bsv", normed, head_weight.astype(normed.dtype))


@functools.partial(jax.jit, static_argnames=("chunk_size", "whole_weight"))
def head_token_logprobs(norm, head_weight, h, labels, mask, *, chunk_size=None, whole_weight=None):
    """A cross-tokenizer run's last streamed program: the final norm, then the LM head and the log-probability of
    each label one chunk of `chunk_size` positions at a time (`distill.cross_tokenizer.linear_token_logprobs`), so
    the teacher's `[batch, T, vocab]` logits never exist whole. `whole_weight`: as `head_logits`'."""
    return linear_token_logprobs(norm(h), constrain(head_weight, whole_weight), labels, mask, chunk_size=chunk_size)


class StreamedTeacher:
    """A teacher run from disk group by group (at most `max_resident_shards` shard files' layers resident).

    With prefetching, the group being computed and the next one being read are both resident, so groups are
    formed with half the shard budget each (at least one shard); with `max_resident_shards=1` there is no
    prefetch. Outputs equal the resident teacher's (the same ops on the same values).
    """

    def __init__(self, lazy: LazyCheckpoint, *, dtype, max_resident_shards: int, mesh=None):
        self.lazy, self.dtype, self.mesh = lazy, dtype, mesh
        self.config = lazy.config
        self.prefetch = max_resident_shards >= 2
        budget = max_resident_shards // 2 if self.prefetch else 1
        self.groups = lazy.layer_groups(budget)
        self.embed = lazy.load_embed(dtype, mesh)
        self.norm = lazy.load_final_norm(dtype, mesh)
        head = lazy.load_lm_head(dtype, mesh)
        self.head_weight = self.embed.weight if head is None else head.weight
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-prefetch")
        self.max_groups_resident = 0

    def _load(self, group):
        return self.lazy.load_layers(*group, dtype=self.dtype, mesh=self.mesh)

    def _rows(self, input_ids):
        """The hidden states' sharding: their rows over the mesh's batch axes when they divide (else whole)."""
        return None if self.mesh is None else rows_sharding(self.mesh, input_ids.shape[0], 3)

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states=False, output_attentions=False,
                 output_qkv=False, segment_ids=None):
        """The teacher's `CausalLMOutput`, group by group; the `output_*` take a bool or indices, as
        `CausalLM.__call__` does (each group computes only its own chosen layers')."""
        n = self.config.num_hidden_layers
        wanted = [_chosen(output_hidden_states, n + 1), _chosen(output_attentions, n), _chosen(output_qkv, n)]
        h, hidden, attns, qkvs = self._layers(input_ids, attention_mask, wanted, segment_ids)
        normed, logits = head_logits(self.norm, self.head_weight, h, whole_weight=self._whole())
        return CausalLMOutput(
            logits=logits, hidden_states=tuple(hidden) + (normed if n in wanted[0] else None,) if wanted[0] else None,
            attentions=tuple(attns) if wanted[1] else None, qkv=tuple(qkvs) if wanted[2] else None,
        )

    def _whole(self):
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def _layers(self, input_ids, attention_mask, wanted, segment_ids=None):
        """The decoder layers group by group: the last layer's output (before the final norm) and the `wanted`
        `[hidden, attentions, qkv]` layer indices' outputs."""
        rows = self._rows(input_ids)
        h, mask, cos, sin = _embed(self.embed, self.config, input_ids, attention_mask, segment_ids, rows)
        hidden, attns, qkvs = [], [], []
        pending = self._pool.submit(self._load, self.groups[0]) if self.prefetch else None
        for g, group in enumerate(self.groups):
            layers = pending.result() if pending is not None else self._load(group)
            nxt = None
            if self.prefetch and g + 1 < len(self.groups):
                nxt = self._pool.submit(self._load, self.groups[g + 1])
                self.max_groups_resident = max(self.max_groups_resident, 2)
            else:
                self.max_groups_resident = max(self.max_groups_resident, 1)
            size = group[1] - group[0]
            local = [tuple(i - group[0] for i in sorted(w) if group[0] <= i < group[1]) for w in wanted]
            out = run_group(layers, h, cos, sin, mask, *(True if len(c) == size else c for c in local),
                            activation_sharding=rows)
            h = out.hidden
            if wanted[0]:
                hidden.extend(out.layer_inputs[i] if group[0] + i in wanted[0] else None for i in range(size))
            if wanted[1]:
                attns.extend(out.attentions[i] if group[0] + i in wanted[1] else None for i in range(size))
            if wanted[2]:
                qkvs.extend(tuple(t[i] for t in out.qkv) if group[0] + i in wanted[2] else None for i in range(size))
            jax.block_until_ready(h)
            del layers, out  # release this group before the one after next is read
            pending = nxt
        return h, hidden, attns, qkvs

    def cross_outputs(self, batch, *, chunk_size: int | None = None) -> dict:
        """What a cross-tokenizer step takes from a streamed teacher (`vishwam.train.cross_step`): the teacher run
        on its own ids (`teacher_input_ids`, `teacher_input_mask`), its final norm and LM head applied
        `chunk_size` positions at a time, and the log-probability of each of its labels:
        `{"teacher_token_logp": float32 [batch, T]}` (0 where `teacher_mask` is 0)."""
        h = self._layers(jnp.asarray(batch["teacher_input_ids"]), jnp.asarray(batch["teacher_input_mask"]),
                         [frozenset()] * 3)[0]
        logp = head_token_logprobs(self.norm, self.head_weight, h, jnp.asarray(batch["teacher_labels"]),
                                   jnp.asarray(batch["teacher_mask"]), chunk_size=chunk_size,
                                   whole_weight=self._whole())
        return {"teacher_token_logp": logp}

    def importance(self, input_ids, attention_mask, segment_ids=None) -> dict:
        """Pruning's importance statistics (`distill.student_init.importance_scores`), group by group: one
        group's layers resident at a time, released once used."""
        valid, rows = attention_mask.astype(bool), self._rows(input_ids)
        h, mask, cos, sin = _embed(self.embed, self.config, input_ids, valid, segment_ids, rows)
        embed, mlp, heads = 0.0, [], []
        for group in self.groups:
            layers = self._load(group)
            h, e, m, hd = group_stats(layers, h, cos, sin, mask, valid, activation_sharding=rows)
            embed, mlp, heads = embed + e, mlp + [m], heads + [hd]
            jax.block_until_ready(h)
            del layers
        return score_dict(embed + _final_norm_stats(self.norm, h, valid), jnp.concatenate(mlp),
                          jnp.concatenate(heads), num_kv_heads=self.config.num_key_value_heads)

    def with_layers(self, numbers: list[int]) -> CausalLM:
        """The teacher holding only decoder layers `numbers` (stacked in that order; its config still names
        them all): what pruning slices the student from, without the other layers ever being read."""
        layers = [self.lazy.load_layers(n, n + 1, dtype=self.dtype, mesh=self.mesh) for n in numbers]
        stack = jax.tree.map(lambda *xs: jnp.concatenate(xs) if eqx.is_array(xs[0]) else xs[0], *layers)
        model = eqx.tree_at(lambda m: (m.model.embed_tokens, m.model.norm, m.model.layers), self.lazy.abstract,
                            (self.embed, self.norm, stack))
        if model.lm_head is not None:
            model = eqx.tree_at(lambda m: m.lm_head.weight, model, self.head_weight)
        return model

    def outputs(self, batch, objective: Objective) -> TeacherOutputs:
        segments = batch.get("segment_ids")  # packed chat rows: the masks the student sees in the step
        out = self(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["mask"]), **objective.teacher_model_outputs(),
                   segment_ids=None if segments is None else jnp.asarray(segments))
        return TeacherOutputs(logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions,
                              qkv=out.qkv)

    def close(self):
        self._pool.shutdown(wait=True)


__all__ = ["StreamedTeacher", "head_logits", "head_token_logprobs", "run_group"]
