"""On-policy distillation's pieces, each against an independent reference: the GKD loss (generalised JSD(β)) on the
on-policy rows against float64 numpy formulas, its gradient through the LM head against autodiff of the
unchunked formula, and the host-side rows (prompts, completions, loss masks, batch layout) against hand-built
expectations."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.config import DistillationParams, OnPolicyConfig
from distill.errors import ConfigError
from distill.logits import linear_kd_loss
from distill.objective import Objective, TeacherOutputs, distill_loss
from models.transformer import CausalLMOutput
from vishwam.data.chat_rows import pack_rows
from vishwam.generation.on_policy import merge, prompt_answers, prompts_of, rollout_batch, rollout_rows, step_prompts

ROWS, SEQ, VOCAB, EMBED = 4, 6, 9, 5


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_gkd(student, teacher, mask, beta):
    """Float64 generalised JSD at T = 1 straight from its definition (GKD, Agarwal et al. 2024, eq. 2), with the
    endpoints as the KLs they stand for: β = 0 forward KL(p || q), β = 1 reverse KL(q || p)."""
    q, p = np.exp(np_log_softmax(np.float64(student))), np.exp(np_log_softmax(np.float64(teacher)))
    if beta == 0.0:
        d = (p * np.log(p / q)).sum(-1)
    elif beta == 1.0:
        d = (q * np.log(q / p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)
    return (d * mask).sum() / max(mask.sum(), 1)


def np_forward_kl_ce(student, teacher, labels, mask, temperature, ce_weight):
    """Float64 forward KL · T² plus `ce_weight` · cross-entropy, masked means (the data rows' objective here)."""
    log_q = np_log_softmax(np.float64(student) / temperature)
    log_p = np_log_softmax(np.float64(teacher) / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1) * temperature**2
    ce = -np.take_along_axis(np_log_softmax(np.float64(student)), labels[..., None], -1)[..., 0]
    return ((kl + ce_weight * ce) * mask).sum() / max(mask.sum(), 1)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(ROWS, SEQ, VOCAB)).astype(np.float32) * 2
    t = rng.normal(size=(ROWS, SEQ, VOCAB)).astype(np.float32) * 2
    labels = rng.integers(0, VOCAB, size=(ROWS, SEQ))
    mask = (rng.random((ROWS, SEQ)) > 0.3).astype(np.int32)
    mask[:, 0] = 1
    return s, t, labels, mask


def objective(beta, fraction=0.5, fused=False, chunk=None):
    params = DistillationParams(kd_weight=1.0, ce_weight=0.3, fused_logit_loss=fused, logit_chunk_size=chunk,
                                on_policy=OnPolicyConfig(fraction=fraction, beta=beta))
    return Objective.build(params, student_layers=1, teacher_layers=1, total_steps=10, micro_batch_size=ROWS)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("head", [False, True], ids=["logits", "lm_head"])
def test_gkd_on_the_on_policy_rows_and_the_objective_on_the_others(beta, head):
    """The last `round(λ·rows)` rows get the GKD loss at T = 1 (known answers for β = 0, 0.5, 1), the first rows
    the configured objective (forward KL at the scheduled T plus CE), and the loss is their row-weighted mean;
    with the LM head fused into the loss (the student's logits never built) the figures are the same."""
    s, t, labels, mask = inputs()
    obj = objective(beta, fraction=0.25, fused=head)
    assert obj.on_policy_rows == 1
    temperature = float(obj.schedule()(jnp.int32(0)))
    if head:
        rng = np.random.default_rng(1)
        hidden = rng.normal(size=(ROWS, SEQ, EMBED)).astype(np.float32)
        weight = rng.normal(size=(VOCAB, EMBED)).astype(np.float32)
        s = np.einsum("bsd,vd->bsv", np.float64(hidden), np.float64(weight)).astype(np.float32)
        out, head_weight = CausalLMOutput(logits=None, last_hidden=jnp.asarray(hidden)), jnp.asarray(weight)
        assert obj.fuses_lm_head(True)
    else:
        out, head_weight = CausalLMOutput(logits=jnp.asarray(s)), None
    loss, metrics, _ = distill_loss(obj, out, TeacherOutputs(logits=jnp.asarray(t)), jnp.asarray(labels),
                                    jnp.asarray(mask), jnp.int32(0), None, None, head_weight=head_weight)
    on = np_gkd(s[3:], t[3:], mask[3:], beta)
    off = np_forward_kl_ce(s[:3], t[:3], labels[:3], mask[:3], temperature, 0.3)
    np.testing.assert_allclose(metrics["on_policy/loss"], on, rtol=1e-5)
    np.testing.assert_allclose(metrics["off_policy/loss"], off, rtol=1e-5)
    np.testing.assert_allclose(loss, (3 * off + 1 * on) / 4, rtol=1e-5)


def test_all_rows_on_policy_is_the_gkd_loss_alone():
    s, t, labels, mask = inputs(3)
    # A config leaves at least one data row per micro-batch (OnPolicyConfig.rows); the loss itself takes any m.
    obj = dataclasses.replace(objective(0.5), on_policy_rows=ROWS)
    loss, metrics, _ = distill_loss(obj, CausalLMOutput(logits=jnp.asarray(s)), TeacherOutputs(logits=jnp.asarray(t)),
                                    jnp.asarray(labels), jnp.asarray(mask), jnp.int32(0), None, None)
    np.testing.assert_allclose(loss, np_gkd(s, t, mask, 0.5), rtol=1e-5)
    assert "off_policy/loss" not in metrics


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_gradient_through_the_head_equals_autodiff_of_the_unchunked_formula(beta):
    """`linear_kd_loss` (the head inside, chunks of 4 of 6 positions: padding included, and none) has the value
    and the gradients with respect to the hidden states and the head of the plain unchunked formula written in
    jnp and differentiated by autodiff."""
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(ROWS, SEQ, EMBED)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(VOCAB, EMBED)), jnp.float32)
    _, t, _, mask = inputs(7)
    t, mask = jnp.asarray(t), jnp.asarray(mask)

    def reference(h, w):
        log_q = jax.nn.log_softmax(h @ w.T, axis=-1)
        log_p = jax.nn.log_softmax(t, axis=-1)
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        if beta == 0.0:
            d = jnp.sum(p * (log_p - log_q), -1)
        elif beta == 1.0:
            d = jnp.sum(q * (log_q - log_p), -1)
        else:
            log_m = jnp.log(beta * p + (1 - beta) * q)
            d = beta * jnp.sum(p * (log_p - log_m), -1) + (1 - beta) * jnp.sum(q * (log_q - log_m), -1)
        return jnp.sum(d * mask) / jnp.sum(mask)

    want, (gh, gw) = jax.value_and_grad(reference, argnums=(0, 1))(hidden, weight)
    for chunk in (None, 4):
        f = functools.partial(linear_kd_loss, teacher_logits=t, mask=mask, temperature=1.0, kind="jsd", beta=beta,
                              chunk_size=chunk)
        got, (gh2, gw2) = jax.jit(jax.value_and_grad(lambda h, w: f(h, w)[0], argnums=(0, 1)))(hidden, weight)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(gh2, gh, rtol=1e-4, atol=1e-6 * float(jnp.abs(gh).max()))
        np.testing.assert_allclose(gw2, gw, rtol=1e-4, atol=1e-6 * float(jnp.abs(gw).max()))


def test_on_policy_rows_need_at_least_one_row_per_micro_batch():
    with pytest.raises(ConfigError, match="on_policy.fraction.*rounds to 0"):
        Objective.build(DistillationParams(on_policy=OnPolicyConfig(fraction=0.1)), student_layers=1,
                        teacher_layers=1, total_steps=1, micro_batch_size=4)
    with pytest.raises(ConfigError, match="on_policy.beta"):
        OnPolicyConfig(fraction=0.5, beta=1.5)
    with pytest.raises(ConfigError, match="on_policy.top_p"):
        OnPolicyConfig(fraction=0.5, top_p=0.0)


# ------------------------------------------------------------------------------------------------- host rows


def test_prompts_are_each_packed_rows_tokens_before_its_last_target_run():
    # Row 1: prompt 10 11, target 12 13, prompt 14, target 15 (two assistant turns); row 2: prompt 20, target 21.
    rows = [(np.array([10, 11, 12, 13, 14, 15]), np.array([0, 0, 1, 1, 0, 1], bool)),
            (np.array([20, 21, 22]), np.array([0, 1, 1], bool)),
            (np.array([30, 31]), np.array([0, 0], bool))]  # no target: dropped by packing
    packed = pack_rows(rows, 9, name="t", log=lambda _: None)
    assert [p.tolist() for p in prompts_of(packed)] == [[10, 11, 12, 13, 14], [20]]
    assert [(p.tolist(), a.tolist()) for p, a in prompt_answers(packed)] == [([10, 11, 12, 13, 14], [15]),
                                                                            ([20], [21, 22])]


def test_completion_rows_keep_the_eos_and_the_loss_counts_the_completion():
    prompts = [np.array([5, 6, 7]), np.array([8])]
    generated = np.array([[1, 2, 0, 3], [4, 4, 4, 4]])  # EOS id 0: row 0 ends after 1 2 0, row 1 never ends
    rows = rollout_rows(prompts, generated, [0], seq_len=7)
    assert rows["tokens"].tolist() == [[5, 6, 7, 1, 2, 0, 0, 0], [8, 4, 4, 4, 4, 0, 0, 0]]
    assert rows["prompt_len"].tolist() == [3, 1] and rows["length"].tolist() == [6, 5]
    batch = rollout_batch(rows, 7)
    # Position t predicts labels[t] = tokens[t + 1]: the loss counts the positions whose label is a new token.
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]]
    assert batch["mask"].tolist() == [[1] * 6 + [0], [1] * 5 + [0, 0]]
    assert (batch["segment_ids"] == batch["mask"]).all()
    assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()
    # A row longer than the window is cut at seq_len + 1 tokens.
    cut = rollout_rows([np.array([5, 6, 7, 8, 9])], np.array([[1, 2, 3, 4]]), [0], seq_len=6)
    assert cut["tokens"].tolist() == [[5, 6, 7, 8, 9, 1, 2]] and cut["length"].tolist() == [7]


def test_every_prompt_once_per_epoch_as_a_function_of_seed_and_step():
    seen = np.concatenate([step_prompts(10, seed=3, step=s, rows=2) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(10))
    assert (step_prompts(10, seed=3, step=4, rows=2) == seen[8:]).all()
    assert not (np.concatenate([step_prompts(10, seed=4, step=s, rows=2) for s in range(5)]) == seen).all()


def test_merge_puts_each_micro_batchs_on_policy_rows_at_its_end():
    data = {"input_ids": np.array([[1], [2], [3], [4]])}
    on = {"input_ids": np.array([[-1], [-2]])}
    assert merge(data, on, 2)["input_ids"][:, 0].tolist() == [1, 2, -1, 3, 4, -2]
