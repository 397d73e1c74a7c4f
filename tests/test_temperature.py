"""Known-answer tests for distill/temperature.py."""

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.temperature import TemperatureSchedule, adaptive_temperature
from vishwam.errors import ConfigError

B, S, V = 2, 7, 11


# --------------------------------------------------------------------------------------------------- schedules


def cosine(start, end, progress):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    "kind, expected",
    [
        # steps:        -5   0    2                     5    10   20
        ("constant", [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]),
        ("linear", [4.0, 4.0, 3.4, 2.5, 1.0, 1.0]),
        ("cosine", [4.0, 4.0, cosine(4.0, 1.0, 0.2), 2.5, 1.0, 1.0]),
    ],
)
def test_schedule_known_answers(kind, expected):
    schedule = TemperatureSchedule(kind=kind, start=4.0, end=1.0, total_steps=10)
    steps = [-5, 0, 2, 5, 10, 20]
    eager = [schedule(step) for step in steps]
    jitted = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
    for step, value, want in zip(steps, eager, expected):
        assert value.dtype == jnp.float32 and value.shape == (), step
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=f"step {step}")
    np.testing.assert_allclose(jitted, expected, rtol=1e-6)


def test_schedule_inside_filter_jit():
    schedule = TemperatureSchedule(kind="cosine", start=2.0, end=1.0, total_steps=100)

    @eqx.filter_jit
    def temperature(sched, step):
        return sched(step)

    np.testing.assert_allclose(temperature(schedule, jnp.int32(50)), 1.5, rtol=1e-6)
    np.testing.assert_allclose(temperature(schedule, jnp.int32(100)), 1.0, rtol=1e-6)
    # Hyperparameters are static: no array leaves to train or shard.
    assert jax.tree_util.tree_leaves(schedule) == []


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(kind="linear", start=0.0, end=1.0, total_steps=10), "start must be a finite number > 0, got 0.0"),
        (dict(kind="linear", start=2.0, end=-1.0, total_steps=10), "end must be a finite number > 0, got -1.0"),
        (dict(kind="cosine", start=2.0, end=float("nan"), total_steps=10), "end must be a finite number > 0, got nan"),
        (dict(kind="linear", start=2.0, end=1.0, total_steps=0), "total_steps must be >= 1, got 0"),
        (dict(kind="exponential", start=2.0, end=1.0, total_steps=10),
         "kind must be one of constant, linear, cosine; got 'exponential'"),
    ],
)
def test_schedule_validation(kwargs, culprit):
    with pytest.raises(ConfigError, match="^" + re.escape(f"temperature schedule {culprit}") + "$"):
        TemperatureSchedule(**kwargs)


# --------------------------------------------------------------------------------------------------- adaptive


def np_entropy(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(-1)


def np_adaptive(student, teacher, base, min_t, max_t):
    vocab = min(student.shape[-1], teacher.shape[-1])
    gap = (np_entropy(teacher[..., :vocab]) - np_entropy(student[..., :vocab])) / np.log(vocab)
    return np.clip(base * np.exp(gap), min_t, max_t)


def adaptive(student, teacher, **kwargs):
    return jax.jit(lambda s, t: adaptive_temperature(s, t, **kwargs))(student, teacher)


def make_logits(seed, vocab=V, scale=2.0):
    return np.random.default_rng(seed).normal(size=(B, S, vocab)).astype(np.float32) * scale


def test_adaptive_matches_numpy_and_bounds():
    student, teacher = make_logits(0), make_logits(1, scale=4.0)
    teacher[0, 0] *= 50  # a one-hot teacher and a uniform student: base / e, clipped at min_t
    student[0, 0] = 0.0
    teacher[1, 0], student[1, 0] = 0.0, teacher[1, 0] * 50  # the other way round: base * e, clipped at max_t
    temps = adaptive(jnp.asarray(student), jnp.asarray(teacher), base=2.0, min_t=1.0, max_t=4.0)
    assert temps.shape == (B, S) and temps.dtype == jnp.float32
    np.testing.assert_allclose(temps, np_adaptive(student, teacher, 2.0, 1.0, 4.0), rtol=1e-5)
    assert np.all((np.asarray(temps) >= 1.0) & (np.asarray(temps) <= 4.0))
    assert temps[0, 0] == 1.0 and temps[1, 0] == 4.0


def test_adaptive_equal_inputs_give_base():
    logits = jnp.asarray(make_logits(2))
    temps = adaptive(logits, logits, base=2.0, min_t=0.5, max_t=8.0)
    np.testing.assert_array_equal(temps, np.full((B, S), 2.0, np.float32))


def test_adaptive_monotone_in_confidence():
    # Sharper teacher (lower entropy) -> lower temperature; sharper student -> higher temperature.
    student, teacher = jnp.asarray(make_logits(3)), jnp.asarray(make_logits(4))
    kwargs = dict(base=2.0, min_t=0.1, max_t=20.0)
    scales = [0.5, 1.0, 2.0, 4.0]
    by_teacher = np.stack([adaptive(student, teacher * c, **kwargs) for c in scales])
    by_student = np.stack([adaptive(student * c, teacher, **kwargs) for c in scales])
    assert np.all(np.diff(by_teacher, axis=0) < 0)
    assert np.all(np.diff(by_student, axis=0) > 0)


def test_adaptive_chunked_vocab_mismatch_bf16_no_grad():
    student, teacher = make_logits(5), make_logits(6, vocab=V + 3)
    kwargs = dict(base=1.5, min_t=0.5, max_t=3.0)
    full = adaptive(jnp.asarray(student), jnp.asarray(teacher), **kwargs)
    np.testing.assert_allclose(full, np_adaptive(student, teacher, 1.5, 0.5, 3.0), rtol=1e-5)
    chunked = adaptive(jnp.asarray(student), jnp.asarray(teacher), chunk_size=3, **kwargs)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    temps16 = adaptive(s16, t16, **kwargs)
    ref16 = np_adaptive(np.asarray(s16.astype(jnp.float32)), np.asarray(t16.astype(jnp.float32)), 1.5, 0.5, 3.0)
    assert temps16.dtype == jnp.float32
    np.testing.assert_allclose(temps16, ref16, rtol=1e-5)
    grad = jax.jit(jax.grad(lambda s: jnp.sum(adaptive_temperature(s, jnp.asarray(teacher), **kwargs))))(
        jnp.asarray(student)
    )
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(base=0.0, min_t=0.5, max_t=2.0), "base must be a finite number > 0, got 0.0"),
        (dict(base=1.0, min_t=-1.0, max_t=2.0), "min_t must be a finite number > 0, got -1.0"),
        (dict(base=1.0, min_t=0.5, max_t=float("inf")), "max_t must be a finite number > 0, got inf"),
        (dict(base=3.0, min_t=0.5, max_t=2.0), "needs min_t <= base <= max_t, got 0.5, 3.0, 2.0"),
    ],
)
def test_adaptive_validation(kwargs, culprit):
    logits = jnp.zeros((B, S, V))
    with pytest.raises(ConfigError, match="^" + re.escape(f"adaptive temperature {culprit}") + "$"):
        adaptive_temperature(logits, logits, **kwargs)
