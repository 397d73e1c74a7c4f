"""Model families as Equinox pytrees: Qwen2/Qwen2.5, Qwen3 and Llama in one implementation."""

from .attention import Attention, AttentionOutput, CausalMask
from .config import ARCHITECTURES, ModelConfig, RopeScaling
from .layers import Embedding, Linear, RMSNorm
from .transformer import (
    MLP,
    CausalLM,
    CausalLMOutput,
    DecoderLayer,
    LayerStackOutput,
    Transformer,
    cast_floating,
    init_model,
    prepare_inputs,
    run_layers,
    stack_layers,
)

__all__ = [
    "ARCHITECTURES", "Attention", "AttentionOutput", "CausalLM", "CausalMask", "CausalLMOutput", "DecoderLayer",
    "Embedding", "LayerStackOutput", "Linear", "MLP", "ModelConfig", "RMSNorm", "RopeScaling", "Transformer",
    "cast_floating", "init_model", "prepare_inputs", "run_layers", "stack_layers",
]
