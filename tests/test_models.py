"""Parity with transformers (fp32, 1e-4) per component and for whole models; key sets; round trips; sharding."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_config, left_padded_batch, make_hf_model, save_hf

import vishwam
from models import ModelConfig, init_model, prepare_inputs
from models.pytree import named_leaves
from vishwam.io.checkpoint import hf_names

TOL = 1e-4

CASES = [
    ("qwen2", 1, False), ("qwen2", 2, False), ("qwen2", 4, False), ("qwen2", 2, True),
    ("qwen3", 1, False), ("qwen3", 2, False), ("qwen3", 4, True),
    ("llama", 1, False), ("llama", 2, False), ("llama", 4, True),
]


def _np(t):
    return t.detach().float().numpy()


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.max(np.abs(a - b) / (1.0 + np.abs(b)))
    assert err < tol, f"max rel err {err}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family, kv, tied in CASES:
        hf = make_hf_model(hf_config(family, kv_heads=kv, tied=tied))
        path = save_hf(hf, tmp_path_factory.mktemp(f"{family}{kv}{tied}"))
        out[(family, kv, tied)] = (hf, path)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-kv{c[1]}{'-tied' if c[2] else ''}")
def test_whole_model_parity_left_padding(checkpoints, case):
    hf, path = checkpoints[case]
    model = vishwam.load_pretrained(path, dtype=jnp.float32)
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_hidden_states=True, output_attentions=True)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), output_hidden_states=True,
                output_attentions=True)
    real = mask.astype(bool)
    _close(np.asarray(out.logits)[real], _np(ref.logits)[real])
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        _close(np.asarray(ours)[real], _np(theirs)[real])
    assert len(out.attentions) == len(ref.attentions)
    for ours, theirs in zip(out.attentions, ref.attentions):
        ours, theirs = np.asarray(ours), _np(theirs)
        for b in range(ids.shape[0]):
            rows = np.nonzero(real[b])[0]
            # Real query rows over all keys: padded keys carry zero probability in both.
            _close(ours[b][:, rows], theirs[b][:, rows])


def test_default_positions_match_transformers_without_padding(checkpoints):
    hf, path = checkpoints[("qwen2", 2, False)]
    model = vishwam.load_pretrained(path)
    ids = np.random.default_rng(1).integers(0, 96, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    _close(model(jnp.asarray(ids)).logits, _np(ref))


def test_left_padding_equals_unpadded(checkpoints):
    _, path = checkpoints[("qwen3", 2, False)]
    model = vishwam.load_pretrained(path)
    ids, mask, _ = left_padded_batch()
    padded = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    alone = np.asarray(model(jnp.asarray(ids[2:3, 4:])).logits)
    _close(padded[2, 4:], alone[0], 1e-5)


def test_components_match_transformers(checkpoints):
    hf, path = checkpoints[("qwen3", 2, False)]  # qwen3: q/k norms and an explicit head_dim
    model = vishwam.load_pretrained(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    tx = torch.tensor(x)
    with torch.no_grad():
        _close(model.model.norm(jnp.asarray(x)), _np(hf.model.norm(tx)))
        layer, hf_layer = model.layer(1), hf.model.layers[1]
        _close(layer.mlp(jnp.asarray(x)), _np(hf_layer.mlp(tx)))
        _close(layer.input_layernorm(jnp.asarray(x)), _np(hf_layer.input_layernorm(tx)))
        pos = np.tile(np.arange(6), (2, 1))
        cos_ref, sin_ref = hf.model.rotary_emb(tx, torch.tensor(pos))
        mask, cos, sin = prepare_inputs(model.config, jnp.asarray(pos), None, jnp.asarray(pos))
        _close(cos, _np(cos_ref))
        _close(sin, _np(sin_ref))
        causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, 6, 6)
        ref, ref_probs = hf_layer.self_attn(hidden_states=tx, position_embeddings=(cos_ref, sin_ref),
                                            attention_mask=causal)
        ours = layer.self_attn(jnp.asarray(x), cos, sin, mask, output_attentions=True)
        _close(ours.output, _np(ref))
        _close(ours.probs, _np(ref_probs))


def test_llama3_rope_scaling_parity(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    hf = make_hf_model(hf_config("llama", rope_parameters=rope, attention_bias=True, mlp_bias=True))
    model = vishwam.load_pretrained(save_hf(hf, tmp_path))
    ids = np.random.default_rng(2).integers(0, 96, (2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    _close(model(jnp.asarray(ids)).logits, _np(ref))


def test_top_level_rope_theta_is_read(tmp_path, checkpoints):
    """Released Qwen2.5 configs put rope_theta at the top level (no rope_parameters)."""
    _, path = checkpoints[("qwen2", 2, False)]
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 1234.0
    from models import ModelConfig

    assert ModelConfig.from_hf(cfg).rope_theta == 1234.0
    cfg["rope_parameters"] = {"rope_theta": 4321.0, "rope_type": "default"}
    assert ModelConfig.from_hf(cfg).rope_theta == 4321.0


def test_key_sets_equal_hf_state_dict(checkpoints):
    for (family, kv, tied), (hf, path) in checkpoints.items():
        model = vishwam.load_pretrained(path)
        ours = {n for p, _ in named_leaves(eqx.filter(model, eqx.is_array))
                for n in hf_names(p, model.config.num_hidden_layers)}
        theirs = set(hf.state_dict())
        if tied:
            theirs.discard("lm_head.weight")
        assert ours == theirs, (family, ours ^ theirs)


def test_bf16_checkpoint_loads(tmp_path):
    hf = make_hf_model(hf_config("qwen2"))
    path = save_hf(hf, tmp_path, dtype=torch.bfloat16)
    as_stored = vishwam.load_pretrained(path)
    assert as_stored.model.embed_tokens.weight.dtype == jnp.bfloat16
    model = vishwam.load_pretrained(path, dtype=jnp.float32)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation="eager")
    ids = np.random.default_rng(3).integers(0, 96, (2, 8))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits
    _close(model(jnp.asarray(ids)).logits, _np(ref))
    out16 = as_stored(jnp.asarray(ids)).logits
    assert out16.dtype == jnp.bfloat16
    _close(out16.astype(jnp.float32), _np(ref), 5e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_export_reload_roundtrip(tmp_path, tied):
    hf = make_hf_model(hf_config("qwen2", tied=tied))
    src = save_hf(hf, tmp_path / "src")
    model = vishwam.load_pretrained(src)
    out_dir = vishwam.save_pretrained(model, tmp_path / "export", max_shard_size="16KB")
    assert (out_dir / "model.safetensors.index.json").is_file()
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
    ids = np.random.default_rng(4).integers(0, 96, (2, 8))
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids)).logits
    ours = model(jnp.asarray(ids)).logits
    np.testing.assert_allclose(np.asarray(ours), _np(ref), atol=1e-5, rtol=1e-5)
    again = vishwam.load_pretrained(out_dir)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_load_on_four_devices(checkpoints, monkeypatch):
    assert len(jax.devices()) >= 4
    _, path = checkpoints[("qwen2", 2, False)]
    single = vishwam.load_pretrained(path)
    from vishwam.io.safetensors_io import SafetensorsFile

    reads = []
    original = SafetensorsFile.read

    def spy(self, name, index=None):
        arr = original(self, name, index)
        reads.append((name, arr.shape, self.info(name).shape))
        return arr

    monkeypatch.setattr(SafetensorsFile, "read", spy)
    mesh = vishwam.make_mesh(data=1, fsdp=2, tensor=2)
    sharded = vishwam.load_pretrained(path, mesh=mesh)
    q = sharded.model.layers.self_attn.q_proj.weight
    assert len(q.sharding.device_set) == 4
    assert tuple(q.sharding.spec) == (None, "tensor", "fsdp")
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 16)}
    # Each device read only its quarter of every q_proj tensor, never the whole tensor.
    q_reads = [(shape, full) for name, shape, full in reads if name.endswith("q_proj.weight")]
    assert q_reads and all(np.prod(s) * 4 == np.prod(f) for s, f in q_reads)
    ids, mask, _ = left_padded_batch()
    a = single(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    b = eqx.filter_jit(lambda m, i, k: m(i, attention_mask=k).logits)(sharded, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_lazy_layer_groups_and_partial_loads(checkpoints):
    _, path = checkpoints[("llama", 2, False)]
    lazy = vishwam.open_pretrained(path)
    full = lazy.load()
    part = lazy.load_layers(1, 2)
    for a, b in zip(jax.tree.leaves(part), jax.tree.leaves(full.layers_slice(1, 2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    groups = lazy.layer_groups(2)
    assert groups[0][0] == 0 and groups[-1][1] == 2
    assert all(len(lazy.shards_of_layers(a, b)) <= 2 or b - a == 1 for a, b in groups)


def test_repr_and_parameter_counts(checkpoints):
    _, path = checkpoints[("qwen2", 2, False)]
    model = vishwam.load_pretrained(path)
    text = repr(model)
    assert "model.layers.self_attn.q_proj.weight" in text and "[2,32,32]" in text and "float32" in text
    counts = vishwam.parameter_counts(model)
    assert sum(counts.values()) == vishwam.count_parameters(model) == model.config.num_parameters()


def test_layer_surgery(checkpoints):
    _, path = checkpoints[("qwen2", 2, True)]
    model = vishwam.load_pretrained(path)
    layer0 = model.layer(0)
    swapped = model.with_layer(1, layer0)
    for a, b in zip(jax.tree.leaves(swapped.layer(1)), jax.tree.leaves(layer0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(swapped.model.embed_tokens.weight),
                                  np.asarray(model.model.embed_tokens.weight))


def test_attention_implementation_choice():
    from models.attention import resolve_implementation

    on_gpu = jax.default_backend() == "gpu"
    # On a CPU backend "auto" is always the XLA path; on a GPU it takes cuDNN for bf16 without probabilities.
    assert resolve_implementation("auto", jnp.bfloat16, 64, need_probs=False) == ("cudnn" if on_gpu else "xla")
    assert resolve_implementation("auto", jnp.float32, 64, need_probs=False) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 64, need_probs=True) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 96 + 4, need_probs=False) == "xla"
    assert resolve_implementation("xla", jnp.bfloat16, 64, need_probs=False) == "xla"
    with pytest.raises(ValueError, match="cannot return attention probabilities"):
        resolve_implementation("cudnn", jnp.bfloat16, 64, need_probs=True)
    with pytest.raises(ValueError, match="attention implementation 'cudnn' needs bf16/fp16 inputs"):
        resolve_implementation("cudnn", jnp.float32, 64, need_probs=False)
    with pytest.raises(ValueError, match="attention implementation must be one of auto, xla, cudnn, got 'flash'"):
        resolve_implementation("flash", jnp.bfloat16, 64, need_probs=False)


# "xla" and "auto" (the XLA path on CPU) are each compared with a naive float64 attention, at the default matmul
# precision and over several causal blocks, in tests/test_attention_naive.py.


@pytest.mark.parametrize("case", [("qwen2", 2, False), ("qwen3", 1, False), ("llama", 4, True)],
                         ids=lambda c: f"{c[0]}-kv{c[1]}{'-tied' if c[2] else ''}")
def test_gradients_match_transformers(checkpoints, case):
    """Every parameter's gradient of a masked next-token CE, left padding, against torch autograd: covers the
    hand-written backward passes (attention core, CPU linear) and the remat policy of the layer scan."""
    hf, path = checkpoints[case]
    model = vishwam.load_pretrained(path, dtype=jnp.float32)
    ids, mask, pos = left_padded_batch(seed=3)
    labels = np.roll(ids, -1, axis=1)
    weight = (mask * np.roll(mask, -1, axis=1)).astype(np.float32)
    weight[:, -1] = 0.0

    hf.zero_grad()
    logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(labels)[..., None])[..., 0]
    (nll * torch.tensor(weight)).sum().backward()
    theirs = {n: _np(p.grad) for n, p in hf.named_parameters()}

    params, static = eqx.partition(model, eqx.is_array)

    def loss(p):
        out = eqx.combine(p, static)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        logp = jax.nn.log_softmax(out.logits, -1)
        return -jnp.sum(jnp.take_along_axis(logp, jnp.asarray(labels)[..., None], -1)[..., 0] * weight)

    grads = jax.jit(jax.grad(loss))(params)
    seen = set()
    for name, g in named_leaves(grads):
        names = hf_names(name, model.config.num_hidden_layers)
        for i, hf_name in enumerate(names):
            ours = np.asarray(g[i] if len(names) > 1 else g)
            _close(ours, theirs[hf_name], 1e-4)
            seen.add(hf_name)
    assert seen == set(theirs)


def test_attention_core_backward_matches_autodiff():
    """The hand-written attention backward against autodiff of the same forward, with a fully masked row."""
    from models.attention import _attention_core, _probs

    rng = np.random.default_rng(0)
    b, kv, q, s, d = 2, 2, 12, 6, 4
    qt, kt, vt = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                  for shape in ((b, kv, q, d), (b, kv, s, d), (b, kv, s, d)))
    mask = jnp.asarray(np.tril(np.ones((q, s), bool), k=-1)[None, None].repeat(b, 0))  # query row 0 sees nothing
    row_valid = jnp.any(mask, axis=-1, keepdims=True)
    assert not bool(row_valid[0, 0, 0, 0])
    cot = jnp.asarray(rng.standard_normal((b, kv, q, d)), jnp.float32)

    def ref(qt, kt, vt):
        return jnp.sum(jnp.einsum("bkqs,bksd->bkqd", _probs(qt, kt, mask, row_valid, 0.5), vt) * cot)

    def ours(qt, kt, vt):
        return jnp.sum(_attention_core(qt, kt, vt, mask, row_valid, 0.5) * cot)

    np.testing.assert_allclose(ours(qt, kt, vt), ref(qt, kt, vt), rtol=1e-6)
    for a, r in zip(jax.grad(ours, argnums=(0, 1, 2))(qt, kt, vt), jax.grad(ref, argnums=(0, 1, 2))(qt, kt, vt)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("widths", [(8, 24), (24, 8)], ids=["in<out", "in>out"])
def test_linear_backward_matches_autodiff(widths):
    from models.layers import _cpu_linear, linear

    d_in, d_out = widths
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 5, d_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d_out, d_in)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((3, 5, d_out)), jnp.float32)
    for f in (linear, _cpu_linear):
        got = jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)
        want = jax.grad(lambda x, w: jnp.sum(jnp.einsum("...i,oi->...o", x, w) * cot), argnums=(0, 1))(x, w)
        for a, r in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_causal_block_counts():
    from models.attention import causal_blocks

    assert [causal_blocks(s) for s in (7, 31, 32, 64, 96, 128, 100, 256, 4096, 200)] == [1, 1, 1, 2, 3, 4, 2, 8, 8, 5]


def testcausal_blocks_equal_one_block(monkeypatch):
    """Attention split into causal query blocks (seq 128: four) gives the single block's logits and gradients,
    left padding included."""
    import models.attention

    cfg = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True)
    model = init_model(cfg, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    ids = jax.random.randint(jax.random.key(2), (2, 128), 0, 64)
    mask = jnp.ones((2, 128), jnp.int32).at[0, :37].set(0)

    def run(p):
        logits = eqx.combine(p, static)(ids, attention_mask=mask).logits
        return jnp.sum(jnp.where(mask[..., None] > 0, jnp.sin(logits), 0.0)), logits

    assert models.attention.causal_blocks(128) == 4
    (_, blocked), g_blocked = jax.value_and_grad(run, has_aux=True)(params)
    monkeypatch.setattr(models.attention, "causal_blocks", lambda seq: 1)
    (_, single), g_single = jax.value_and_grad(run, has_aux=True)(params)
    np.testing.assert_allclose(blocked, single, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_blocked), jax.tree.leaves(g_single)):  # fp32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_remat_gradients_equal_saved(checkpoints):
    """`remat=True` (nothing saved per layer) and the default policy (the named linear outputs saved) give the
    same gradients, through the hand-written attention and linear backward passes."""
    _, path = checkpoints[("qwen3", 2, False)]
    model = vishwam.load_pretrained(path, dtype=jnp.float32)
    ids, mask, _ = left_padded_batch(seed=5)
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, remat):
        logits = eqx.combine(p, static)(jnp.asarray(ids), attention_mask=jnp.asarray(mask), remat=remat).logits
        return jnp.sum(jnp.where(jnp.asarray(mask)[..., None] > 0, jnp.tanh(logits), 0.0))

    saved = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
    rematted = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(rematted)):  # recomputed: fp32 rounding differs
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_cast_floating_casts_abstract_leaves_and_keeps_their_sharding():
    """The compile dry run casts the abstract student to the compute dtype (its on-policy generation programs):
    abstract floating leaves change dtype, keep shape and sharding; integer leaves and arrays behave as before."""
    from jax.sharding import NamedSharding, PartitionSpec

    from models import cast_floating

    sharding = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",)), PartitionSpec("fsdp"))
    tree = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=sharding),
            "i": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=sharding), "a": jnp.ones(3, jnp.float32)}
    out = cast_floating(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].shape == (4, 2) and out["w"].sharding == sharding
    assert out["i"].dtype == jnp.int32 and out["a"].dtype == jnp.bfloat16


def test_chosen_layers_outputs_match_transformers(tmp_path, family="qwen2"):
    """Outputs asked for by index (what a teacher's forward asks for: its mapped layers) equal transformers' at
    those indices, are None elsewhere, and leave the logits and the gradients as they are."""
    hf = make_hf_model(hf_config(family, kv_heads=2, layers=5))
    model = vishwam.load_pretrained(save_hf(hf, tmp_path), dtype=jnp.float32)
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_hidden_states=True, output_attentions=True)
    call = dict(attention_mask=jnp.asarray(mask))
    full = model(jnp.asarray(ids), **call, output_qkv=True)
    out = model(jnp.asarray(ids), **call, output_hidden_states=(1, 3, 5), output_attentions=(0, 3), output_qkv=(4,))
    real = mask.astype(bool)
    _close(np.asarray(out.logits)[real], _np(ref.logits)[real])
    assert [h is not None for h in out.hidden_states] == [False, True, False, True, False, True]
    for i in (1, 3, 5):
        _close(np.asarray(out.hidden_states[i])[real], _np(ref.hidden_states[i])[real])
    assert [a is not None for a in out.attentions] == [True, False, False, True, False]
    for i in (0, 3):
        ours, theirs = np.asarray(out.attentions[i]), _np(ref.attentions[i])
        for b in range(ids.shape[0]):
            rows = np.nonzero(real[b])[0]
            _close(ours[b][:, rows], theirs[b][:, rows])
    assert [q is not None for q in out.qkv] == [False, False, False, False, True]
    for ours, theirs in zip(out.qkv[4], full.qkv[4]):
        _close(ours, theirs)

    def loss(m, chosen):
        o = m(jnp.asarray(ids), **call, output_attentions=chosen, output_hidden_states=chosen and (2,))
        return o.attentions[2].sum() + o.hidden_states[2].sum() + o.logits.sum()

    grads = [jax.tree.leaves(eqx.filter_grad(loss)(model, chosen)) for chosen in ((2,), True)]
    for ours, theirs in zip(*grads):
        _close(ours, theirs)
