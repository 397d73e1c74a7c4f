"""The run configuration: nested frozen dataclasses, one per YAML section.

Every field carries an attribute docstring, which tyro turns into `--help` text. Every section checks its own
values in `__post_init__` and raises a :class:`~vishwam.errors.ConfigError` that names the dotted key
(`training.batch_size`); :meth:`RunConfig.validate` re-runs every check, including the ones that span sections.
`vishwam.cli.parse_args` builds the config from YAML and flags and validates once at the end, so a flag can fix
a value that the YAML alone would get wrong.

Paths (`data.train`, `distillation.teacher_model.path`, `training.output_dir`, ...) are kept exactly as given:
relative paths are relative to the working directory of the run, not to the YAML file.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import yaml

from vishwam.errors import ConfigError

# parse_args builds the YAML layer and runs tyro with checks off, then validates the final config once.
_VALIDATE: contextvars.ContextVar[bool] = contextvars.ContextVar("vishwam_config_validate", default=True)


@contextlib.contextmanager
def unvalidated() -> Iterator[None]:
    """Within this block, constructing a config section skips its checks (for building configs in layers)."""
    token = _VALIDATE.set(False)
    try:
        yield
    finally:
        _VALIDATE.reset(token)


def _fail(key: str, message: str) -> ConfigError:
    error = ConfigError(f"config key '{key}' {message}")
    error.key = key  # type: ignore[attr-defined]  # lets the CLI add the file the key came from
    return error


class _Section:
    """Shared checking for config sections. `_path` is the section's dotted path in the YAML."""

    _path = ""

    def __post_init__(self) -> None:
        if _VALIDATE.get():
            self._check()

    def _check(self) -> None:
        pass

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise _fail(self._key(name), f"must be > 0, got {value}")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise _fail(self._key(name), f"must be >= 0, got {value}")

    def validate(self) -> None:
        """Check this section and every section nested in it; raise `ConfigError` naming the first bad key."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, _Section):
                value.validate()
        self._check()


# ----------------------------------------------------------------------------------------------- distillation


@dataclasses.dataclass(frozen=True)
class TeacherConfig(_Section):
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
            raise _fail(self._key("path"), "must name a checkpoint directory or hub id")
        self._positive("max_resident_shards", "top_k")
        if self.loading == "cached" and not self.cache_dir:
            raise _fail(self._key("cache_dir"), "is required when distillation.teacher_model.loading is 'cached'")


@dataclasses.dataclass(frozen=True)
class StudentConfig(_Section):
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

    def _check(self) -> None:
        arch = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim")
        self._positive(*arch)
        if self.init == "path":
            if not self.path:
                raise _fail(self._key("path"), "is required when distillation.student_model.init is 'path'")
            for name in (*arch, "tie_word_embeddings"):
                if getattr(self, name) is not None:
                    raise _fail(self._key(name), "cannot be set with init 'path' (the checkpoint's config sets it)")
        elif self.path is not None:
            raise _fail(self._key("path"), f"is only used with init 'path', but init is '{self.init}'")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv_heads is not None and heads % kv_heads:
            raise _fail(self._key("num_key_value_heads"),
                        f"must divide num_attention_heads ({heads}), got {kv_heads}")


@dataclasses.dataclass(frozen=True)
class DistillationConfig(_Section):
    """The teacher and student models."""

    _path = "distillation"

    teacher_model: TeacherConfig
    """The teacher model."""
    student_model: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    """The student model."""


# ------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Training and evaluation text, packed into fixed-length windows."""

    _path = "data"

    train: tuple[str, ...]
    """Training files or globs (relative to the working directory): .jsonl with 'text', .txt, or 1-D token .npy."""
    eval: tuple[str, ...] = ()
    """Evaluation files or globs, in the same formats as train. Empty: see eval_fraction."""
    tokenizer: str | None = None
    """tokenizer.json (or its directory) for text data. None: the teacher's. Not needed for .npy data."""
    eval_fraction: float = 0.0
    """When eval is empty: hold out this fraction of the train token stream (its tail) for evaluation."""

    def _check(self) -> None:
        if not self.train:
            raise _fail(self._key("train"), "must list at least one file or glob")
        for name in ("train", "eval"):
            for i, item in enumerate(getattr(self, name)):
                if not item:
                    raise _fail(f"{self._key(name)}[{i}]", "is an empty path")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise _fail(self._key("eval_fraction"), f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval and self.eval_fraction > 0:
            raise _fail(self._key("eval_fraction"), "cannot be used together with data.eval files")


# --------------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainingConfig(_Section):
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
    """Peak learning rate (AdamW), reached after warmup_steps."""
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
    """Batches per evaluation."""
    save_every: int = 50
    """Write a checkpoint every this many steps."""
    keep_checkpoints: int = 2
    """Number of newest checkpoints kept."""
    max_nonfinite_steps: int = 5
    """Stop the run after this many non-finite (NaN/inf) steps in a row."""
    dry_run: bool = False
    """Build the models with abstract shapes, print the memory plan and exit without training."""

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch: batch_size // grad_accum_steps."""
        return self.batch_size // self.grad_accum_steps

    def _check(self) -> None:
        self._positive("max_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
                       "save_every", "keep_checkpoints", "max_nonfinite_steps")
        self._non_negative("seed", "learning_rate", "warmup_steps", "weight_decay", "grad_clip", "eval_batches")
        if not self.output_dir:
            raise _fail(self._key("output_dir"), "must not be empty")
        if self.batch_size % self.grad_accum_steps:
            raise _fail(self._key("grad_accum_steps"),
                        f"must divide training.batch_size ({self.batch_size}), got {self.grad_accum_steps}")


# -------------------------------------------------------------------------------------------- distillation params


@dataclasses.dataclass(frozen=True)
class TemperatureConfig(_Section):
    """The softmax temperature of the KD loss and its schedule over training."""

    _path = "distillation_params.temperature"

    schedule: Literal["constant", "linear", "cosine", "adaptive"] = "constant"
    """'constant': start; 'linear'/'cosine': start -> end over max_steps; 'adaptive': per token, in [min, max]."""
    start: float = 2.0
    """Temperature at step 0 (the constant value for schedule=constant)."""
    end: float = 1.0
    """Temperature at the last step, for linear and cosine."""
    min: float = 0.5
    """Lower bound for schedule=adaptive."""
    max: float = 4.0
    """Upper bound for schedule=adaptive."""

    def _check(self) -> None:
        self._positive("start", "end", "min", "max")
        if self.min > self.max:
            raise _fail(self._key("min"), f"must be <= {self._key('max')} ({self.max}), got {self.min}")
        if self.schedule == "adaptive" and not self.min <= self.start <= self.max:
            raise _fail(self._key("start"), f"must lie in [min, max] = [{self.min}, {self.max}] for the adaptive "
                        f"schedule, got {self.start}")


@dataclasses.dataclass(frozen=True)
class LayerMappingConfig(_Section):
    """Which teacher layer each student layer is matched with (for init from the teacher and feature losses)."""

    _path = "distillation_params.layer_mapping"

    strategy: Literal["uniform", "seed", "last_k", "explicit"] = "uniform"
    """'uniform': spread evenly; 'seed': dense at the bottom, top to top; 'last_k': last k; 'explicit': pairs."""
    k: int | None = None
    """Pairs for strategy=last_k (required there); final pairs for strategy=seed (optional); unused otherwise."""
    pairs: tuple[tuple[int, int], ...] = ()
    """With strategy=explicit: (student_layer, teacher_layer) pairs, 0-based. Flag form: --...pairs 0 0 1 3."""

    def _check(self) -> None:
        self._positive("k")
        if self.strategy == "last_k" and self.k is None:
            raise _fail(self._key("k"), "is required for strategy 'last_k'")
        if self.k is not None and self.strategy not in ("last_k", "seed"):
            raise _fail(self._key("k"), f"is only used with strategies 'last_k' and 'seed', not '{self.strategy}'")
        if self.strategy == "explicit" and not self.pairs:
            raise _fail(self._key("pairs"), "must list (student, teacher) layer pairs for strategy 'explicit'")
        if self.strategy != "explicit" and self.pairs:
            raise _fail(self._key("pairs"), f"is only used with strategy 'explicit', but strategy is "
                        f"'{self.strategy}'")
        for i, (student, teacher) in enumerate(self.pairs):
            if student < 0 or teacher < 0:
                raise _fail(f"{self._key('pairs')}[{i}]", f"must hold layer indices >= 0, got {[student, teacher]}")
        students = [student for student, _ in self.pairs]
        if len(set(students)) != len(students):
            raise _fail(self._key("pairs"), "maps a student layer more than once")


@dataclasses.dataclass(frozen=True)
class EPLBConfig(_Section):
    """EPLB: mapped layer pairs switched on in stages, their losses balanced, the mapping re-derived by CKA."""

    _path = "distillation_params.eplb"

    enabled: bool = False
    """Turn EPLB on."""
    num_stages: int = 3
    """Number of stages the mapped pairs are switched on in, shallow to deep."""
    stage_steps: int = 100
    """Steps between the starts of consecutive stages."""
    ramp_steps: int = 50
    """Steps over which a pair's weight rises from 0 to 1 (0: a step)."""
    balance: bool = True
    """Divide each pair's loss by a running estimate of its magnitude."""
    target_ratio: float = 0.5
    """With balance: the intermediate losses sum to target_ratio x the KD loss."""
    ema_decay: float = 0.99
    """Decay of the running loss magnitudes, in [0, 1)."""
    remap: bool = True
    """Re-derive the mapping by student/teacher layer similarity (linear CKA)."""
    probe_batches: int = 1
    """Batches used to measure layer similarity when remapping."""

    def _check(self) -> None:
        self._positive("num_stages", "stage_steps", "probe_batches")
        self._non_negative("ramp_steps")
        self._positive("target_ratio")
        if not 0.0 <= self.ema_decay < 1.0:
            raise _fail(self._key("ema_decay"), f"must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class DistillationParams(_Section):
    """The distillation loss: its components, their weights and their settings."""

    _path = "distillation_params"

    kd_weight: float = 1.0
    """Weight of the logit distillation loss (kd_loss)."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy loss on the data's next tokens."""
    feature_weight: float = 0.0
    """Weight of the hidden-state (feature) loss over mapped layers."""
    attention_weight: float = 0.0
    """Weight of the attention-map loss over attention_layers."""
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = "forward_kl"
    """Logit loss: KL(teacher||student), KL(student||teacher), generalised Jensen-Shannon, or total variation."""
    jsd_beta: float = 0.5
    """Mixture weight of the generalised JSD, in [0, 1]."""
    temperature: TemperatureConfig = dataclasses.field(default_factory=TemperatureConfig)
    """Softmax temperature of the KD loss and its schedule."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss, in [0, 1)."""
    logit_chunk_size: int | None = None
    """Compute the logit losses over chunks of this many tokens to bound memory. None: all at once."""
    fused_logit_loss: bool = True
    """Forward-KL KD and CE in one pass with their closed-form gradient (distill.logits.kd_ce_loss); false
    differentiates the separate losses instead (same values). Other KD losses and a top-k cache never fuse."""
    layer_mapping: LayerMappingConfig = dataclasses.field(default_factory=LayerMappingConfig)
    """How student layers are matched with teacher layers."""
    feature_loss: Literal["mse", "cosine"] = "mse"
    """Loss between the hidden states of mapped layers."""
    feature_normalize: bool = True
    """Normalise hidden states before the feature loss."""
    attention_layers: tuple[int, ...] = ()
    """Student layers whose attention is matched, 0-based. Empty: derived from the layer mapping."""
    attention_loss: Literal["kl", "relation"] = "kl"
    """'kl': KL between attention maps; 'relation': MiniLM-style self-attention relations."""
    attention_head_mapping: Literal["group_average", "head_wise"] = "group_average"
    """How teacher heads meet student heads: average teacher heads in groups, or match head by head."""
    relation_heads: int = 8
    """Number of relation heads for attention_loss=relation."""
    eplb: EPLBConfig = dataclasses.field(default_factory=EPLBConfig)
    """Staged progressive distillation."""

    def _check(self) -> None:
        weights = ("kd_weight", "ce_weight", "feature_weight", "attention_weight")
        self._non_negative(*weights)
        if not any(getattr(self, name) > 0 for name in weights):
            raise _fail(self._key("kd_weight"), "and the other loss weights are all 0: nothing to train on")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise _fail(self._key("jsd_beta"), f"must be in [0, 1], got {self.jsd_beta}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise _fail(self._key("label_smoothing"), f"must be in [0, 1), got {self.label_smoothing}")
        self._positive("logit_chunk_size", "relation_heads")
        for i, layer in enumerate(self.attention_layers):
            if layer < 0:
                raise _fail(f"{self._key('attention_layers')}[{i}]", f"must be a layer index >= 0, got {layer}")
        if len(set(self.attention_layers)) != len(self.attention_layers):
            raise _fail(self._key("attention_layers"), "lists a layer more than once")


# ------------------------------------------------------------------------------------ parallelism and the rest


@dataclasses.dataclass(frozen=True)
class ParallelismConfig(_Section):
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

    def _check(self) -> None:
        self._positive("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class DistributedConfig(_Section):
    """Multi-host set-up through jax.distributed.initialize (leave the defaults for one host)."""

    _path = "distributed"

    coordinator_address: str | None = None
    """host:port of process 0. None with num_processes > 1: auto-detected by JAX (SLURM, TPU pods)."""
    num_processes: int = 1
    """Total number of processes (hosts)."""
    process_id: int = 0
    """This process's index, in [0, num_processes)."""

    def _check(self) -> None:
        self._positive("num_processes")
        if not 0 <= self.process_id < self.num_processes:
            raise _fail(self._key("process_id"), f"must be in [0, {self.num_processes}), got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig(_Section):
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
            raise _fail(self._key("experiment"), "must not be empty")


@dataclasses.dataclass(frozen=True)
class RunConfig(_Section):
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
            raise _fail("training.batch_size", f"gives {micro} sequences per micro-batch, which must divide evenly "
                        f"over parallelism.data x parallelism.fsdp = {batch_devices} devices")


# ------------------------------------------------------------------------------------------------ serialising


def config_to_dict(cfg: Any) -> Any:
    """A config (or section) as plain YAML-serialisable data: dicts in field order, tuples as lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {field.name: config_to_dict(getattr(cfg, field.name)) for field in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(item) for item in cfg]
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config as YAML that `--config` reads back to an equal config.

    The file is written next to its destination and renamed into place, so a crash never leaves half a file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    text = "# The fully resolved vishwam config of this run; `python run.py --config <this file>` repeats it.\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
