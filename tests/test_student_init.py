"""Student initialisation from the teacher (Minitron pruning): known answers, importance, config errors."""

import dataclasses
import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill.student_init import (
    importance_scores,
    init_student_from_teacher,
    student_config_from_teacher,
    validate_student_config,
)
from models import CausalLM, ModelConfig
from models.pytree import path_name
from vishwam.errors import ConfigError

SMALL = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
FAMILIES = {
    "qwen2": ModelConfig(model_type="qwen2", qkv_bias=True, **SMALL),
    "qwen3": ModelConfig(model_type="qwen3", qk_norm=True, tie_word_embeddings=True, **SMALL),
    "llama": ModelConfig(model_type="llama", qkv_bias=True, o_bias=True, mlp_bias=True, **SMALL),
}


def _random_model(config, seed=0, std=0.2, default_init=False):
    """A model with random leaves, filled from numpy into an abstract skeleton (nothing to compile).

    `default_init` draws what `CausalLM.__init__` draws (weights N(0, 0.02), biases 0, norm gains 1); otherwise
    every leaf is random (biases and norm gains included, so no slice of them is trivially zero or one)."""
    rng = np.random.default_rng(seed)
    skeleton = eqx.filter_eval_shape(CausalLM, config, key=jax.random.key(0))
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    leaves = []
    for path, leaf in flat:
        name = path_name(path)
        base = 1.0 if name.endswith("norm.weight") else 0.0
        scale = 0.0 if default_init and (name.endswith("norm.weight") or name.endswith(".bias")) else std
        leaves.append(jnp.asarray(base + scale * rng.standard_normal(leaf.shape), jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.cache
def _teacher(family):
    return _random_model(FAMILIES[family])


@eqx.filter_jit
def _logits(model, ids, mask=None):
    return model(ids, mask).logits


def _np_layer(model, i):
    """Layer `i` with numpy leaves (indexing numpy compiles nothing)."""
    return jax.tree.map(lambda x: np.asarray(x)[i], model.model.layers)


def _probe(vocab=32, batch=2, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, :3] = 0  # one left-padded row
    return jnp.asarray(ids), jnp.asarray(mask)


def _zeroed(x, index):
    y = np.array(x)
    y[index] = 0
    return jnp.asarray(y)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_size_student_is_the_teacher(family):
    teacher = _teacher(family)
    ids, mask = _probe()
    n = teacher.config.num_hidden_layers
    student = init_student_from_teacher(teacher, teacher.config, pairs=tuple((i, i) for i in range(n)),
                                        probe_ids=ids, probe_mask=mask, key=jax.random.key(5))
    assert jax.tree.structure(student) == jax.tree.structure(teacher)
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_logits(student, ids, mask), _logits(teacher, ids, mask))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_narrow_student_is_a_slice_of_the_teacher(family):
    teacher = _teacher(family)
    t_cfg = teacher.config
    ids, mask = _probe()
    cfg = student_config_from_teacher(t_cfg, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                      num_key_value_heads=1, num_attention_heads=1)
    assert (cfg.head_dim, cfg.vocab_size, cfg.qk_norm, cfg.tie_word_embeddings) == (
        t_cfg.head_dim, t_cfg.vocab_size, t_cfg.qk_norm, t_cfg.tie_word_embeddings)
    scores = importance_scores(teacher, ids, mask)
    student = init_student_from_teacher(teacher, cfg, pairs=((0, 1),), probe_ids=ids, probe_mask=mask,
                                        key=jax.random.key(5))
    assert student.config == cfg
    skeleton = eqx.filter_eval_shape(CausalLM, cfg, key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(skeleton)):
        assert a.shape == b.shape

    embed = np.sort(np.argsort(-np.asarray(scores["embed"]), kind="stable")[:24])
    mlp = np.sort(np.argsort(-np.asarray(scores["mlp"][1]), kind="stable")[:32])
    group = int(np.argmax(scores["kv_groups"][1]))
    head = 2 * group + int(np.argmax(scores["heads"][1, 2 * group: 2 * group + 2]))
    t, s = _np_layer(teacher, 1), _np_layer(student, 0)
    q_rows = np.arange(8) + 8 * head
    kv_rows = np.arange(8) + 8 * group
    t_embed = np.asarray(teacher.model.embed_tokens.weight)
    np.testing.assert_array_equal(student.model.embed_tokens.weight, t_embed[:, embed])
    np.testing.assert_array_equal(student.model.norm.weight, np.asarray(teacher.model.norm.weight)[embed])
    np.testing.assert_array_equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[q_rows][:, embed])
    np.testing.assert_array_equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[kv_rows][:, embed])
    np.testing.assert_array_equal(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[kv_rows][:, embed])
    np.testing.assert_array_equal(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[embed][:, q_rows])
    np.testing.assert_array_equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight[embed][:, mlp])
    np.testing.assert_array_equal(s.mlp.up_proj.weight, t.mlp.up_proj.weight[mlp][:, embed])
    np.testing.assert_array_equal(s.post_attention_layernorm.weight, t.post_attention_layernorm.weight[embed])
    if t_cfg.qkv_bias:
        np.testing.assert_array_equal(s.self_attn.q_proj.bias, t.self_attn.q_proj.bias[q_rows])
        np.testing.assert_array_equal(s.self_attn.v_proj.bias, t.self_attn.v_proj.bias[kv_rows])
    if t_cfg.o_bias:
        np.testing.assert_array_equal(s.self_attn.o_proj.bias, t.self_attn.o_proj.bias[embed])
    if t_cfg.mlp_bias:
        np.testing.assert_array_equal(s.mlp.gate_proj.bias, t.mlp.gate_proj.bias[mlp])
        np.testing.assert_array_equal(s.mlp.down_proj.bias, t.mlp.down_proj.bias[embed])
    if t_cfg.qk_norm:
        np.testing.assert_array_equal(s.self_attn.k_norm.weight, t.self_attn.k_norm.weight)
    if t_cfg.tie_word_embeddings:
        assert student.lm_head is None
    else:
        np.testing.assert_array_equal(student.lm_head.weight, np.asarray(teacher.lm_head.weight)[:, embed])


def test_tied_teacher_to_untied_student_copies_embeddings():
    teacher = _teacher("qwen3")
    cfg = student_config_from_teacher(teacher.config, hidden_size=16, tie_word_embeddings=False)
    ids, mask = _probe()
    student = init_student_from_teacher(teacher, cfg, pairs=None, probe_ids=ids, probe_mask=mask,
                                        key=jax.random.key(0))
    np.testing.assert_array_equal(student.lm_head.weight, student.model.embed_tokens.weight)


def test_importance_scores_shapes_groups_and_padding():
    teacher = _teacher("qwen2")
    ids, mask = _probe()
    scores = importance_scores(teacher, ids, mask)
    assert {k: v.shape for k, v in scores.items()} == {
        "embed": (32,), "mlp": (2, 48), "heads": (2, 4), "kv_groups": (2, 2)}
    np.testing.assert_allclose(scores["kv_groups"], scores["heads"].reshape(2, 2, 2).sum(-1), rtol=1e-6)
    assert all(bool(jnp.all(v > 0)) for v in scores.values())
    # Head scores from the model's own attention probabilities and values: mean over real tokens of
    # ||probs_h @ v_(h // group)||.
    out = eqx.filter_jit(lambda m, i, k: m(i, k, output_attentions=True, output_qkv=True))(teacher, ids, mask)
    valid = np.asarray(mask, bool)
    for layer in range(2):
        v = np.repeat(np.asarray(out.qkv[layer][2]), 2, axis=1)  # [batch, heads, seq, head_dim]
        norms = np.linalg.norm(np.asarray(out.attentions[layer]) @ v, axis=-1)  # [batch, heads, seq]
        np.testing.assert_allclose(scores["heads"][layer], norms.transpose(0, 2, 1)[valid].mean(0), rtol=1e-5)
    # What sits under padding does not count.
    other_ids = np.array(ids)
    other_ids[1, :3] = (other_ids[1, :3] + 7) % 32
    other = importance_scores(teacher, jnp.asarray(other_ids), mask)
    for k in scores:
        np.testing.assert_allclose(other[k], scores[k], rtol=1e-6)


def test_zeroed_components_are_pruned_and_gqa_groups_kept_whole():
    """KV group 0 (k, v and biases zero in every layer) and some MLP neurons (zero `up` rows) contribute nothing:
    the student keeps group 1 with both its query heads, and the live neurons, and computes the teacher's logits.
    Embedding channels whose every norm gain is zero are the ones dropped from the width."""
    teacher = _teacher("qwen2")
    attn = teacher.model.layers.self_attn
    dead_neurons = np.array([0, 5, 6, 20, 47])
    teacher = eqx.tree_at(
        lambda m: [m.model.layers.self_attn.k_proj.weight, m.model.layers.self_attn.k_proj.bias,
                   m.model.layers.self_attn.v_proj.weight, m.model.layers.self_attn.v_proj.bias,
                   m.model.layers.mlp.up_proj.weight],
        teacher,
        [_zeroed(attn.k_proj.weight, np.s_[:, :8]), _zeroed(attn.k_proj.bias, np.s_[:, :8]),
         _zeroed(attn.v_proj.weight, np.s_[:, :8]), _zeroed(attn.v_proj.bias, np.s_[:, :8]),
         _zeroed(teacher.model.layers.mlp.up_proj.weight, np.s_[:, dead_neurons])],
    )
    ids, mask = _probe()
    scores = importance_scores(teacher, ids, mask)
    np.testing.assert_array_equal(scores["heads"][:, :2], 0.0)
    np.testing.assert_array_equal(scores["mlp"][:, dead_neurons], 0.0)

    cfg = student_config_from_teacher(teacher.config, num_key_value_heads=1, intermediate_size=48 - 5)
    assert cfg.num_attention_heads == 2
    student = init_student_from_teacher(teacher, cfg, pairs=((0, 0), (1, 1)), probe_ids=ids, probe_mask=mask,
                                        key=jax.random.key(0))
    live = np.setdiff1d(np.arange(48), dead_neurons)
    for i in range(2):
        s, t = _np_layer(student, i), _np_layer(teacher, i)
        np.testing.assert_array_equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[16:])  # heads 2, 3
        np.testing.assert_array_equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[8:])
        np.testing.assert_array_equal(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[:, 16:])
        np.testing.assert_array_equal(s.mlp.gate_proj.weight, t.mlp.gate_proj.weight[live])
    np.testing.assert_allclose(_logits(student, ids, mask), _logits(teacher, ids, mask), atol=1e-5)

    dead_channels = np.array([1, 4, 9, 10, 11, 17, 25, 30])
    layers = teacher.model.layers
    teacher = eqx.tree_at(
        lambda m: [m.model.layers.input_layernorm.weight, m.model.layers.post_attention_layernorm.weight,
                   m.model.norm.weight],
        teacher,
        [_zeroed(layers.input_layernorm.weight, np.s_[:, dead_channels]),
         _zeroed(layers.post_attention_layernorm.weight, np.s_[:, dead_channels]),
         _zeroed(teacher.model.norm.weight, dead_channels)],
    )
    # (The narrow test's shapes, so the compiled gather is reused.)
    cfg = student_config_from_teacher(teacher.config, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                      num_key_value_heads=1, num_attention_heads=1)
    student = init_student_from_teacher(teacher, cfg, pairs=None, probe_ids=ids, probe_mask=mask,
                                        key=jax.random.key(0))
    kept = np.setdiff1d(np.arange(32), dead_channels)
    t_embed = np.asarray(teacher.model.embed_tokens.weight)
    np.testing.assert_array_equal(student.model.embed_tokens.weight, t_embed[:, kept])


def test_query_heads_chosen_inside_kept_groups():
    teacher = _teacher("llama")
    heads = jnp.array([[1.0, 5.0, 3.0, 2.0],  # groups 6 vs 5: group 0, its head 1
                       [1.0, 1.0, 3.0, 4.0]])  # groups 2 vs 7: group 1, its head 3
    scores = {"embed": jnp.ones(32), "mlp": jnp.ones((2, 48)), "heads": heads}
    pairs = ((0, 0), (1, 1))

    def init(**sizes):
        cfg = student_config_from_teacher(teacher.config, **sizes)
        return init_student_from_teacher(teacher, cfg, pairs=pairs, probe_ids=None, probe_mask=None,
                                         key=jax.random.key(0), scores=scores)

    one = init(num_key_value_heads=1, num_attention_heads=1)
    two = init(num_attention_heads=2)  # both groups, one query head each
    for layer, (group, head, kept_heads) in enumerate([(0, 1, (1, 2)), (1, 3, (0, 3))]):
        t = _np_layer(teacher, layer)
        rows = lambda hs: np.concatenate([np.arange(8) + 8 * h for h in hs])  # noqa: E731
        s1, s2 = _np_layer(one, layer).self_attn, _np_layer(two, layer).self_attn
        np.testing.assert_array_equal(s1.q_proj.weight, t.self_attn.q_proj.weight[rows([head])])
        np.testing.assert_array_equal(s1.k_proj.bias, t.self_attn.k_proj.bias[rows([group])])
        np.testing.assert_array_equal(s2.q_proj.weight, t.self_attn.q_proj.weight[rows(kept_heads)])
        np.testing.assert_array_equal(s2.v_proj.weight, t.self_attn.v_proj.weight)


def test_pairs_filled_from_uniform():
    teacher = _teacher("qwen2")
    cfg = student_config_from_teacher(teacher.config, num_hidden_layers=1)
    scores = importance_scores(teacher, *_probe())
    only = init_student_from_teacher(teacher, cfg, pairs=((0, 0),), probe_ids=None, probe_mask=None,
                                     key=jax.random.key(0), scores=scores)
    default = init_student_from_teacher(teacher, cfg, pairs=None, probe_ids=None, probe_mask=None,
                                        key=jax.random.key(0), scores=scores)
    for s, t in zip(jax.tree.leaves(only.model.layers), jax.tree.leaves(_np_layer(teacher, slice(0, 1)))):
        np.testing.assert_array_equal(s, t)
    for s, t in zip(jax.tree.leaves(default.model.layers), jax.tree.leaves(_np_layer(teacher, slice(1, 2)))):
        np.testing.assert_array_equal(s, t)  # uniform maps the single student layer to the last teacher layer

    big = student_config_from_teacher(teacher.config)
    filled = init_student_from_teacher(teacher, big, pairs=((1, 1),), probe_ids=None, probe_mask=None,
                                       key=jax.random.key(0), scores=scores)
    for s, t in zip(jax.tree.leaves(filled), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(s, t)
    with pytest.raises(ConfigError, match="student layer 1 mapped twice"):
        init_student_from_teacher(teacher, big, pairs=((1, 0), (1, 1)), probe_ids=None, probe_mask=None,
                                  key=jax.random.key(0), scores=scores)


# ------------------------------------------------------------------------------- pruning a trained teacher

V = 32


def _markov_batches(steps, batch=16, seq=24, seed=0):
    """Token sequences of a Markov chain where each token has two equally likely successors (CE floor ln 2)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, V, size=(V, 2))
    out = np.zeros((steps, batch, seq), np.int32)
    out[:, :, 0] = rng.integers(0, V, (steps, batch))
    for j in range(1, seq):
        out[:, :, j] = successors[out[:, :, j - 1], rng.integers(0, 2, (steps, batch))]
    return jnp.asarray(out)


def _ce(model, ids):
    logits = model(ids).logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_pruned_trained_teacher_beats_random_init():
    cfg = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True)
    teacher = _random_model(cfg)
    opt = optax.adam(1e-2)
    data = _markov_batches(101)

    @eqx.filter_jit
    def train(model, data):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(carry, ids):
            params, state = carry
            loss, grads = jax.value_and_grad(lambda p: _ce(eqx.combine(p, static), ids))(params)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), data)
        return eqx.combine(params, static), losses

    teacher, losses = train(teacher, data[:-1])
    probe = data[-1]
    assert float(losses[-10:].mean()) < 1.2  # learned most of the chain (uniform is ln 32 = 3.47)

    student_cfg = student_config_from_teacher(cfg, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                              num_key_value_heads=1, num_attention_heads=2)
    # Keep the first and last teacher layers: dropping layer 0 is what hurts most (Minitron and ShortGPT both
    # rank the first layer highest), and this test is about width pruning from the kept layers.
    student = init_student_from_teacher(teacher, student_cfg, pairs=((0, 0), (1, 3)), probe_ids=probe,
                                        probe_mask=None, key=jax.random.key(1))
    random = _random_model(student_cfg, seed=1, std=0.02, default_init=True)
    ce = eqx.filter_jit(_ce)
    pruned_ce, random_ce = float(ce(student, probe)), float(ce(random, probe))
    assert pruned_ce < random_ce - 0.5, (pruned_ce, random_ce)


# ---------------------------------------------------------------------------------------------------- errors

TEACHER = FAMILIES["qwen2"]  # hidden 32, heads 4, kv 2 (groups of 2), head_dim 8, mlp 48, 2 layers, untied


@pytest.mark.parametrize(
    "sizes, field",
    [
        (dict(hidden_size=40), "hidden_size=40 is larger than the teacher's 32"),
        (dict(intermediate_size=64), "intermediate_size=64 is larger than the teacher's 48"),
        (dict(num_hidden_layers=3), "num_hidden_layers=3 is larger than the teacher's 2"),
        (dict(num_key_value_heads=4), "num_key_value_heads=4 is larger than the teacher's 2"),
        (dict(num_attention_heads=3), "num_attention_heads=3 is not a multiple of num_key_value_heads=2"),
        (dict(num_attention_heads=8), "num_attention_heads=8 is larger than the teacher's 4"),
        (dict(num_key_value_heads=1, num_attention_heads=4),  # group of 4 > 2
         "num_attention_heads=4 gives 4 query heads per KV group but the teacher has 2"),
        (dict(head_dim=16), "head_dim=16 differs from the teacher's 8"),
        (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings=True but the teacher has a separate lm_head"),
    ],
)
def test_impossible_student_configs(sizes, field):
    with pytest.raises(ConfigError, match="^" + re.escape(f"student {field}")) as info:
        student_config_from_teacher(TEACHER, **sizes)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model_type="llama"), "model_type='llama' differs from the teacher's 'qwen2'"),
        (dict(qk_norm=True), "qk_norm=True differs from the teacher's False"),
        (dict(vocab_size=16), "vocab_size=16 differs from the teacher's 32"),
        (dict(qkv_bias=False), "qkv_bias=False differs from the teacher's True"),
        (dict(head_dim=4), "head_dim=4 differs from the teacher's 8"),
    ],
)
def test_student_config_must_share_the_family(change, field):
    student = dataclasses.replace(TEACHER, **change)
    with pytest.raises(ConfigError, match="^" + re.escape(f"student {field}")):
        validate_student_config(TEACHER, student)
    with pytest.raises(ConfigError, match="^" + re.escape(f"student {field}")):
        init_student_from_teacher(_teacher("qwen2"), student, pairs=None, probe_ids=None, probe_mask=None,
                                  key=jax.random.key(0))


def test_kv_only_pruning_keeps_group_size():
    cfg = student_config_from_teacher(TEACHER, num_key_value_heads=1, hidden_size=16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size) == (2, 1, 8, 16)
    assert cfg.rope_theta == TEACHER.rope_theta and cfg.rms_norm_eps == TEACHER.rms_norm_eps
