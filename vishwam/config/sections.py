"""The run configuration: nested frozen dataclasses, one per YAML section.

Every field carries an attribute docstring, which tyro turns into `--help` text. Every section checks its own
values in `__post_init__` and raises a :class:`~vishwam.errors.ConfigError` that names the dotted key
(`training.batch_size`). The objective's section, `distillation_params`, and the `Section` machinery live in
`distill.config`, next to the objective that reads them; :meth:`RunConfig.validate` re-runs every check, including the ones that span sections.
`vishwam.config.cli.parse_args` builds the config from YAML and flags and validates once at the end, so a flag can fix
a value that the YAML alone would get wrong.

Paths (`data.train`, `distillation.teacher_model.path`, `training.output_dir`, ...) are kept exactly as given:
relative paths are relative to the working directory of the run, not to the YAML file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import yaml

from distill.config import DistillationParams, Section, config_error, unvalidated
from vishwam.io.files import atomic_write

# ----------------------------------------------------------------------------------------------- distillation


@dataclasses.dataclass(frozen=True)
class TeacherConfig(Section):
    """The teacher: a Hugging Face checkpoint that is only run forward."""

    _path = "distillation.teacher_model"

    path: str
    """Teacher checkpoint: a local Hugging Face directory (config.json + safetensors) or a hub id."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype the teacher weights are held and run in."""
    loading: Literal["resident", "streamed", "cached"] = "resident"
    """'resident': all weights on device; 'streamed': shards loaded on demand; 'cached': top-k logits cached."""
    max_resident_shards: int = 5
    """With loading=streamed: the most safetensors shards held in memory at once."""
    cache_dir: str | None = None
    """With loading=cached: directory for the teacher's cached top-k logits (required then)."""
    top_k: int = 64
    """Number of teacher logits kept per token when the teacher's outputs are cached."""

    def _check(self) -> None:
        if not self.path:
            raise config_error(self._key("path"), "must name a checkpoint directory or hub id")
        self._positive("max_resident_shards", "top_k")
        if self.loading == "cached" and not self.cache_dir:
            raise config_error(self._key("cache_dir"), "is required when distillation.teacher_model.loading is 'cached'")


@dataclasses.dataclass(frozen=True)
class StudentConfig(Section):
    """The student: how it is initialised and its architecture (unset fields default from the teacher)."""

    _path = "distillation.student_model"

    init: Literal["random", "from_teacher", "path"] = "from_teacher"
    """'random': fresh weights; 'from_teacher': weights taken from the teacher's mapped layers; 'path': load path."""
    path: str | None = None
    """With init=path: the student's Hugging Face checkpoint directory or hub id (its config sets the architecture)."""
    hidden_size: int | None = None
    """Model width (HF config name). None: the teacher's."""
    num_hidden_layers: int | None = None
    """Number of transformer layers. None: the teacher's."""
    num_attention_heads: int | None = None
    """Number of query heads. None: the teacher's."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (must divide num_attention_heads). None: the teacher's."""
    intermediate_size: int | None = None
    """MLP hidden width. None: the teacher's."""
    head_dim: int | None = None
    """Per-head dimension. None: the teacher's."""
    tie_word_embeddings: bool | None = None
    """Share the input embedding with the LM head. None: the teacher's setting."""
    tokenizer: str | None = None
    """The student's own tokenizer (a tokenizer.json, or a directory with one, with its tokenizer_config.json).
    None: the teacher's. Set and different from the teacher's: cross-tokenizer distillation (docs/cross_tokenizer.md);
    the student's vocabulary and special ids come from it."""
    vocab_size: int | None = None
    """With tokenizer set: the student's vocabulary size (at least the tokenizer's; e.g. padded to a multiple of
    128). None: the tokenizer's own size."""

    def _check(self) -> None:
        arch = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim")
        self._positive(*arch, "vocab_size")
        if self.vocab_size is not None and self.tokenizer is None:
            raise config_error(self._key("vocab_size"), "is only used with distillation.student_model.tokenizer set "
                                                        "(a same-tokenizer student has the teacher's vocabulary)")
        if self.init == "path":
            if not self.path:
                raise config_error(self._key("path"), "is required when distillation.student_model.init is 'path'")
            for name in (*arch, "tie_word_embeddings", "vocab_size"):
                if getattr(self, name) is not None:
                    raise config_error(self._key(name), "cannot be set with init 'path' (the checkpoint's config sets it)")
        elif self.path is not None:
            raise config_error(self._key("path"), f"is only used with init 'path', but init is '{self.init}'")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv_heads is not None and heads % kv_heads:
            raise config_error(self._key("num_key_value_heads"),
                        f"must divide num_attention_heads ({heads}), got {kv_heads}")


@dataclasses.dataclass(frozen=True)
class DistillationConfig(Section):
    """The teacher and student models."""

    _path = "distillation"

    teacher_model: TeacherConfig
    """The teacher model."""
    student_model: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    """The student model."""


# ------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Training and evaluation text, packed into fixed-length windows."""

    _path = "data"

    train: tuple[str, ...]
    """Training files or globs (relative to the working directory): .jsonl with 'text' (or chat rows: 'messages',
    or 'prompt' + 'completion'), .txt, 1-D token .npy, or with pyarrow ([data] extra) .parquet files and
    directories written by datasets' save_to_disk, with the same columns as .jsonl's fields."""
    eval: tuple[str, ...] = ()
    """Evaluation files or globs, in the same formats as train. Empty: see eval_fraction."""
    tokenizer: str | None = None
    """tokenizer.json (or its directory) for text data. None: the teacher's. Not needed for .npy data."""
    eval_fraction: float = 0.0
    """When eval is empty: hold out this fraction of the train token stream (its tail) for evaluation; with chat
    data, the last rows."""
    chat_template: str | None = None
    """Chat data ('messages' rows): a Jinja chat template file. None: the tokenizer's own (chat_template.jinja
    beside it, else 'chat_template' in its tokenizer_config.json)."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Chat data: the tokens KD, CE and feature losses count: 'assistant' (assistant turns, or a row's
    'completion') or 'all' (every token but each row's first)."""
    store_dir: str | None = None
    """Where the token store of the data lives (train in store_dir/train, eval in store_dir/eval): prepared there
    on first use (python -m vishwam.data, or the run itself), reused on every later start; a store there made
    from other data is an error. None: a directory named by the sources' fingerprint under ~/.cache/vishwam/data."""
    workers: int = 0
    """Tokenizer processes when the run prepares its token store itself (0: one per CPU core)."""

    def _check(self) -> None:
        if not self.train:
            raise config_error(self._key("train"), "must list at least one file or glob")
        for name in ("train", "eval"):
            for i, item in enumerate(getattr(self, name)):
                if not item:
                    raise config_error(f"{self._key(name)}[{i}]", "is an empty path")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise config_error(self._key("eval_fraction"), f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval and self.eval_fraction > 0:
            raise config_error(self._key("eval_fraction"), "cannot be used together with data.eval files")
        if self.workers < 0:
            raise config_error(self._key("workers"), f"must be >= 0, got {self.workers}")
        if self.store_dir is not None and not self.store_dir:
            raise config_error(self._key("store_dir"), "is an empty path")


# --------------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class DownstreamConfig(Section):
    """lm-evaluation-harness tasks scored at evaluations (`vishwam.downstream`; lm-eval is the [eval] extra): each
    task's metrics go to eval.json (`downstream`; the teacher's, scored once, to `teacher_downstream`),
    output_dir/downstream.jsonl, Aim and the log."""

    _path = "training.downstream"

    tasks: tuple[str, ...] = ()
    """lm-eval task, group or tag names (registered ones whose data is reachable, or YAML files under include_path).
    Empty: off."""
    include_path: str | None = None
    """A directory of lm-eval task YAML files (local data: dataset_path json, dataset_kwargs.data_files)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt. None: each task's own, else 0."""
    limit: int | None = None
    """Documents per task scored at each evaluation: a fixed subset drawn with seed. None: all."""
    every: int | None = None
    """Score the tasks every this many steps (a multiple of training.eval_every); the last step is always scored.
    None: at every evaluation."""
    seed: int = 1234
    """Seed of the few-shot draws and of limit's subset (lm-eval's default few-shot seed). Apart from
    training.seed, so that runs of different seeds are scored on the same documents."""

    def _check(self) -> None:
        self._positive("limit", "every")
        self._non_negative("num_fewshot", "seed")
        for i, task in enumerate(self.tasks):
            if not task.strip():
                raise config_error(f"{self._key('tasks')}[{i}]", "is an empty task name")
        if self.include_path is not None and not self.include_path:
            raise config_error(self._key("include_path"), "is an empty path")


@dataclasses.dataclass(frozen=True)
class TrainingConfig(Section):
    """The optimisation loop, logging, evaluation and checkpointing."""

    _path = "training"

    output_dir: str = "outputs/run"
    """Directory for metrics.jsonl, eval.json, checkpoints/, student/ and config.yaml. Re-running resumes."""
    seed: int = 0
    """Seed for initialisation and the data order (the batch at a step depends only on seed and step)."""
    max_steps: int = 100
    """Number of optimizer steps."""
    batch_size: int = 8
    """Sequences per optimizer step, all devices together; split into grad_accum_steps micro-batches."""
    seq_len: int = 128
    """Tokens per training sequence."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (must divide batch_size)."""
    learning_rate: float = 3e-4
    """Peak learning rate (AdamW), reached after warmup_steps, then decayed on a cosine to 10% of it at max_steps."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the student's trainable parameters and optimizer state."""
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Dtype of the student's matmuls (softmax, norms and losses always run in float32)."""
    remat: bool = False
    """Rematerialise each student layer in the backward pass (less memory, more compute)."""
    log_every: int = 10
    """Write a line to metrics.jsonl every this many steps."""
    eval_every: int = 50
    """Evaluate every this many steps."""
    eval_batches: int = 4
    """Batches per evaluation (0: no evaluation)."""
    sample_prompts: tuple[str, ...] = ()
    """Prompts whose greedy continuation by the student (and, once, by a resident teacher) is written at every
    evaluation to output_dir/samples.jsonl (step, prompt, student, teacher) and to Aim as text."""
    sample_prompts_file: str | None = None
    """A .jsonl file of more such prompts (a string field `prompt` or `text` per line)."""
    sample_max_new_tokens: int = 48
    """Tokens generated per sample prompt."""
    downstream: DownstreamConfig = dataclasses.field(default_factory=DownstreamConfig)
    """lm-eval tasks scored at evaluations (tasks, include_path, num_fewshot, limit, every, seed)."""
    save_every: int = 50
    """Write a checkpoint every this many steps."""
    keep_checkpoints: int = 2
    """Number of newest checkpoints kept."""
    max_nonfinite_steps: int = 5
    """A non-finite (NaN/inf) loss or gradient skips the step's update; this many skipped steps in a row stop the
    run."""
    dry_run: bool | Literal["compile"] = False
    """true: print the planner's memory plan from the shapes and exit. 'compile': also compile every program of
    the run from abstract inputs (no weight read) for compile_target and write output_dir/memory_plan.json."""
    compile_target: str | None = None
    """Where a dry run compiles for: tpu:<v4|v5e|v5p|v6e>-<size> (libtpu, the [tpu] extra), cpu:<N> (N simulated
    host devices), or None (this host's devices)."""
    compile_check: Literal["auto", "on", "off"] = "auto"
    """Before a run reads any weight: compile its programs from the abstract shapes on this host's devices and stop
    (one line, exit 2) if XLA's bytes for one exceed a device's capacity. 'auto': on accelerators (GPU, TPU),
    where XLA's compilation cache (compilation_cache) makes its compiles the run's; 'on' also on CPU hosts."""
    compilation_cache: str = "auto"
    """XLA's persistent compilation cache (JAX's jax_compilation_cache_dir): a directory, 'off', or 'auto'
    ($XDG_CACHE_HOME/vishwam/xla, default ~/.cache/vishwam/xla, when the compile check runs). A program compiled
    once is read back: the compile check's compiles serve the run, and a resumed run skips its compiles."""

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch: batch_size // grad_accum_steps."""
        return self.batch_size // self.grad_accum_steps

    def _check(self) -> None:
        self._positive("max_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
                       "save_every", "keep_checkpoints", "max_nonfinite_steps", "sample_max_new_tokens")
        self._non_negative("seed", "learning_rate", "warmup_steps", "weight_decay", "grad_clip", "eval_batches")
        if not self.output_dir:
            raise config_error(self._key("output_dir"), "must not be empty")
        if self.batch_size % self.grad_accum_steps:
            raise config_error(self._key("grad_accum_steps"),
                        f"must divide training.batch_size ({self.batch_size}), got {self.grad_accum_steps}")
        every = self.downstream.every
        if every is not None and every % self.eval_every:
            raise config_error("training.downstream.every", f"must be a multiple of training.eval_every "
                                                            f"({self.eval_every}), got {every}")


# ------------------------------------------------------------------------------------ parallelism and the rest


@dataclasses.dataclass(frozen=True)
class ParallelismConfig(Section):
    """Device mesh axis sizes; their product is the number of devices used."""

    _path = "parallelism"

    data: int = 1
    """Data-parallel axis: replicas that each see a slice of the batch."""
    fsdp: int = 1
    """Fully sharded data-parallel axis: parameters and optimizer state sharded, batch split too."""
    tensor: int = 1
    """Tensor-parallel axis: attention heads and MLP width split across devices."""

    @property
    def num_devices(self) -> int:
        """Devices in the mesh: data x fsdp x tensor."""
        return self.data * self.fsdp * self.tensor

    @property
    def shape(self) -> dict[str, int]:
        """Axis name -> size, as `jax.sharding.Mesh.shape` reads: the sharding rules take either, so a mesh with
        more devices than this host has can be planned from this section alone."""
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def size(self) -> int:
        """Devices in the mesh (`jax.sharding.Mesh.size`)."""
        return self.num_devices

    def __str__(self) -> str:
        return f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}"

    def _check(self) -> None:
        self._positive("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Section):
    """Multi-host set-up through jax.distributed.initialize (leave the defaults for one host)."""

    _path = "distributed"

    coordinator_address: str | None = None
    """host:port of process 0. None: a SLURM, Open MPI or TPU-pod job is joined through JAX's cluster detection
    (process count and id from the scheduler); with num_processes > 1 and no cluster, an error."""
    num_processes: int = 1
    """Total number of processes (hosts)."""
    process_id: int = 0
    """This process's index, in [0, num_processes)."""

    def _check(self) -> None:
        self._positive("num_processes")
        if not 0 <= self.process_id < self.num_processes:
            raise config_error(self._key("process_id"), f"must be in [0, {self.num_processes}), got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig(Section):
    """Experiment tracking with Aim."""

    _path = "tracking"

    aim: bool = True
    """Log metrics to an Aim run."""
    repo: str | None = None
    """Aim repository directory. None: training.output_dir."""
    experiment: str = "vishwam"
    """Aim experiment name."""

    def _check(self) -> None:
        if not self.experiment:
            raise config_error(self._key("experiment"), "must not be empty")


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """A distillation run: models, data, training, losses, parallelism, multi-host set-up and tracking."""

    distillation: DistillationConfig
    """Teacher and student models."""
    data: DataConfig
    """Training and evaluation data."""
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    """Optimisation loop, logging, evaluation and checkpointing."""
    distillation_params: DistillationParams = dataclasses.field(default_factory=DistillationParams)
    """Distillation losses and schedules."""
    parallelism: ParallelismConfig = dataclasses.field(default_factory=ParallelismConfig)
    """Device mesh."""
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    """Multi-host set-up."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """Experiment tracking."""

    def _check(self) -> None:
        batch_devices = self.parallelism.data * self.parallelism.fsdp
        micro = self.training.micro_batch_size
        if micro % batch_devices:
            raise config_error("training.batch_size", f"gives {micro} sequences per micro-batch, which must divide evenly "
                        f"over parallelism.data x parallelism.fsdp = {batch_devices} devices")
        on = self.distillation_params.on_policy
        on.rows(micro)  # at least one on-policy and one data row per micro-batch
        if on.enabled:
            if self.distillation.teacher_model.loading == "cached":
                raise config_error("distillation_params.on_policy.fraction", "> 0 needs a teacher that scores the "
                                   "student's completions (loading 'resident' or 'streamed'); a cache holds only the "
                                   "data's rows")
            if self.data.loss_on != "assistant":
                raise config_error("distillation_params.on_policy.fraction", "> 0 needs data.loss_on 'assistant' "
                                   "(the prompts are the tokens before the targets)")
            if on.max_new_tokens >= self.training.seq_len:
                raise config_error("distillation_params.on_policy.max_new_tokens", f"({on.max_new_tokens}) must be "
                                   f"below training.seq_len ({self.training.seq_len})")


# ------------------------------------------------------------------------------------------------ serialising


def config_to_dict(cfg: Any) -> Any:
    """A config (or section) as plain YAML-serialisable data: dicts in field order, tuples as lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {field.name: config_to_dict(getattr(cfg, field.name)) for field in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(item) for item in cfg]
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config as YAML that `--config` reads back to an equal config (atomically)."""
    text = "# The fully resolved vishwam config of this run; `python run.py --config <this file>` repeats it.\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write(path, text)


__all__ = ["DataConfig", "DistillationConfig", "DownstreamConfig", "DistillationParams", "DistributedConfig", "ParallelismConfig",
           "RunConfig", "Section", "StudentConfig", "TeacherConfig", "TrackingConfig", "TrainingConfig",
           "config_to_dict", "save_config", "unvalidated"]
