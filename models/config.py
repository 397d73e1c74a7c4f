"""Architecture config for the decoder-only families vishwam runs: Qwen2/Qwen2.5, Qwen3 and Llama.

One frozen (hashable) dataclass; the family differences are flags, not subclasses:

| family | q/k/v bias | o bias | per-head q/k RMSNorm | head_dim |
|---|---|---|---|---|
| qwen2 (Qwen2, Qwen2.5) | yes | no | no | hidden / heads |
| qwen3 | `attention_bias` | `attention_bias` | yes | explicit in config.json |
| llama | `attention_bias` | `attention_bias` | no | `head_dim` or hidden / heads |
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from .errors import ConfigError

# model_type -> the `architectures` entry transformers expects in config.json.
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
_ARCH_TO_TYPE = {v: k for k, v in ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number (NaN and infinities are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_number(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


_EXPECTED = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object",
             list: "a list", "ids": "a token id or a list of token ids"}


def _describe(value: Any) -> str:
    text = json.dumps(value) if _is_json(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class _Reader:
    """Typed reads of one JSON object: a value of the wrong type is a `ConfigError` naming `source` and the key."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = ""):
        self.data, self.source, self.prefix = data, source, prefix

    def get(self, key: str, kind: Any, default: Any = None, *, null_ok: bool = False, positive: bool = False) -> Any:
        """`data[key]` if it is a `kind` (`int`, `float`, `bool`, `str`, `dict`, `list` or `"ids"`); `default` when
        absent (or null, with `null_ok`)."""
        if key not in self.data:
            return default
        value = self.data[key]
        if value is None and null_ok:
            return default
        if kind is int:
            ok = _is_int(value) and (value > 0 or not positive)
        elif kind is float:
            ok = _is_number(value)
        elif kind == "ids":
            ok = _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
        else:
            ok = isinstance(value, kind)
        if not ok:
            expected = "a positive integer" if positive else _EXPECTED[kind]
            raise ConfigError(f"{self.source}: key '{self.prefix}{key}' must be {expected}, got {_describe(value)}")
        return value


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` in HF's `rope_parameters` / `rope_scaling`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_positive_number(f"rope {name}", getattr(self, name))
        _check_positive_int("rope original_max_position_embeddings", self.original_max_position_embeddings)
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                              f"({self.low_freq_factor}) for rope_type 'llama3'")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of one decoder-only causal LM, with HF `config.json` field names."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: vishwam runs {', '.join(sorted(ARCHITECTURES))}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        _check_positive_number("rms_norm_eps", self.rms_norm_eps)
        _check_positive_number("rope_theta", self.rope_theta)
        _check_positive_int("max_position_embeddings", self.max_position_embeddings)
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else () if value is None else (value,)
            for token in ids:
                if not _is_int(token):
                    raise ConfigError(f"{name} must be a token id (an integer){' or a list of them' if name == 'eos_token_id' else ''} or null, got {value!r}")
                if not 0 <= token < self.vocab_size:
                    raise ConfigError(f"{name} {token} is outside the vocabulary [0, vocab_size={self.vocab_size})")
        if self.rope_scaling.rope_type not in _ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {self.rope_scaling.rope_type!r}: supported are {', '.join(_ROPE_TYPES)}"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; `head_dim` follows `hidden_size / heads` unless given or explicit before."""
        derived_head_dim = self.hidden_size // self.num_attention_heads == self.head_dim
        if "head_dim" not in changes and derived_head_dim and (
            "hidden_size" in changes or "num_attention_heads" in changes
        ):
            hidden = changes.get("hidden_size", self.hidden_size)
            heads = changes.get("num_attention_heads", self.num_attention_heads)
            if hidden % heads:
                raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
            changes["head_dim"] = hidden // heads
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf(cls, hf: Any, *, source: str = "config.json") -> "ModelConfig":
        """Parse a transformers `config.json` (its JSON value: an object unless the file is broken). Errors name
        `source` and the offending key: a value of the wrong JSON type, NaN or infinity, and ids outside the
        vocabulary are one-line `ConfigError`s, never tracebacks."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source} must hold a JSON object, got {_describe(hf)}")
        read = _Reader(hf, source)
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            archs = read.get("architectures", list, [], null_ok=True)
            known = [_ARCH_TO_TYPE[a] for a in archs if isinstance(a, str) and a in _ARCH_TO_TYPE]
            if known and model_type is None:
                model_type = known[0]
            else:
                raise ConfigError(
                    f"{source}: unsupported architecture {model_type or archs!r}; vishwam runs "
                    f"{', '.join(sorted(ARCHITECTURES.values()))}"
                )
        if read.get("hidden_act", str, "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        if read.get("use_sliding_window", bool, False):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r}")
            read.get(key, int, positive=True)
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        kv_heads = read.get("num_key_value_heads", int, heads, null_ok=True, positive=True)
        head_dim = read.get("head_dim", int, 0, null_ok=True, positive=True) or hidden // heads
        if model_type != "qwen3" and not hf.get("head_dim") and hidden % heads:
            raise ConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")

        # Released Qwen2.5 configs put rope_theta at the top level; transformers>=5 writes `rope_parameters`.
        rope = _Reader(read.get("rope_parameters", dict, {}, null_ok=True), source, "rope_parameters.")
        legacy = _Reader(read.get("rope_scaling", dict, {}, null_ok=True), source, "rope_scaling.")

        def scaling_field(key: str, kind: type, default: Any) -> Any:
            """A scaling field from `rope_parameters`, else `rope_scaling` (rope_type's old name there: type)."""
            for part in (rope, legacy):
                for name in (key, "type") if key == "rope_type" else (key,):
                    if name in part.data:
                        return part.get(name, kind)
            return default

        if "rope_theta" in rope.data:
            rope_theta = rope.get("rope_theta", float)
        else:
            rope_theta = read.get("rope_theta", float, 10000.0, null_ok=True)
        scaling = dict(
            rope_type=scaling_field("rope_type", str, "default"),
            factor=float(scaling_field("factor", float, 1.0)),
            low_freq_factor=float(scaling_field("low_freq_factor", float, 1.0)),
            high_freq_factor=float(scaling_field("high_freq_factor", float, 4.0)),
            original_max_position_embeddings=scaling_field("original_max_position_embeddings", int, 8192),
        )
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = read.get("attention_bias", bool, False)
        eos = read.get("eos_token_id", "ids", None, null_ok=True)
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(read.get("rms_norm_eps", float, 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=read.get("max_position_embeddings", int, 32768),
            tie_word_embeddings=read.get("tie_word_embeddings", bool, False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=read.get("mlp_bias", bool, False),
            qk_norm=model_type == "qwen3",
            bos_token_id=read.get("bos_token_id", int, None, null_ok=True),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=read.get("pad_token_id", int, None, null_ok=True),
        )
        try:  # the values' own checks (ranges, special ids in the vocabulary), named with the file
            return cls(rope_scaling=RopeScaling(**scaling), **fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self, *, dtype: str = "float32") -> dict[str, Any]:
        """The transformers `config.json` dict for this architecture."""
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_scaling.rope_type}
        if self.rope_scaling.rope_type == "linear":
            rope_parameters["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rope_parameters.update(
                factor=self.rope_scaling.factor,
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
            )
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        else:
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.rope_scaling.rope_type != "default":
            out["rope_scaling"] = dict(rope_parameters)
        return out

    def num_parameters(self) -> int:
        """Parameter count implied by the config (embeddings counted once when tied)."""
        d, h, kv, hd, f = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                           self.head_dim, self.intermediate_size)
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h * hd + 2 * kv * hd) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2·(matmul params) plus attention scores and values (causal: half)."""
        d, h, kv, hd, f = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                           self.head_dim, self.intermediate_size)
        matmul = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
        per_layer = 2 * matmul + 2 * 2 * h * hd * seq_len / 2
        return self.num_hidden_layers * per_layer + 2 * d * self.vocab_size


def rope_inv_freq(config: ModelConfig):
    """Inverse RoPE frequencies `[head_dim // 2]` (numpy float64), with `linear` or `llama3` scaling applied."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv = inv / s.factor
    elif s.rope_type == "llama3":
        # transformers' `_compute_llama3_parameters`: long wavelengths are scaled down by `factor`,
        # short ones kept, and the band between interpolated smoothly.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv
