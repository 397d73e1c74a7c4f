"""The compile dry run of a cross-tokenizer run (`vishwam.compile.cross_programs`) at small size, on simulated CPU
devices: the cross step and its evaluation (and a streamed teacher's group and head) compiled from abstract
inputs at both sides' shapes, every program planned, `memory_plan.json` the only file written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hf_fixtures import hf_config, make_hf_model, save_hf

ROOT = Path(__file__).resolve().parents[1]
STUDENT_TOKENIZER = ROOT / "benchmarks" / "assets" / "pysrc" / "teacher"  # 2,048 ids; the teacher has none here


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cross_programs")
    save_hf(make_hf_model(hf_config("qwen2", layers=4, kv_heads=2)), d / "teacher")
    np.save(d / "train.npy", np.tile(np.arange(2, 40, dtype=np.int32), 100))
    text = {
        "distillation": {"teacher_model": {"path": str(d / "teacher"), "dtype": "float32", "max_resident_shards": 1},
                         "student_model": {"init": "random", "num_hidden_layers": 2, "hidden_size": 32,
                                           "tokenizer": str(STUDENT_TOKENIZER)}},
        "data": {"train": str(d / "train.npy"), "eval_fraction": 0.1},
        "training": {"output_dir": str(d / "unused"), "max_steps": 4, "batch_size": 8, "seq_len": 32,
                     "grad_accum_steps": 2, "compute_dtype": "float32"},
        "distillation_params": {"alm_weight": 1.0, "ce_weight": 1.0, "shared_kl_weight": 1.0,
                                "teacher_seq_len": 36, "logit_chunk_size": 16},
        "parallelism": {"fsdp": 4},
        "tracking": {"aim": False},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(text))
    return d / "c.yaml"


def dry_run(config, out, extra=()):
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1", "VISHWAM_DEVICE_MEMORY": "8GiB"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(config), "--training.dry-run",
                           "compile", "--training.compile-target", "cpu:4", "--training.output-dir", str(out),
                           *extra], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("loading", ["resident", "streamed", "cached", "resident-pruned"])
def test_a_cross_tokenizer_run_compiles_its_step_and_evaluation(config, tmp_path, loading):
    out = tmp_path / "out"
    extra = [] if loading.startswith("resident") else ["--distillation.teacher-model.loading", loading,
                                                       "--distillation-params.shared-kl-weight", "0"]
    if loading == "resident-pruned":  # init: from_teacher ranks on the teacher's tokens, slices its vocabulary
        extra += ["--distillation.student-model.init", "from_teacher"]
    if loading == "cached":
        extra += ["--distillation.teacher-model.cache-dir", str(tmp_path / "cache")]
    proc = dry_run(config, out, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["memory_plan.json"]
    plan = json.loads((out / "memory_plan.json").read_text())
    want = {"train", "eval"} | {"streamed": {"streamed_group", "streamed_head"}, "cached": {"cache_build"},
                                "resident-pruned": {"prune_importance", "prune_slice"}}.get(loading, set())
    assert set(plan["programs"]) == want
    for name, p in plan["programs"].items():
        assert p["error"] is None and p["total_bytes"] > 0 and p["fits"] is True, name
        assert p["planner_bytes"] > 0, name


def test_a_streamed_teacher_with_the_shared_kl_is_one_line_naming_the_key(config, tmp_path):
    proc = dry_run(config, tmp_path / "out", ["--distillation.teacher-model.loading", "streamed"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distillation_params.shared_kl_weight" in proc.stderr.strip().splitlines()[-1]
