"""`models.attention.Attention` against a naive float64 attention written from its definition.

The reference repeats each kv head over its query heads, applies qk-norm and rotate-half RoPE, a causal softmax
over each row's valid keys (left padding) and o_proj, in float64 (NumPy for the forward, torch autograd for the
gradient with respect to the input). The module runs at JAX's DEFAULT matmul precision (tests/conftest.py sets
"highest" for the suite; it is undone here), over 128 positions, so that the XLA path splits the queries into
several causal blocks, some of them entirely left padding for one row.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models.attention
from models import ModelConfig, prepare_inputs
from models.attention import Attention

SEQ = 128
PADS = (0, 37, 100)  # left padding of each row; row 2's first three blocks of 32 queries are all padding
# Tolerance, as a fraction of the largest |reference value| (outputs; input gradients), for fp32 arithmetic (DEFAULT
# precision on CPU is true fp32, eps = 1.2e-7). The longest chain of accumulations is the input projection (32
# terms), the scores (head_dim 16), the softmax's sum and P·V (up to 128 keys) and o_proj (4 heads · 16 = 64):
# 240 terms. Rounding errors add up like a random walk, sqrt(32) + sqrt(16) + sqrt(128) + sqrt(64) ~ 29 eps
# = 3.5e-6 of the values' size; the worst case (errors all of one sign) is 240 eps = 2.9e-5. 1e-5 (84 eps) sits
# between the two. The backward pass has the same chains run in reverse (plus dK/dV's sums over up to 2 · 128
# stacked queries), so the same tolerance.
TOL = 1e-5


@pytest.fixture(autouse=True)
def default_precision():
    with jax.default_matmul_precision(None):
        assert jax.config.jax_default_matmul_precision is None
        yield


def _config(family: str) -> ModelConfig:
    """GQA, 4 query heads on 2 kv heads: qwen2 with q/k/v biases, qwen3 with qk-norm, llama with all biases."""
    return ModelConfig(model_type=family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=family != "qwen3",
                       o_bias=family == "llama", qk_norm=family == "qwen3", rope_theta=10000.0)


def _module(cfg: ModelConfig, seed: int) -> Attention:
    """An Attention block with weights large enough for peaked softmaxes (scores of a few units), random norm
    gains and biases."""
    rng = np.random.default_rng(seed)
    attn = Attention(cfg, key=jax.random.key(seed))

    def f32(shape, std):
        return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32)

    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(attn, name)
        std = 1.5 / math.sqrt(lin.weight.shape[1])
        attn = eqx.tree_at(lambda m, n=name: getattr(m, n).weight, attn, f32(lin.weight.shape, std))
        if lin.bias is not None:
            attn = eqx.tree_at(lambda m, n=name: getattr(m, n).bias, attn, f32(lin.bias.shape, 0.3))
    if cfg.qk_norm:  # gains ~2: normalised q, k of RMS ~2, scores q·k / 4 of a few units
        for name in ("q_norm", "k_norm"):
            attn = eqx.tree_at(lambda m, n=name: getattr(m, n).weight, attn, 2.0 + f32((cfg.head_dim,), 0.5))
    return attn


def _inputs(cfg: ModelConfig, seed: int):
    rng = np.random.default_rng(seed + 100)
    valid = np.ones((len(PADS), SEQ), bool)
    for row, pad in enumerate(PADS):
        valid[row, :pad] = False
    x = rng.standard_normal((len(PADS), SEQ, cfg.hidden_size)).astype(np.float32)
    ids = jnp.zeros(valid.shape, jnp.int32)
    mask, cos, sin = prepare_inputs(cfg, ids, jnp.asarray(valid.astype(np.int32)))
    return x, valid, mask, cos, sin


# ------------------------------------------------------------------------------------------------ reference

NP_OPS = dict(cat=lambda xs: np.concatenate(xs, -1), permute=lambda a, *p: a.transpose(*p),
              mean=lambda a: a.mean(-1, keepdims=True), amax=lambda a: a.max(-1, keepdims=True),
              sum=lambda a: a.sum(-1, keepdims=True), where=np.where, sqrt=np.sqrt, exp=np.exp)
TORCH_OPS = dict(cat=lambda xs: torch.cat(xs, -1), permute=lambda a, *p: a.permute(*p),
                 mean=lambda a: a.mean(-1, keepdim=True), amax=lambda a: a.amax(-1, keepdim=True),
                 sum=lambda a: a.sum(-1, keepdim=True), where=torch.where, sqrt=torch.sqrt, exp=torch.exp)


def _params64(attn: Attention, lib):
    as64 = (lambda a: np.asarray(a, np.float64)) if lib is np else (lambda a: torch.tensor(np.asarray(a, np.float64)))
    p = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(attn, name)
        p[name] = (as64(lin.weight), None if lin.bias is None else as64(lin.bias))
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name)
        p[name] = None if norm is None else (as64(norm.weight), norm.eps)
    return p


def naive_attention(x, p, valid, cos, sin, heads: int, kv_heads: int, head_dim: int, ops):
    """float64 causal GQA attention from its definition. `x`: [b, s, d]; `valid`: [b, s] bool (left padding);
    `cos`, `sin`: [b, s, head_dim] rotate-half tables. Query head h reads kv head h // (heads // kv_heads); query
    i sees key j iff j <= i and key j is valid; a query that sees no key outputs zeros (before o_proj).
    **Returns:** `(output [b, s, d], probabilities [b, heads, s, s])`."""
    b, s, _ = x.shape

    def linear(a, wb):
        w, bias = wb
        return a @ w.T + (0 if bias is None else bias)

    def rms(a, norm):
        w, eps = norm
        return w * a / ops["sqrt"](ops["mean"](a * a) + eps)

    def rope(a):  # a: [b, s, n, hd]
        half = head_dim // 2
        rotated = ops["cat"]([-a[..., half:], a[..., :half]])
        return a * cos[:, :, None, :] + rotated * sin[:, :, None, :]

    q = linear(x, p["q_proj"]).reshape(b, s, heads, head_dim)
    k = linear(x, p["k_proj"]).reshape(b, s, kv_heads, head_dim)
    v = linear(x, p["v_proj"]).reshape(b, s, kv_heads, head_dim)
    if p["q_norm"] is not None:
        q, k = rms(q, p["q_norm"]), rms(k, p["k_norm"])
    q, k = rope(q), rope(k)
    group = heads // kv_heads
    kv_of = [h // group for h in range(heads)]
    k = k[:, :, kv_of]  # repeat_kv: [b, s, heads, hd]
    v = v[:, :, kv_of]
    qh, kh, vh = (ops["permute"](a, 0, 2, 1, 3) for a in (q, k, v))  # [b, heads, s, hd]
    scores = qh @ ops["permute"](kh, 0, 1, 3, 2) / math.sqrt(head_dim)  # [b, heads, s, s]
    allowed = np.tril(np.ones((s, s), bool))[None, None] & np.asarray(valid)[:, None, None, :]
    if ops is TORCH_OPS:
        allowed = torch.tensor(allowed)
    scores = ops["where"](allowed, scores, -1e30 * (scores * 0 + 1))  # masked keys: exp underflows to exactly 0
    e = ops["exp"](scores - ops["amax"](scores))
    probs = e / ops["sum"](e)
    any_key = np.asarray(valid).cumsum(-1)[:, None, :, None] > 0  # [b, 1, s, 1]: sees some key
    probs = probs * (torch.tensor(any_key) if ops is TORCH_OPS else any_key)
    out = ops["permute"](probs @ vh, 0, 2, 1, 3).reshape(b, s, heads * head_dim)
    return linear(out, p["o_proj"]), probs


# -------------------------------------------------------------------------------------------------- tests


def test_reference_tables_and_positions():
    """The RoPE tables the module is given (prepare_inputs: positions counting each row's real tokens) against
    float64 tables from the definition. The fp32 angle pos · inv_freq is off by <= pos · eps (the product's
    rounding plus inv_freq's, relative), pos < 128: |cos, sin error| <= 128 · eps = 1.5e-5 (+ sin/cos's own ulp)."""
    cfg = _config("qwen2")
    _, valid, _, cos, sin = _inputs(cfg, 0)
    pos = np.maximum(np.cumsum(valid, -1) - 1, 0).astype(np.float64)
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    ang = np.concatenate([pos[..., None] * inv, pos[..., None] * inv], -1)
    bound = SEQ * np.finfo(np.float32).eps + np.finfo(np.float32).eps
    np.testing.assert_allclose(np.asarray(cos, np.float64), np.cos(ang), rtol=0, atol=bound)
    np.testing.assert_allclose(np.asarray(sin, np.float64), np.sin(ang), rtol=0, atol=bound)
    assert pos[2, 100] == 0 and pos[2, SEQ - 1] == SEQ - 1 - 100  # a left-padded row restarts at position 0


@pytest.mark.parametrize("impl", ["xla", "auto"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"], ids=["qwen2-qkv_bias", "qwen3-qk_norm",
                                                                      "llama-o_bias"])
def test_attention_matches_naive_float64(family, impl):
    cfg = _config(family)
    assert models.attention.causal_blocks(SEQ) == 4  # the XLA path runs four causal query blocks of 32
    attn = _module(cfg, seed=1)
    x, valid, mask, cos, sin = _inputs(cfg, seed=1)
    cos64, sin64 = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
    h, g, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def forward(x):
        return attn(x, cos, sin, mask, implementation=impl).output

    lowered = jax.jit(forward).lower(jnp.asarray(x)).as_text()
    assert "HIGHEST" not in lowered and "precision = [DEFAULT, DEFAULT]" in lowered  # DEFAULT matmul precision
    ours = np.asarray(jax.jit(forward)(jnp.asarray(x)), np.float64)
    ref, probs = naive_attention(x.astype(np.float64), _params64(attn, np), valid, cos64, sin64, h, g, hd, NP_OPS)

    # Query positions with a valid key: the naive attention, to fp32 rounding.
    seen = np.cumsum(valid, -1) > 0
    scale = np.max(np.abs(ref[seen]))
    err = np.max(np.abs(ours[seen] - ref[seen])) / scale
    assert err <= TOL, f"max error {err:.3g} of the largest output {scale:.3g}"
    # A check on the test's inputs: the softmaxes are peaked (a uniform one over j keys has largest probability
    # 1/j), so which keys are masked and where they sit matter.
    assert np.mean(probs.max(-1).transpose(0, 2, 1)[seen]) > 0.3
    # Left-pad query positions see no key: attention output zero (documented: "rows with no valid key are
    # zero"), so the module gives exactly o_proj(0) = its bias (or 0).
    bias = np.zeros(cfg.hidden_size) if attn.o_proj.bias is None else np.asarray(attn.o_proj.bias, np.float64)
    np.testing.assert_array_equal(ours[~seen], np.broadcast_to(bias, ours[~seen].shape))

    # The gradient w.r.t. x of a weighted sum over the valid positions, against torch float64 autograd.
    w = np.random.default_rng(7).standard_normal(ours.shape) * seen[..., None]
    g_ours = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(forward(x) * jnp.asarray(w, jnp.float32))))(
        jnp.asarray(x)), np.float64)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    out_t = naive_attention(xt, _params64(attn, torch), valid, torch.tensor(cos64), torch.tensor(sin64), h, g, hd,
                            TORCH_OPS)
    (out_t[0] * torch.tensor(w)).sum().backward()
    g_ref = xt.grad.numpy()
    np.testing.assert_allclose(out_t[0].detach().numpy(), ref, rtol=1e-12, atol=1e-12)  # one formula, two libraries
    g_scale = np.max(np.abs(g_ref))
    g_err = np.max(np.abs(g_ours - g_ref)) / g_scale
    assert g_err <= TOL, f"max gradient error {g_err:.3g} of the largest {g_scale:.3g}"
    # Left-pad inputs reach no valid query's output through attention (they are masked keys), only through nothing:
    # their gradient is exactly zero.
    np.testing.assert_array_equal(g_ours[~valid], 0.0)

