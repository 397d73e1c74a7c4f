"""The embedded default: every shipped YAML loads, and distillation beats CE-only training on the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vishwam.config.cli import load_config
from vishwam.run.loop import Run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(str(path))
    assert cfg.training.max_steps > 0


@pytest.mark.slow  # two 100-step runs: a quality benchmark at the demo's size
def test_demo_kd_beats_ce_only(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAML's paths are relative to the repository root
    common = ["--training.max-steps", "100", "--training.eval-every", "100", "--training.save-every", "100",
              "--tracking.aim", "false"]
    kd = Run(load_config("configs/distill.yaml", [*common, "--training.output-dir", str(tmp_path / "kd")])).train()
    ce = Run(load_config("configs/distill.yaml", [
        *common, "--training.output-dir", str(tmp_path / "ce"), "--distillation-params.kd-weight", "0",
        "--distillation-params.ce-weight", "1", "--distillation-params.feature-weight", "0",
        "--distillation-params.attention-weight", "0"])).train()
    assert kd["eval"]["student_loss"] < ce["eval"]["student_loss"]
    assert kd["eval"]["kl"] < ce["eval"]["kl"]
    for out in (tmp_path / "kd", tmp_path / "ce"):
        assert (out / "student" / "tokenizer.json").is_file() and (out / "eval.json").is_file()
    assert os.path.isdir(ROOT / "vishwam" / "assets" / "demo" / "teacher")


@pytest.mark.slow  # the shipped chat demo's quality (tests/test_on_policy_run.py holds the on-policy path)
def test_chat_demo_distils_on_policy(tmp_path, monkeypatch):
    """`configs/chat.yaml` as shipped, shortened: the chat teacher answers held-out questions (it was trained for
    them, not random), and the on-policy run logs its figures and exports a student."""
    import json

    import jax.numpy as jnp
    import numpy as np

    from vishwam.generation.on_policy import prompt_answers
    from vishwam.generation.sampler import generate, left_pad
    from vishwam.io.checkpoint import load_pretrained

    monkeypatch.chdir(ROOT)
    out = tmp_path / "chat"
    run = Run(load_config("configs/chat.yaml", ["--training.max-steps", "20", "--training.eval-every", "20",
                                                "--training.save-every", "20", "--training.log-every", "10",
                                                "--training.output-dir", str(out), "--tracking.aim", "false"]))
    result = run.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    for r in rows:
        assert r["on_policy/fraction"] == 0.5 and r["on_policy/gen_tokens_per_sec"] > 0
        assert 0 < r["on_policy/completion_len"] <= 32 and np.isfinite(r["on_policy/loss"])
    assert np.isfinite(result["eval"]["student_loss"]) and (out / "student" / "config.json").is_file()
    # The teacher: greedy answers to the first held-out questions, checked against the data's own answers.
    teacher = load_pretrained("vishwam/assets/demo/chat_teacher", dtype=jnp.float32)
    prompts, answers = zip(*prompt_answers(run.prepared.eval_data)[:32])
    ids, mask = left_pad(prompts)
    out_ids = np.asarray(generate(teacher, ids, mask, max_new_tokens=32, eos_token_id=0))[:, ids.shape[1]:]
    # An answer's targets run to its EOS (id 0) and the newline the template writes after it; generation ends at EOS.
    right = sum(list(new[: list(a).index(0) + 1]) == list(a[: list(a).index(0) + 1]) for new, a in zip(out_ids, answers))
    assert right >= 0.75 * len(prompts), right
