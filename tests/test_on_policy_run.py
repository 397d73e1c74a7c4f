"""On-policy distillation in a run: the student's completions in the batch, its metrics, resident and streamed
teachers, exact resume between two samplings, and the config mistakes it rejects."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from models import cast_floating
from vishwam.config.cli import load_config, run_main
from vishwam.run.loop import Run, train
from vishwam.tracking import WALL_CLOCK_METRICS

DEMO = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo" / "teacher"
TEMPLATE = """{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\
{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}\
{% if add_generation_prompt %}Assistant: {% endif %}"""
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
TIMING = WALL_CLOCK_METRICS


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        a, b = rng.integers(0, 6, 2)
        rows.append({"messages": [{"role": "user", "content": f"What is {WORDS[a]} plus {WORDS[b]}?"},
                                  {"role": "assistant", "content": f"{WORDS[a].capitalize()} plus {WORDS[b]} is "
                                                                   f"{WORDS[a + b]}."}]})
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "chat.jinja").write_text(TEMPLATE)
    (d / "text.jsonl").write_text("".join(json.dumps({"text": f"{w} and {w}."}) + "\n" for w in WORDS * 8))
    return d


def write(chat_data: Path, out: Path, *, loading="resident", train="chat.jsonl", on_policy=(), **training) -> Path:
    path = out.parent / f"{out.name}.yaml"
    tr = {"max_steps": 4, "save_every": 100, "learning_rate": 0.003, **training}
    op = {"fraction": 0.5, "max_new_tokens": 12, "temperature": 1.0, **dict(on_policy)}
    flow = lambda d: ", ".join(f"{k}: {v}" for k, v in d.items())  # noqa: E731
    path.write_text(textwrap.dedent(f"""
        distillation:
          teacher_model: {{path: {DEMO}, dtype: float32, loading: {loading}, max_resident_shards: 2,
                          cache_dir: {out.parent / (out.name + '_cache')}}}
          student_model: {{init: random, num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}}
        data: {{train: {chat_data / train}, chat_template: {chat_data / 'chat.jinja'}}}
        training: {{output_dir: {out}, batch_size: 4, seq_len: 48, log_every: 1, eval_every: 100, eval_batches: 0,
                   compute_dtype: float32, warmup_steps: 0, {flow(tr)}}}
        distillation_params: {{kd_weight: 1.0, ce_weight: 0.2,
                              on_policy: {{{flow(op)}}}}}
        tracking: {{aim: false}}
    """))
    return path


def metrics_of(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("loading", ["resident", "streamed"])
def test_on_policy_run_logs_its_metrics(chat_data, tmp_path, loading):
    out = tmp_path / loading
    train(load_config(str(write(chat_data, out, loading=loading))))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["on_policy/fraction"] == 0.5  # 2 of each 4 rows
        assert 1 <= r["on_policy/completion_len"] <= 12
        for key in ("loss", "on_policy/loss", "off_policy/loss", "on_policy/gen_tokens_per_sec",
                    "on_policy/gen_time_share", "distill/kd"):
            assert math.isfinite(r[key]) and r[key] >= 0, key
        assert r["on_policy/gen_tokens_per_sec"] > 0  # every: 1, so every step samples
        np.testing.assert_allclose(r["loss"], (r["on_policy/loss"] + r["off_policy/loss"]) / 2, rtol=1e-5)


def test_two_clean_runs_write_equal_metrics_but_for_the_wall_clock(chat_data, tmp_path):
    """`metrics.jsonl` of two runs of one on-policy config: equal once `WALL_CLOCK_METRICS` are dropped (speeds,
    memory, generation's share of the time, all four logged): every other field is a function of the config and
    the step."""
    rows = []
    for name in ("a", "b"):
        train(load_config(str(write(chat_data, tmp_path / name, max_steps=2))))
        rows.append([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert all(set(WALL_CLOCK_METRICS) <= set(row) for row in rows[0] + rows[1])
    drop = lambda row: {k: v for k, v in row.items() if k not in WALL_CLOCK_METRICS}  # noqa: E731
    assert [r["step"] for r in rows[0]] == [1, 2] and list(map(drop, rows[0])) == list(map(drop, rows[1]))


def test_greedy_completions_are_the_students_own_argmax(chat_data, tmp_path):
    """With temperature 0 and no learning, each on-policy row's completion is the student's greedy continuation:
    at every completion position the next token is the argmax of the student's teacher-forced full forward pass
    over the row (an independent path: no KV cache, no decode loop)."""
    out = tmp_path / "greedy"
    run = Run(load_config(str(write(chat_data, out, on_policy={"temperature": 0.0}, max_steps=1,
                                    learning_rate=0.0))))
    state = run.train()["state"]
    r = state.rollout
    tokens, prompt_len, length = (np.asarray(x) for x in (r.tokens, r.prompt_len, r.length))
    student = cast_floating(state.student, np.float32)
    checked = 0
    for row, p, n in zip(tokens, prompt_len, length):
        logits = np.asarray(student(jax.numpy.asarray(row[None, : n - 1])).logits[0])
        assert p < n  # something was generated
        np.testing.assert_array_equal(row[p:n], logits[p - 1: n - 1].argmax(-1))
        checked += n - p
    assert checked >= 2


def test_killed_and_rerun_on_policy_run_equals_an_uninterrupted_one(chat_data, tmp_path):
    """Sampling every 2 steps and a checkpoint at step 3: the rerun resumes between two samplings, with the
    completions of step 2 from the checkpoint; it ends bit for bit where the uninterrupted run does."""
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    full = train(load_config(str(write(chat_data, full_out, on_policy={"every": 2}, max_steps=6, save_every=3))))
    config = str(write(chat_data, cut_out, on_policy={"every": 2}, max_steps=6, save_every=3))

    class Stop(Exception):
        pass

    def stop_at_4(step, state):
        if step == 4:
            raise Stop

    run = Run(load_config(config))
    run.on_step = stop_at_4
    with pytest.raises(Stop):
        run.train()
    resumed = train(load_config(config))
    for a, b in zip(jax.tree.leaves(eqx.filter(full["state"], eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed["state"], eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics_of(full_out) == metrics_of(cut_out)


@pytest.mark.parametrize("case, expect", [
    ("text", "on_policy.fraction' > 0 needs chat data"),
    ("cached", "on_policy.fraction' > 0 needs a teacher that scores"),
    ("loss_on", "on_policy.fraction' > 0 needs data.loss_on 'assistant'"),
    ("rows", "rounds to 0 on-policy rows"),
    ("long", "on_policy.max_new_tokens' (40) leaves no room"),
])
def test_on_policy_config_mistakes_are_one_line(chat_data, tmp_path, capsys, case, expect):
    kwargs = {"text": dict(train="text.jsonl"), "cached": dict(loading="cached"), "loss_on": {}, "rows": {},
              "long": dict(on_policy={"max_new_tokens": 40})}[case]
    out = tmp_path / case
    config = write(chat_data, out, **kwargs)
    flags = {"loss_on": ["--data.loss-on", "all"], "rows": ["--distillation-params.on-policy.fraction", "0.1"]}
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda argv: train(load_config(str(config), argv)), flags.get(case, []))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()
