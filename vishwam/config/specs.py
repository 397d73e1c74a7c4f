"""What a run config implies before anything is loaded: the models' architectures and the objective.

Pure functions of the config (and the teacher's `config.json`), shared by the memory planner, the dry run and
the run itself, so that each rule is stated once:

- `resolve_architecture(path)`: a checkpoint's `ModelConfig` from a local directory or, offline, a bundled hub
  architecture;
- `student_config(cfg, teacher)`: the student's architecture (the teacher's with `student_model`'s fields
  changed; pruning's constraints for `init: from_teacher`; the checkpoint's own for `init: path`);
- `objective(cfg, student, teacher)`: the `distill.objective.Objective` of `distillation_params`, as it is;
- `init_layer_pairs(student, teacher)`: which teacher layer initialises each student layer when pruning;
- `cross_tokenizer(cfg)`, `teacher_seq_len(cfg)`, `shared_kl_weight(cfg)`, `student_tokenizer_ids(path)`: a
  cross-tokenizer run's mode, its teacher window, its shared-vocabulary KL weight and the student tokenizer's
  vocabulary size and special ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from huggingface_hub import hf_hub_download
from tokenizers import Tokenizer

from distill.objective import Objective
from distill.student_init import student_config_from_teacher
from models import ModelConfig
from vishwam.config.sections import RunConfig
from vishwam.errors import CheckpointError, ConfigError
from vishwam.io.checkpoint import hub_failure, read_config, resolve_checkpoint_dir

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ARCHITECTURES_DIR = Path(__file__).parents[1] / "assets" / "architectures"
_ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "head_dim", "tie_word_embeddings")


def resolve_architecture(path: str) -> ModelConfig:
    """A checkpoint's architecture: a local directory's `config.json`; else the bundled architecture file for a
    hub id (`Qwen/Qwen2.5-32B` -> `assets/architectures/Qwen--Qwen2.5-32B.json`); else the hub id's
    `config.json` alone from the hub (never the weights), whose failure is a one-line `CheckpointError`."""
    local = Path(path).expanduser()
    hub_id = not local.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.startswith(".")
    if not hub_id:
        return read_config(resolve_checkpoint_dir(path))  # a directory, or the error that names the path
    bundled = ARCHITECTURES_DIR / (path.replace("/", "--") + ".json")
    if bundled.is_file():
        return ModelConfig.from_hf(json.loads(bundled.read_text()), source=str(bundled))
    try:
        config_file = hf_hub_download(path, "config.json", etag_timeout=10)
    except Exception as e:  # offline, unreachable, gated or missing repo: one clear line
        raise CheckpointError(
            f"checkpoint {path!r} is not a local directory, vishwam bundles no architecture for it, and the Hugging "
            f"Face hub could not provide its config.json ({hub_failure(e)})"
        ) from None
    return read_config(Path(config_file).parent)


def student_config(cfg: RunConfig, teacher: ModelConfig) -> ModelConfig:
    """The student's architecture: with `init: path` the checkpoint's own; otherwise the teacher's with the
    `distillation.student_model` fields that are set changed (with `init: from_teacher`, checked to be prunable
    from the teacher: narrower, GQA groups kept whole). A cross-tokenizer student (`cross_tokenizer(cfg)`) takes
    its vocabulary size and special ids from its tokenizer (`student_tokenizer_ids`)."""
    s = cfg.distillation.student_model
    if s.init == "path":
        return resolve_architecture(s.path)
    changes = {k: getattr(s, k) for k in _ARCHITECTURE_FIELDS if getattr(s, k) is not None}
    vocab = {}
    if cross_tokenizer(cfg):
        ids = student_tokenizer_ids(s.tokenizer)
        size = ids["vocab_size"] if s.vocab_size is None else s.vocab_size
        if size < ids["vocab_size"]:
            raise ConfigError(f"config key 'distillation.student_model.vocab_size' {size} is smaller than its "
                              f"tokenizer's {ids['vocab_size']} ids ({s.tokenizer})")
        vocab = dict(vocab_size=size, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    try:
        if s.init == "from_teacher":
            return student_config_from_teacher(teacher, **changes).replace(**vocab)
        return teacher.replace(**changes, **vocab)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section 'distillation.student_model' describes an impossible architecture: {e}")


def cross_tokenizer(cfg: RunConfig) -> bool:
    """Whether the run distils across tokenizers: `distillation.student_model.tokenizer` is set. (`prepare`
    clears it when it names a tokenizer equal to the teacher's, so an equal one runs as a same-tokenizer run.)"""
    return cfg.distillation.student_model.tokenizer is not None


def shared_kl_weight(cfg: RunConfig) -> float:
    """`distillation_params.shared_kl_weight`, its default (None) resolved: 1.0 with a resident teacher, else 0."""
    w = cfg.distillation_params.shared_kl_weight
    if w is not None:
        return w
    return 1.0 if cfg.distillation.teacher_model.loading == "resident" else 0.0


def teacher_seq_len(cfg: RunConfig) -> int:
    """A cross-tokenizer window's teacher tokens (`distillation_params.teacher_seq_len`, else 5/4 of seq_len)."""
    n = cfg.distillation_params.teacher_seq_len
    return n if n is not None else cfg.training.seq_len + cfg.training.seq_len // 4


_SPECIAL_FALLBACK = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


def student_tokenizer_ids(path: str) -> dict:
    """The student tokenizer's `vocab_size` (its largest id + 1, added tokens included) and its `bos`, `eos` and
    `pad` ids, from the `tokenizer_config.json` beside its `tokenizer.json` (`eos_token` and friends, strings or
    `{"content": ...}`); without one, the first of a few common end-of-text tokens it has is its EOS. A file that
    cannot be read, or a tokenizer with no EOS, is a one-line `ConfigError` naming the key."""
    key = "config key 'distillation.student_model.tokenizer'"
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as error:  # a missing or malformed file (the Rust side raises a bare Exception)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{key} ({path}): cannot read {file}: {first}") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    settings = {}
    config_file = file.parent / "tokenizer_config.json"
    if config_file.is_file():
        try:
            settings = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{key}: {config_file} is unreadable ({error})") from None
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}: {config_file} is not a JSON object")

    def special(name: str) -> int | None:
        value = settings.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        if not isinstance(value, str) or value not in vocab:
            raise ConfigError(f"{key}: {config_file} names {name} {value!r}, which is not a token of {file}")
        return vocab[value]

    eos = special("eos_token")
    if eos is None:
        eos = next((vocab[t] for t in _SPECIAL_FALLBACK if t in vocab), None)
    if eos is None:
        raise ConfigError(f"{key}: {file} has no EOS token (give a tokenizer_config.json beside it with eos_token)")
    pad = special("pad_token")
    return {"vocab_size": size, "bos": special("bos_token"), "eos": eos, "pad": eos if pad is None else pad}


def objective(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig) -> Objective:
    """The run's objective: `distillation_params` as it is, its layer pairs resolved for these two models."""
    return Objective.build(cfg.distillation_params, student_layers=student.num_hidden_layers,
                           teacher_layers=teacher.num_hidden_layers, total_steps=cfg.training.max_steps,
                           micro_batch_size=cfg.training.micro_batch_size)


def init_layer_pairs(student: ModelConfig, teacher: ModelConfig) -> tuple[tuple[int, int], ...]:
    """Which teacher layer initialises each student layer: evenly spread from the first to the last teacher
    layer, both kept (dropping the first layer costs more than any other in depth pruning)."""
    s, t = student.num_hidden_layers, teacher.num_hidden_layers
    if s == 1:
        return ((0, t - 1),)
    return tuple((i, int(np.floor(i * (t - 1) / (s - 1) + 0.5))) for i in range(s))


__all__ = ["DTYPES", "cross_tokenizer", "init_layer_pairs", "objective", "resolve_architecture", "student_config",
           "shared_kl_weight", "student_tokenizer_ids", "teacher_seq_len"]
