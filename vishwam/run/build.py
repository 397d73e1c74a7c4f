"""Building a run from its config: what it will run (before any weight is read), then its parts.

`prepare(cfg)` is everything that needs no weights, in the order that stops a mistake soonest: the mesh; the
teacher opened lazily (config, index and every shard header validated, nothing read); the student's architecture
and the objective (`vishwam.config.specs`); the checkpoint to resume from, its saved config compared with this
one; the memory plan, asked once (its plan serves the summary, the fit check and the compile check); then the
data. `build_state(run, teacher)` then initialises the student (randomly, pruned from the teacher, or from a
checkpoint), the feature projections, EPLB's balancer and the optimizer into one sharded `TrainState`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from distill.eplb import LossBalancer
from distill.features import FeatureProjections
from distill.objective import Objective
from distill.student_init import full_pairs, importance_scores, init_student_from_teacher
from models import CausalLM, ModelConfig, cast_floating, init_model
from models.pytree import count_parameters
from vishwam.config import specs
from vishwam.config.sections import RunConfig, config_to_dict
from vishwam.data import windows as data_lib
from vishwam.data.splits import load_splits, split_args
from vishwam.errors import ConfigError
from vishwam.generation.on_policy import initial_rollout, usable_prompts
from vishwam.generation.sampler import check_generation, checkpoint_eos_ids
from vishwam.generation.samples import Samples
from vishwam.io.checkpoint import LazyCheckpoint, load_pretrained, open_pretrained
from vishwam.io.export import save_pretrained
from vishwam.io.files import atomic_write, require_directory
from vishwam.plan.fit import check_fits
from vishwam.plan.planner import MemoryPlan, plan
from vishwam.run.cross_tokenizer import check_cross_run, fvt_student, resolve_student_tokenizer, with_teacher_vocab
from vishwam.sharding import batch_sharding, global_batch, make_mesh, rows_sharding, setup_distributed, tree_shardings
from vishwam.teacher.sources import TeacherSource, check_cacheable
from vishwam.teacher.streamed import StreamedTeacher
from vishwam.tracking import log
from vishwam.train.resume import Checkpointer
from vishwam.train.step import init_state


@dataclasses.dataclass
class Prepared:
    """A run as far as it is known before any weight is read."""

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    lazy_teacher: LazyCheckpoint
    teacher_config: ModelConfig
    student_config: ModelConfig
    objective: Objective
    train_data: data_lib.PackedDataset
    eval_data: data_lib.PackedDataset | None
    batch_sharding: jax.sharding.NamedSharding
    memory: MemoryPlan | None
    """The run's memory plan on its devices (checked: it fits, or its capacity is unknown); None unless training."""
    checkpoints: Checkpointer
    """The run's checkpoints (`output_dir/checkpoints`); the caller closes it."""
    resume_step: int | None
    """The checkpoint the run resumes from (its config already compared with this one), or None."""
    prompts: list | None = None
    """The training data's prompts, for on-policy distillation (`vishwam.generation.on_policy.usable_prompts`)."""

    @property
    def out(self) -> Path:
        return Path(self.cfg.training.output_dir)

    @property
    def vocab_size(self) -> int:
        """The vocabulary both models share (token ids beyond it are a data error)."""
        return min(self.student_config.vocab_size, self.teacher_config.vocab_size)

    @property
    def splits(self) -> dict[str, data_lib.PackedDataset]:
        return {"train": self.train_data, **({"eval": self.eval_data} if self.eval_data is not None else {})}


def _load_data(cfg: RunConfig, teacher: LazyCheckpoint, student: ModelConfig):
    """The train and eval datasets, from token stores (`vishwam.data.splits`; prepared on first use), tokenized
    with the teacher's tokenizer unless `data.tokenizer` names another (a cross-tokenizer run's: with both sides',
    aligned)."""
    barrier = None
    if jax.process_count() > 1:
        barrier = multihost_utils.sync_global_devices
    return load_splits(cfg.data, seq_len=cfg.training.seq_len,
                       **split_args(cfg, teacher.directory, teacher.config, student), log=log,
                       workers=cfg.data.workers, process_index=jax.process_index(),
                       process_count=jax.process_count(), barrier=barrier)


def _check_eos_ids(teacher: LazyCheckpoint, student: ModelConfig) -> None:
    """The teacher's EOS ids are token ids of the vocabulary both models share: `config.json`'s separate the data's
    documents and rows, `generation_config.json`'s end sampled completions. (Each checkpoint's own reader holds
    them to its own vocabulary; a student's may be smaller.)"""
    vocab = min(student.vocab_size, teacher.config.vocab_size)
    for name, ids in (("config.json", teacher.config.eos_ids),
                      ("generation_config.json", checkpoint_eos_ids(teacher.directory, teacher.config))):
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise ConfigError(f"{teacher.directory / name}: eos_token_id {outside[0]} is outside the run's vocabulary "
                              f"of {vocab} ids (the student's {student.vocab_size}, the teacher's "
                              f"{teacher.config.vocab_size})")


def prepare(cfg: RunConfig, *, training: bool = True) -> Prepared:
    """Everything about the run that needs no weights (see the module docstring); raises the one-line errors.
    `training=False` (the cache build alone) skips the resume check and the memory plan of the train step."""
    setup_distributed(cfg.distributed)
    p, tr = cfg.parallelism, cfg.training
    if training:  # a file where a directory is expected: said now, not after the teacher is loaded
        require_directory(tr.output_dir, "config key 'training.output_dir'")
    if cfg.distillation.teacher_model.cache_dir:
        require_directory(cfg.distillation.teacher_model.cache_dir, "config key 'distillation.teacher_model.cache_dir'")
    mesh = make_mesh(p.data, p.fsdp, p.tensor)
    lazy = open_pretrained(cfg.distillation.teacher_model.path)
    cfg = resolve_student_tokenizer(cfg, lazy.directory, log)  # the teacher's own tokenizer: a same-tokenizer run
    t_config = lazy.config
    s_config = specs.student_config(cfg, t_config)
    objective = specs.objective(cfg, s_config, t_config)
    if specs.cross_tokenizer(cfg):
        check_cross_run(cfg, objective)
    else:  # a cross-tokenizer student's special ids are its tokenizer's
        _check_eos_ids(lazy, s_config)
    if cfg.distillation.teacher_model.loading == "cached":
        check_cacheable(cfg)
    checkpoints = Checkpointer(Path(tr.output_dir) / "checkpoints", tr.keep_checkpoints)
    try:
        # Before the data is read or anything written: the newest readable checkpoint, its config compared.
        resume_step = checkpoints.resumable(cfg, log) if training else None
        memory = None
        if training:  # a misfit stops here; the plan's summary is printed once the data has loaded too
            memory = plan(cfg, t_config)
            check_fits(memory, cfg)
        train, evaluation = _load_data(cfg, lazy, s_config)
        prompts = None
        if objective.on_policy_rows:
            if not train.packed:
                raise ConfigError("config key 'distillation_params.on_policy.fraction' > 0 needs chat data (rows of "
                                  f"'messages' or 'prompt' + 'completion'), and data.train ({cfg.data.train[0]}) is "
                                  "text")
            prompts = usable_prompts(train, cfg.distillation_params.on_policy, log=log)
    except BaseException:
        checkpoints.close()
        raise
    if memory is not None and jax.process_index() == 0:
        print(memory.summary(), file=sys.stderr, flush=True)
    return Prepared(cfg, mesh, lazy, t_config, s_config, objective, train, evaluation, batch_sharding(mesh), memory,
                    checkpoints, resume_step, prompts)


def check_samples(run: Prepared, samples: Samples) -> None:
    """Raise a one-line `ConfigError` naming `training.sample_max_new_tokens` when the samples' generation cannot
    run (`vishwam.generation.sampler.check_generation`): past a model's positions, or a KV cache that does not fit
    beside the run's weights and optimizer state (the memory plan's) on a device. The student writes samples in the
    compute dtype, a resident teacher in its own."""
    if not samples.enabled:
        return
    cfg, memory = run.cfg, run.memory
    itemsize = lambda name: jnp.dtype(specs.DTYPES[name]).itemsize  # noqa: E731
    models = {"student": (run.student_config, itemsize(cfg.training.compute_dtype))}
    if cfg.distillation.teacher_model.loading == "resident":
        models["teacher"] = (run.teacher_config, itemsize(cfg.distillation.teacher_model.dtype))
    held = 0 if memory is None else (memory.teacher_bytes + memory.student_bytes + memory.projection_bytes
                                     + memory.optimizer_bytes + memory.gradient_bytes)
    prompt_len = samples.ids.shape[1]
    if samples.teacher_side is not None:  # a cross-tokenizer teacher's prompts are its own tokens
        prompt_len = max(prompt_len, samples.teacher_side.ids.shape[1])
    check_generation(models, rows=samples.ids.shape[0], prompt_len=prompt_len,
                     max_new_tokens=samples.max_new_tokens, mesh=cfg.parallelism,
                     capacity=None if memory is None else memory.capacity, resident_bytes=held,
                     what="config key 'training.sample_max_new_tokens'")


def compile_check_due(cfg: RunConfig) -> bool:
    """Whether the run compiles its programs from abstract shapes before reading weights (`training.compile_check`:
    'on', or 'auto' on accelerators)."""
    check = cfg.training.compile_check
    return check == "on" or (check == "auto" and jax.devices()[0].platform != "cpu")


def init_student(run: Prepared, teacher: TeacherSource, key) -> CausalLM:
    """The student before training, in `training.param_dtype`: random, read from `student_model.path`, or pruned
    from the teacher (streamed for it when the source holds no resident model) and saved to
    `output_dir/init_student` with a stamp of what it depends on, so that a run restarted before its first
    checkpoint reads it back instead of pruning again."""
    cfg, s = run.cfg, run.cfg.distillation.student_model
    param_dtype = specs.DTYPES[cfg.training.param_dtype]
    if s.init == "path":
        return load_pretrained(s.path, dtype=param_dtype)
    if s.init == "random":
        return cast_floating(init_model(run.student_config, key=key), param_dtype)
    saved = run.out / "init_student"
    stamp = _init_stamp(run)
    if _read_stamp(saved) == stamp:
        log(f"student: the pruned student saved in {saved} (pruning not run again)")
        return load_pretrained(saved, dtype=param_dtype, mesh=run.mesh)
    student = _prune(run, teacher, key, param_dtype)
    save_pretrained(student, saved)  # every process gathers, process 0 writes; the stamp goes last
    if jax.process_index() == 0:
        atomic_write(saved / INIT_STAMP, json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return student


INIT_STAMP = "vishwam_init.json"


def _init_stamp(run: Prepared) -> dict:
    """What the pruned student depends on: the teacher, the student's section, the data, the probe's batch and
    the parameter dtype. A saved student is reused only for an equal stamp."""
    c = config_to_dict(run.cfg)
    tr = c["training"]
    return {"version": 1, "teacher": str(run.lazy_teacher.directory), "teacher_model": c["distillation"]["teacher_model"],
            "student_model": c["distillation"]["student_model"], "data": c["data"],
            **{k: tr[k] for k in ("seed", "seq_len", "batch_size", "param_dtype")}}


def _read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / INIT_STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _prune(run: Prepared, teacher: TeacherSource, key, param_dtype) -> CausalLM:
    """`init: from_teacher`: the student pruned from the teacher (see `init_student`)."""
    cfg = run.cfg
    t = cfg.distillation.teacher_model
    cross = specs.cross_tokenizer(cfg)
    probe = data_lib.batch_for_step(run.train_data, seed=cfg.training.seed, step=0,
                                    batch_size=min(8, cfg.training.batch_size))
    if cross:  # the teacher ranks its channels on its own tokens
        probe = {"input_ids": probe["teacher_input_ids"], "mask": probe["teacher_input_mask"]}
    keys = ("input_ids", "mask") + (("segment_ids",) if "segment_ids" in probe else ())  # packed chat rows
    probe = global_batch({k: probe[k] for k in keys}, rows_sharding(run.mesh, len(probe["mask"])))
    pairs = full_pairs(specs.init_layer_pairs(run.student_config, run.teacher_config),
                       run.student_config.num_hidden_layers, run.teacher_config.num_hidden_layers)
    # Across tokenizers the body is pruned with the teacher's vocabulary and the embeddings then given by FVT.
    pruned_config = with_teacher_vocab(run.student_config, run.teacher_config) if cross else run.student_config
    skeleton = eqx.filter_eval_shape(init_model, pruned_config, key=key, dtype=param_dtype)
    # Ranked in the teacher's own dtype on the mesh, one layer at a time; sliced one student layer at a time,
    # cast to the parameter dtype as it is taken and placed as the training state is (never whole on a device).
    common = dict(pairs=pairs, probe_ids=None, probe_mask=None, key=key, dtype=param_dtype,
                  shardings=tree_shardings(skeleton, run.mesh))
    if cross:
        student_shardings = tree_shardings(eqx.filter_eval_shape(init_model, run.student_config, key=key,
                                                                 dtype=param_dtype), run.mesh)
        finish = lambda pruned: fvt_student(pruned, run.student_config, cfg, run.lazy_teacher.directory,  # noqa: E731
                                            shardings=student_shardings, log=log)
    else:
        finish = lambda pruned: pruned  # noqa: E731
    if teacher.kind == "resident":
        scores = importance_scores(teacher.model, probe["input_ids"], probe["mask"], probe.get("segment_ids"),
                                   activation_sharding=rows_sharding(run.mesh, len(probe["mask"]), 3))
        return finish(init_student_from_teacher(teacher.model, pruned_config, scores=scores, **common))
    # Streamed or cached: the teacher streams group by group for the ranking, then only its mapped layers load.
    streamed = teacher.model if teacher.kind == "streamed" else StreamedTeacher(
        run.lazy_teacher, dtype=specs.DTYPES[t.dtype], max_resident_shards=t.max_resident_shards, mesh=run.mesh)
    try:
        scores = streamed.importance(probe["input_ids"], probe["mask"], probe.get("segment_ids"))
        numbers = sorted({n for _, n in pairs})
        return finish(init_student_from_teacher(streamed.with_layers(numbers), pruned_config, scores=scores,
                                                teacher_layers=numbers, **common))
    finally:
        if streamed is not teacher.model:
            streamed.close()


def build_state(run: Prepared, teacher: TeacherSource | None, optimizer: optax.GradientTransformation, *,
                abstract: bool = False):
    """**Returns:** `(state, shardings)`: the initial `TrainState`, every array leaf placed by the rule table on
    the run's mesh, and those shardings (the step's output shardings and the checkpoint's restore target).

    With `abstract` (a resumed run, whose every array the checkpoint replaces) the state is only its shapes and
    shardings (`jax.ShapeDtypeStruct`s): nothing is initialised, pruning never runs again on resume, and no teacher
    is needed (None)."""
    cfg, objective = run.cfg, run.objective
    param_dtype = specs.DTYPES[cfg.training.param_dtype]
    k_student, k_proj, k_state = jax.random.split(jax.random.key(cfg.training.seed), 3)

    def make(student):
        projections = None
        if objective.uses_features:
            projections = cast_floating(FeatureProjections(objective.feature_pairs, run.student_config.hidden_size,
                                                           run.teacher_config.hidden_size, key=k_proj), param_dtype)
        balancer = None
        if objective.balances:
            e = cfg.distillation_params.eplb
            balancer = LossBalancer(len(objective.feature_pairs), decay=e.ema_decay, target_ratio=e.target_ratio)
        return init_state(student, projections, balancer, optimizer, k_state, objective.feature_pairs,
                          initial_rollout(objective, cfg.training))

    if abstract:
        state = eqx.filter_eval_shape(
            lambda: make(cast_floating(init_model(run.student_config, key=k_student), param_dtype)))
        arrays, static = eqx.partition(state, lambda x: isinstance(x, jax.ShapeDtypeStruct))
        shardings = tree_shardings(arrays, run.mesh)
        placed = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), arrays, shardings)
        return eqx.combine(placed, static), shardings
    student = init_student(run, teacher, k_student)
    log(f"student: {run.student_config.architecture} {count_parameters(student) / 1e6:.2f}M params "
        f"({cfg.distillation.student_model.init} init), mapping {list(objective.feature_pairs)}")
    arrays, static = eqx.partition(make(student), eqx.is_array)
    shardings = tree_shardings(arrays, run.mesh)
    return eqx.combine(jax.device_put(arrays, shardings), static), shardings


__all__ = ["Prepared", "build_state", "check_samples", "compile_check_due", "init_student", "prepare"]
