"""`distillation.student_model.tokenizer` and the cross-tokenizer knobs: unset or the teacher's own = today's run;
unreadable, or different with what a cross-tokenizer run does not do (the shared-vocabulary KL from a cached
teacher, feature losses) = one line, exit 2."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vishwam.config.cli import load_config
from vishwam.errors import ConfigError
from vishwam.run.cross_tokenizer import check_student_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "vishwam" / "assets" / "demo" / "teacher"
OTHER = ROOT / "benchmarks" / "assets" / "pysrc" / "teacher" / "tokenizer.json"


def _config(*flags):
    return load_config(str(ROOT / "configs" / "distill.yaml"), list(flags))


def test_the_teachers_own_tokenizer_is_a_same_tokenizer_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    for path in (None, str(DEMO_TEACHER / "tokenizer.json"), str(DEMO_TEACHER)):
        flags = [] if path is None else ["--distillation.student-model.tokenizer", path]
        check_student_tokenizer(_config(*flags), DEMO_TEACHER)  # no error


def test_a_run_with_the_teachers_tokenizer_named_trains_and_reports_bits_per_byte(tmp_path, monkeypatch):
    from vishwam.run.loop import Run

    monkeypatch.chdir(ROOT)
    result = Run(_config("--distillation.student-model.tokenizer", str(DEMO_TEACHER), "--training.max-steps", "2",
                         "--training.eval-every", "2", "--training.eval-batches", "1", "--training.save-every", "2",
                         "--tracking.aim", "false", "--training.output-dir", str(tmp_path / "out"))).train()
    ev = result["eval"]
    assert 0 < ev["teacher_bpb"] < ev["student_bpb"] < 64
    # nats per token over bits per byte is ln 2 x bytes per token: the same tokens and bytes on both sides
    bytes_per_token = ev["teacher_loss"] / (ev["teacher_bpb"] * math.log(2))
    assert bytes_per_token == pytest.approx(ev["student_loss"] / (ev["student_bpb"] * math.log(2)), rel=1e-6)
    assert 1.0 < bytes_per_token < 10.0


def test_knobs_are_checked_where_they_enter():
    with pytest.raises(ConfigError, match="distillation_params.alm_temperature"):
        _config("--distillation-params.alm-temperature", "0")
    with pytest.raises(ConfigError, match="distillation_params.shared_kl_weight"):
        _config("--distillation-params.shared-kl-weight", "-1")
    params = _config().distillation_params
    assert (params.alm_weight, params.alm_temperature, params.shared_kl_weight) == (1.0, 1.0, None)  # measured
    from vishwam.config import specs

    assert specs.shared_kl_weight(_config()) == 1.0  # resident
    assert specs.shared_kl_weight(_config("--distillation.teacher-model.loading", "streamed")) == 0.0
    assert specs.shared_kl_weight(_config("--distillation-params.shared-kl-weight", "0.5")) == 0.5


@pytest.mark.parametrize("case", ["unreadable", "features", "cached"])
def test_bad_student_tokenizer_is_one_line_exit_2(tmp_path, case):
    flags = ["--distillation.student-model.tokenizer", str(tmp_path / "nope.json") if case == "unreadable" else
             str(OTHER), "--training.output-dir", str(tmp_path / "out"), "--tracking.aim", "false"]
    if case == "cached":  # a cached teacher gives the step its token log-probabilities only
        flags += ["--distillation.teacher-model.loading", "cached", "--distillation.teacher-model.cache-dir",
                  str(tmp_path / "cache"), "--distillation-params.shared-kl-weight", "1"]
    if case == "features":
        flags += ["--distillation-params.feature-weight", "1"]
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", "configs/distill.yaml", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    key = {"features": "distillation_params.feature_weight", "cached": "distillation_params.shared_kl_weight"}.get(
        case, "distillation.student_model.tokenizer")
    assert key in lines[0]
    needle = {"unreadable": "nope.json", "features": "different tokens", "cached": "cached teacher"}[case]
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("case", ["unknown", "untiled"])
def test_a_text_the_student_tokenizer_cannot_align_is_one_line_exit_2(tmp_path, case):
    """A student tokenizer that cannot encode the data (its unknown token appears), or whose byte offsets do not
    tile the text (a Whitespace pre-tokenizer drops the spaces), stops the data preparation with one line."""
    import json as json_

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = ["1 + 1 = 2"] if case == "unknown" else [json_.loads(line)["text"] for line in
                                                      (ROOT / "vishwam/assets/demo/train.jsonl").open()]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    flags = ["--distillation.student-model.tokenizer", str(tmp_path), "--training.output-dir", str(tmp_path / "out"),
             "--tracking.aim", "false", "--data.store-dir", str(tmp_path / "store")]
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", "configs/distill.yaml", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    needle = {"unknown": "cannot encode the text: unknown token '[UNK]'",
              "untiled": "byte offsets do not tile the text"}[case]
    assert "student tokenizer (vishwam/assets/demo/train.jsonl, document 0)" in lines[0] and needle in lines[0]
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_on_policy_distillation_is_refused_in_a_cross_run(tmp_path, monkeypatch):
    from vishwam.run.build import prepare

    monkeypatch.chdir(ROOT)
    flags = ["--distillation.student-model.tokenizer", str(OTHER), "--training.output-dir", str(tmp_path / "out"),
             "--tracking.aim", "false", "--data.store-dir", str(tmp_path / "store"),
             "--distillation-params.on-policy.fraction", "0.25"]
    cfg = load_config(str(ROOT / "configs" / "chat.yaml"), flags)
    with pytest.raises(ConfigError, match="distillation_params.on_policy.fraction' must be 0 in a cross-tokenizer run"):
        prepare(cfg).checkpoints.close()
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.ids"))
