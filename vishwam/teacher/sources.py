"""Where a run's teacher comes from, behind one interface: resident, streamed, or cached.

The loop and evaluation ask a `TeacherSource` two things per batch, and never which kind it is:

- `in_step`: the teacher pytree to pass into the jitted step, which then runs the teacher itself (a resident
  teacher), or None;
- `outputs(batch, split)`: the teacher's outputs computed ahead of the step (`TeacherOutputs`: a streamed
  teacher's forward pass, or rows read from the offline cache), or None when the step runs the teacher.

`model` is the teacher as a callable model, for probes that run it on their own batch (EPLB re-mapping); a cached
teacher has none. `open_teacher` builds the source that `distillation.teacher_model.loading` names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from distill.objective import Objective, TeacherOutputs
from models import CausalLM
from vishwam.config import specs
from vishwam.config.sections import RunConfig
from vishwam.config.specs import DTYPES
from vishwam.data.windows import PackedDataset
from vishwam.errors import ConfigError, DataError
from vishwam.io.checkpoint import LazyCheckpoint
from vishwam.teacher.cache import (
    CACHE_VERSION,
    TeacherCache,
    build_cache,
    cache_complete,
    cache_mismatch,
    stale_cache_message,
)
from vishwam.teacher.fingerprint import fingerprint
from vishwam.teacher.streamed import StreamedTeacher


class TeacherSource:
    """A resident teacher: the whole model on the mesh, run inside the jitted step."""

    kind = "resident"

    def __init__(self, model: CausalLM | StreamedTeacher | None):
        self.model = model

    @property
    def in_step(self) -> CausalLM | None:
        return self.model if self.kind == "resident" else None

    def cross_outputs(self, batch: dict[str, np.ndarray], split: str = "train") -> dict | None:
        """A cross-tokenizer step's teacher input (`vishwam.train.cross_step`): None for a resident teacher (it
        runs in the step), else `{"teacher_token_logp": [rows, T]}`, its log-probability of each of its labels."""
        return None

    def outputs(self, batch: dict[str, np.ndarray], split: str = "train") -> TeacherOutputs | None:
        return None

    def close(self) -> None:
        pass


class Streamed(TeacherSource):
    """A teacher run from disk group by group ahead of each step (`vishwam.teacher.streamed.StreamedTeacher`)."""

    kind = "streamed"

    def __init__(self, model: StreamedTeacher, objective: Objective):
        super().__init__(model)
        self.objective = objective

    def outputs(self, batch, split="train"):
        return self.model.outputs(batch, self.objective)

    def cross_outputs(self, batch, split="train"):
        return self.model.cross_outputs(batch, chunk_size=self.objective.params.logit_chunk_size)

    def close(self):
        self.model.close()


class Cached(TeacherSource):
    """A teacher read from its offline cache (`vishwam.teacher.cache`), one `TeacherCache` per data split."""

    kind = "cached"

    def __init__(self, caches: dict[str, TeacherCache], num_teacher_layers: int):
        super().__init__(None)
        self.caches, self.num_teacher_layers = caches, num_teacher_layers

    def outputs(self, batch, split="train"):
        return self.caches[split].outputs(batch, self.num_teacher_layers)

    def cross_outputs(self, batch, split="train"):
        """A cross-tokenizer run's cache holds the teacher's side of each window: the label log-probability it
        stores for every teacher token is the one float per token the cross step needs."""
        return {"teacher_token_logp": jnp.asarray(self.caches[split].rows(batch["window"])["label_logprob"])}

    def close(self):
        for cache in self.caches.values():
            cache.close()


def check_cacheable(cfg: RunConfig) -> None:
    """A top-k cache holds logits (and mapped hidden states): the objectives that need more are config errors."""
    p = cfg.distillation_params
    bad = None
    if p.attention_weight > 0:
        bad = "distillation_params.attention_weight > 0 (attention maps are not cached)"
    elif p.kd_loss != "forward_kl" and p.kd_weight > 0:
        bad = f"distillation_params.kd_loss={p.kd_loss!r} (a top-k cache supports forward_kl)"
    elif p.temperature.schedule == "adaptive":
        bad = "distillation_params.temperature.schedule='adaptive' (needs full teacher logits)"
    if bad:
        raise ConfigError(f"config key 'distillation.teacher_model.loading' = 'cached' cannot be used with {bad}")


def cached_layers(objective: Objective) -> tuple[int, ...]:
    """The teacher layers whose hidden states a cache must hold (the mapped ones, with feature matching on)."""
    return tuple(sorted({t for _, t in objective.feature_pairs})) if objective.uses_features else ()


def cache_fingerprints(cfg: RunConfig, lazy: LazyCheckpoint, splits: dict[str, PackedDataset], objective: Objective,
                       *, vocab_size: int) -> dict[str, dict]:
    """Each split's cache fingerprint (`vishwam.teacher.fingerprint`): what its rows must have been computed from."""
    t = cfg.distillation.teacher_model
    return {split: fingerprint(cfg, lazy, split, data, top_k=t.top_k, vocab_size=vocab_size,
                               hidden_layers=cached_layers(objective), version=CACHE_VERSION)
            for split, data in splits.items()}


def build_caches(cfg: RunConfig, lazy: LazyCheckpoint, splits: dict[str, PackedDataset], objective: Objective, *,
                 vocab_size: int, mesh, log: Callable[[str], None], always: bool = False,
                 fingerprints: dict[str, dict] | None = None) -> dict[str, dict]:
    """Build (or finish) the teacher cache of every split; the teacher is loaded once, only if a split needs it.

    A split's cache built for another fingerprint (another teacher, tokenizer, data, seq_len, top_k, ...) is never
    reused: without `always` (a training run) that is a `DataError` naming the cache and what changed; with
    `always` (`python -m vishwam.cache`) it is rebuilt from scratch. Without `always`, a split whose index already
    covers all its windows is left as it is (its shards' checksums are verified when read); an interrupted build
    of the same fingerprint resumes. Returns each built split's index. Every process of a multi-process run
    calls this (they run the teacher together); process 0 alone writes."""
    t = cfg.distillation.teacher_model
    if fingerprints is None:
        fingerprints = cache_fingerprints(cfg, lazy, splits, objective, vocab_size=vocab_size)
    todo = {}
    for split, data in splits.items():
        directory = Path(t.cache_dir) / split
        change = cache_mismatch(directory, fingerprints[split])
        if change is not None and not always:
            raise DataError(stale_cache_message(directory, change))
        if change is not None:
            log(f"teacher cache {directory} was built for {change}: rebuilding it from scratch")
        if always or not cache_complete(directory, fingerprints[split]):  # missing, interrupted or stale
            todo[split] = data
    if not todo:
        return {}
    teacher = lazy.load(dtype=DTYPES[t.dtype], mesh=mesh)
    built = {}
    for split, data in todo.items():
        directory = Path(t.cache_dir) / split
        log(f"building teacher cache in {directory} (top-{t.top_k}, {data.num_windows} windows)")
        built[split] = build_cache(teacher, data, directory, top_k=t.top_k, vocab_size=vocab_size,
                                   hidden_layers=cached_layers(objective), meta={"teacher": str(lazy.directory)},
                                   fingerprint=fingerprints[split], log=log, mesh=mesh,
                                   batch_size=cfg.training.micro_batch_size,
                                   chunk_size=objective.params.logit_chunk_size)
        log(f"teacher cache {split}: {data.num_windows} windows, {len(built[split]['shards'])} shard(s), "
            f"{built[split]['bytes_per_token']:.0f} bytes per token")
    return built


def cache_inputs(cfg: RunConfig, lazy: LazyCheckpoint, splits: dict, vocab_size: int) -> tuple[dict, int]:
    """What a cache is built over: the run's windows at the run's vocabulary, or in a cross-tokenizer run the
    teacher's side of each window (`CrossDataset.teacher_side`) at the teacher's own vocabulary."""
    if not specs.cross_tokenizer(cfg):
        return splits, vocab_size
    return {split: data.teacher_side() for split, data in splits.items()}, lazy.config.vocab_size


def open_teacher(cfg: RunConfig, lazy: LazyCheckpoint, splits: dict[str, PackedDataset], objective: Objective, *,
                 vocab_size: int, mesh, log: Callable[[str], None]) -> TeacherSource:
    """The teacher source `distillation.teacher_model.loading` names, ready to use (a missing or unfinished
    cache is built first; one built for another fingerprint is a `DataError`)."""
    t = cfg.distillation.teacher_model
    dtype = DTYPES[t.dtype]
    if t.loading == "cached":
        splits, vocab_size = cache_inputs(cfg, lazy, splits, vocab_size)
    if t.loading == "resident":
        return TeacherSource(lazy.load(dtype=dtype, mesh=mesh))
    if t.loading == "streamed":
        return Streamed(StreamedTeacher(lazy, dtype=dtype, max_resident_shards=t.max_resident_shards, mesh=mesh),
                        objective)
    fingerprints = cache_fingerprints(cfg, lazy, splits, objective, vocab_size=vocab_size)
    build_caches(cfg, lazy, splits, objective, vocab_size=vocab_size, mesh=mesh, log=log, fingerprints=fingerprints)
    caches = {split: TeacherCache(Path(t.cache_dir) / split, seq_len=data.seq_len, top_k=t.top_k,
                                  num_windows=data.num_windows, hidden_layers=cached_layers(objective),
                                  fingerprint=fingerprints[split])
              for split, data in splits.items()}
    return Cached(caches, lazy.config.num_hidden_layers)


__all__ = ["Cached", "Streamed", "TeacherSource", "build_caches", "cache_inputs", "cache_fingerprints", "cached_layers",
           "check_cacheable", "open_teacher"]
