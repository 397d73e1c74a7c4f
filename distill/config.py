"""The objective's config sections, and the machinery every config section of a run shares.

`DistillationParams` (the YAML section `distillation_params`) with its nested `temperature`, `layer_mapping` and
`eplb` sections is what `distill.objective.Objective` is built from, as it is: the objective reads these fields,
it does not restate them. Each section checks its own values in `__post_init__` (skipped inside `unvalidated()`,
so that `vishwam.config.cli` can build a config in layers and validate once at the end) and raises a
:class:`~models.errors.ConfigError` that names the dotted key (`distillation_params.kd_weight`).

`Section` is the base of every section, here and in `vishwam.config.sections`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Literal

from .errors import ConfigError

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


#: Integers of a config feed JAX's 32-bit integers (seeds, steps, token counts): larger ones would overflow there.
INT_LIMIT = 2**31


def number_problem(value: object) -> str | None:
    """Why a number given for a config key or a flag is unusable, or None: a float must be finite (NaN compares
    false with every bound, so range checks alone let it through) and an integer must fit in 32 bits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        bound = f"at most {INT_LIMIT - 1}" if value > 0 else f"at least {-INT_LIMIT}"
        return f"must be {bound} (a 32-bit integer), got {value}"
    return None


def config_error(key: str, message: str) -> ConfigError:
    error = ConfigError(f"config key '{key}' {message}")
    error.key = key  # type: ignore[attr-defined]  # lets the CLI add the file the key came from
    return error


def _numbers(key: str, value: object) -> Iterator[tuple[str, object]]:
    """`(dotted key, number)` for a field's value: a number, or the numbers in a tuple of them (`pairs[0][1]`)."""
    if isinstance(value, (int, float)):
        yield key, value
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _numbers(f"{key}[{i}]", item)


class Section:
    """Shared checking for config sections. `_path` is the section's dotted path in the YAML."""

    _path = ""

    def __post_init__(self) -> None:
        if _VALIDATE.get():
            self._check_numbers()
            self._check()

    def _check_numbers(self) -> None:
        """Every number of this section's own fields (nested sections check theirs) is finite and fits in 32 bits:
        checked once here, where values enter, for every key."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            for key, value in _numbers(self._key(field.name), getattr(self, field.name)):
                problem = number_problem(value)
                if problem is not None:
                    raise config_error(key, problem)

    def _check(self) -> None:
        pass

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise config_error(self._key(name), f"must be > 0, got {value}")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise config_error(self._key(name), f"must be >= 0, got {value}")

    def validate(self) -> None:
        """Check this section and every section nested in it; raise `ConfigError` naming the first bad key."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Section):
                value.validate()
        self._check_numbers()
        self._check()


# -------------------------------------------------------------------------------------------- distillation params


@dataclasses.dataclass(frozen=True)
class TemperatureConfig(Section):
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
            raise config_error(self._key("min"), f"must be <= {self._key('max')} ({self.max}), got {self.min}")
        if self.schedule == "adaptive" and not self.min <= self.start <= self.max:
            raise config_error(self._key("start"), f"must lie in [min, max] = [{self.min}, {self.max}] for the adaptive "
                        f"schedule, got {self.start}")


@dataclasses.dataclass(frozen=True)
class LayerMappingConfig(Section):
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
            raise config_error(self._key("k"), "is required for strategy 'last_k'")
        if self.k is not None and self.strategy not in ("last_k", "seed"):
            raise config_error(self._key("k"), f"is only used with strategies 'last_k' and 'seed', not '{self.strategy}'")
        if self.strategy == "explicit" and not self.pairs:
            raise config_error(self._key("pairs"), "must list (student, teacher) layer pairs for strategy 'explicit'")
        if self.strategy != "explicit" and self.pairs:
            raise config_error(self._key("pairs"), f"is only used with strategy 'explicit', but strategy is "
                        f"'{self.strategy}'")
        for i, (student, teacher) in enumerate(self.pairs):
            if student < 0 or teacher < 0:
                raise config_error(f"{self._key('pairs')}[{i}]", f"must hold layer indices >= 0, got {[student, teacher]}")
        students = [student for student, _ in self.pairs]
        if len(set(students)) != len(students):
            raise config_error(self._key("pairs"), "maps a student layer more than once")


@dataclasses.dataclass(frozen=True)
class EPLBConfig(Section):
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
    probe_tokens: int = 1024
    """Tokens of the sample layer similarity is measured on when remapping (whole sequences, at least one): the
    probe holds (student layers + 1) Gram matrices of tokens² floats."""

    def _check(self) -> None:
        self._positive("num_stages", "stage_steps", "probe_tokens")
        self._non_negative("ramp_steps")
        self._positive("target_ratio")
        if not 0.0 <= self.ema_decay < 1.0:
            raise config_error(self._key("ema_decay"), f"must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024): a share of each micro-batch's rows are prompts that the
    current student completes; the loss on those completions is the generalised JSD(beta) between the teacher's
    and the student's token distributions. Needs chat data (prompts and completions)."""

    _path = "distillation_params.on_policy"

    fraction: float = 0.0
    """Share of each micro-batch's rows whose completion the student samples (lambda), in [0, 1); 0 turns
    on-policy distillation off. Rounded to whole rows per micro-batch, which must leave at least one row of each
    kind: 1 <= round(fraction x micro-batch rows) <= micro-batch rows - 1."""
    max_new_tokens: int = 64
    """Most tokens the student writes per prompt; prompts longer than seq_len + 1 - max_new_tokens are left out
    (their count is logged)."""
    temperature: float = 1.0
    """Sampling temperature of the student's completions (0: greedy)."""
    top_p: float = 1.0
    """Nucleus filter of the student's sampling, in (0, 1] (1: off)."""
    beta: float = 0.5
    """Generalised JSD weight of the teacher, in [0, 1]: 0 is forward KL(teacher || student), 1 reverse KL."""
    every: int = 1
    """Sample new completions every this many steps; the steps between reuse the last ones."""

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def rows(self, micro_batch_size: int) -> int:
        """On-policy rows per micro-batch of `micro_batch_size` rows: `round(fraction x micro_batch_size)` (0 when
        off), which must leave at least one row of each kind (on-policy and data)."""
        if not self.enabled:
            return 0
        rows = int(round(self.fraction * micro_batch_size))
        if not 1 <= rows <= micro_batch_size - 1:
            raise config_error(self._key("fraction"), f"x training.micro_batch_size ({self.fraction} x "
                               f"{micro_batch_size}) rounds to {rows} on-policy rows per micro-batch: each "
                               "micro-batch needs at least one on-policy row and one data row")
        return rows

    def _check(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise config_error(self._key("fraction"), f"must be in [0, 1), got {self.fraction}")
        self._positive("max_new_tokens", "every")
        self._non_negative("temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise config_error(self._key("top_p"), f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.beta <= 1.0:
            raise config_error(self._key("beta"), f"must be in [0, 1], got {self.beta}")


@dataclasses.dataclass(frozen=True)
class DistillationParams(Section):
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
    on_policy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)
    """On-policy distillation on the student's own completions (chat data)."""
    alm_weight: float = 1.0
    """Cross-tokenizer runs only: weight of ALM chunk-likelihood matching (distill.cross_tokenizer.alm_loss)."""
    alm_temperature: float = 1.0
    """Cross-tokenizer runs only: ALM's binarisation temperature (> 0). 1.0 measured best of 1, 10 and 100
    (tokenkit's default) in docs/cross_tokenizer.md."""
    shared_kl_weight: float | None = None
    """Cross-tokenizer runs only: weight of the forward KL on the shared vocabulary at chunks that are one token
    on each side with the same string (distill.cross_tokenizer.shared_vocab_kl). None: 1.0 with a resident teacher
    (measured: the largest part of the gain, docs/cross_tokenizer.md), 0 with a streamed or cached one (which give
    the step only their log-probability of each token)."""
    teacher_seq_len: int | None = None
    """Cross-tokenizer runs only: the teacher's tokens per window (a window's chunks past them do not count).
    None: training.seq_len + training.seq_len // 4."""

    def _check(self) -> None:
        weights = ("kd_weight", "ce_weight", "feature_weight", "attention_weight")
        self._non_negative(*weights)
        if not any(getattr(self, name) > 0 for name in weights):
            raise config_error(self._key("kd_weight"), "and the other loss weights are all 0: nothing to train on")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise config_error(self._key("jsd_beta"), f"must be in [0, 1], got {self.jsd_beta}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise config_error(self._key("label_smoothing"), f"must be in [0, 1), got {self.label_smoothing}")
        self._positive("logit_chunk_size", "relation_heads", "alm_temperature", "teacher_seq_len")
        self._non_negative("alm_weight", "shared_kl_weight")
        for i, layer in enumerate(self.attention_layers):
            if layer < 0:
                raise config_error(f"{self._key('attention_layers')}[{i}]", f"must be a layer index >= 0, got {layer}")
        if len(set(self.attention_layers)) != len(self.attention_layers):
            raise config_error(self._key("attention_layers"), "lists a layer more than once")


__all__ = ["INT_LIMIT", "DistillationParams", "EPLBConfig", "LayerMappingConfig", "OnPolicyConfig", "Section",
           "TemperatureConfig", "config_error", "number_problem", "unvalidated"]
