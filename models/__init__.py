"""Model families as Equinox pytrees: Qwen2/Qwen2.5, Qwen3 and Llama in one implementation."""

from .attention import Attention, AttentionOutput, CausalMask, causal_blocks
from .config import ARCHITECTURES, ModelConfig, RopeScaling
from .decode import KVCache, decode_step, prefill
from .layers import Embedding, Linear, RMSNorm, constrain
from .sampling import filter_logits, sample_tokens
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
    "Embedding", "KVCache", "LayerStackOutput", "Linear", "MLP", "ModelConfig", "RMSNorm", "RopeScaling",
    "Transformer", "cast_floating", "causal_blocks", "constrain", "decode_step", "filter_logits", "init_model",
    "prefill", "prepare_inputs", "run_layers", "sample_tokens", "stack_layers",
]
