"""A cross-tokenizer run's device programs (`specs.cross_tokenizer(cfg)`), built from abstract inputs for the
compile dry run (`vishwam.compile.programs`):

- `train`: `vishwam.train.cross_step.make_cross_train_step` on a step's batch of both sides' windows (`S =
  training.seq_len` student tokens, `T = specs.teacher_seq_len(cfg)` teacher tokens, `S + 1` chunks a row), the
  shared vocabulary closed over when `distillation_params.shared_kl_weight > 0` (its size from both tokenizers
  when the teacher has a `tokenizer.json` here, else `min(V_s, V_t)`, the most it can be); a streamed teacher's
  per-token log-probabilities as the step's argument;
- `eval`: `vishwam.train.cross_eval.cross_eval_sums` on one micro-batch, when the run evaluates;
- `prune_importance`, `prune_slice`: `init: from_teacher`'s ranking on the teacher's tokens and slicing of the body
  with the teacher's vocabulary (FVT then runs on the host);
- `streamed_group`, `streamed_head`: a streamed teacher's layer group on the teacher's ids and its final norm + LM
  head to the labels' log-probabilities (`vishwam.teacher.streamed.head_token_logprobs`).

- `cache_build`: a cached teacher's rows of one micro-batch of its own side of the windows.
- `downstream`, `downstream_teacher`: lm-eval scoring, as a same-tokenizer run builds them (each model at its own
  vocabulary).

Samples' generation programs are not built for a cross run (their prompts' lengths would be the student's
tokenizer's); on-policy distillation is refused in a cross run.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from tokenizers import Tokenizer

from vishwam.config import specs
from vishwam.data.cross.alignment import shared_vocab
from vishwam.sharding import rows_sharding
from vishwam.teacher.cache import cache_rows
from vishwam.teacher.streamed import head_token_logprobs, run_group
from vishwam.train.cross_eval import cross_eval_sums
from vishwam.train.cross_step import cross_step_config, make_cross_train_step

STUDENT_KEYS = ("input_ids", "labels", "mask", "loss_mask", "student_chunk")
TEACHER_KEYS = ("teacher_input_ids", "teacher_labels", "teacher_mask", "teacher_loss_mask", "teacher_input_mask",
                "teacher_chunk")
CHUNK_KEYS = ("one_to_one", "chunk_mask")


def cross_batch(cfg, rows: int, sharding) -> dict:
    """A cross-tokenizer batch of `rows` rows as `CrossWindows.batch` makes it, abstract: ids and chunk ids int32,
    masks bool."""
    S, T = cfg.training.seq_len, specs.teacher_seq_len(cfg)
    dtype = lambda k: bool if "mask" in k or k == "one_to_one" else jnp.int32  # noqa: E731
    widths = {**dict.fromkeys(STUDENT_KEYS, S), **dict.fromkeys(TEACHER_KEYS, T), **dict.fromkeys(CHUNK_KEYS, S + 1)}
    return {k: jax.ShapeDtypeStruct((rows, n), dtype(k), sharding=sharding) for k, n in widths.items()}


def shared_vocab_size(cfg, student_vocab: int, teacher_vocab: int) -> int:
    """The shared vocabulary's size: from both tokenizers when the teacher's is here, else `min(V_s, V_t)`."""
    own = Path(cfg.distillation.teacher_model.path).expanduser() / "tokenizer.json"
    if not own.is_file():
        return min(student_vocab, teacher_vocab)
    student = Path(cfg.distillation.student_model.tokenizer).expanduser()
    student = student / "tokenizer.json" if student.is_dir() else student
    return len(shared_vocab(Tokenizer.from_file(str(student)), Tokenizer.from_file(str(own)))[0])


def cross_programs(run) -> dict:
    """name -> (jitted function, abstract args, kwargs) for a cross run; `run`: a `vishwam.compile.programs.
    AbstractRun` (its mesh, teacher, state, shardings and optimizer)."""
    cfg, tr = run.cfg, run.cfg.training
    resident = cfg.distillation.teacher_model.loading == "resident"
    step_cfg = cross_step_config(cfg)
    shared = None
    if step_cfg.shared_kl_weight > 0:
        n = shared_vocab_size(cfg, run.s_config.vocab_size, run.t_config.vocab_size)
        shared = (jnp.arange(n, dtype=jnp.int32), jnp.arange(n, dtype=jnp.int32))
    step = make_cross_train_step(step_cfg, run.optimizer, run.schedule, run.shardings, shared)
    T = specs.teacher_seq_len(cfg)

    def logp(rows):  # a streamed teacher's log-probability of each of its labels, split like the batch
        return {"teacher_token_logp": jax.ShapeDtypeStruct((rows, T), jnp.float32, sharding=run.rows)}

    batch = cross_batch(cfg, tr.batch_size, run.rows)
    out = {"train": (step, (run.teacher if resident else None, run.state, batch, None if resident else
                            logp(tr.batch_size)), {})}
    whole = NamedSharding(run.mesh, PartitionSpec())
    if (cfg.data.eval or cfg.data.eval_fraction > 0) and tr.eval_batches > 0:
        micro = cross_batch(cfg, tr.micro_batch_size, run.rows)
        if not resident:
            micro.update(logp(tr.micro_batch_size))
        table = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32, sharding=whole)  # noqa: E731
        out["eval"] = (cross_eval_sums, (run.state.student, run.teacher if resident else None, micro), {
            "num_chunks": step_cfg.num_chunks, "alm_temperature": step_cfg.alm_temperature,
            "chunk_size": step_cfg.chunk_size, "compute_dtype": run.compute_dtype,
            "student_bytes": table(run.s_config.vocab_size), "teacher_bytes": table(run.t_config.vocab_size),
            "activation_sharding": rows_sharding(run.mesh, tr.micro_batch_size, 3)})
    if cfg.distillation.teacher_model.loading == "cached":  # the run builds a missing cache of the teacher's side
        micro = cross_batch(cfg, tr.micro_batch_size, run.rows)
        side = {"input_ids": micro["teacher_input_ids"], "labels": micro["teacher_labels"],
                "mask": micro["teacher_input_mask"]}
        out["cache_build"] = (cache_rows, (run.teacher, side), {
            "k": cfg.distillation.teacher_model.top_k, "vocab": run.t_config.vocab_size,
            "chunk_size": step_cfg.chunk_size, "activation_sharding": rows_sharding(run.mesh, tr.micro_batch_size, 3)})
    elif not resident:
        group, h, mask, cos, sin = run._group_inputs(batch["teacher_input_ids"], None)
        out["streamed_group"] = (run_group, (group, h, cos, sin, mask, (), (), ()),
                                 {"activation_sharding": h.sharding})
        head = (run.teacher.model.norm, run.teacher.unembedding_weight(), h, batch["teacher_labels"],
                batch["teacher_mask"])
        out["streamed_head"] = (head_token_logprobs, head, {"chunk_size": step_cfg.chunk_size, "whole_weight": whole})
    if cfg.distillation.student_model.init == "from_teacher":  # the body pruned on the teacher's tokens
        out.update(run._pruning(resident))
    if tr.downstream.tasks:
        out.update(run._downstream(resident))
    return out


__all__ = ["cross_batch", "cross_programs", "shared_vocab_size"]
