"""A short distillation run on chat data end to end: `messages` rows rendered with `data.chat_template`, packed,
trained with the losses on the assistant tokens or on every token, evaluated and exported."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vishwam.config.cli import load_config
from vishwam.run.loop import Run

DEMO = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo" / "teacher"
TEMPLATE = """{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\
{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}\
{% if add_generation_prompt %}Assistant: {% endif %}"""
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(60):
        a, b = rng.integers(0, 6, 2)
        turns = [{"role": "user", "content": f"What is {WORDS[a]} plus {WORDS[b]}?"},
                 {"role": "assistant", "content": f"{WORDS[a].capitalize()} plus {WORDS[b]} is {WORDS[a + b]}."}]
        if rng.random() < 0.5:
            turns = [{"role": "system", "content": "Answer in words."}] + turns + [
                {"role": "user", "content": "And one more?"},
                {"role": "assistant", "content": f"Then it is {WORDS[a + b + 1]}."}]
        rows.append({"messages": turns})
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "chat.jinja").write_text(TEMPLATE)
    return d


def _run(chat_data: Path, out: Path, loss_on: str, loading: str):
    path = out.parent / f"{out.name}.yaml"
    path.write_text(textwrap.dedent(f"""
        distillation:
          teacher_model: {{path: {DEMO}, dtype: float32, loading: {loading}, max_resident_shards: 2}}
          student_model: {{init: random, num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}}
        data:
          train: {chat_data / 'chat.jsonl'}
          eval_fraction: 0.2
          chat_template: {chat_data / 'chat.jinja'}
          loss_on: {loss_on}
        training: {{output_dir: {out}, max_steps: 2, batch_size: 2, seq_len: 64, log_every: 1, eval_every: 2,
                   eval_batches: 1, save_every: 2, compute_dtype: float32, learning_rate: 0.003, warmup_steps: 0}}
        distillation_params: {{kd_weight: 1.0, ce_weight: 0.5, feature_weight: 0.5}}
        tracking: {{aim: false}}
    """))
    run = Run(load_config(str(path)))
    result = run.train()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return run, result, metrics


def test_chat_run_end_to_end_with_either_loss_target(chat_data, tmp_path, capfd):
    runs = {}
    # The streamed teacher runs ahead of the step with the batch's segment ids; the resident one inside it.
    for loss_on, loading in (("assistant", "resident"), ("all", "streamed")):
        runs[loss_on] = _run(chat_data, tmp_path / loss_on, loss_on, loading)
        err = capfd.readouterr().err
        assert "data.train: 48 rows packed into" in err and "data.eval: 12 rows packed into" in err, err
        run, result, metrics = runs[loss_on]
        assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
        assert math.isfinite(result["eval"]["student_loss"]) and (tmp_path / loss_on / "eval.json").is_file()
        assert (tmp_path / loss_on / "student" / "config.json").is_file()
        # The export carries the template the run rendered its rows with (data.chat_template here).
        assert (tmp_path / loss_on / "student" / "chat_template.jinja").read_text() == \
            (chat_data / "chat.jinja").read_text()
        assert run.train_data.segment_ids is not None
    # The same windows in the same order (packing does not depend on loss_on); the losses count other tokens.
    a, b = runs["assistant"][0].train_data, runs["all"][0].train_data
    np.testing.assert_array_equal(a.windows, b.windows)
    assert (a.targets <= b.targets).all() and a.targets.sum() < b.targets.sum()
    assert runs["assistant"][2][0]["loss"] != pytest.approx(runs["all"][2][0]["loss"], rel=1e-3)
    # Evaluation counts the same tokens as the losses: the teacher's loss on the same eval windows differs.
    assert runs["assistant"][1]["eval"]["teacher_loss"] != runs["all"][1]["eval"]["teacher_loss"]
