"""Inputs a hostile user gave that must be refused (issue 30, items 1, 2, 3, 6, 7, 10, 14 and part of 15), each
through the entry point where it was accepted: `run.py` (its `main` under `run_main`, in process: exit status 2,
one line on stderr, `output_dir` byte-identical), `python -m vishwam.generate`, or the Python API.

`R` is `configs/chat.yaml` and `T` `configs/distill.yaml`, each with `--tracking.aim false --training.max-steps 2`;
a changed teacher is a copy of a demo teacher with keys of its `config.json` replaced (`changed_teacher`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import hf_config, make_hf_model, save_hf
from test_contract import tree_hash

import vishwam
from vishwam.config.cli import parse_args, run_main
from vishwam.config.sections import RunConfig
from vishwam.errors import CheckpointError, ConfigError
from vishwam.generate import main as generate_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "vishwam" / "assets" / "demo"
R = str(ROOT / "configs" / "chat.yaml")
T = str(ROOT / "configs" / "distill.yaml")


def _run_py():
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN_PY = _run_py()


@pytest.fixture
def out(tmp_path):
    """An output_dir holding an earlier run's files, which a refused run must leave as they are."""
    out = tmp_path / "o"
    (out / "student").mkdir(parents=True)
    (out / "config.yaml").write_text("# an earlier run\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (out / "student" / "config.json").write_text("{}\n")
    return out


def changed_teacher(tmp_path, name: str, changes: dict | None = None, source: str = "chat_teacher",
                    files: dict | None = None) -> Path:
    """A copy of a demo teacher with `changes` merged into its config.json and `files` (name -> text) written."""
    directory = tmp_path / name
    shutil.copytree(DEMO / source, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **(changes or {})}))
    for file, text in (files or {}).items():
        (directory / file).write_text(text)
    return directory


def refused(capsys, out: Path, config: str, *flags: str) -> str:
    """`python run.py --config CONFIG --tracking.aim false --training.max-steps 2 --training.output-dir OUT *flags`
    (run.py's `main` under `run_main`, in this process) exits 2 with one line and leaves `out` byte-identical;
    returns the line."""
    before = tree_hash(out)
    capsys.readouterr()  # what the test printed before
    with pytest.raises(SystemExit) as info:
        run_main(RUN_PY.main, ["--config", config, "--tracking.aim", "false", "--training.max-steps", "2",
                               "--training.output-dir", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert tree_hash(out) == before
    return err[0]


def generate_refused(capsys, tmp_path, *args: str, model: Path = DEMO / "teacher") -> str:
    """`python -m vishwam.generate --model MODEL *args --out FILE` exits 2 with one line and writes nothing."""
    target = tmp_path / "gen.jsonl"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(generate_main, ["--model", str(model), *args, "--out", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not target.exists()
    return err[0]


# ------------------------------------------------------------------------- 1. ids and eps that train silently wrong


@pytest.mark.parametrize("changes, message", [
    ({"eos_token_id": 100000}, "config.json: eos_token_id 100000 is outside the vocabulary [0, vocab_size=512)"),
    ({"eos_token_id": -3}, "config.json: eos_token_id -3 is outside the vocabulary [0, vocab_size=512)"),
    ({"eos_token_id": [0, 512]}, "config.json: eos_token_id 512 is outside the vocabulary"),
    ({"pad_token_id": 600}, "config.json: pad_token_id 600 is outside the vocabulary"),
    ({"bos_token_id": -1}, "config.json: bos_token_id -1 is outside the vocabulary"),
    ({"rms_norm_eps": -1.0}, "config.json: rms_norm_eps must be a finite number > 0, got -1.0"),
    ({"rms_norm_eps": 0}, "config.json: rms_norm_eps must be a finite number > 0, got 0"),
], ids=["eos-big", "eos-negative", "eos-list", "pad", "bos", "eps-negative", "eps-zero"])
def test_teacher_special_ids_and_eps_are_checked(tmp_path, out, capsys, changes, message):
    teacher = changed_teacher(tmp_path, "e", changes)
    line = refused(capsys, out, T, "--distillation.teacher-model.path", str(teacher))
    assert f"{teacher}/{message}" in line, line


def test_teacher_eos_outside_the_students_vocabulary_is_refused(tmp_path, out, capsys):
    """Each checkpoint holds its ids to its own vocabulary; the run holds the teacher's EOS ids (the data's
    separator, the completions' end) to the vocabulary both models share."""
    teacher = changed_teacher(tmp_path, "t", {"eos_token_id": 200}, source="teacher")
    student = save_hf(make_hf_model(hf_config("qwen2")), tmp_path / "student")  # vocabulary of 96
    line = refused(capsys, out, T, "--distillation.teacher-model.path", str(teacher),
                   "--distillation.student-model.init", "path", "--distillation.student-model.path", str(student),
                   *[arg for key in ("num-hidden-layers", "hidden-size", "num-attention-heads", "num-key-value-heads",
                                     "intermediate-size") for arg in (f"--distillation.student-model.{key}", "None")])
    assert (f"{teacher}/config.json: eos_token_id 200 is outside the run's vocabulary of 96 ids (the student's 96, "
            "the teacher's 512)") in line, line


# ------------------------------------------------------------------------------------------ 2. NaN and infinities


def _float_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{field.name}.")
        elif tp is float:
            keys.append(prefix + field.name)
    return keys


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_nan_and_infinities(value):
    keys = _float_keys()
    assert len(keys) >= 20 and "training.learning_rate" in keys
    for key in keys:
        flag = "--" + key.replace("_", "-")
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number, got {value}$"):
            parse_args(["--config", R, flag, value])


@pytest.mark.parametrize("flags, key", [
    (["--training.learning-rate", "nan"], "training.learning_rate"),
    (["--distillation-params.on-policy.temperature", "nan"], "distillation_params.on_policy.temperature"),
    (["--training.grad-clip", "inf"], "training.grad_clip"),
])
def test_nan_flags_are_refused_by_run_py(out, capsys, flags, key):
    line = refused(capsys, out, R, *flags)
    assert f"config key '{key}' must be a finite number" in line, line


def test_nan_in_the_yaml_names_key_and_file(tmp_path, out, capsys):
    config = tmp_path / "nan.yaml"
    config.write_text(Path(R).read_text().replace("learning_rate: 0.003", "learning_rate: .nan"))
    line = refused(capsys, out, str(config))
    assert line == f"error: config key 'training.learning_rate' must be a finite number, got nan (in {config})"


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "nan"), ("--temperature", "inf")])
def test_generate_refuses_nan_flags(tmp_path, capsys, flag, value):
    assert f"{flag} must be a finite number, got {value}" in generate_refused(capsys, tmp_path, "--prompt", "x",
                                                                              flag, value)


def test_generate_api_refuses_nan():
    model = vishwam.load_pretrained(DEMO / "teacher")
    for name in ("temperature", "top_p"):
        with pytest.raises(ValueError, match=f"{name} must be finite, got nan"):
            vishwam.generate(model, np.asarray([[3, 4]]), max_new_tokens=2, **{name: float("nan")})


# ------------------------------------------------------------------------------ 3. on-policy rows fill the batch


@pytest.mark.parametrize("flags, message", [
    (["--distillation-params.on-policy.fraction", "1.0"],
     "config key 'distillation_params.on_policy.fraction' must be in [0, 1), got 1.0"),
    (["--distillation-params.on-policy.fraction", "0.75", "--training.batch-size", "2"],
     "config key 'distillation_params.on_policy.fraction' x training.micro_batch_size (0.75 x 2) rounds to 2 "
     "on-policy rows per micro-batch: each micro-batch needs at least one on-policy row and one data row"),
    (["--distillation-params.on-policy.fraction", "0.1"],
     "config key 'distillation_params.on_policy.fraction' x training.micro_batch_size (0.1 x 16) rounds to 2 "
     "on-policy rows"),
], ids=["whole", "rounds-up-to-whole", "rounds-to-2-of-16"])
def test_on_policy_rows_leave_a_data_row(out, capsys, flags, message):
    """One rule, at config time: round(fraction x micro-batch rows) is between 1 and the rows less one."""
    if flags[1] == "0.1":  # 2 of 16 rows: accepted
        assert parse_args(["--config", R, *flags])[0].distillation_params.on_policy.rows(16) == 2
        return
    assert refused(capsys, out, R, *flags) == f"error: {message}"
    assert parse_args(["--config", R, "--training.batch-size", "2"])[0].distillation_params.on_policy.rows(2) == 1


# --------------------------------------------------------------------- 6. a layer count the checkpoint lacks


def test_a_billion_layers_are_refused_fast_in_bounded_memory(tmp_path):
    """`num_hidden_layers: 1e9` on a 4-layer checkpoint: one line naming the first missing tensor, in seconds and
    well under 2 GiB (listing every layer's tensor names first grew to 18 GB). A watchdog ends the child at 3 GiB so
    that a regression fails here rather than exhausting the machine."""
    teacher = changed_teacher(tmp_path, "l", {"num_hidden_layers": 1_000_000_000})
    out = tmp_path / "o"
    code = (
        "import os, runpy, sys, threading, time\n"
        "from vishwam.tracking import peak_rss_bytes, rss_bytes\n"
        "def watchdog():\n"
        "    while True:\n"
        "        if rss_bytes() > 3 * 2**30:\n"
        "            print('RSS_LIMIT', file=sys.stderr, flush=True); os._exit(99)\n"
        "        time.sleep(0.02)\n"
        "threading.Thread(target=watchdog, daemon=True).start()\n"
        f"sys.argv = ['run.py', '--config', {R!r}, '--tracking.aim', 'false', '--training.max-steps', '2',\n"
        f"            '--training.output-dir', {str(out)!r}, '--distillation.teacher-model.path', {str(teacher)!r}]\n"
        "try:\n    runpy.run_path('run.py', run_name='__main__')\n"
        "finally:\n    print(f'PEAK_RSS {peak_rss_bytes()}', file=sys.stderr)\n")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("PEAK_RSS")]
    assert len(errors) == 1 and errors[0] == (
        f"error: tensor 'model.layers.4.self_attn.q_proj.weight' is missing from checkpoint {teacher} (its "
        "config.json has num_hidden_layers=1000000000, its weights hold 4 layers)"), proc.stderr
    assert int(proc.stderr.split("PEAK_RSS ")[1].split()[0]) < 2 * 2**30
    assert not out.exists()


# ----------------------------------------------------------------------------- 7. ill-typed checkpoint files


def _index(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


CONFIG, INDEX = "config.json", "model.safetensors.index.json"


@pytest.mark.parametrize("file, edit, message", [
    (CONFIG, {"rms_norm_eps": "abc"}, "config.json: key 'rms_norm_eps' must be a finite number, got \"abc\""),
    (CONFIG, {"rms_norm_eps": float("nan")}, "config.json: key 'rms_norm_eps' must be a finite number, got nan"),
    (CONFIG, {"rope_scaling": "linear"}, "config.json: key 'rope_scaling' must be an object, got \"linear\""),
    (CONFIG, {"rope_parameters": {"rope_type": "linear", "factor": "two"}},
     "config.json: key 'rope_parameters.factor' must be a finite number, got \"two\""),
    (CONFIG, {"max_position_embeddings": None},
     "config.json: key 'max_position_embeddings' must be an integer, got null"),
    (CONFIG, {"num_attention_heads": 0, "head_dim": None},
     "config.json: key 'num_attention_heads' must be a positive integer, got 0"),
    (CONFIG, {"eos_token_id": "x"},
     "config.json: key 'eos_token_id' must be a token id or a list of token ids, got \"x\""),
    (CONFIG, {"tie_word_embeddings": "no"}, "config.json: key 'tie_word_embeddings' must be true or false, got \"no\""),
    (CONFIG, {"model_type": ["qwen2"]}, "config.json: unsupported architecture ['qwen2']"),
    (CONFIG, [], "config.json must hold a JSON object, got []"),
    (INDEX, {"weight_map": []}, f"{INDEX}: 'weight_map' must be an object of tensor name -> shard file, got list"),
    (INDEX, {"weight_map": 5}, f"{INDEX}: 'weight_map' must be an object of tensor name -> shard file, got int"),
    (INDEX, {"model.norm.weight": 5},
     f"{INDEX}: weight_map entry 'model.norm.weight' must name a shard file inside the checkpoint directory, got 5"),
], ids=["eps-string", "eps-nan", "rope-scaling-string", "rope-factor-string", "max-pos-null", "heads-zero",
        "eos-string", "tie-string", "model-type-list", "config-list", "weight-map-list", "weight-map-int",
        "shard-int"])
def test_ill_typed_checkpoint_files_name_file_and_key(tmp_path, file, edit, message):
    """Merged into the file's object (an index's weight_map entries into its weight_map), or the file's whole
    content when not an object. Each is one line naming the file, never a traceback."""
    directory = changed_teacher(tmp_path, "c")
    content = json.loads((directory / file).read_text())
    if not isinstance(edit, dict):
        content = edit
    elif file == INDEX and "weight_map" not in edit:
        content["weight_map"].update(edit)
    else:
        content.update(edit)
    (directory / file).write_text(json.dumps(content))
    with pytest.raises(CheckpointError) as info:
        vishwam.load_pretrained(directory)
    assert f"{directory}/{message}" in str(info.value) and "\n" not in str(info.value), info.value


@pytest.mark.parametrize("text, message", [
    ("{not json", "generation_config.json is not valid JSON"),
    ("[1, 2]", "generation_config.json must hold a JSON object, got list"),
    ('{"eos_token_id": "x"}', "generation_config.json: key 'eos_token_id' must be a token id or a list of them, "
                              "got 'x'"),
    ('{"eos_token_id": [0, 9999]}', "generation_config.json: eos_token_id 9999 is outside the vocabulary [0, "
                                    "vocab_size=512)"),
], ids=["invalid", "list", "eos-string", "eos-outside"])
def test_a_bad_generation_config_is_one_line(tmp_path, out, capsys, text, message):
    """In run.py (before anything is written: it was a traceback at step 1) and in `vishwam.generate`."""
    teacher = changed_teacher(tmp_path, "g", files={"generation_config.json": text})
    line = refused(capsys, out, R, "--distillation.teacher-model.path", str(teacher))
    assert f"{teacher}/{message}" in line, line
    assert f"{teacher}/{message}" in generate_refused(capsys, tmp_path, "--prompt", "x", model=teacher)


# -------------------------------------------------------------------------------------------- 10. integer overflow


def test_a_seed_past_32_bits_is_refused_by_run_py(out, capsys):
    line = refused(capsys, out, R, "--training.seed", "99999999999999999999999")
    assert line == ("error: config key 'training.seed' must be at most 2147483647 (a 32-bit integer), got "
                    "99999999999999999999999")


@pytest.mark.parametrize("flag, value", [("--seed", "99999999999999999999999"), ("--top-k", "3000000000"),
                                         ("--max-new-tokens", "3000000000")])
def test_generate_integers_past_32_bits_are_refused(tmp_path, capsys, flag, value):
    line = generate_refused(capsys, tmp_path, "--prompt", "x", flag, value)
    assert line == f"error: {flag} must be at most 2147483647 (a 32-bit integer), got {value}"


def test_generate_api_refuses_top_k_past_32_bits():
    model = vishwam.load_pretrained(DEMO / "teacher")
    with pytest.raises(ValueError, match=r"top_k must be in \[0, 2\*\*31\), got 3000000000"):
        vishwam.generate(model, np.asarray([[3, 4]]), max_new_tokens=2, top_k=3_000_000_000)


# --------------------------------------------------------------------------------------------------- 14. API edges


@pytest.fixture(scope="module")
def demo_model():
    return vishwam.load_pretrained(DEMO / "teacher")


@pytest.mark.parametrize("target, message", [
    ("notes.txt", "save_pretrained: {tmp}/notes.txt exists and is not a directory"),
    ("foreign", "save_pretrained: {tmp}/foreign is a directory that holds no checkpoint (no config.json)"),
    (".", "save_pretrained: . is the working directory or holds it"),
    ("..", "save_pretrained: .. is the working directory or holds it"),
], ids=["file", "foreign-directory", "dot", "dotdot"])
def test_save_pretrained_never_replaces_a_file_or_a_foreign_directory(demo_model, tmp_path, monkeypatch, target,
                                                                      message):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.csv").write_text("1,2\n")
    monkeypatch.chdir(tmp_path / "foreign" if target in (".", "..") else tmp_path)
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError) as info:
        vishwam.save_pretrained(demo_model, target)
    assert str(info.value).startswith(message.format(tmp=tmp_path)), info.value
    assert tree_hash(tmp_path) == before


def test_save_pretrained_replaces_an_earlier_export(demo_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exported = vishwam.save_pretrained(demo_model, "export")  # relative to the working directory
    assert exported.resolve() == (tmp_path / "export").resolve() and (tmp_path / "export" / "config.json").is_file()
    (tmp_path / "empty").mkdir()
    vishwam.save_pretrained(demo_model, "export")  # an earlier export, and an empty directory, are replaced
    vishwam.save_pretrained(demo_model, tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "export"]


def test_model_call_refuses_ids_outside_the_vocabulary(demo_model):
    for ids, bad in (([[3, 512]], 512), ([[-1, 3]], -1)):
        with pytest.raises(ValueError, match=rf"input_ids hold token id {bad}, outside the vocabulary \[0, 512\)"):
            demo_model(jnp.asarray(ids))
    assert demo_model(jnp.asarray([[3, 511]])).logits.shape == (1, 2, 512)


def test_generate_refuses_float_ids(demo_model):
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got dtype float64"):
        vishwam.generate(demo_model, np.asarray([[3.7, 4.2]]), max_new_tokens=2)


def test_generate_refuses_a_fractional_length(demo_model):
    with pytest.raises(TypeError, match="max_new_tokens must be an integer, got 2.5"):
        vishwam.generate(demo_model, np.asarray([[3, 4]]), max_new_tokens=2.5)
    out = vishwam.generate(demo_model, np.asarray([[3, 4]]), max_new_tokens=np.int64(2))  # an integer is fine
    assert out.shape == (1, 4)


def test_load_pretrained_refuses_a_non_float_dtype(tmp_path):
    for dtype in (jnp.int8, jnp.int32, bool):
        with pytest.raises(ValueError, match="dtype must be a floating dtype"):
            vishwam.load_pretrained(DEMO / "teacher", dtype=dtype)
    assert vishwam.load_pretrained(DEMO / "teacher", dtype=jnp.bfloat16).lm_head.weight.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------- 15. hardening


@pytest.mark.parametrize("entry", ["../outside.safetensors", "{tmp}/outside.safetensors",
                                   "sub/../../outside.safetensors"], ids=["parent", "absolute", "dotdot-inside"])
def test_weight_map_entries_stay_inside_the_checkpoint(tmp_path, entry):
    """An index naming a file outside its directory (here a readable shard holding the tensor, so that following
    the entry would load) is refused before anything is opened."""
    directory = changed_teacher(tmp_path, "w")
    index = _index(directory)
    shutil.copy(directory / index["weight_map"]["model.norm.weight"], tmp_path / "outside.safetensors")
    index["weight_map"]["model.norm.weight"] = entry.format(tmp=tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map entry 'model.norm.weight' must name a shard file inside "
                                              "the checkpoint directory"):
        vishwam.load_pretrained(directory)


@pytest.mark.parametrize("flag", ["--fsdp", "--tensor"])
def test_generate_refuses_a_zero_mesh_axis(tmp_path, capsys, flag):
    line = generate_refused(capsys, tmp_path, "--prompt", "x", flag, "0")
    assert "--fsdp and --tensor must be >= 1" in line, line
