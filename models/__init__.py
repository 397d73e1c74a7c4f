"""Model families as Equinox pytrees: Qwen2/Qwen2.5, Qwen3 and Llama in one implementation.

Owns the architectures (`config`), the layers and the scanned decoder stack (`layers`, `attention`,
`transformer`), the KV-cache programs (`decode`, `sampling`) and pytree helpers (`pytree`). The bottom layer:
imports nothing of `distill` or `vishwam`; exports the names in `__all__`.
"""

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
