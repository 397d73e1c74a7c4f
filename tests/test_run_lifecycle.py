"""Issue 30, the run's lifecycle: what a hostile user or a crash leaves for the next run, through the entry points
where each was found (`run.py`, `python -m vishwam.generate`, `python -m vishwam.cache`, run in this process).

A damaged newest checkpoint is skipped for the newest readable one before the teacher loads; generation lengths
are planned (positions and KV-cache bytes) before anything is written; chat-template errors, a file where a
directory is expected and an empty train file are one line; a killed export's temporaries are cleared; the XLA
compilation cache is private and takes every program; `metrics.jsonl` is strict JSON. A user error exits with
status 2 and a single `error:` line (after the memory plan's summary at most), with `output_dir` unchanged (its
tree hashed before and after). docs/errors.md, "Run lifecycle (issue 30)", lists the cases.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hf_fixtures import hf_config, make_hf_model, save_hf

from vishwam.config.cli import load_config, run_main
from vishwam.io.checkpoint import LazyCheckpoint
from vishwam.run.loop import Run

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "vishwam" / "assets" / "demo" / "teacher"
CHAT_TEACHER = ROOT / "vishwam" / "assets" / "demo" / "chat_teacher"
_spec = importlib.util.spec_from_file_location("vishwam_run_script", ROOT / "run.py")
RUN_PY = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RUN_PY)


# ------------------------------------------------------------------------------------------------ helpers


def tree_hash(directory: Path) -> str:
    """Every file and folder below `directory`: relative path, mode, and the bytes of files."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(str(path.relative_to(directory)).encode() + f" {path.stat().st_mode:o}".encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def call(main, capsys, *argv) -> tuple[int, list[str]]:
    """An entry point's `main` as its `__main__` runs it (`run_main`): the exit status and the stderr lines."""
    capsys.readouterr()
    try:
        code = run_main(main, [str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()


def error_line(code: int, lines: list[str]) -> str:
    """The one `error:` line of a user error: status 2, no traceback, nothing after it."""
    assert code == 2, lines[-20:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and not any("Traceback" in line for line in lines), lines
    return errors[0]


@pytest.fixture
def no_teacher(monkeypatch):
    """Fails the test if the run opens its teacher (a check that must stop the run before that)."""
    def refuse(self):
        raise AssertionError("the teacher was opened")

    monkeypatch.setattr(Run, "open_teacher", refuse)


@pytest.fixture
def kept(tmp_path):
    """An `output_dir` holding a file of a user's, and its tree hash."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny teacher (no tokenizer) and token streams."""
    d = tmp_path_factory.mktemp("lifecycle")
    save_hf(make_hf_model(hf_config("qwen2", layers=2, kv_heads=2)), d / "teacher")
    stream = np.tile(np.arange(2, 40, dtype=np.int32), 200)
    np.save(d / "train.npy", stream[:6000])
    np.save(d / "eval.npy", stream[6000:])
    return d


def tiny_config(tiny: Path, out: Path, **training) -> Path:
    config = {
        "distillation": {"teacher_model": {"path": str(tiny / "teacher"), "dtype": "float32"},
                         "student_model": {"init": "random", "num_hidden_layers": 1, "hidden_size": 32,
                                           "intermediate_size": 32}},
        "data": {"train": str(tiny / "train.npy"), "eval": str(tiny / "eval.npy")},
        "training": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "seq_len": 16, "log_every": 1,
                     "eval_every": 100, "eval_batches": 1, "save_every": 2, "compute_dtype": "float32",
                     "warmup_steps": 0, **training},
        "distillation_params": {"kd_weight": 1.0, "ce_weight": 0.5},
        "tracking": {"aim": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def metrics(out: Path) -> list[dict]:
    from vishwam.tracking import WALL_CLOCK_METRICS

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_METRICS} for row in rows]


def copy_teacher(source: Path, to: Path, **config) -> Path:
    """`mk`: a copy of a teacher with `config` merged into its config.json."""
    shutil.copytree(source, to)
    hf = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**hf, **config}))
    return to


# ------------------------------------------------------------------------ item 4: a damaged newest checkpoint


@pytest.fixture(scope="module")
def finished6(tiny, tmp_path_factory):
    """A finished 6-step run: checkpoints 4 and 6."""
    out = tmp_path_factory.mktemp("finished6") / "run"
    Run(load_config(str(tiny_config(tiny, out, max_steps=6)))).train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6"]
    return out


@pytest.mark.parametrize("part", ["meta/metadata", "state/_METADATA", "arrays"])
def test_a_damaged_newest_checkpoint_is_skipped_before_the_teacher_loads(tiny, finished6, tmp_path, capsys,
                                                                        monkeypatch, part):
    """A finished 6-step run's checkpoint 6 damaged: its meta or its arrays' metadata garbled (caught before the
    data is read), or its largest data file gone (its metadata reads: caught by the restore, still before the
    teacher loads). The same command resumes from checkpoint 4 and ends as the run had."""
    out = tmp_path / "run"
    shutil.copytree(finished6, out)
    if part == "arrays":
        max(out.glob("checkpoints/6/state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size).unlink()
    else:
        (out / "checkpoints" / "6" / part).write_text("{garbage")
    opened = []
    real = Run.open_teacher
    monkeypatch.setattr(Run, "open_teacher", lambda self: opened.append(capsys.readouterr().err) or real(self))
    code, lines = call(RUN_PY.main, capsys, "--config", tiny_config(tiny, out, max_steps=6))
    assert code == 0, lines[-20:]
    before_teacher = opened[0].splitlines()
    warning = [line for line in before_teacher if line.startswith("warning:")]
    assert len(warning) == 1 and f"{out / 'checkpoints' / '6'}" in warning[0], before_teacher
    assert ("(JSONDecodeError: " if part != "arrays" else "whose arrays cannot be read") in warning[0], warning
    assert "resuming from checkpoint 4 instead" in warning[0]
    assert "resumed from checkpoint step 4" in before_teacher[-1]
    assert metrics(out) == metrics(finished6)  # steps 5 and 6 again, as they were
    if part != "arrays":
        assert (out / "checkpoints" / "6.unreadable" / part).read_text() == "{garbage"  # kept, set aside
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6", "6.unreadable"]


def test_no_readable_checkpoint_is_one_line(tiny, finished6, tmp_path, capsys, no_teacher):
    out = tmp_path / "run"
    shutil.copytree(finished6, out)
    (out / "checkpoints" / "6" / "meta" / "metadata").write_text("{garbage")
    (out / "checkpoints" / "4" / "state" / "_METADATA").write_text("{garbage")
    before = tree_hash(out)
    line = error_line(*call(RUN_PY.main, capsys, "--config", tiny_config(tiny, out, max_steps=6)))
    assert f"no checkpoint in {out / 'checkpoints'} can be read" in line and f"{out / 'checkpoints' / '4'} (" in line
    assert tree_hash(out) == before


# ------------------------------------------------------------------------------ item 5: generation lengths


def test_sample_lengths_past_the_models_positions_are_one_line(kept, capsys, monkeypatch, no_teacher):
    monkeypatch.chdir(ROOT)
    before = tree_hash(kept)
    line = error_line(*call(RUN_PY.main, capsys, "--config", "configs/distill.yaml", "--tracking.aim", "false",
                            "--training.max-steps", "2", "--training.output-dir", kept, "--training.sample-prompts",
                            "One two", "--training.sample-max-new-tokens", "1000000000", "--training.eval-every", "1"))
    assert ("config key 'training.sample_max_new_tokens' is 1000000000: after a prompt of 3 tokens that runs to "
            "position 1000000003, past the student's max_position_embeddings (2048)") in line, line
    assert tree_hash(kept) == before


def test_a_samples_kv_cache_past_a_device_is_one_line(kept, tmp_path, capsys, monkeypatch, no_teacher):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("VISHWAM_DEVICE_MEMORY", "1GiB")  # the train step's plan fits (0.04 GiB)
    long = copy_teacher(DEMO_TEACHER, tmp_path / "long", max_position_embeddings=10**9)
    before = tree_hash(kept)
    line = error_line(*call(RUN_PY.main, capsys, "--config", "configs/distill.yaml", "--tracking.aim", "false",
                            "--training.max-steps", "2", "--training.output-dir", kept, "--training.sample-prompts",
                            "One two", "--training.sample-max-new-tokens", "10000000",
                            "--distillation.teacher-model.path", long))
    assert "config key 'training.sample_max_new_tokens' is 10000000: the student's KV cache" in line, line
    assert line.endswith("a device holds 1.00 GiB"), line
    assert tree_hash(kept) == before


@pytest.mark.parametrize("case", ["positions", "kv-cache"])
def test_generate_plans_max_new_tokens_before_reading_a_weight(tmp_path, capsys, monkeypatch, case):
    from vishwam.generate import main

    monkeypatch.setattr(LazyCheckpoint, "load", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setenv("VISHWAM_DEVICE_MEMORY", "1GiB")
    model = DEMO_TEACHER if case == "positions" else copy_teacher(DEMO_TEACHER, tmp_path / "long",
                                                                  max_position_embeddings=10**9)
    out = tmp_path / "rows.jsonl"
    line = error_line(*call(main, capsys, "--model", model, "--prompt", "One two", "--max-new-tokens", "100000000",
                            "--out", out))
    expect = {"positions": "--max-new-tokens is 100000000: after a prompt of 3 tokens that runs to position "
                           "100000003, past the model's max_position_embeddings (2048)",
              "kv-cache": "--max-new-tokens is 100000000: the model's KV cache for 1 prompt(s) of up to 3 tokens "
                          "needs 381.47 GiB/device"}[case]
    assert expect in line, line
    assert not out.exists()


def test_the_compile_dry_run_compiles_the_samples_programs(tiny, tmp_path):
    out = tmp_path / "dry"  # a subprocess: the abstract programs are not for this process's runtime type checks
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    env.pop("VISHWAM_DEVICE_MEMORY", None)
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(tiny_config(tiny, out)),
                           "--training.dry-run", "compile", "--training.eval-batches", "0",
                           "--training.sample-prompts", "abc", "abcdef", "--training.sample-max-new-tokens", "8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = json.loads((out / "memory_plan.json").read_text())["programs"]
    assert set(programs) == {"train", "sample_prefill", "sample_decode", "teacher_sample_prefill",
                             "teacher_sample_decode"}
    for name, p in programs.items():
        assert p["total_bytes"] > 0 and p["planner_bytes"] > 0 and p["fits"] is True, name
    # No tokenizer beside the tiny teacher: prompts of up to 6 bytes are taken as 7 tokens (a bucket of 8), and
    # the cache holds 8 + 8 - 1 slots: the decode program's output is that cache (and the new tokens).
    c = hf_config("qwen2", layers=2, kv_heads=2)
    cache = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * 15 * (c.hidden_size // c.num_attention_heads) * 4
    assert programs["teacher_sample_decode"]["output_bytes"] >= cache


# ---------------------------------------------------------------------------------- item 8: chat templates


@pytest.mark.parametrize("case", ["division", "type", "not-utf8"])
def test_a_chat_template_that_fails_is_one_line(kept, tmp_path, capsys, monkeypatch, no_teacher, case):
    monkeypatch.chdir(ROOT)
    flags = []
    if case == "not-utf8":
        teacher = copy_teacher(CHAT_TEACHER, tmp_path / "teacher")
        (teacher / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe")
        flags = ["--distillation.teacher-model.path", teacher]
        where = teacher / "chat_template.jinja"
    else:
        where = tmp_path / "bad.jinja"
        where.write_text({"division": "{{ 1 // 0 }}",
                          "type": "{% for m in messages %}{{ m.content + 1 }}{% endfor %}"}[case])
        flags = ["--data.chat-template", where]
    before = tree_hash(kept)
    line = error_line(*call(RUN_PY.main, capsys, "--config", "configs/chat.yaml", "--tracking.aim", "false",
                            "--training.max-steps", "2", "--training.output-dir", kept, *flags))
    assert str(where) in line, line
    assert {"division": "ZeroDivisionError", "type": "TypeError", "not-utf8": "codec can't decode"}[case] in line
    assert tree_hash(kept) == before


@pytest.mark.parametrize("template,expect", [
    ("{{ raise_exception('no system turns here') }}", "no system turns here"),
    ("{{ messages.append(1) }}", "access to attribute 'append' of 'list' object is unsafe"),
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
], ids=["raise_exception", "sandbox-append", "sandbox-mro", "division"])
def test_generate_chat_template_errors_are_one_line(tmp_path, capsys, monkeypatch, template, expect):
    from vishwam.generate import main

    monkeypatch.setattr(LazyCheckpoint, "load", lambda *a, **k: pytest.fail("weights were read"))
    model = copy_teacher(CHAT_TEACHER, tmp_path / "model")
    (model / "chat_template.jinja").write_text(template)
    out = tmp_path / "rows.jsonl"
    line = error_line(*call(main, capsys, "--model", model, "--prompt", "Hi", "--chat", "--out", out))
    assert f"--chat: the chat template {model / 'chat_template.jinja'} fails to render prompt 0: " in line, line
    assert expect in line, line
    assert not out.exists()


# ------------------------------------------------------------------- item 9: a file where a directory goes


@pytest.mark.parametrize("below", [False, True], ids=["the-file", "below-a-file"])
def test_an_output_dir_that_is_a_file_is_one_line(tiny, tmp_path, capsys, no_teacher, below):
    blocker = tmp_path / "taken"
    blocker.write_text("a file of the user's")
    out = blocker / "run" if below else blocker
    config = tiny_config(tiny, tmp_path / "run")
    line = error_line(*call(RUN_PY.main, capsys, "--config", config, "--training.output-dir", out))
    assert f"config key 'training.output_dir' ({out}) must be a directory, and {blocker} is a file" in line, line
    assert blocker.read_text() == "a file of the user's"


def test_a_teacher_cache_dir_that_is_a_file_is_one_line(tiny, tmp_path, capsys):
    from vishwam.cache import main

    blocker = tmp_path / "cache"
    blocker.write_text("a file of the user's")
    config = tiny_config(tiny, tmp_path / "run")
    line = error_line(*call(main, capsys, "--config", config, "--distillation.teacher-model.cache-dir", blocker))
    assert (f"config key 'distillation.teacher_model.cache_dir' ({blocker}) must be a directory, and {blocker} is a "
            "file") in line, line
    assert blocker.read_text() == "a file of the user's"


def test_generate_out_below_a_file_is_one_line_before_generating(tmp_path, capsys, monkeypatch):
    from vishwam.generate import main

    monkeypatch.setattr(LazyCheckpoint, "load", lambda *a, **k: pytest.fail("weights were read"))
    blocker = tmp_path / "taken"
    blocker.write_text("a file of the user's")
    line = error_line(*call(main, capsys, "--model", DEMO_TEACHER, "--prompt", "One", "--out", blocker / "x.jsonl"))
    assert f"the folder of --out {blocker / 'x.jsonl'} ({blocker}) must be a directory, and {blocker} is a file" \
        in line, line
    assert blocker.read_text() == "a file of the user's"


# ----------------------------------------------------------------------------- item 11: a killed export


def test_a_killed_export_leaves_nothing_once_the_run_is_repeated(tiny, tmp_path, capsys):
    """SIGKILL while `student/` is being written leaves `student.tmp-<pid>`; the repeated command clears it (and
    `init_student`'s and a moved-aside `.old-<pid>` of a dead process), leaves a running process's alone, and
    exports the student."""
    out = tmp_path / "run"
    config = tiny_config(tiny, out)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.argv = ["run.py", "--config", {str(config)!r}]
        import vishwam.io.export as c
        original = c.write_file
        def write_file(path, *args, **kwargs):
            original(path, *args, **kwargs)
            if path.parent.name.startswith("student.tmp-"):
                os.kill(os.getpid(), signal.SIGKILL)  # the export's first shard is written, the rest is not
        c.write_file = write_file
        sys.path.insert(0, {str(ROOT)!r})
        import runpy
        runpy.run_path({str(ROOT / 'run.py')!r}, run_name="__main__")
    """)
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and left[0].startswith("student.tmp-") and not (out / "student").exists(), left
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid  # a process id that no longer runs
    (out / f"init_student.tmp-{dead}").mkdir()
    (out / f"student.old-{dead}").mkdir()
    running = out / f"student.tmp-{os.getppid()}"  # pytest's parent runs: its temporary is not ours to clear
    running.mkdir()
    code, lines = call(RUN_PY.main, capsys, "--config", config)
    assert code == 0, lines[-20:]
    assert sorted(p.name for p in out.iterdir() if "-" in p.name) == [running.name]
    assert (out / "student" / "config.json").is_file()
    assert any(f"{left[0]}, left by an export that was killed: removed" in line for line in lines), lines


# ------------------------------------------------------------------------------- item 13: an empty train file


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_train_file_is_named(kept, tmp_path, capsys, monkeypatch, no_teacher, content):
    monkeypatch.chdir(ROOT)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    before = tree_hash(kept)
    line = error_line(*call(RUN_PY.main, capsys, "--config", "configs/chat.yaml", "--tracking.aim", "false",
                            "--training.max-steps", "2", "--training.output-dir", kept, "--data.train", empty))
    assert line == f"error: {empty}: the file holds no rows", line
    assert tree_hash(kept) == before


# ------------------------------------------------------------------ item 15: the compilation cache, metrics


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=["777", "770", "702"])
def test_a_compilation_cache_others_may_write_is_refused(tiny, kept, tmp_path, capsys, no_teacher, mode):
    cache = tmp_path / "xla"
    cache.mkdir()
    cache.chmod(mode)
    before = tree_hash(kept)
    line = error_line(*call(RUN_PY.main, capsys, "--config", tiny_config(tiny, kept),
                            "--training.compilation-cache", cache))
    assert f"the XLA compilation cache (training.compilation_cache): {cache} may be written by " in line, line
    assert f"(mode {mode:o})" in line
    assert tree_hash(kept) == before and not any(cache.iterdir())


def test_every_program_reaches_a_private_compilation_cache(tiny, tmp_path, capsys, monkeypatch):
    """Under umask 000 the default cache directory and its missing parents are made private (0700); every program
    the run compiles is written to it, so a second run reads back each one it compiles; JAX's settings are put
    back after each run."""
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("VISHWAM_DEVICE_MEMORY", "8GiB")
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    flags = ["--training.compile-check", "on", "--training.compilation-cache", "auto", "--training.max-steps", "1"]
    seen = []
    umask = os.umask(0)
    try:
        run = Run(load_config(str(tiny_config(tiny, tmp_path / "first")), flags))
        run.on_step = lambda step, state: seen.append(jax.config.jax_persistent_cache_min_compile_time_secs)
        first = run.train()["compilation_cache"]
    finally:
        os.umask(umask)
    assert min_seconds > 0 and seen == [0]  # within the run, however short a compile, it is stored
    for path in (xdg, xdg / "vishwam", xdg / "vishwam" / "xla"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert first.directory == xdg / "vishwam" / "xla" and first.requests > 0
    assert jax.config.jax_persistent_cache_min_compile_time_secs == min_seconds
    assert jax.config.jax_compilation_cache_dir is None
    second = Run(load_config(str(tiny_config(tiny, tmp_path / "second")), flags)).train()["compilation_cache"]
    assert second.requests > 0 and second.hits == second.requests, second.summary()


def test_metrics_jsonl_writes_non_finite_numbers_as_null(tiny, tmp_path, monkeypatch):
    """A teacher that yields NaN: the loss is NaN, and metrics.jsonl is still strict JSON (`null`)."""
    import equinox as eqx

    real = Run.open_teacher

    def nan_teacher(self):
        source = real(self)
        source.model = jax.tree.map(lambda x: x * jnp.nan if eqx.is_inexact_array(x) else x, source.model)
        return source

    monkeypatch.setattr(Run, "open_teacher", nan_teacher)
    out = tmp_path / "nan"
    Run(load_config(str(tiny_config(tiny, out, eval_batches=0, max_nonfinite_steps=10)))).train()

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    rows = [json.loads(line, parse_constant=strict) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] is None for r in rows)
