"""The compile dry run at small size: every program of the run compiled from abstract inputs, memory_plan.json
the only file written, a misfit one line; and the evaluation program against a NumPy reference."""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hf_fixtures import hf_config, make_hf_model, save_hf

from models import init_model
from vishwam.data.windows import PackedDataset
from vishwam.sharding import batch_sharding, make_mesh
from vishwam.teacher.sources import TeacherSource
from vishwam.train.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("programs")
    save_hf(make_hf_model(hf_config("qwen2", layers=4, kv_heads=2)), d / "teacher")
    np.save(d / "train.npy", np.tile(np.arange(2, 40, dtype=np.int32), 100))
    text = {
        "distillation": {"teacher_model": {"path": str(d / "teacher"), "dtype": "float32"},
                         "student_model": {"init": "random", "num_hidden_layers": 2, "hidden_size": 32}},
        "data": {"train": str(d / "train.npy"), "eval_fraction": 0.1},
        "training": {"output_dir": str(d / "unused"), "max_steps": 4, "batch_size": 8, "seq_len": 32,
                     "grad_accum_steps": 2, "compute_dtype": "float32"},
        "distillation_params": {"kd_weight": 1.0, "feature_weight": 1.0,
                                "eplb": {"enabled": True, "num_stages": 2, "stage_steps": 2}},
        "parallelism": {"fsdp": 4},
        "tracking": {"aim": False},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(text))
    return d / "c.yaml"


def dry_run(config, out, target, memory=None, extra=()):
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    env.pop("VISHWAM_DEVICE_MEMORY", None)
    if memory:
        env["VISHWAM_DEVICE_MEMORY"] = memory
    flags = [] if target is None else ["--training.compile-target", target]
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(config), "--training.dry-run",
                           "compile", *flags, "--training.output-dir", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_compile_dry_run_on_simulated_cpu_devices(config, tmp_path):
    out = tmp_path / "out"
    proc = dry_run(config, out, "cpu:4", memory="8GiB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["memory_plan.json"]  # nothing else written
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["target"] == "cpu:4" and plan["compiler"] == "XLA:CPU" and plan["capacity_bytes"] == 8 * 2**30
    assert set(plan["programs"]) == {"train", "eval", "eplb_probe"}
    for name, p in plan["programs"].items():
        assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"] - p["alias_bytes"]
        assert p["total_bytes"] > 0 and p["fits"] is True, name
    assert plan["programs"]["train"]["planner_bytes"] > 0


@pytest.mark.parametrize("loading", ["resident", "streamed"])
def test_pruning_programs_are_compiled(config, tmp_path, loading):
    """`init: from_teacher` adds its importance pass (the whole teacher, or one streamed group) and the slicing
    of the student; the slice's outputs are the student's leaves in the training state's dtype and sharding."""
    out = tmp_path / loading
    proc = dry_run(config, out, "cpu:4", memory="8GiB", extra=[
        "--distillation.student-model.init", "from_teacher", "--distillation.teacher-model.loading", loading])
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = json.loads((out / "memory_plan.json").read_text())["programs"]
    assert {"prune_importance", "prune_slice"} <= set(programs), set(programs)
    if loading == "streamed":  # a layer group's forward and the head over the step's hidden states
        assert {"streamed_group", "streamed_head"} <= set(programs), set(programs)
        # the head's output: the step's teacher logits, 8 rows x 32 x vocab 96 in fp32, rows over 4 devices
        assert programs["streamed_head"]["output_bytes"] >= 8 * 32 * 96 * 4 // 4
    student_fp32_bytes = 4 * sum(n for n in (96 * 32 * 2, 32, 2 * (32 * 32 * 2 + 2 * 16 * 32 + 3 * 48 * 32 + 32 +
                                                                 16 * 2 + 2 * 32)))
    # 4 devices, fsdp: each holds about a quarter of the student (small leaves replicated)
    assert programs["prune_slice"]["output_bytes"] < student_fp32_bytes / 2
    for name in ("prune_importance", "prune_slice"):
        assert programs[name]["fits"] is True and programs[name]["total_bytes"] > 0


def test_a_cached_teacher_compiles_its_cache_build(config, tmp_path):
    """`loading: cached`: the run builds a missing cache, so the cache build's program is compiled, its output the
    cache rows of one micro-batch (4 rows over 4 devices): top-k values, ids, tail and label log-probability, and
    the two mapped teacher layers' hidden states (feature matching on) in float32."""
    out = tmp_path / "cached"
    proc = dry_run(config, out, "cpu:4", memory="8GiB", extra=[
        "--distillation.teacher-model.loading", "cached", "--distillation.teacher-model.top-k", "8",
        "--distillation.teacher-model.cache-dir", str(tmp_path / "cache"),
        "--distillation-params.logit-chunk-size", "8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = json.loads((out / "memory_plan.json").read_text())["programs"]
    assert {"train", "eval", "cache_build"} <= set(programs) and "eplb_probe" not in programs, set(programs)
    rows, S, k, D = 4, 32, 8, 32
    per_token = 4 * k + 4 * k + 4 + 4 + 2 * D * 4
    tuple_table = 6 * 8  # XLA counts the 6 outputs' pointers in the output bytes
    assert programs["cache_build"]["output_bytes"] == rows * S * per_token // 4 + tuple_table
    assert programs["cache_build"]["fits"] is True


def test_cpu_estimates_are_reported_not_binding(config, tmp_path):
    out = tmp_path / "estimate"
    proc = dry_run(config, out, "cpu:4", memory="64KiB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["binding"] is False and plan["programs"]["train"]["fits"] is False
    assert "reported, not binding" in proc.stdout


def test_a_program_that_does_not_fit_is_one_line_naming_it(config, tmp_path):
    out = tmp_path / "tight"
    proc = dry_run(config, out, None, memory="64KiB", extra=["--parallelism.fsdp", "1"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    # XLA's own C++ diagnostics (glog lines such as an SPMD rematerialization warning) are the compiler's, not ours.
    lines = [line for line in proc.stderr.strip().splitlines() if not re.match(r"[IWE]\d{4} ", line)]
    assert len(lines) == 1 and lines[0].startswith("error: compiled program 'train' needs "), lines
    assert "MiB/device on local (XLA:CPU), a device holds 0.06 MiB" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["memory_plan.json"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu (the [tpu] extra) is not installed: the TPU compile is not checked here")
def test_compile_dry_run_for_a_tpu_topology(config, tmp_path):
    out = tmp_path / "tpu"
    proc = dry_run(config, out, "tpu:v5p-8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["compiler"] == "XLA:TPU" and plan["capacity_bytes"] == int(95.74 * 2**30)
    assert all(p["fits"] for p in plan["programs"].values())


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_evaluation_matches_a_numpy_reference(tmp_path, chunk_size):
    """Micro-batched evaluation (one program for every teacher kind) against float64 NumPy over the same tokens,
    with a partly filled last batch (masked rows); the logits all at once, and in chunks of 5 positions (not
    dividing the 12 of a window: the padded tail is left out)."""
    from models import ModelConfig

    t_cfg = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    teacher = init_model(t_cfg, key=jax.random.key(1))
    student = init_model(dataclasses.replace(t_cfg, num_hidden_layers=1), key=jax.random.key(2))
    rng = np.random.default_rng(0)
    data = PackedDataset(rng.integers(0, 48, 7 * 12 + 1).astype(np.int32), 12, name="data.eval")  # 7 windows
    mesh = make_mesh(1, 1, 1)
    result = evaluate(student, TeacherSource(teacher), data, step=3, batch_size=4, micro_batch_size=2, num_batches=2,
                      compute_dtype=jnp.float32, batch_sharding=batch_sharding(mesh), out_dir=tmp_path, log=print,
                      chunk_size=chunk_size)
    ids = data.windows[:, :-1]
    labels = data.windows[:, 1:]
    s = _np_log_softmax(np.asarray(student(jnp.asarray(ids)).logits, np.float64))
    t = _np_log_softmax(np.asarray(teacher(jnp.asarray(ids)).logits, np.float64))
    pick = lambda lp: -np.take_along_axis(lp, labels[..., None], -1)[..., 0]  # noqa: E731
    kl = (np.exp(t) * (t - s)).sum(-1)
    agree = s.argmax(-1) == t.argmax(-1)
    assert result["student_loss"] == pytest.approx(pick(s).mean(), rel=1e-5)
    assert result["teacher_loss"] == pytest.approx(pick(t).mean(), rel=1e-5)
    assert result["kl"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-6)
    assert result["top1_agreement"] == pytest.approx(agree.mean())
    assert result["student_ppl"] == pytest.approx(math.exp(result["student_loss"]))
    assert json.loads((tmp_path / "eval.json").read_text()) == result


def test_the_bytes_of_a_refused_tpu_program_are_read_from_xlas_message():
    from vishwam.compile.programs import _hbm_needed

    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
               "for HLO temporaries (126.58G) exceeds available HBM (95.73G). HLO module: jit_step_fn.")
    assert _hbm_needed(message) == int(126.58 * 2**30)
    assert _hbm_needed("Used 3.5M of 2M hbm") == int(3.5 * 2**20)
    assert _hbm_needed("some other failure") is None


def test_on_policy_generation_programs_are_compiled(config, tmp_path):
    """With on-policy distillation the student's prefill and decode programs are compiled for its rows (2 per
    micro-batch x 2 micro-batches) at the longest prompt allowed; the train state carries the rollout."""
    out = tmp_path / "on_policy"
    proc = dry_run(config, out, "cpu:4", memory="8GiB", extra=[
        "--distillation-params.on-policy.fraction", "0.5", "--distillation-params.on-policy.max-new-tokens", "8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = json.loads((out / "memory_plan.json").read_text())["programs"]
    assert {"train", "on_policy_prefill", "on_policy_decode"} <= set(programs), set(programs)
    for name in ("on_policy_prefill", "on_policy_decode"):
        assert programs[name]["fits"] is True and programs[name]["total_bytes"] > 0
    # decode's cache: 2 layers x 4 rows x 1 kv head (the student's) x (32 prompt slots + 7) x head_dim 16 x 2 (k, v)
    # fp32, donated and aliased: its argument bytes hold it (sharded over the 4 devices or not).
    cache = 2 * 4 * 1 * (32 + 7) * 16 * 2 * 4
    assert programs["on_policy_decode"]["alias_bytes"] >= cache / 4


def test_chat_data_programs_take_the_batches_the_run_feeds(config, tmp_path):
    """On chat data the loop's batches carry `segment_ids` and `loss_mask`; the dry run's abstract batches have
    the same keys, shapes and dtypes, so it compiles the program the run executes (text data: neither)."""
    from vishwam.compile.programs import AbstractRun
    from vishwam.compile.targets import resolve_target
    from vishwam.config.cli import load_config
    from vishwam.data import chat_rows as chat_data
    from vishwam.data.windows import batch_for_step

    demo = ROOT / "vishwam" / "assets" / "demo"
    chat = ["--data.train", str(demo / "chat_train.jsonl"), "--data.tokenizer", str(demo / "chat_teacher"),
            "--data.eval-fraction", "0"]
    for flags, packed in (([], False), (chat, True)):
        cfg = load_config(str(config), flags)
        run = AbstractRun(cfg, resolve_target("cpu:4", 4))
        if packed:
            train, _ = chat_data.load_chat_splits(cfg.data, seq_len=cfg.training.seq_len, tokenizer_path=str(
                demo / "chat_teacher"), eos_id=0, vocab_size=None, log=lambda _: None)
            real = batch_for_step(train, seed=0, step=0, batch_size=cfg.training.batch_size)
            real.pop("window")
            assert {k: (v.shape, str(v.dtype)) for k, v in real.items()} == {
                k: (v.shape, str(v.dtype)) for k, v in run.batch.items()}
        assert ({"segment_ids", "loss_mask"} <= set(run.batch)) is packed, sorted(run.batch)


def test_a_run_compiles_its_programs_before_reading_a_weight(config, tmp_path, monkeypatch):
    """`training.compile_check: on`: a program XLA says does not fit stops the run with the dry run's one line
    before the teacher is opened and before output_dir exists; when everything fits the run goes on."""
    from vishwam.config.cli import load_config
    from vishwam.errors import ConfigError
    from vishwam.run import loop

    real_open = loop.Run.open_teacher
    opened = []
    monkeypatch.setattr(loop.Run, "open_teacher", lambda self: opened.append(1) or real_open(self))
    out = tmp_path / "out"
    flags = ["--training.compile-check", "on", "--training.output-dir", str(out), "--training.max-steps", "1"]
    monkeypatch.setenv("VISHWAM_DEVICE_MEMORY", "1MiB")
    with pytest.raises(ConfigError, match=r"compiled program '\w+' needs .* [GM]iB/device on local \(XLA:CPU\), a "
                                          r"device holds 1\.00 MiB"):
        loop.Run(load_config(str(config), flags)).train()
    assert not opened and not out.exists()
    monkeypatch.setenv("VISHWAM_DEVICE_MEMORY", "8GiB")
    result = loop.Run(load_config(str(config), flags)).train()
    assert opened and result["state"].step == 1 and not (out / "memory_plan.json").exists()


def test_the_compile_checks_compiles_are_the_runs(config, tmp_path, monkeypatch, caplog):
    """Through XLA's compilation cache (`training.compilation_cache`) each program is compiled once: what the
    compile check compiled from abstract shapes is read back when the run calls it on its arrays (the train step,
    evaluation), so the check costs no second compile, however short its compile (the run sets JAX's
    `jax_persistent_cache_min_compile_time_secs` to 0). JAX's cache settings are put back when the run ends."""
    import logging

    from vishwam.config.cli import load_config
    from vishwam.run import loop

    cache = tmp_path / "xla"
    flags = ["--training.compile-check", "on", "--training.compilation-cache", str(cache), "--training.output-dir",
             str(tmp_path / "out"), "--training.max-steps", "1"]
    monkeypatch.setenv("VISHWAM_DEVICE_MEMORY", "8GiB")
    caplog.set_level(logging.DEBUG, logger="jax._src.compiler")
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    assert min_seconds > 0  # JAX's default: the tiny programs, compiled in under 1 s, would not be cached
    result = loop.Run(load_config(str(config), flags)).train()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == min_seconds
    compiled = collections.Counter(r.args[0] for r in caplog.records if "seconds to compile" in str(r.msg))
    read_back = {r.args[0] for r in caplog.records if str(r.msg).startswith("Persistent compilation cache hit")}
    # The step is a new jitted function in the run (read back from the cache); evaluation's is the same function
    # the check compiled (JAX's in-memory cache serves it; not at all if an earlier test in this process did).
    assert compiled["jit_step_fn"] == 1 and compiled["jit_eval_sums"] <= 1, compiled
    assert "jit_step_fn" in read_back, read_back
    use = result["compilation_cache"]
    assert use.directory == cache and use.hits >= 1 and use.requests > use.hits and any(cache.iterdir())
    assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_evaluation_of_streamed_and_cached_teachers_matches_numpy(chunk_size):
    """The evaluation program with the teacher's outputs handed in: full logits (a streamed teacher) and a top-k
    cache (its KL is that of the collapsed top-k + tail distributions), against float64 NumPy, with masked tokens."""
    from distill.logits import teacher_topk
    from distill.objective import TeacherOutputs
    from models import ModelConfig
    from vishwam.train.evaluation import eval_sums

    V, k = 48, 6
    cfg = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    student = init_model(cfg, key=jax.random.key(2))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, 12)).astype(np.int32)
    labels = rng.integers(0, V, (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[2, 7:] = 0
    t_logits = rng.normal(0, 2, (3, 12, V)).astype(np.float32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "mask": jnp.asarray(mask)}
    s = _np_log_softmax(np.asarray(student(jnp.asarray(ids)).logits, np.float64))
    t = _np_log_softmax(t_logits.astype(np.float64))
    m = mask.astype(bool)
    pick = lambda lp: -np.take_along_axis(lp, labels[..., None], -1)[..., 0]  # noqa: E731

    dense = eval_sums(None, student, batch, TeacherOutputs(logits=jnp.asarray(t_logits)), compute_dtype=jnp.float32,
                      chunk_size=chunk_size)
    assert float(dense["tokens"]) == m.sum()
    assert float(dense["student_nll"]) == pytest.approx(pick(s)[m].sum(), rel=1e-5)
    assert float(dense["teacher_nll"]) == pytest.approx(pick(t)[m].sum(), rel=1e-5)
    assert float(dense["kl"]) == pytest.approx((np.exp(t) * (t - s)).sum(-1)[m].sum(), rel=1e-4)
    assert float(dense["agree"]) == (s.argmax(-1) == t.argmax(-1))[m].sum()

    values, indices, tail = teacher_topk(jnp.asarray(t_logits), k)
    label_logprob = -pick(t).astype(np.float32)
    cached = eval_sums(None, student, batch, TeacherOutputs(topk_values=values, topk_indices=indices,
                                                             tail_logsumexp=tail,
                                                             label_logprob=jnp.asarray(label_logprob)),
                       compute_dtype=jnp.float32, chunk_size=chunk_size)
    top = np.argsort(-t_logits, -1)[..., :k]
    p = np.concatenate([np.take_along_axis(t, top, -1), np.log1p(-np.exp(np.take_along_axis(t, top, -1)).sum(-1,
                        keepdims=True).clip(max=1 - 1e-12))], -1)
    q_top = np.take_along_axis(s, top, -1)
    q = np.concatenate([q_top, np.log1p(-np.exp(q_top).sum(-1, keepdims=True))], -1)
    collapsed_kl = (np.exp(p) * (p - q)).sum(-1)
    assert float(cached["student_nll"]) == pytest.approx(pick(s)[m].sum(), rel=1e-5)
    assert float(cached["teacher_nll"]) == pytest.approx(pick(t)[m].sum(), rel=1e-5)
    assert float(cached["kl"]) == pytest.approx(collapsed_kl[m].sum(), rel=1e-4)
    assert float(cached["agree"]) == (s.argmax(-1) == top[..., 0])[m].sum()


def _mlp_rows_per_device(config, program, flags=()):
    """The row counts of the `[rows, 32, 48]` float32 buffers (the MLP's activations) in `program` compiled from
    the dry run's abstract inputs on 4 CPU devices (a subprocess: the tests' type checks do not take abstract
    models)."""
    script = f"""
import re
from vishwam.compile.targets import configure_process
configure_process("cpu:4")
from vishwam.config.cli import load_config
from vishwam.compile.programs import AbstractRun
from vishwam.compile.targets import resolve_target
cfg = load_config({str(config)!r}, {list(flags)!r})
fn, args, kwargs = AbstractRun(cfg, resolve_target("cpu:4", 4)).programs()[{program!r}]
print(sorted(set(re.findall(r"f32\\[(\\d+),32,48\\]", fn.lower(*args, **kwargs).compile().as_text()))))
"""
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_the_train_step_keeps_each_row_on_its_device(config):
    """The models' hidden states keep their rows on the batch axes: in the compiled train step (4 devices, micro-
    batches of 4 rows) the MLP's [rows, seq, 48] activations hold 1 row a device. Left to XLA, they followed the
    embedding table's fsdp-split hidden axis and every device ran all 4 rows."""
    assert _mlp_rows_per_device(config, "train") == "['1']"


def test_pruning_importance_and_the_eplb_probe_keep_each_row_on_their_device(config):
    """The importance pass over its 8 probe rows and the EPLB probe over its 8 (256 tokens) on 4 devices keep the
    hidden states' rows on the batch axes: the MLP's [rows, seq, 48] activations hold 2 rows a device (all 8
    without the constraint)."""
    prune = ["--distillation.student-model.init", "from_teacher"]
    assert _mlp_rows_per_device(config, "prune_importance", prune) == "['2']"
    assert _mlp_rows_per_device(config, "eplb_probe", ["--distillation-params.eplb.probe-tokens", "256"]) == "['2']"


def test_on_policy_prefill_keeps_each_row_on_its_device(config):
    """The student's prefill of its on-policy prompts (4 rows over 4 devices) keeps the hidden states' rows with
    the cache's: the MLP's [rows, prompt, 48] activations hold 1 row a device (all 4 without the constraint)."""
    flags = ["--distillation-params.on-policy.fraction", "0.5", "--distillation-params.on-policy.max-new-tokens", "8"]
    assert _mlp_rows_per_device(config, "on_policy_prefill", flags) == "['1']"


def test_downstream_scoring_is_compiled_and_keeps_each_row_on_its_device(config, tmp_path):
    """`training.downstream.tasks` adds the scoring of lm-eval requests at the micro-batch's shape, the student's and
    a resident teacher's (the tasks themselves are not read to compile); the student's keeps the rows on the batch
    axes: its MLP's [rows, seq, 48] activations hold 1 of the micro-batch's 4 rows a device."""
    out = tmp_path / "downstream"
    flags = ["--training.downstream.tasks", "demo_arithmetic"]
    proc = dry_run(config, out, "cpu:4", memory="8GiB", extra=flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = json.loads((out / "memory_plan.json").read_text())["programs"]
    assert {"downstream", "downstream_teacher"} <= set(programs), set(programs)
    for name in ("downstream", "downstream_teacher"):
        p = programs[name]
        assert p["fits"] is True and p["planner_bytes"] > 0
        # out: each row's per-segment sums (float32) and greedy flags (bool), 4 rows of 32 over 4 devices
        assert p["output_bytes"] >= 4 * 32 * (4 + 1) // 4
    assert _mlp_rows_per_device(config, "downstream", flags) == "['1']"


def test_a_diverged_students_eval_json_is_strict_json(tmp_path):
    """A student whose weights went NaN evaluates to NaN losses; `eval.json` holds them as null (strict JSON, which
    `json.loads(..., parse_constant=...)` refusing NaN reads), not as a bare NaN."""
    from models import ModelConfig

    cfg = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    teacher = init_model(cfg, key=jax.random.key(1))
    student = jax.tree.map(lambda x: x * jnp.nan if eqx.is_inexact_array(x) else x, init_model(cfg, key=jax.random.key(2)))
    data = PackedDataset(np.arange(2 * 13, dtype=np.int32) % 48, 12, name="data.eval")
    result = evaluate(student, TeacherSource(teacher), data, step=1, batch_size=2, micro_batch_size=2, num_batches=1,
                      compute_dtype=jnp.float32, batch_sharding=batch_sharding(make_mesh(1, 1, 1)), out_dir=tmp_path,
                      log=print)
    assert math.isnan(result["student_loss"])

    def refuse(constant):
        raise ValueError(f"bare {constant} in eval.json")

    written = json.loads((tmp_path / "eval.json").read_text(), parse_constant=refuse)
    assert written["student_loss"] is None and written["teacher_loss"] == pytest.approx(result["teacher_loss"])
