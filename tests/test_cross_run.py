"""A cross-tokenizer run through run.py's code path: the demo teacher (its own 512-id tokenizer) into a student with
the pysrc tokenizer (2,048-id byte-level BPE). Its data is a `cross` token store, its student starts from the
pruned teacher with FVT embeddings, it evaluates in bits per byte, resumes bitwise, writes samples with each model's
own tokenizer, and exports the student with the student's tokenizer, which `vishwam.generate` then reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import demo_slice
from tokenizers import Tokenizer

from models import init_model
from vishwam.config.cli import load_config
from vishwam.data.cross.vocab_transfer import fvt_embeddings, fvt_sources
from vishwam.data.text import load_tokenizer
from vishwam.run.cross_tokenizer import fvt_student

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "vishwam" / "assets" / "demo" / "teacher"
STUDENT_TOK = ROOT / "benchmarks" / "assets" / "pysrc" / "teacher"


TASKS = ROOT / "vishwam" / "assets" / "demo" / "tasks"
DOWNSTREAM = ("--training.downstream.tasks", "demo_arithmetic", "demo_ppl", "--training.downstream.include-path",
              str(TASKS), "--training.downstream.limit", "4")


def _flags(out: Path, *extra: str) -> list[str]:
    return ["--distillation.student-model.tokenizer", str(STUDENT_TOK), "--training.max-steps", "4",
            "--training.eval-every", "2", "--training.eval-batches", "1", "--training.save-every", "2",
            "--training.batch-size", "4", "--training.seq-len", "32", "--tracking.aim", "false",
            "--distillation-params.ce-weight", "1", "--distillation-params.shared-kl-weight", "1",
            "--data.train", str(out.parent / "train.jsonl"), "--data.eval", str(out.parent / "eval.jsonl"),
            "--data.store-dir", str(out.parent / "store"), "--training.output-dir", str(out), *extra]


def _run(out: Path, *extra: str, on_step=None) -> dict:
    from vishwam.run.loop import Run

    run = Run(load_config(str(ROOT / "configs" / "distill.yaml"), _flags(out, *extra)))
    run.on_step = on_step
    return run.train()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("xrun")
    demo_slice(root)  # the run reads a few windows; a cached teacher caches them all
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        result = _run(root / "full", "--training.sample-prompts", "12 + 7 =", *DOWNSTREAM)
    finally:
        os.chdir(cwd)
    return root, result


def test_the_run_evaluates_in_bits_per_byte_and_exports_the_students_tokenizer(finished):
    root, result = finished
    out = root / "full"
    ev = json.loads((out / "eval.json").read_text())
    assert ev == result["eval"] and ev["step"] == 4
    assert 0 < ev["teacher_bpb"] < ev["student_bpb"] < 64 and ev["chunks"] > 0 and ev["chunk_kl"] >= 0
    student = out / "student"
    assert (student / "tokenizer.json").read_bytes() == (STUDENT_TOK / "tokenizer.json").read_bytes()
    config = json.loads((student / "config.json").read_text())
    tok = Tokenizer.from_file(str(STUDENT_TOK / "tokenizer.json"))
    assert config["vocab_size"] == tok.get_vocab_size() == 2048
    assert config["eos_token_id"] == tok.token_to_id("<|endoftext|>") and config["pad_token_id"] == tok.token_to_id(
        "<|pad|>")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert {"distill/alm", "distill/shared_kl", "distill/ce"} <= set().union(*map(set, metrics))


def test_samples_use_each_models_own_tokenizer(finished):
    root, _ = finished
    rows = [json.loads(line) for line in (root / "full" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    # The teacher's continuation is transformers' greedy one with the teacher's own tokenizer (not its ids read
    # through the student's tokenizer); the student's is text of the student's tokenizer.
    from hf_fixtures import hf_greedy_completions

    config = json.loads((DEMO_TEACHER / "config.json").read_text())
    expect = hf_greedy_completions(DEMO_TEACHER, DEMO_TEACHER, ["12 + 7 ="], 48, eos_token_id=config["eos_token_id"])
    assert rows[0]["teacher"] == expect[0] and rows[1]["teacher"] == expect[0]
    student = load_tokenizer(str(STUDENT_TOK))
    assert rows[1]["student"] and student.decode(student.encode(rows[1]["student"]).ids) == rows[1]["student"]


def test_the_exported_student_generates_with_its_own_tokenizer(finished):
    root, _ = finished
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vishwam.generate", "--model", str(root / "full" / "student"),
                           "--prompt", "def f(x):", "--max-new-tokens", "4"], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "def f(x):" in proc.stdout


def test_an_interrupted_cross_run_resumes_bitwise(finished, monkeypatch):
    root, full = finished
    monkeypatch.chdir(ROOT)

    class Stop(Exception):
        pass

    def stop_at_3(step, state):
        if step == 3:
            raise Stop

    cut = root / "cut"
    with pytest.raises(Stop):
        _run(cut, "--training.sample-prompts", "12 + 7 =", on_step=stop_at_3)
    resumed = _run(cut, "--training.sample-prompts", "12 + 7 =")
    for a, b in zip(jax.tree.leaves(eqx.filter(full["state"], eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed["state"], eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The full run also scored downstream tasks at its end; the loss and byte figures must agree bitwise.
    full_eval = json.loads((root / "full" / "eval.json").read_text())
    assert {"downstream", "teacher_downstream"} <= set(full_eval)
    full_eval = {k: v for k, v in full_eval.items() if k not in ("downstream", "teacher_downstream")}
    assert json.loads((cut / "eval.json").read_text()) == full_eval


def test_fvt_student_gives_the_students_vocabulary_the_teachers_mean_rows(tmp_path):
    from vishwam.io.checkpoint import load_pretrained

    teacher = load_pretrained(str(DEMO_TEACHER), dtype=jnp.float32)
    cfg = load_config(str(ROOT / "configs" / "distill.yaml"), ["--distillation.student-model.tokenizer",
                                                              str(STUDENT_TOK)])
    student_config = teacher.config.replace(vocab_size=2048, tie_word_embeddings=teacher.config.tie_word_embeddings)
    out = fvt_student(teacher, student_config, cfg, DEMO_TEACHER)
    sources = fvt_sources(load_tokenizer(str(STUDENT_TOK)), load_tokenizer(str(DEMO_TEACHER)), 2048,
                          teacher.config.vocab_size)
    rows = np.asarray(teacher.model.embed_tokens.weight)
    np.testing.assert_array_equal(np.asarray(out.model.embed_tokens.weight), fvt_embeddings(rows, sources))
    some = next(i for i, s in enumerate(sources) if len(s) > 1)
    np.testing.assert_allclose(np.asarray(out.model.embed_tokens.weight[some]), rows[sources[some]].mean(0),
                               rtol=1e-6)
    if teacher.lm_head is not None:
        np.testing.assert_array_equal(np.asarray(out.lm_head.weight),
                                      fvt_embeddings(np.asarray(teacher.lm_head.weight), sources))
    assert out.config.vocab_size == 2048
    np.testing.assert_array_equal(np.asarray(out.model.layers.mlp.down_proj.weight),
                                  np.asarray(teacher.model.layers.mlp.down_proj.weight))
    logits = out(jnp.asarray([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 2048) and bool(jnp.all(jnp.isfinite(logits)))
    assert eqx.tree_equal(jax.tree.structure(out), jax.tree.structure(
        eqx.filter_eval_shape(init_model, student_config, key=jax.random.key(0))))


@pytest.mark.parametrize("loading", ["streamed", "cached"])
def test_streamed_and_cached_teachers_give_the_resident_teachers_figures(finished, loading, monkeypatch):
    """A streamed teacher (its token log-probabilities computed group by group ahead of the step) and a cached one
    (a cache of the teacher's side of each window, its label log-probabilities the one float per token the step
    needs) evaluate the teacher on the same windows as the resident run: the same bits per byte and chunks."""
    root, full = finished
    monkeypatch.chdir(ROOT)
    out = root / loading
    extra = ["--distillation.teacher-model.loading", loading, "--distillation-params.shared-kl-weight", "0",
             "--training.max-steps", "2"]
    if loading == "cached":
        extra += ["--distillation.teacher-model.cache-dir", str(root / "cache")]
    result = _run(out, *extra)
    ev, ref = result["eval"], full["eval"]
    assert ev["teacher_bpb"] == pytest.approx(ref["teacher_bpb"], rel=2e-6)
    assert ev["teacher_loss"] == pytest.approx(ref["teacher_loss"], rel=2e-6)
    assert ev["chunks"] == ref["chunks"] and np.isfinite(ev["student_bpb"])
    if loading == "cached":
        index = json.loads((root / "cache" / "train" / "index.json").read_text())
        assert index["seq_len"] == 40 and index["vocab_size"] == 512  # the teacher's side: 5/4 of 32, its vocabulary
        # `python -m vishwam.cache` builds the cache of the same fingerprint (the teacher's side of the windows)
        from vishwam.cache import main as cache_main

        assert cache_main(["--config", str(ROOT / "configs" / "distill.yaml"), *_flags(out, *extra)]) == 0
        assert json.loads((root / "cache" / "train" / "index.json").read_text())["fingerprint"] == index["fingerprint"]


def test_lm_eval_scores_each_model_with_its_own_tokenizer(finished, tmp_path, monkeypatch):
    """The run's last downstream scores are `python -m vishwam.evaluate`'s on the exported student (whose
    directory holds the student's tokenizer) and, for `teacher_downstream`, on the teacher's own directory, on the
    same documents at the run's length: each model was scored with its own tokenizer."""
    from vishwam.downstream.tasks import load_tasks, subset
    from vishwam.evaluate import main as evaluate_main

    root, _ = finished
    monkeypatch.chdir(ROOT)
    last = json.loads((root / "full" / "downstream.jsonl").read_text().splitlines()[-1])
    names = ["demo_arithmetic", "demo_ppl"]
    chosen = subset(load_tasks(names, include_path=str(TASKS))[0]["tasks"], 4, 1234)
    for who, model in (("student", root / "full" / "student"), ("teacher", DEMO_TEACHER)):
        out = tmp_path / f"{who}.json"
        assert evaluate_main(["--model", str(model), "--tasks", ",".join(names), "--include-path", str(TASKS),
                              "--samples", json.dumps(chosen), "--max-length", "32", "--out", str(out)]) == 0
        results = json.loads(out.read_text())["results"]
        assert last[who], who
        for task, metrics in last[who].items():
            for metric, value in metrics.items():
                assert results[task][f"{metric},none"] == pytest.approx(value, rel=1e-5), (who, task, metric)


def test_a_cache_without_the_teachers_side_is_refused(finished, monkeypatch):
    """A teacher cache built for a same-tokenizer run (rows of the teacher's ids as the run's windows, not the
    teacher's side of cross windows) is not read by a cross-tokenizer run: one error naming the cache."""
    from vishwam.errors import DataError
    from vishwam.run.loop import Run

    root, _ = finished
    monkeypatch.chdir(ROOT)
    cache = root / "same_tok_cache"
    same = ["--training.max-steps", "1", "--training.batch-size", "4", "--training.seq-len", "32",
            "--tracking.aim", "false", "--distillation.teacher-model.loading", "cached",
            "--distillation.teacher-model.cache-dir", str(cache), "--data.store-dir", str(root / "same_store"),
            "--data.train", str(root / "train.jsonl"), "--data.eval", str(root / "eval.jsonl"),
            "--training.output-dir", str(root / "same_out")]
    Run(load_config(str(ROOT / "configs" / "distill.yaml"), same)).train()
    with pytest.raises(DataError, match=rf"teacher cache {cache}/train .*(data|seq_len)"):
        _run(root / "cross_on_same_cache", "--distillation.teacher-model.loading", "cached",
             "--distillation.teacher-model.cache-dir", str(cache), "--distillation-params.shared-kl-weight", "0",
             "--training.max-steps", "1")
