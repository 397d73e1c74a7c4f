"""Generation: greedy output equal to transformers' `generate` token for token, sampling filters and
frequencies, one compilation per shape bucket, and sharded generation equal to one device."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_config, make_hf_model, save_hf

import vishwam
from models.sampling import filter_logits, sample_tokens
from vishwam.generation.sampler import compiled_programs, generate, prompt_bucket

DEMO_TEACHER = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo" / "teacher"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
CASES = {
    "qwen2-kv2": dict(family="qwen2", kv_heads=2),
    "qwen2-kv1-tied": dict(family="qwen2", kv_heads=1, tied=True),
    "qwen3-kv2": dict(family="qwen3", kv_heads=2),
    "llama-kv4-rope-llama3": dict(family="llama", kv_heads=4, rope_parameters=LLAMA3_ROPE, attention_bias=True),
}
NEW = 16
PAD = 0


def _prompts(vocab, seed=0, lengths=(9, 5, 2, 7)):
    """Left-padded prompts of different lengths (ids avoid 0 and 1: pad and the config's eos)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(2, vocab, n)
        mask[row, width - n:] = 1
    return ids, mask


def _hf_generate(hf, ids, mask, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD).numpy()
    # transformers stops when every row has ended; rows are padded to the full length here.
    return np.pad(out, ((0, 0), (0, ids.shape[1] + NEW - out.shape[1])), constant_values=PAD)


def _early_eos(hf, ids, mask):
    """A token that ends some rows early: the greedy continuation's 4th token of the first row."""
    free = _hf_generate(hf, ids, mask, eos=None)[:, ids.shape[1]:]
    return int(free[0, 3])


@pytest.fixture(scope="module")
def demo():
    return vishwam.load_pretrained(DEMO_TEACHER, dtype=jnp.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, spec in CASES.items():
        spec = dict(spec)
        hf = make_hf_model(hf_config(spec.pop("family"), **spec))
        out[name] = (hf, vishwam.load_pretrained(save_hf(hf, tmp_path_factory.mktemp(name)), dtype=jnp.float32))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_transformers_with_left_padding_and_eos(models, name):
    hf, model = models[name]
    ids, mask = _prompts(model.config.vocab_size)
    eos = _early_eos(hf, ids, mask)
    ref = _hf_generate(hf, ids, mask, eos)
    ours = np.asarray(generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD))
    assert ours.shape == (4, ids.shape[1] + NEW)
    np.testing.assert_array_equal(ours, ref)
    new = ours[:, ids.shape[1]:]
    ended = [np.flatnonzero(row == eos) for row in new]
    assert any(len(e) and e[0] < NEW - 1 for e in ended), "no row ended early: the EOS path is not exercised"


def test_greedy_equals_transformers_on_the_demo_teacher(demo):
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO_TEACHER, attn_implementation="eager").eval()
    model = demo
    ids, mask = _prompts(512, seed=3, lengths=(12, 30, 4))
    ref = _hf_generate(hf, ids, mask, eos=0)
    np.testing.assert_array_equal(np.asarray(generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=0,
                                                      pad_token_id=PAD)), ref)


def test_bfloat16_greedy_agrees_with_its_full_forward():
    """In bf16 the cached decode and the full forward differ by rounding only (different reduction orders of
    bf16 products): wherever the full forward's top two logits are apart by more than 0.25 (a few bf16 ulps at
    the demo teacher's logit magnitudes, ~8-16), the decode picks the same token."""
    model = vishwam.load_pretrained(DEMO_TEACHER, dtype=jnp.bfloat16)
    ids, mask = _prompts(512, seed=1, lengths=(12, 30, 4))
    out = np.asarray(generate(model, ids, mask, max_new_tokens=NEW))
    full_mask = np.concatenate([mask, np.ones((len(ids), NEW), np.int64)], axis=1)
    logits = np.asarray(model(jnp.asarray(out), attention_mask=jnp.asarray(full_mask)).logits, np.float32)
    width = ids.shape[1]
    step_logits = logits[:, width - 1:-1]  # the logits that chose each new token
    top2 = np.sort(step_logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.25
    assert clear.mean() > 0.7, clear.mean()
    np.testing.assert_array_equal(out[:, width:][clear], step_logits.argmax(-1)[clear])


# ----------------------------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_masks_known_answers():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [False, True, False, True, False]
    assert kept(top_k=0) == kept(top_k=5) == kept(top_k=9) == [True] * 5
    assert kept(top_p=0.4) == [False, True, False, False, False]  # the first token alone reaches 0.4
    assert kept(top_p=0.41) == [False, True, False, True, False]
    assert kept(top_p=0.85) == [False, True, False, True, True]  # 0.4 + 0.3 = 0.7 < 0.85: the 0.15 one too
    assert kept(top_p=0.01) == [False, True, False, False, False]  # the most probable is always kept
    assert kept(top_p=0.8) == [False, True, False, True, True]  # 0.7 before the 0.15 token: kept
    # top-p over the top-3 renormalised (0.47, 0.35, 0.18): 0.7/0.85 = 0.82 before the third, so 0.8 drops it
    assert kept(top_k=3, top_p=0.8) == [False, True, False, True, False]
    assert kept(top_k=3, top_p=0.83) == [False, True, False, True, True]
    ties = jnp.asarray([[1.0, 2.0, 2.0, 0.0]])
    assert np.isfinite(np.asarray(filter_logits(ties, top_k=1)))[0].tolist() == [False, True, True, False]


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (7, 1.0), (5, 0.6), (0, 0.3)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 50)).astype(np.float32) * 3
    scores = torch.tensor(logits)
    if top_k:
        scores = transformers.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = transformers.TopPLogitsWarper(top_p)(None, scores)
    np.testing.assert_array_equal(np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))),
                                  np.isfinite(scores.numpy()))


def test_first_sampled_token_frequencies_match_the_tempered_softmax(demo):
    """4096 first tokens of one prompt of the demo teacher (one generate call per 1024 rows, four keys) against
    softmax(logits / T) in float64: a chi-square goodness of fit over the tokens expected at least 5 times (the
    rest pooled in one cell), bound at p = 1e-4. With the temperature ignored (T = 1) the statistic is far beyond
    the bound, so the test can tell."""
    from scipy.stats import chi2

    prompt = np.asarray([[77, 301, 45, 12, 260, 98]])
    temperature = 1.6
    draws = np.concatenate([np.asarray(generate(demo, np.repeat(prompt, 1024, 0), max_new_tokens=1,
                                                temperature=temperature, key=jax.random.key(k)))[:, -1]
                            for k in range(4)])
    logits = np.asarray(demo(jnp.asarray(prompt)).logits[0, -1], np.float64)

    def statistic(t):
        p = np.exp((logits - logits.max()) / t)
        p /= p.sum()
        expected = p * len(draws)
        counts = np.bincount(draws, minlength=len(p))
        big = expected >= 5
        observed, expected = counts[big], expected[big]
        if (~big).any():
            observed = np.append(observed, counts[~big].sum())
            expected = np.append(expected, p[~big].sum() * len(draws))
        return np.sum((observed - expected) ** 2 / expected), len(expected) - 1

    stat, dof = statistic(temperature)
    bound = chi2.ppf(1 - 1e-4, dof)
    assert dof >= 10 and stat < bound, (stat, dof, bound)
    assert statistic(1.0)[0] > 10 * bound


def test_sampling_depends_on_the_key_and_only_on_it(models):
    _, model = models["qwen2-kv2"]
    ids, mask = _prompts(model.config.vocab_size)
    run = lambda k: np.asarray(generate(model, ids, mask, max_new_tokens=8, temperature=1.0, top_k=20,  # noqa
                                        key=jax.random.key(k)))
    assert (run(1) == run(1)).all() and (run(1) != run(2)).any()
    g = sample_tokens(jnp.asarray([[0.0, 3.0, 1.0]]), jax.random.key(0), temperature=0.0)
    assert g.tolist() == [1]


# ------------------------------------------------------------------------------------------- programs


def test_compiled_once_per_shape_bucket(models):
    _, model = models["qwen2-kv1-tied"]
    ids, mask = _prompts(model.config.vocab_size, lengths=(7, 3))
    generate(model, ids, mask, max_new_tokens=6)
    before = compiled_programs()
    # Same batch, a prompt length in the same bucket (5..8 -> 8), other sampling settings and keys: no compile.
    short_ids, short_mask = _prompts(model.config.vocab_size, seed=4, lengths=(5, 6))
    generate(model, short_ids, short_mask, max_new_tokens=6)
    generate(model, ids, mask, max_new_tokens=6, temperature=0.8, top_k=4, top_p=0.9, key=jax.random.key(3))
    generate(model, ids, mask, max_new_tokens=6, eos_token_id=7, pad_token_id=3)
    assert compiled_programs() == before
    generate(model, ids, mask, max_new_tokens=7)  # another max_new_tokens: one more decode program
    after = compiled_programs()
    assert after["decode"] == before["decode"] + 1 and after["prefill"] == before["prefill"] + 1
    assert [prompt_bucket(n) for n in (1, 2, 3, 5, 8, 33, 64, 65, 129)] == [1, 2, 4, 8, 8, 64, 64, 128, 192]


@pytest.mark.parametrize("axes", [dict(fsdp=4), dict(fsdp=2, tensor=2)], ids=["fsdp4", "fsdp2-tensor2"])
def test_sharded_generate_equals_one_device(models, axes, tmp_path):
    hf, single = models["qwen2-kv2"]
    path = save_hf(hf, tmp_path / "ckpt")
    sharded = vishwam.load_pretrained(path, dtype=jnp.float32, mesh=vishwam.make_mesh(**axes))
    q = sharded.model.layers.self_attn.q_proj.weight
    assert len(q.sharding.device_set) == 4 and not q.sharding.is_fully_replicated
    ids, mask = _prompts(single.config.vocab_size)
    for kw in (dict(), dict(temperature=0.9, top_p=0.95, key=jax.random.key(5))):
        np.testing.assert_array_equal(np.asarray(generate(sharded, ids, mask, max_new_tokens=NEW, **kw)),
                                      np.asarray(generate(single, ids, mask, max_new_tokens=NEW, **kw)))


def test_cache_is_sharded_on_the_mesh(models, tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec

    from vishwam.generation.sampler import _prefill

    hf, _ = models["qwen2-kv2"]
    mesh = vishwam.make_mesh(fsdp=2, tensor=2)
    model = vishwam.load_pretrained(save_hf(hf, tmp_path / "ckpt"), dtype=jnp.float32, mesh=mesh)
    sharding = NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor", None, None))
    ids = jnp.ones((4, 8), jnp.int32)
    _, cache = _prefill(model, ids, ids > 0, slots=12, cache_sharding=sharding, attention_impl="auto")
    assert cache.k.sharding.is_equivalent_to(sharding, 5)
    assert {s.data.shape for s in cache.k.addressable_shards} == {(2, 2, 1, 12, 8)}


@pytest.mark.parametrize("kwargs,message", [
    (dict(attention_mask=np.asarray([[1, 1, 0]])), "left-padded"),
    (dict(temperature=0.5), "needs a PRNG key"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(input_ids=np.asarray([[3, 96]])), "outside the vocabulary"),
])
def test_bad_arguments_are_named(models, kwargs, message):
    _, model = models["qwen2-kv2"]
    args = dict(input_ids=np.asarray([[3, 4, 5]]), max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, **args)
