"""The contract's promises on user mistakes (CONTRACT.md §3, §5), through `run.py` as a user runs it.

Each mistake exits with status 2 and one line on stderr naming the culprit, and leaves `output_dir` byte-identical
(every file's path, bytes and mode hashed before and after). Also: `eval_batches: 0` turns evaluation off, and
`student_model.init: path` trains and exports a student of another shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from hf_fixtures import hf_config, make_hf_model, save_hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    save_hf(make_hf_model(hf_config("qwen2", layers=4, kv_heads=2)), d / "teacher")
    stream = np.tile(np.arange(2, 40, dtype=np.int32), 200)
    np.save(d / "train.npy", stream[:6000])
    np.save(d / "eval.npy", stream[6000:])
    return d


def write_config(assets: Path, out: Path, student: dict | None = None) -> Path:
    student = student or {"init": "random", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 32}
    config = {
        "distillation": {"teacher_model": {"path": str(assets / "teacher"), "dtype": "float32"},
                         "student_model": student},
        "data": {"train": str(assets / "train.npy"), "eval": str(assets / "eval.npy")},
        "training": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "seq_len": 16, "log_every": 1,
                     "eval_every": 2, "eval_batches": 1, "save_every": 2, "compute_dtype": "float32"},
        "distillation_params": {"kd_weight": 1.0, "ce_weight": 0.5},
        "tracking": {"aim": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(*args: str, memory: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    env.pop("VISHWAM_DEVICE_MEMORY", None)
    if memory is not None:
        env["VISHWAM_DEVICE_MEMORY"] = memory
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env)


def tree_hash(directory: Path) -> str:
    """Every file and folder below `directory`: relative path, mode, and the bytes of files."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(str(path.relative_to(directory)).encode() + f" {path.stat().st_mode:o}".encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 2-step run: config.yaml, metrics, eval.json, a checkpoint at step 2, the student."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = cli("--config", str(write_config(assets, out)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_outputs_are_written_with_ordinary_modes(finished):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "eval.json", "metrics.jsonl"):
        assert (finished / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_run_that_does_not_fit_leaves_the_previous_run_untouched(assets, copy_of):
    """config.yaml is written only once every check has passed: the memory plan's failure changes nothing."""
    before = tree_hash(copy_of)
    config = write_config(assets, copy_of)
    line = one_line_error(cli("--config", str(config), "--training.max-steps", "4", memory="100KiB"))
    assert line.startswith("error: memory plan:") and "GiB/device needed" in line, line
    assert tree_hash(copy_of) == before


def test_resume_with_a_changed_architecture_names_the_key_and_changes_nothing(assets, copy_of):
    before = tree_hash(copy_of)
    config = write_config(assets, copy_of)
    line = one_line_error(cli("--config", str(config), "--distillation.student-model.num-hidden-layers", "4"))
    key = "distillation.student_model.num_hidden_layers"
    assert re.search(rf"config key '{re.escape(key)}' is 4, but the checkpoint {re.escape(str(copy_of))}"
                     rf"/checkpoints/2 was written with 2", line), line
    assert tree_hash(copy_of) == before
    line = one_line_error(cli("--config", str(config), "--distillation-params.kd-weight", "0.5"))
    assert "config key 'distillation_params.kd_weight' is 0.5" in line and "written with 1.0" in line, line
    assert tree_hash(copy_of) == before


@pytest.mark.parametrize("flag,expect", [
    (["--training.max-stepz", "3"], r"Unrecognized options: --training\.max-stepz.*did you mean --training\.max-steps INT"),
    (["--training.max-steps", "abc"], r"--training\.max-steps: .*'abc'.*expected --training\.max-steps INT"),
    (["--training.remat", "maybe"], r"'maybe' for argument '--training\.remat'"),
], ids=["unknown", "ill-typed", "bad-choice"])
def test_a_bad_flag_is_one_line_naming_the_flag(assets, copy_of, flag, expect):
    before = tree_hash(copy_of)
    line = one_line_error(cli("--config", str(write_config(assets, copy_of)), *flag))
    assert re.search(expect, line), line
    assert tree_hash(copy_of) == before


def test_help_is_still_tyros():
    proc = cli("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ") and "run.py [-h]" in proc.stdout and "--training.max-steps" in proc.stdout


def test_a_token_id_outside_the_vocabulary_names_the_file(assets, copy_of, tmp_path):
    bad = tmp_path / "big.npy"
    np.save(bad, np.arange(0, 500, dtype=np.int32))
    # Without its checkpoints: a run that could resume compares the checkpoint's config first, and data.train
    # changed (issue 30: the comparison runs before the data is read).
    shutil.rmtree(copy_of / "checkpoints")
    before = tree_hash(copy_of)
    line = one_line_error(cli("--config", str(write_config(assets, copy_of)), "--data.train", str(bad)))
    assert f"{bad} holds token id 499, outside the model's vocabulary of 96 ids" in line, line
    assert tree_hash(copy_of) == before


def test_a_resumed_run_compares_its_config_before_reading_data(assets, copy_of, tmp_path):
    """Issue 30 item 12: the checkpoint's config is compared before the data is read (a changed key costs no data
    load, and its line is the only one)."""
    bad = tmp_path / "big.npy"
    np.save(bad, np.arange(0, 500, dtype=np.int32))  # would be a data error, were it read
    before = tree_hash(copy_of)
    proc = cli("--config", str(write_config(assets, copy_of)), "--data.train", str(bad))
    line = one_line_error(proc)
    assert line.startswith("error: config key 'data.train' is ") and "but the checkpoint" in line, line
    assert "token store" not in proc.stderr and "tokens," not in proc.stderr  # nothing of the data was read
    assert tree_hash(copy_of) == before


def test_eval_batches_zero_turns_evaluation_off(assets, tmp_path):
    out = tmp_path / "noeval"
    proc = cli("--config", str(write_config(assets, out)), "--training.eval-batches", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "eval.json").exists() and (out / "student" / "config.json").is_file()
    assert "eval @" not in proc.stderr


def test_a_student_from_a_checkpoint_of_another_shape_trains_and_exports(assets, tmp_path):
    """`init: path`: the student's architecture, layer mapping and objective come from its own checkpoint."""
    student_dir = tmp_path / "student_in"
    save_hf(make_hf_model(hf_config("qwen2", layers=3, kv_heads=1, hidden_size=24, intermediate_size=40,
                                    num_attention_heads=2), seed=3), student_dir)
    out = tmp_path / "frompath"
    config = write_config(assets, out, student={"init": "path", "path": str(student_dir)})
    proc = cli("--config", str(config), "--distillation-params.feature-weight", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "student", attn_implementation="eager")
    c = exported.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.intermediate_size) == (3, 24, 1, 40)
    start = transformers.AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="eager")
    moved = [name for name, p in exported.state_dict().items()
             if not torch.equal(p, start.state_dict()[name])]
    assert moved, "training changed no weight"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["distill/feature"]) for r in rows)
