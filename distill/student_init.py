"""Student initialisation from the teacher (`init: from_teacher`): depth by the layer mapping, width by importance.

Minitron (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge Distillation") prunes a
trained model into a smaller one by ranking its width components with activation magnitudes on a small probe
batch, then keeping the top ones:

- embedding channels: `F(i) = sum over every RMSNorm output of mean |LN(X)_i|` (both norms of every layer and
  the final norm);
- MLP neurons, per layer: `F(i) = mean |silu(gate(x)) * up(x)|_i`, the input of `down_proj`;
- attention heads, per layer: `F(h) = mean ||attn_h(x)||_2`, the L2 norm of the head's output before `o_proj`.

Means are over the valid (unpadded) tokens of the probe. With GQA the unit kept or dropped is the key/value
group (its importance is the sum of its query heads), so a kept query head always keeps the k/v head it reads;
inside a kept group the student may keep fewer query heads (the most important ones). `head_dim` is never
pruned: RoPE pairs dimensions `i` and `i + head_dim / 2` of a head, and q/k norms act over the whole head.

Depth comes from the layer mapping: student layer `s` starts as a pruned copy of teacher layer `t` for its pair
`(s, t)`. Every kept index set is sorted by original index, so the student computes the teacher's function
restricted to the kept components; with the teacher's own shape and the identity mapping it *is* the teacher.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from models import CausalLM, DecoderLayer, ModelConfig, constrain, prepare_inputs
from .errors import ConfigError
from models.pytree import path_name

from .mapping import layer_mapping, validate_pairs

TokenMask = Bool[Array, "batch seq"] | Int[Array, "batch seq"]

# Fields a pruned student must share with its teacher: they change which tensors exist, not their sizes.
_FAMILY_FIELDS = ("model_type", "vocab_size", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")
# Fields that may only shrink when initialising from the teacher.
_SHRINK_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads",
                  "num_attention_heads")

# How each leaf of a CausalLM is sliced: one entry per axis (after the stacked layer axis, for layer leaves),
# naming the index set kept along it; `None` keeps the axis whole. `q` / `kv` are the rows of the kept query
# heads / key-value heads (`head * head_dim + arange(head_dim)`).
_AXES = {
    "model.embed_tokens.weight": (None, "embed"),
    "model.norm.weight": ("embed",),
    "lm_head.weight": (None, "embed"),
    "model.layers.self_attn.q_proj.weight": ("q", "embed"),
    "model.layers.self_attn.q_proj.bias": ("q",),
    "model.layers.self_attn.k_proj.weight": ("kv", "embed"),
    "model.layers.self_attn.k_proj.bias": ("kv",),
    "model.layers.self_attn.v_proj.weight": ("kv", "embed"),
    "model.layers.self_attn.v_proj.bias": ("kv",),
    "model.layers.self_attn.o_proj.weight": ("embed", "q"),
    "model.layers.self_attn.o_proj.bias": ("embed",),
    "model.layers.self_attn.q_norm.weight": (None,),
    "model.layers.self_attn.k_norm.weight": (None,),
    "model.layers.mlp.gate_proj.weight": ("mlp", "embed"),
    "model.layers.mlp.gate_proj.bias": ("mlp",),
    "model.layers.mlp.up_proj.weight": ("mlp", "embed"),
    "model.layers.mlp.up_proj.bias": ("mlp",),
    "model.layers.mlp.down_proj.weight": ("embed", "mlp"),
    "model.layers.mlp.down_proj.bias": ("embed",),
    "model.layers.input_layernorm.weight": ("embed",),
    "model.layers.post_attention_layernorm.weight": ("embed",),
}
_LAYERS = "model.layers."


# ------------------------------------------------------------------------------------------------------ config


def student_config_from_teacher(
    teacher_config: ModelConfig,
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    head_dim: int | None = None,
    tie_word_embeddings: bool | None = None,
) -> ModelConfig:
    """The config of a student pruned from `teacher_config`.

    Unspecified fields come from the teacher (vocabulary, RoPE, norm eps, family flags, special tokens).
    `head_dim` stays the teacher's even when `hidden_size` shrinks (heads are pruned whole, never narrowed).
    `num_key_value_heads` defaults to the teacher's; `num_attention_heads` defaults to
    `num_key_value_heads` times the teacher's group size, so pruning KV groups alone keeps each group whole.

    **Arguments:**

    - `teacher_config`: the teacher's architecture.
    - `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `intermediate_size`:
      the student's sizes, each at most the teacher's.
    - `head_dim`: must equal the teacher's if given (pruning inside a head is not supported).
    - `tie_word_embeddings`: tie the student's lm_head to its embeddings; only possible if the teacher's are.

    **Returns:**

    The student's `ModelConfig`. Raises `ConfigError` naming the field for an architecture that cannot be
    initialised from this teacher (see `validate_student_config`).
    """
    given = {
        "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size, "head_dim": head_dim,
    }
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"student {name} must be a positive integer, got {value!r}")
    if tie_word_embeddings is not None and not isinstance(tie_word_embeddings, bool):
        raise ConfigError(f"student tie_word_embeddings must be a bool, got {tie_word_embeddings!r}")
    t = teacher_config
    kv = t.num_key_value_heads if num_key_value_heads is None else num_key_value_heads
    heads = kv * t.num_groups if num_attention_heads is None else num_attention_heads
    if heads % kv:
        raise ConfigError(
            f"student num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
        )
    changes = {
        "hidden_size": t.hidden_size if hidden_size is None else hidden_size,
        "num_hidden_layers": t.num_hidden_layers if num_hidden_layers is None else num_hidden_layers,
        "intermediate_size": t.intermediate_size if intermediate_size is None else intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        # Given explicitly, so `replace` does not re-derive it from hidden / heads.
        "head_dim": t.head_dim if head_dim is None else head_dim,
        "tie_word_embeddings": t.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings,
    }
    student = t.replace(**changes)
    validate_student_config(t, student)
    return student


def validate_student_config(teacher_config: ModelConfig, student_config: ModelConfig) -> None:
    """Checks that `student_config` can be initialised from `teacher_config` by pruning.

    **Arguments:**

    - `teacher_config`, `student_config`: the two architectures.

    **Returns:**

    Nothing. Raises `ConfigError` naming the first offending field: a family field that differs
    (`model_type`, `vocab_size`, biases, `qk_norm`), a different `head_dim`, a size larger than the teacher's,
    more query heads per KV group than the teacher has, or a tied student from an untied teacher.
    """
    t, s = teacher_config, student_config
    for name in _FAMILY_FIELDS:
        if getattr(s, name) != getattr(t, name):
            raise ConfigError(
                f"student {name}={getattr(s, name)!r} differs from the teacher's {getattr(t, name)!r}; "
                "initialising from the teacher keeps the architecture family"
            )
    if s.head_dim != t.head_dim:
        raise ConfigError(
            f"student head_dim={s.head_dim} differs from the teacher's {t.head_dim}: pruning inside a head is not "
            "supported (RoPE pairs dims i and i + head_dim/2); prune whole heads instead"
        )
    for name in _SHRINK_FIELDS:
        if getattr(s, name) > getattr(t, name):
            raise ConfigError(
                f"student {name}={getattr(s, name)} is larger than the teacher's {getattr(t, name)}; "
                "initialising from the teacher can only prune"
            )
    if s.num_groups > t.num_groups:
        raise ConfigError(
            f"student num_attention_heads={s.num_attention_heads} gives {s.num_groups} query heads per KV group "
            f"but the teacher has {t.num_groups}; KV groups are kept whole, so use at most "
            f"{s.num_key_value_heads * t.num_groups}"
        )
    if s.tie_word_embeddings and not t.tie_word_embeddings:
        raise ConfigError(
            "student tie_word_embeddings=True but the teacher has a separate lm_head; initialising from the "
            "teacher would drop it"
        )


# -------------------------------------------------------------------------------------------------- importance


def importance_scores(
    teacher: CausalLM,
    probe_ids: Int[Array, "batch seq"],
    probe_mask: TokenMask | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
    *,
    activation_sharding=None,
) -> dict[str, Float[Array, "..."]]:
    """Minitron activation-magnitude importance of the teacher's width components on a probe batch.

    **Arguments:**

    - `teacher`: the model to rank.
    - `probe_ids`: token ids `[batch, seq]` (a few hundred real tokens are enough for a ranking).
    - `probe_mask`: 1 for real tokens, 0 for padding; `None` means all real. Padding is excluded from every mean.
    - `segment_ids`: packed rows (chat data): attention stays within each row, positions restart per row.
    - `activation_sharding`: the hidden states' sharding on a mesh (rows over the batch axes; see `CausalLM`).

    **Returns:**

    A dict of float32 arrays:

    - `embed` `[embed]`: sum over the `2 * layers + 1` RMSNorm outputs of the mean |activation| per channel;
    - `mlp` `[layers, mlp]`: mean |silu(gate) * up| per neuron;
    - `heads` `[layers, heads]`: mean L2 norm of each query head's output before `o_proj`;
    - `kv_groups` `[layers, kv_heads]`: the sum of `heads` over the query heads of each KV group.
    """
    if probe_mask is None:
        probe_mask = jnp.ones(probe_ids.shape, bool)
    stats = activation_stats(teacher, probe_ids, probe_mask.astype(bool), segment_ids,
                             activation_sharding=activation_sharding)
    return score_dict(*stats, num_kv_heads=teacher.config.num_key_value_heads)


def score_dict(embed, mlp, heads, *, num_kv_heads: int) -> dict[str, Array]:
    """The statistics as `importance_scores` returns them, with each KV group's importance (its heads' sum)."""
    groups = heads.reshape(heads.shape[0], num_kv_heads, -1).sum(-1)
    return {"embed": embed, "mlp": mlp, "heads": heads, "kv_groups": groups}


@functools.partial(jax.jit, static_argnames="activation_sharding")
def activation_stats(teacher: CausalLM, ids, valid, segment_ids=None, *, activation_sharding=None):
    """The teacher's forward pass (a scan over its layers, in its own dtype), collecting per-component activation
    magnitudes in float32: `(embed [embed], mlp [layers, mlp], heads [layers, heads])`."""
    mask, cos, sin = prepare_inputs(teacher.config, ids, valid, segment_ids=segment_ids)
    h, embed, mlp, heads = stack_stats(teacher.model.layers, teacher.embed(ids), cos, sin, mask, valid,
                                       activation_sharding=activation_sharding)
    return embed + final_norm_stats(teacher.model.norm, h, valid), mlp, heads


def _token_mean(valid, x):
    """`[batch, seq, ...] -> [...]`: the float32 mean over the valid tokens."""
    weights = valid.astype(jnp.float32)
    return jnp.einsum("bs,bs...->...", weights, x.astype(jnp.float32)) / jnp.maximum(weights.sum(), 1.0)


def final_norm_stats(norm, h, valid) -> Float[Array, " embed"]:
    """The final norm's share of the embedding-channel importance."""
    return _token_mean(valid, jnp.abs(norm(h)))


def stack_stats(layers: DecoderLayer, h, cos, sin, mask, valid, *, activation_sharding=None):
    """Run a stack of layers (leading layer axis) over `h` and collect their importance statistics, one layer
    at a time (`lax.scan`): nothing of size `[seq, seq]` per head is kept (head outputs come from
    `Attention.attend`), and the weights stay in their dtype. Returns `(h, embed, mlp, heads)`: the stack's
    output, its two norms' channel magnitudes summed over its layers, and per layer the MLP neurons' and query
    heads' magnitudes. A streamed teacher calls it group by group. `activation_sharding`: each layer's input is
    constrained to it (rows over the batch axes, see `CausalLM`)."""
    params, static = eqx.partition(layers, eqx.is_array)

    def step(h, layer_params):
        h = constrain(h, activation_sharding)
        layer = eqx.combine(layer_params, static)
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = attn.project(x, cos, sin)
        out = attn.attend(q, k, v, mask)  # [batch, seq, heads·head_dim], before o_proj
        b, s, _ = out.shape
        head_norm = jnp.linalg.norm(out.reshape(b, s, attn.num_heads, attn.head_dim).astype(jnp.float32), axis=-1)
        h = h + attn.o_proj(out)
        x2 = layer.post_attention_layernorm(h)
        act = jax.nn.silu(layer.mlp.gate_proj(x2)) * layer.mlp.up_proj(x2)
        h = h + layer.mlp.down_proj(act)
        embed = _token_mean(valid, jnp.abs(x)) + _token_mean(valid, jnp.abs(x2))
        return h, (embed, _token_mean(valid, jnp.abs(act)), _token_mean(valid, head_norm))

    h, (embed, mlp, heads) = jax.lax.scan(step, h, params)
    return h, embed.sum(0), mlp, heads


# ------------------------------------------------------------------------------------------------ initialisation


def init_student_from_teacher(
    teacher: CausalLM,
    student_config: ModelConfig,
    *,
    pairs: Sequence[Sequence[int]] | None,
    probe_ids: Int[Array, "batch seq"] | None,
    probe_mask: TokenMask | None,
    key: PRNGKeyArray,
    scores: dict[str, Array | np.ndarray] | None = None,
    dtype=None,
    shardings=None,
    teacher_layers: Sequence[int] | None = None,
) -> CausalLM:
    """A student whose every weight is a slice of the teacher's (Minitron width pruning + layer dropping).

    Student layer `s` is teacher layer `t` of its pair `(s, t)`, pruned to the student's widths. The same
    top-`hidden_size` embedding channels are kept everywhere (embeddings, norms, every projection's embed side,
    lm_head); per layer, the top MLP neurons and the top KV groups, and within each kept group its top query
    heads. Kept indices stay in their original order.

    **Arguments:**

    - `teacher`: the trained model.
    - `student_config`: the student's architecture; see `student_config_from_teacher`.
    - `pairs`: `(student_layer, teacher_layer)` pairs (the distillation layer mapping). Student layers it leaves
      out take their teacher layer from the `uniform` mapping, so the filled-in mapping may repeat a teacher
      layer; `None` means the `uniform` mapping.
    - `probe_ids`, `probe_mask`: the probe batch for `importance_scores` (mask `None`: no padding).
    - `key`: PRNG key for the student skeleton; every leaf is then replaced, so the result does not depend on it.
    - `scores`: precomputed `importance_scores` of this teacher, used instead of the probe (only `embed`, `mlp`
      and `heads` are read; group importance is the sum of `heads` over the group).
    - `dtype`: the student's dtype (default: the teacher's); each slice is cast as it is taken, so no copy of
      the teacher in `dtype` is ever made.
    - `shardings`: a pytree of shardings like the student (e.g. the training state's): the student comes out
      placed by them, never whole on one device. The slicing program takes one student layer at a time.
    - `teacher_layers`: when `teacher.model.layers` holds only some of the teacher's layers (a streamed teacher
      loads just the mapped ones), their layer numbers, in stack order; `scores` must then be given.

    **Returns:**

    The student `CausalLM`. Raises `ConfigError` if `student_config` cannot be pruned
    from the teacher or `pairs` is not a valid mapping.
    """
    t_cfg, s_cfg, given_layers = teacher.config, student_config, teacher_layers
    validate_student_config(t_cfg, s_cfg)
    pairs = full_pairs(pairs, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    if scores is None:
        if given_layers is not None:
            raise ValueError("init from teacher: a teacher holding some of its layers needs precomputed scores")
        if probe_ids is None:
            raise ConfigError("init from teacher: give probe_ids (or precomputed scores) to rank the teacher")
        scores = importance_scores(teacher, probe_ids, probe_mask)
    embed_scores = np.asarray(scores["embed"], np.float64)
    mlp_scores = np.asarray(scores["mlp"], np.float64)
    head_scores = np.asarray(scores["heads"], np.float64)
    expected = {"embed": (t_cfg.hidden_size,), "mlp": (t_cfg.num_hidden_layers, t_cfg.intermediate_size),
                "heads": (t_cfg.num_hidden_layers, t_cfg.num_attention_heads)}
    for name, arr in (("embed", embed_scores), ("mlp", mlp_scores), ("heads", head_scores)):
        if arr.shape != expected[name]:
            raise ValueError(f"scores[{name!r}] has shape {arr.shape}, the teacher needs {expected[name]}")

    stacked = list(range(t_cfg.num_hidden_layers) if given_layers is None else given_layers)
    teacher_layers = [t for _, t in pairs]
    if not set(teacher_layers) <= set(stacked):
        raise ValueError(f"init from teacher: the mapping reads teacher layers {sorted(set(teacher_layers))}, the "
                         f"teacher holds {stacked}")
    kept_heads = [
        _select_heads(head_scores[t], t_cfg.num_key_value_heads, s_cfg.num_key_value_heads, s_cfg.num_groups)
        for t in teacher_layers
    ]
    index = {
        "embed": _top(embed_scores, s_cfg.hidden_size),
        "layer": np.array([stacked.index(t) for t in teacher_layers]),
        "mlp": np.stack([_top(mlp_scores[t], s_cfg.intermediate_size) for t in teacher_layers]),
        "q": np.stack([_head_rows(heads, t_cfg.head_dim) for _, heads in kept_heads]),
        "kv": np.stack([_head_rows(groups, t_cfg.head_dim) for groups, _ in kept_heads]),
    }
    slicer, sources, skeleton = slice_program(teacher, s_cfg, key=key, dtype=dtype, shardings=shardings)
    leaves = slicer(sources, {k: jnp.asarray(v, jnp.int32) for k, v in index.items()})
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    for (path, target), value in zip(flat, leaves):
        if value.shape != target.shape:
            raise ValueError(f"init from teacher: {path_name(path)} came out {value.shape}, the student needs "
                             f"{target.shape}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def slice_program(teacher: CausalLM, student_config: ModelConfig, *, key=None, dtype=None, shardings=None):
    """The program that gathers the student's leaves from the teacher's: `(jitted(sources, index) -> leaves,
    sources, skeleton)`, `sources` being the teacher leaves it reads by student leaf name and `skeleton` the
    student's shapes. The teacher may be abstract (`jax.ShapeDtypeStruct`s with shardings: the compile dry run
    lowers this program). Layer leaves are gathered one student layer at a time (`lax.map`), so the program's
    temporaries are one layer's slices, and the outputs are cast to `dtype` and placed by `shardings`."""
    t_cfg = teacher.config
    skeleton = eqx.filter_eval_shape(CausalLM, student_config, key=jax.random.key(0) if key is None else key)
    sources = dict(_named(teacher))
    if t_cfg.tie_word_embeddings and not student_config.tie_word_embeddings:
        # A tied teacher's output embedding is its input embedding.
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    names = tuple(path_name(path) for path, _ in flat)
    for name in names:
        if name not in _AXES or name not in sources:
            raise ValueError(f"init from teacher: no rule to fill student leaf {name!r}")
    dtype = jnp.dtype(dtype if dtype is not None else sources[names[0]].dtype)
    out_shardings = None if shardings is None else list(jax.tree_util.tree_leaves(shardings))
    if out_shardings is not None and len(out_shardings) != len(names):
        raise ValueError(f"init from teacher: {len(out_shardings)} shardings for the student's {len(names)} leaves")
    fn = functools.partial(_slice_leaves, names=names, dtype=dtype)
    return jax.jit(fn, out_shardings=out_shardings), {n: sources[n] for n in names}, skeleton


def _slice_leaves(sources: dict[str, Array], index: dict[str, Array], *, names: tuple[str, ...],
                  dtype) -> list[Array]:
    """Every student leaf, in `names` order, gathered from the teacher's leaves `sources` (the index sets are
    traced arrays, so their values do not recompile the program)."""
    out = []
    embed = {"embed": index["embed"]}
    per_layer = {k: index[k] for k in ("layer", "mlp", "q", "kv")}
    for name in names:
        axes = _AXES[name]
        if name.startswith(_LAYERS):
            def one_layer(idx, source=sources[name], axes=axes):  # teacher layer idx["layer"], pruned
                return _take(source[idx["layer"]], axes, {**idx, **embed}).astype(dtype)

            out.append(jax.lax.map(one_layer, per_layer))
        else:
            out.append(_take(sources[name], axes, embed).astype(dtype))
    return out


def full_pairs(pairs, student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """`(student_layer, teacher_layer)` for every student layer: the given pairs, the rest from `uniform`."""
    uniform = dict(layer_mapping("uniform", student_layers=student_layers, teacher_layers=teacher_layers))
    if pairs is None:
        return tuple(uniform.items())
    given = dict(validate_pairs(pairs, student_layers=student_layers, teacher_layers=teacher_layers))
    return tuple((s, given.get(s, uniform[s])) for s in range(student_layers))


def _named(model: CausalLM) -> list[tuple[str, Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(model)
    return [(path_name(p), leaf) for p, leaf in flat]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest scores (ties to the lower index), in increasing index order."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def _select_heads(head_scores: np.ndarray, teacher_kv: int, student_kv: int, student_group: int):
    """The kept KV groups and, inside them, the kept query heads (global head numbers), both sorted."""
    group_scores = head_scores.reshape(teacher_kv, -1)
    teacher_group = group_scores.shape[1]
    groups = _top(group_scores.sum(-1), student_kv)
    heads = np.concatenate([g * teacher_group + _top(group_scores[g], student_group) for g in groups])
    return groups, heads


def _head_rows(heads: np.ndarray, head_dim: int) -> np.ndarray:
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _take(x: Array, axes: tuple[str | None, ...], index: dict[str, Array]) -> Array:
    for axis, kind in enumerate(axes):
        if kind is not None:
            x = jnp.take(x, index[kind], axis=axis)
    return x
