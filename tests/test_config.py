"""Config and CLI: defaults < YAML < flags, strict YAML, validation that names the key, --help, round trip."""

import dataclasses
import re
import textwrap

import pytest

from distill.config import LayerMappingConfig, TemperatureConfig
from vishwam.config.cli import load_config, parse_args, run_main
from vishwam.config.sections import (
    DataConfig,
    DistillationConfig,
    DistillationParams,
    RunConfig,
    TeacherConfig,
    TrainingConfig,
    config_to_dict,
    save_config,
)
from vishwam.errors import ConfigError, DataError

BASE = """\
data:
  train: [train.jsonl]
distillation:
  teacher_model:
    path: teacher_dir
"""
STUDENT = "  student_model:\n"  # appended to BASE: continues its `distillation` section


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _config(**training):
    return RunConfig(
        distillation=DistillationConfig(teacher_model=TeacherConfig(path="t")),
        data=DataConfig(train=("a.jsonl",)),
        training=TrainingConfig(**training),
    )


# ------------------------------------------------------------------------------------------------- precedence


@pytest.mark.parametrize("flag", ["--training.max-steps", "--training.max_steps"])
def test_defaults_then_yaml_then_flags(tmp_path, flag):
    path = _write(tmp_path, BASE + "training:\n  max_steps: 7\n  batch_size: 4\n  learning_rate: 3e-4\n")
    cfg, options = parse_args(["--config", path, flag, "20", "--debug"])
    assert cfg.training.max_steps == 20  # flag beats YAML
    assert cfg.training.batch_size == 4  # YAML beats default
    assert cfg.training.learning_rate == pytest.approx(3e-4)  # `3e-4` is a float, not YAML 1.1's string
    assert cfg.training.seq_len == TrainingConfig.seq_len  # default
    assert cfg.distillation.teacher_model.path == "teacher_dir"
    assert options.config_path == path and options.debug


def test_nested_flags_and_config_equals_form(tmp_path):
    path = _write(tmp_path, BASE)
    cfg, _ = parse_args([
        f"--config={path}",
        "--distillation-params.temperature.schedule", "cosine",
        "--distillation_params.layer_mapping.strategy", "explicit",
        "--distillation-params.layer-mapping.pairs", "0", "0", "1", "3",
        "--data.train", "x.jsonl", "y.jsonl",
        "--training.remat",
        "--distillation.student-model.num-hidden-layers", "2",
    ])
    assert cfg.distillation_params.temperature.schedule == "cosine"
    assert cfg.distillation_params.layer_mapping.pairs == ((0, 0), (1, 3))
    assert cfg.data.train == ("x.jsonl", "y.jsonl")
    assert cfg.training.remat is True
    assert cfg.distillation.student_model.num_hidden_layers == 2


def test_flags_alone_and_data_train_as_string(tmp_path):
    cfg, options = parse_args(["--distillation.teacher-model.path", "t", "--data.train", "a.jsonl"])
    assert options.config_path is None and cfg.data.train == ("a.jsonl",)
    path = _write(tmp_path, BASE.replace("[train.jsonl]", "data/*.jsonl"))
    assert load_config(path).data.train == ("data/*.jsonl",)


def test_missing_required_value_is_a_usage_error(tmp_path):
    """tyro's usage error as one `ConfigError` line (exit 2 through `run_main`) naming the missing flag."""
    path = _write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match=r"^Missing from .*: --distillation\.teacher-model\.path STR"):
        parse_args(["--config", path])


def test_unknown_flag_exits_2(tmp_path):
    with pytest.raises(ConfigError, match=r"^Unrecognized options: --training\.max-stepz, 3; did you mean "
                                          r"--training\.max-steps INT\?$"):
        parse_args(["--config", _write(tmp_path, BASE), "--training.max-stepz", "3"])


def test_flag_can_fix_what_the_yaml_gets_wrong(tmp_path):
    path = _write(tmp_path, BASE + "distillation_params:\n  kd_weight: 0.0\n")
    cfg = load_config(path, ["--distillation-params.ce-weight", "1.0"])
    assert cfg.distillation_params.ce_weight == 1.0


# ------------------------------------------------------------------------------------------------- strict YAML


@pytest.mark.parametrize(
    "extra, key",
    [
        ("training:\n  max_stepz: 3\n", "training.max_stepz"),
        ("trainng:\n  max_steps: 3\n", "trainng"),
        ("distillation_params:\n  temperature:\n    strat: 1.0\n", "distillation_params.temperature.strat"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path, extra, key):
    path = _write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", path])
    assert f"unknown config key '{key}' in {path}" in str(info.value)


@pytest.mark.parametrize(
    "extra, key",
    [
        ("training:\n  batch_size: eight\n", "training.batch_size"),
        ("training:\n  max_steps: [1, 2]\n", "training.max_steps"),
        ("training:\n  seq_len: 12.5\n", "training.seq_len"),
        ("training:\n  remat: 1\n", "training.remat"),
        ("training:\n  learning_rate: fast\n", "training.learning_rate"),
        ("training:\n  output_dir: null\n", "training.output_dir"),
        ("training: 3\n", "training"),
        ("distillation_params:\n  kd_loss: kl\n", "distillation_params.kd_loss"),
        ("distillation_params:\n  attention_layers: [1, x]\n", "distillation_params.attention_layers[1]"),
        ("distillation_params:\n  layer_mapping:\n    pairs: [[0, 1, 2]]\n",
         "distillation_params.layer_mapping.pairs[0]"),
        (STUDENT + "    hidden_size: big\n", "distillation.student_model.hidden_size"),
    ],
)
def test_ill_typed_value_names_key_and_file(tmp_path, extra, key):
    path = _write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", path])
    message = str(info.value)
    assert f"'{key}' in {path}" in message and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {re.escape(str(tmp_path / 'nope.yaml'))}"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    broken = _write(tmp_path, "training: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError, match=f"invalid YAML in config file {re.escape(broken)} at line"):
        parse_args(["--config", broken])
    twice = _write(tmp_path, BASE + "training:\n  seed: 1\n  seed: 2\n", "twice.yaml")
    with pytest.raises(ConfigError, match=f"{re.escape(twice)} at line 8.*duplicate key 'seed'"):
        parse_args(["--config", twice])
    scalar = _write(tmp_path, "just a string\n", "scalar.yaml")
    with pytest.raises(ConfigError, match=f"{re.escape(scalar)} must hold a mapping"):
        parse_args(["--config", scalar])
    with pytest.raises(ConfigError, match="--config needs a YAML file path"):
        parse_args(["--config"])


# -------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: TrainingConfig(batch_size=0), "training.batch_size"),
        (lambda: TrainingConfig(batch_size=6, grad_accum_steps=4), "training.grad_accum_steps"),
        (lambda: TeacherConfig(path="t", loading="cached"), "distillation.teacher_model.cache_dir"),
        (lambda: DistillationParams(ce_weight=-1.0), "distillation_params.ce_weight"),
        (lambda: DistillationParams(label_smoothing=1.0), "distillation_params.label_smoothing"),
        (lambda: DistillationParams(jsd_beta=1.5), "distillation_params.jsd_beta"),
        (lambda: TemperatureConfig(start=0.0), "distillation_params.temperature.start"),
        (lambda: DataConfig(train=()), "data.train"),
        (lambda: LayerMappingConfig(strategy="last_k"), "distillation_params.layer_mapping.k"),
        (lambda: LayerMappingConfig(k=2), "distillation_params.layer_mapping.k"),
        (lambda: LayerMappingConfig(strategy="explicit"), "distillation_params.layer_mapping.pairs"),
        (lambda: dataclasses.replace(_config(), parallelism=dataclasses.replace(
            _config().parallelism, data=3)), "training.batch_size"),
    ],
)
def test_validation_names_the_key(make, key):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
        make()


def test_validation_error_from_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, BASE + STUDENT + "    init: path\n", "v.yaml")
    key = re.escape("'distillation.student_model.path'")
    with pytest.raises(ConfigError, match=rf"{key} is required .*\(in {re.escape(path)}\)"):
        parse_args(["--config", path])
    ok = load_config(path, ["--distillation.student-model.path", "student_dir"])
    assert ok.distillation.student_model.path == "student_dir"
    with pytest.raises(ConfigError, match=r"config key 'training\.warmup_steps' must be >= 0, got -1$"):
        parse_args(["--config", path, "--distillation.student-model.path", "s", "--training.warmup-steps", "-1"])


# ------------------------------------------------------------------------------------------- help and round trip


def test_help_lists_options_with_help_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--training.max-steps" in out and "Number of optimizer steps." in out
    assert "--distillation-params.temperature.schedule" in out
    assert "--config PATH" in out


def test_saved_config_reads_back_equal(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, [
        "--training.learning-rate", "1e-5", "--training.output-dir", str(tmp_path / "out"),
        "--distillation-params.layer-mapping.strategy", "explicit",
        "--distillation-params.layer-mapping.pairs", "0", "1", "1", "3",
        "--distillation-params.attention-layers", "0", "1",
        "--distillation.student-model.tie-word-embeddings", "False",
        "--data.eval", "e1.jsonl", "e2.jsonl", "--tracking.repo", "aim_repo",
    ])
    saved = tmp_path / "out" / "config.yaml"
    save_config(cfg, saved)
    assert load_config(str(saved)) == cfg
    plain = config_to_dict(cfg)
    assert plain["distillation_params"]["layer_mapping"]["pairs"] == [[0, 1], [1, 3]]
    assert plain["data"]["eval"] == ["e1.jsonl", "e2.jsonl"]


# ------------------------------------------------------------------------------------------------- run_main


def test_run_main_turns_user_errors_into_one_line(capsys):
    def main(argv):
        raise DataError("data file not found: x.jsonl")

    with pytest.raises(SystemExit) as info:
        run_main(main, ["--config", "c.yaml"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data file not found: x.jsonl\n"
    with pytest.raises(DataError):
        run_main(main, ["--debug"])


def test_run_main_interrupt_and_result(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_main(interrupted, [])
    assert info.value.code == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert run_main(lambda argv: argv, ["--x"]) == ["--x"]


def test_boolean_flags_take_yaml_style_values(tmp_path):
    from vishwam.config.cli import parse_args

    base = ["--distillation.teacher-model.path", "t", "--data.train", "d.jsonl"]
    for word, want in (("true", True), ("True", True), ("yes", True), ("false", False), ("off", False)):
        cfg, _ = parse_args([*base, "--training.remat", word])
        assert cfg.training.remat is want
    cfg, _ = parse_args([*base, "--training.dry-run=true"])
    assert cfg.training.dry_run is True


def test_bare_and_negated_boolean_flags():
    from vishwam.config.cli import parse_args

    base = ["--distillation.teacher-model.path", "t", "--data.train", "d.jsonl"]
    assert parse_args([*base, "--training.remat"])[0].training.remat is True
    assert parse_args([*base, "--training.remat", "--training.no-remat"])[0].training.remat is False
    assert parse_args([*base, "--tracking.no-aim"])[0].tracking.aim is False
