"""A cross-tokenizer run (`distillation.student_model.tokenizer` set and different from the teacher's): its checks,
the student's FVT embeddings, the shared vocabulary and the step's settings.

Unset, or the same tokenizer as the teacher's (same vocabulary, model, normalizer and pre-tokenizer): today's
same-tokenizer run (`resolve_student_tokenizer` clears the key). Set and different: the student's vocabulary and
special ids come from its tokenizer (`vishwam.config.specs.student_config`), the data is a token store of kind
`cross` with both sides and their byte alignment (`vishwam.data.cross.windows`), the step is
`vishwam.train.cross_step` (ALM + CE + shared-vocabulary KL), `init: from_teacher` prunes the body and gives the
student's embeddings (and an untied head) by FVT (`vishwam.data.cross.vocab_transfer`), and the export, the samples and
downstream evaluation use the student's tokenizer. What is not built refuses with one line (`check_cross_run`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tokenizers import Tokenizer

from distill.config import config_error
from distill.objective import Objective
from models import CausalLM, ModelConfig, init_model
from vishwam.config import specs
from vishwam.config.sections import RunConfig
from vishwam.data.cross.alignment import shared_vocab
from vishwam.data.cross.vocab_transfer import fvt_embeddings, fvt_sources
from vishwam.data.splits import tokenizer_path
from vishwam.data.text import load_tokenizer
from vishwam.errors import DataError

KEY = "distillation.student_model.tokenizer"


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers cut every text into the same ids."""
    fields = ("model", "normalizer", "pre_tokenizer", "added_tokens")
    ja, jb = json.loads(a.to_str()), json.loads(b.to_str())
    return all(ja.get(f) == jb.get(f) for f in fields)


def resolve_student_tokenizer(cfg: RunConfig, teacher_dir: Path, log=None) -> RunConfig:
    """`cfg` with `distillation.student_model.tokenizer` checked: unreadable is a one-line `ConfigError`; the
    teacher's own tokenizer clears it (and `vocab_size`), a same-tokenizer run; a different one stays."""
    path = cfg.distillation.student_model.tokenizer
    if path is None:
        return cfg
    try:
        student = load_tokenizer(path)
    except DataError as error:
        raise config_error(KEY, f"cannot be read: {error}") from None
    teacher_path = tokenizer_path(cfg.data, teacher_dir)
    if teacher_path is None:
        raise config_error(KEY, f"is set, but the teacher ({teacher_dir}) has no tokenizer.json to compare it with "
                                "(set data.tokenizer to the teacher's)")
    if not same_tokenizer(student, load_tokenizer(teacher_path)):
        return cfg
    if log is not None:
        log(f"{KEY}: {path} is the teacher's tokenizer: a same-tokenizer run")
    s = dataclasses.replace(cfg.distillation.student_model, tokenizer=None, vocab_size=None)
    return dataclasses.replace(cfg, distillation=dataclasses.replace(cfg.distillation, student_model=s))


def check_student_tokenizer(cfg: RunConfig, teacher_dir: Path) -> None:
    """Raise the one-line `ConfigError` for an unreadable student tokenizer (`resolve_student_tokenizer`)."""
    resolve_student_tokenizer(cfg, teacher_dir)


def check_cross_run(cfg: RunConfig, objective: Objective) -> None:
    """One line (exit 2) for what a cross-tokenizer run does not do: the shared-vocabulary KL with a streamed or
    cached teacher (the step gets its log-probability of each token only), feature, attention and EPLB losses (the
    two sides' positions are different tokens), on-policy distillation."""
    p, t = cfg.distillation_params, cfg.distillation.teacher_model
    if t.loading != "resident" and specs.shared_kl_weight(cfg) > 0:
        raise config_error("distillation_params.shared_kl_weight", f"must be 0 with a {t.loading} teacher in a "
                                                                  "cross-tokenizer run (its step gets the teacher's "
                                                                  "log-probability of each token only)")
    for name in ("feature_weight", "attention_weight"):
        if getattr(p, name) > 0:
            raise config_error(f"distillation_params.{name}", "must be 0 in a cross-tokenizer run: the student's and "
                                                              "the teacher's positions are different tokens")
    if objective.on_policy_rows:
        raise config_error("distillation_params.on_policy.fraction", "must be 0 in a cross-tokenizer run (on-policy "
                                                                    "distillation across tokenizers is not built)")


def student_tokenizer_file(cfg: RunConfig) -> str:
    path = Path(cfg.distillation.student_model.tokenizer)
    return str(path / "tokenizer.json" if path.is_dir() else path)


def shared_ids(cfg: RunConfig, teacher_dir: Path, student_vocab: int, teacher_vocab: int):
    """The shared vocabulary `(student_ids, teacher_ids)` as int32 device arrays (ids inside both models'
    vocabularies), or None when `shared_kl_weight` is 0."""
    if specs.shared_kl_weight(cfg) <= 0:
        return None
    s, t = shared_vocab(load_tokenizer(student_tokenizer_file(cfg)),
                        load_tokenizer(tokenizer_path(cfg.data, teacher_dir)))
    keep = (s < student_vocab) & (t < teacher_vocab)
    return jnp.asarray(s[keep]), jnp.asarray(t[keep])


def with_teacher_vocab(student: ModelConfig, teacher: ModelConfig) -> ModelConfig:
    """The student's architecture with the teacher's vocabulary: what pruning slices from the teacher before FVT
    gives the student its own embeddings."""
    return student.replace(vocab_size=teacher.vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _on_host(x: jax.Array) -> np.ndarray:
    """A sharded array whole on this host, float32 (gathered from every process when it spans several: each then
    computes the same FVT rows, and the placing below takes this process's shards of them)."""
    if not getattr(x, "is_fully_addressable", True):
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)


def fvt_student(pruned: CausalLM, student: ModelConfig, cfg: RunConfig, teacher_dir: Path, *, shardings=None,
                log=None) -> CausalLM:
    """`pruned` (the body pruned from the teacher, with the teacher's vocabulary) with the student's vocabulary:
    each student token's embedding (and untied head row) the mean of the pruned teacher rows of its string
    re-tokenized by the teacher (FVT), computed on the host; the result placed by `shardings` when given."""
    s_tok = load_tokenizer(student_tokenizer_file(cfg))
    t_tok = load_tokenizer(tokenizer_path(cfg.data, teacher_dir))
    sources = fvt_sources(s_tok, t_tok, student.vocab_size, pruned.config.vocab_size)
    unspelled = sum(not s for s in sources[: s_tok.get_vocab_size()])
    if log is not None:
        log(f"student: embeddings of its {student.vocab_size} ids by FVT from the teacher's ({unspelled} ids the "
            f"teacher cannot spell take the mean row)")
    leaves = jax.tree.leaves(pruned)
    embed = _on_host(pruned.model.embed_tokens.weight)
    swap = {id(pruned.model.embed_tokens.weight): fvt_embeddings(embed, sources)}
    if pruned.lm_head is not None:
        swap[id(pruned.lm_head.weight)] = fvt_embeddings(_on_host(pruned.lm_head.weight), sources)
    dtype = pruned.model.embed_tokens.weight.dtype
    leaves = [jnp.asarray(swap[id(x)], dtype) if id(x) in swap else x for x in leaves]
    skeleton = eqx.filter_eval_shape(init_model, student, key=jax.random.key(0))
    out = jax.tree.unflatten(jax.tree.structure(skeleton), leaves)
    if shardings is not None:
        arrays, static = eqx.partition(out, eqx.is_array)
        out = eqx.combine(jax.device_put(arrays, shardings), static)
    return out


__all__ = ["check_cross_run", "check_student_tokenizer", "fvt_student", "resolve_student_tokenizer",
           "same_tokenizer", "shared_ids", "student_tokenizer_file", "with_teacher_vocab"]
