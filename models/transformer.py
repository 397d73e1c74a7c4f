"""The decoder-only causal LM: Qwen2/Qwen2.5, Qwen3 and Llama as one Equinox module.

Field names equal the HF tensor names (`model.layers.self_attn.q_proj.weight`), so loading and export are a walk
over pytree paths. The decoder layers are *stacked*: `model.layers` is one `DecoderLayer` whose every leaf has a
leading `[num_hidden_layers]` axis, and the forward pass is a `lax.scan` over it, so compile time does not grow
with depth. `CausalLM.layer(i)` returns layer `i` as its own module; `CausalLM.with_layer(i, layer)` puts one back.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .attention import Attention, CausalMask
from .config import ModelConfig
from .layers import LINEAR_OUTPUT, Embedding, Linear, RMSNorm, constrain, rotary_tables
from .pytree import summary


class MLP(eqx.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, use_bias=bias, key=kg, std=0.02)
        self.up_proj = Linear(d, f, use_bias=bias, key=ku, std=0.02)
        self.down_proj = Linear(f, d, use_bias=bias, key=kd, std=0.02)

    def __call__(self, x: Float[Array, "*batch embed"]) -> Float[Array, "*batch embed"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(eqx.Module):
    """Pre-norm block: `h + attn(norm(h))`, then `h + mlp(norm(h))`."""

    self_attn: Attention
    mlp: MLP
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        self.self_attn = Attention(config, key=ka)
        self.mlp = MLP(config, key=km)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, h, cos, sin, mask, *, output_attentions: bool = False, output_qkv: bool = False,
                 attention_impl: str = "auto"):
        attn = self.self_attn(
            self.input_layernorm(h), cos, sin, mask, output_attentions=output_attentions, output_qkv=output_qkv,
            implementation=attention_impl,
        )
        h = h + attn.output
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, attn.probs, attn.qkv

    def decode(self, h, cos, sin, cache_k, cache_v, layer, key_valid, slot):
        """The block for one new token per row, as layer `layer` of the stacked KV cache (`Attention.decode`)."""
        attn, cache_k, cache_v = self.self_attn.decode(self.input_layernorm(h), cos, sin, cache_k, cache_v, layer,
                                                       key_valid, slot)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, cache_k, cache_v


class Transformer(eqx.Module):
    """The HF `model.` submodule: embeddings, the stacked decoder layers and the final norm."""

    embed_tokens: Embedding
    layers: DecoderLayer
    norm: RMSNorm

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        ke, kl = jax.random.split(key)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, key=ke)
        layer_keys = jax.random.split(kl, config.num_hidden_layers)
        self.layers = eqx.filter_vmap(lambda k: DecoderLayer(config, key=k))(layer_keys)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Concrete ids (a host array, or a device array called eagerly) must be integers in `[0, vocab_size)`: an
    embedding lookup would silently clamp the others. Traced ids (inside `jit`, `vmap`, `eval_shape`) and arrays
    spread over other processes are not looked at: their values are not known here."""
    if isinstance(input_ids, jax.core.Tracer) or not getattr(input_ids, "is_fully_addressable", True):
        return
    ids = np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab_size})")


class CausalLMOutput(eqx.Module):
    """Model outputs; the optional ones are `None` unless asked for.

    - `logits`: `[batch, seq, vocab]`, in the compute dtype.
    - `hidden_states`: L+1 entries `[batch, seq, embed]` with transformers' semantics: the embeddings, the
      outputs of layers 0..L-2, and the *final-normed* output of layer L-1.
    - `attentions`: L entries `[batch, heads, seq, seq]`, per-head attention probabilities (float32).
    - `qkv`: L triples `(q [batch, heads, seq, head_dim], k, v [batch, kv_heads, seq, head_dim])`, after RoPE.
    - With outputs asked for by index (`CausalLM.__call__`), the entries not asked for are None.
    - `last_hidden`: the final-normed hidden states `[batch, seq, embed]`, returned instead of `logits` when the
      caller unembeds them itself (`output_logits=False`, e.g. a loss fused with the LM head).
    """

    logits: Float[Array, "batch seq vocab"] | None
    hidden_states: tuple[Array | None, ...] | None = None
    attentions: tuple[Array | None, ...] | None = None
    qkv: tuple[tuple[Array, Array, Array] | None, ...] | None = None
    last_hidden: Float[Array, "batch seq embed"] | None = None


class LayerStackOutput(eqx.Module):
    """What a run over a stack of layers returns: per-layer entries stacked on a leading axis, or, when only some
    layers were asked for, tuples over the layers with None for the others (`run_layers`)."""

    hidden: Float[Array, "batch seq embed"]
    layer_inputs: Array | tuple | None
    attentions: Array | tuple | None
    qkv: tuple | None


def prepare_inputs(
    config: ModelConfig,
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"] | Bool[Array, "batch seq"] | None = None,
    position_ids: Int[Array, "batch seq"] | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
) -> tuple[CausalMask, Float[Array, "batch seq head_dim"], Float[Array, "batch seq head_dim"]]:
    """The attention mask (causal over each row's real tokens, see [`CausalMask`][]) and the RoPE tables for a
    batch.

    Without `position_ids`, positions count the real tokens of each row (`cumsum(mask) - 1`), so a left-padded
    row gets the same positions, and so the same outputs, as the unpadded sequence. (transformers' forward
    uses `arange(seq)` instead; pass `position_ids` explicitly to reproduce that.) With `segment_ids` (rows
    packed into one sequence, each row's tokens contiguous) attention stays within a segment and positions
    count the real tokens of the segment: each packed row gets the outputs it would get alone.
    """
    b, s = input_ids.shape
    if attention_mask is None:
        valid = jnp.ones((b, s), bool)
    else:
        valid = attention_mask.astype(bool)
    mask = CausalMask(valid, None if segment_ids is None else segment_ids.astype(jnp.int32))
    if position_ids is None:
        position_ids = jnp.maximum(mask.seen() - 1, 0)
    cos, sin = rotary_tables(config, position_ids)
    return mask, cos, sin


Layers = bool | tuple[int, ...] | list[int]


def _layer_set(request: Layers, n: int) -> frozenset[int]:
    if isinstance(request, bool):
        return frozenset(range(n)) if request else frozenset()
    chosen = frozenset(int(i) for i in request)
    if any(not 0 <= i < n for i in chosen):
        raise ValueError(f"layer indices {sorted(chosen)} must lie in [0, {n})")
    return chosen


def run_layers(
    layers: DecoderLayer,
    h: Float[Array, "batch seq embed"],
    cos: Float[Array, "batch seq head_dim"],
    sin: Float[Array, "batch seq head_dim"],
    mask: CausalMask,
    *,
    output_hidden_states: Layers = False,
    output_attentions: Layers = False,
    output_qkv: Layers = False,
    remat: bool = False,
    attention_impl: str = "auto",
    activation_sharding=None,
) -> LayerStackOutput:
    """Run a stack of layers (leading axis = layer) over `h` with `lax.scan`; `remat` saves nothing per layer for
    the backward pass (the default saves only the weight matmuls' outputs).

    Each `output_*` is a bool (every layer or none) or the layer indices (in the stack) to return it for: then
    the scan is cut at those layers, they run one by one with the output asked for, and the others run in scans
    that return nothing, so only the chosen layers' inputs, attention maps or q/k/v exist (the per-layer entries
    come back as tuples, None for the layers not chosen). A teacher's forward asks for the mapped layers alone;
    under differentiation prefer the bools (the scans then index the weights, and their gradients accumulate
    at full size per scan). `activation_sharding`: each layer's input is constrained to it (see `CausalLM`)."""
    params, static = eqx.partition(layers, eqx.is_array)
    n = layers.input_layernorm.weight.shape[0]
    hid, att, qkv = (_layer_set(r, n) for r in (output_hidden_states, output_attentions, output_qkv))

    def step(carry, layer_params, attentions=bool(att), qkvs=bool(qkv)):
        carry = constrain(carry, activation_sharding)
        layer = eqx.combine(layer_params, static)
        out, probs, q = layer(carry, cos, sin, mask, output_attentions=attentions, output_qkv=qkvs,
                              attention_impl=attention_impl)
        return out, (carry if hid else None, probs, q)

    # Under differentiation the scanned body is always rematerialised: with `remat` nothing is saved; without it
    # only the weight matmuls' outputs are, and the attention scores and elementwise work are recomputed. Storing
    # every residual of the body into the scan's stacked buffers cost more than recomputing them (d=512 student on
    # CPU: forward+backward 799 ms saving everything, 697 ms with this policy, 714 ms with full remat).
    policies = jax.checkpoint_policies
    policy = policies.nothing_saveable if remat else policies.save_from_both_policies(
        policies.dots_with_no_batch_dims_saveable, policies.save_only_these_names(LINEAR_OUTPUT))
    every = frozenset(range(n))
    if all(chosen in (frozenset(), every) for chosen in (hid, att, qkv)):
        h, (inputs, probs, q) = jax.lax.scan(jax.checkpoint(step, prevent_cse=False, policy=policy), h, params)
        return LayerStackOutput(hidden=h, layer_inputs=inputs, attentions=probs, qkv=q)

    def quiet(carry, i):  # layer i of the stack, returning nothing but its output
        layer_params = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), params)
        return step(carry, layer_params, False, False)[0], None

    quiet = jax.checkpoint(quiet, prevent_cse=False, policy=policy)
    inputs, probs, qs = [None] * n, [None] * n, [None] * n
    done = 0
    for i in sorted(hid | att | qkv):
        if i > done:
            h, _ = jax.lax.scan(quiet, h, jnp.arange(done, i))
        if i in hid:
            inputs[i] = h
        layer_params = jax.tree.map(lambda x: x[i], params)
        one = functools.partial(step, attentions=i in att, qkvs=i in qkv)
        h, (_, probs[i], qs[i]) = jax.checkpoint(one, prevent_cse=False, policy=policy)(h, layer_params)
        done = i + 1
    if done < n:
        h, _ = jax.lax.scan(quiet, h, jnp.arange(done, n))
    q = None if not qkv else tuple(tuple(None if t is None else t[k] for t in qs) for k in range(3))
    return LayerStackOutput(hidden=h, layer_inputs=tuple(inputs) if hid else None,
                            attentions=tuple(probs) if att else None, qkv=q)


class CausalLM(eqx.Module):
    """A decoder-only causal language model (`Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `LlamaForCausalLM`).

    **Arguments:**

    - `config`: the architecture.
    - `key`: PRNG key for random initialisation (normal, std 0.02, as transformers' `initializer_range`).
    """

    model: Transformer
    lm_head: Linear | None
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        km, kh = jax.random.split(key)
        self.model = Transformer(config, key=km)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, key=kh, std=0.02)
        self.config = config

    def __check_init__(self):
        n = self.config.num_hidden_layers
        if self.model.layers.input_layernorm.weight.shape[0] != n:
            raise ValueError(f"stacked layers hold {self.model.layers.input_layernorm.weight.shape[0]}, config {n}")
        if (self.lm_head is None) != self.config.tie_word_embeddings:
            raise ValueError("lm_head must be None exactly when tie_word_embeddings is set")

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | Bool[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        output_hidden_states: Layers = False,
        output_attentions: Layers = False,
        output_qkv: Layers = False,
        remat: bool = False,
        attention_impl: str = "auto",
        output_logits: bool = True,
        segment_ids: Int[Array, "batch seq"] | None = None,
        activation_sharding=None,
    ) -> CausalLMOutput:
        """**Arguments:**

        - `input_ids`: token ids `[batch, seq]`.
        - `attention_mask`: 1 for real tokens, 0 for padding (left or right), `[batch, seq]`.
        - `position_ids`: optional explicit positions; default counts real tokens (see `prepare_inputs`).
        - `output_hidden_states`, `output_attentions`, `output_qkv`: which optional outputs to return: a bool
            (all or none), or the indices to return (`hidden_states` indices 0..L, `attentions`/`qkv` layer
            indices); the entries not asked for are None, and they are never computed (`run_layers`).
        - `remat`: rematerialise each layer in the backward pass (`jax.checkpoint` per scan step).
        - `attention_impl`: `"auto"` (cuDNN flash attention on GPUs in bf16/fp16 when no attention probabilities
            are asked for, else XLA), `"xla"` or `"cudnn"`; see `models.attention.resolve_implementation`.
        - `output_logits`: False returns the final-normed hidden states as `last_hidden` and no logits (the caller
            applies `unembedding_weight()` itself).
        - `segment_ids`: rows packed into each sequence, `[batch, seq]` ints (each row's tokens contiguous):
            attention never crosses rows and positions restart with each (see `prepare_inputs`).
        - `activation_sharding`: a sharding for the `[batch, seq, embed]` hidden states, applied after the
            embedding and at every layer's input (`jax.lax.with_sharding_constraint`): under jit on a mesh whose
            weights are split along `embed` (fsdp), XLA otherwise may follow the embedding table's split and run
            every row on every device. None leaves the layout to XLA.

        **Returns:** a `CausalLMOutput`.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        mask, cos, sin = prepare_inputs(self.config, input_ids, attention_mask, position_ids, segment_ids)
        h = constrain(self.embed(input_ids), activation_sharding)
        n = self.config.num_hidden_layers
        hidden = _layer_set(output_hidden_states, n + 1)
        stack = run_layers(
            self.model.layers, h, cos, sin, mask,
            output_hidden_states=True if len(hidden) > n else tuple(sorted(hidden - {n})),
            output_attentions=output_attentions, output_qkv=output_qkv, remat=remat, attention_impl=attention_impl,
            activation_sharding=activation_sharding,
        )
        normed = self.model.norm(stack.hidden)
        hidden_states = attentions = qkv = None
        if hidden:
            inputs = stack.layer_inputs
            hidden_states = tuple(None if inputs is None or i not in hidden else inputs[i] for i in range(n)) + (
                normed if n in hidden else None,)
        if output_attentions is not False and stack.attentions is not None:
            attentions = tuple(stack.attentions[i] for i in range(n))
        if output_qkv is not False and stack.qkv is not None:
            qkv = tuple(None if stack.qkv[0][i] is None else tuple(t[i] for t in stack.qkv) for i in range(n))
        if not output_logits:
            return CausalLMOutput(logits=None, hidden_states=hidden_states, attentions=attentions, qkv=qkv,
                                  last_hidden=normed)
        return CausalLMOutput(logits=self.unembed(normed), hidden_states=hidden_states, attentions=attentions,
                              qkv=qkv)

    def embed(self, input_ids: Int[Array, "batch seq"]) -> Float[Array, "batch seq embed"]:
        return self.model.embed_tokens(input_ids)

    def unembedding_weight(self) -> Float[Array, "vocab embed"]:
        """The LM head's `[vocab, embed]` matrix: `lm_head.weight`, or the embedding table when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def unembed(self, h: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq vocab"]:
        """Logits from final-normed hidden states (the tied embedding table when there is no lm_head)."""
        return jnp.einsum("bsd,vd->bsv", h, self.unembedding_weight().astype(h.dtype))

    # ----------------------------------------------------------------------------- inspection and surgery

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer `i` as its own module (leaves without the stacked axis)."""
        n = self.config.num_hidden_layers
        if not -n <= i < n:
            raise IndexError(f"layer {i} out of range for {n} layers")
        return jax.tree.map(lambda x: x[i] if eqx.is_array(x) else x, self.model.layers)

    def layers_slice(self, start: int, stop: int) -> DecoderLayer:
        """Layers `start:stop` as a stack."""
        return jax.tree.map(lambda x: x[start:stop] if eqx.is_array(x) else x, self.model.layers)

    def with_layer(self, i: int, layer: DecoderLayer) -> "CausalLM":
        """A copy with layer `i` replaced by `layer` (an unstacked `DecoderLayer` of the same shapes)."""
        stacked = jax.tree.map(
            lambda s, x: s.at[i].set(x.astype(s.dtype)) if eqx.is_array(s) else s, self.model.layers, layer
        )
        return eqx.tree_at(lambda m: m.model.layers, self, stacked)


def stack_layers(layers: Sequence[DecoderLayer]) -> DecoderLayer:
    """Stack unstacked `DecoderLayer`s (same static structure) into one with a leading layer axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0], *layers)


def init_model(config: ModelConfig, *, key: PRNGKeyArray, dtype=jnp.float32) -> CausalLM:
    """A randomly initialised model with every floating leaf in `dtype`."""
    model = CausalLM(config, key=key)
    return cast_floating(model, dtype)


def cast_floating(tree, dtype):
    """Cast every floating-point array leaf of `tree` to `dtype` (others untouched); an abstract leaf
    (`jax.ShapeDtypeStruct`) becomes one of `dtype`, its sharding kept."""
    if dtype is None:
        return tree

    def cast(x):
        if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact) and x.dtype != dtype:
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype) if eqx.is_inexact_array(x) and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


def _repr(self: CausalLM) -> str:
    c = self.config
    title = (f"CausalLM({c.architecture}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads "
             f"{c.num_attention_heads}/{c.num_key_value_heads} kv, head_dim {c.head_dim}, mlp {c.intermediate_size}, "
             f"vocab {c.vocab_size}{', tied' if c.tie_word_embeddings else ''})")
    return summary(self, title=title)


CausalLM.__repr__ = _repr
CausalLM._repr_pretty_ = lambda self, p, cycle: p.text(_repr(self))
