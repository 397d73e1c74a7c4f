"""The embedded default: every shipped YAML loads, and distillation beats CE-only training on the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vishwam.cli import load_config
from vishwam.loop import Run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(str(path))
    assert cfg.training.max_steps > 0


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
