"""Downstream evaluation: lm-eval tasks scored by vishwam equal lm-eval's own `hf` backend (transformers) to the
item, from the command line and in a run; a run's downstream metrics resume exactly; bad input is one line.

The tasks are the demo domain's (`vishwam/assets/demo/tasks`, `scripts/make_downstream_tasks.py`): three multiple
choice tasks and a perplexity task (`loglikelihood_rolling`), plus a generation task written here. The models are
the demo teacher and a student exported by a short run (`finished`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from lm_eval.tasks import TaskManager

from models import ModelConfig, init_model
from vishwam.config.cli import load_config
from vishwam.downstream.packing import first_fit
from vishwam.downstream.scoring import Scorer
from vishwam.downstream.tasks import load_tasks, subset
from vishwam.downstream.tokens import ScoredRequest, rolling_windows
from vishwam.errors import ConfigError, DataError
from vishwam.evaluate import main as evaluate_main
from vishwam.run.loop import Run
from vishwam.sharding import make_mesh, shard_tree

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vishwam" / "assets" / "demo" / "teacher"
TASKS = ROOT / "vishwam" / "assets" / "demo" / "tasks"
MULTIPLE_CHOICE = ["demo_arithmetic", "demo_story_sums", "demo_counting"]
GENERATE = """task: demo_arithmetic_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: vishwam/assets/demo/tasks/demo_arithmetic.test.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{question}}"
doc_to_target: "{{' ' + choices[answer]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


# ------------------------------------------------------------------------------------------------ the pieces


def test_rolling_windows_are_lm_evals():
    for n, length in [(1, 4), (4, 4), (5, 4), (9, 4), (23, 5), (40, 8)]:
        tokens = list(range(10, 10 + n))
        theirs = [lm_eval.utils.make_disjoint_window(w)
                  for w in lm_eval.utils.get_rolling_token_windows(tokens, 0, length, 1)]
        assert rolling_windows(tokens, 0, length) == [tuple(map(list, w)) for w in theirs]


def test_requests_are_truncated_on_the_left_as_lm_eval_does():
    r = ScoredRequest.of([1, 2, 3, 4, 5], [6, 7], max_length=4)  # (ctx + cont)[-(4 + 1):][:-1]
    assert (r.tokens, r.targets, r.scored, r.truncated) == ((3, 4, 5, 6), (4, 5, 6, 7), 2, True)
    r = ScoredRequest.of([1], [2, 3], max_length=8)
    assert (r.tokens, r.targets, r.scored, r.truncated) == ((1, 2), (2, 3), 2, False)
    with pytest.raises(DataError, match="empty continuation"):
        ScoredRequest.of([1], [], max_length=8)


def test_first_fit_packs_every_request_whole_in_order_of_size():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 17, 200)]
    placed = first_fit(lengths, 16)
    rows: dict[int, list[tuple[int, int]]] = {}
    for n, (row, start) in zip(lengths, placed):
        rows.setdefault(row, []).append((start, start + n))
    for spans in rows.values():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] <= 16
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # back to back, no overlap
    # First fit, longest first: each goes into the first row with room for it (a plain scan over the rows).
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), len(room))
        room += [16] * (row == len(room))
        assert placed[i] == (row, 16 - room[row])
        room[row] -= lengths[i]
    assert len(rows) == max(rows) + 1 <= 11 / 9 * -(-sum(lengths) // 16) + 1  # first-fit decreasing's bound


def _requests(rng, n, vocab, longest):
    out = []
    for _ in range(n):
        context = [int(t) for t in rng.integers(0, vocab, int(rng.integers(1, longest - 4)))]
        continuation = [int(t) for t in rng.integers(0, vocab, int(rng.integers(1, 4)))]
        out.append(ScoredRequest.of(context, continuation, max_length=longest))
    return out


def test_packed_scores_equal_each_request_scored_alone_and_numpy():
    """Packed rows (segments, restarting positions) give each request the score it gets alone in a row of its own,
    on one device and with rows and weights split over a 2 x 2 (data, fsdp) mesh; and both are NumPy's sums of
    the full logits' log-softmax at the targets, with the argmax test."""
    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True)
    model = init_model(config, key=jax.random.key(0))
    requests = _requests(np.random.default_rng(1), 24, 64, 20)
    packed = Scorer(rows=4, seq_len=32, compute_dtype=jnp.float32, chunk_size=8).score(model, requests)
    sharded = Scorer(rows=4, seq_len=32, compute_dtype=jnp.float32, mesh=make_mesh(data=2, fsdp=2)).score(
        shard_tree(model, make_mesh(data=2, fsdp=2)), requests)
    alone = Scorer(rows=1, seq_len=20, compute_dtype=jnp.float32)
    forward = jax.jit(lambda m, ids, mask: m(ids, attention_mask=mask).logits)  # right-padded: as if unpadded
    for r, a, b in zip(requests, packed, sharded):
        (single,) = alone.score(model, [r])
        ids, mask = np.zeros((1, 20), np.int32), np.zeros((1, 20), bool)
        ids[0, :len(r)], mask[0, :len(r)] = r.tokens, True
        logits = np.asarray(forward(model, ids, mask)[0, :len(r)], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        tail = slice(len(r) - r.scored, len(r))
        targets = np.asarray(r.targets)[tail]
        expected = logp[tail][np.arange(r.scored), targets].sum()
        greedy = bool((logits[tail].argmax(-1) == targets).all())
        for got in (a, b, single):
            assert got[0] == pytest.approx(expected, rel=1e-5, abs=1e-5) and got[1] == greedy


# ------------------------------------------------------------------------------------------ a run, and resume


def _run_config(out: Path, *extra: str):
    return load_config(str(ROOT / "configs" / "distill.yaml"), [
        "--training.output-dir", str(out), "--training.max-steps", "4", "--training.eval-every", "1",
        "--training.save-every", "2", "--training.eval-batches", "1", "--training.batch-size", "4",
        "--training.seq-len", "64", "--tracking.aim", "false",
        "--training.downstream.tasks", "demo_arithmetic", "demo_recall", "demo_ppl",
        "--training.downstream.include-path", str(TASKS.relative_to(ROOT)), "--training.downstream.limit", "6",
        *extra])


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step demo run (rows of 64 tokens) scoring three tasks (6 seeded documents each) at every evaluation,
    Aim on; its log is `finished / "log.txt"`."""
    old = os.getcwd()
    os.chdir(ROOT)
    log = io.StringIO()
    try:
        out = tmp_path_factory.mktemp("downstream") / "run"
        with contextlib.redirect_stderr(log):
            Run(_run_config(out, "--tracking.aim", "true")).train()
    finally:
        os.chdir(old)
    (out.parent / "log.txt").write_text(log.getvalue())
    return out


def test_a_run_scores_its_tasks_at_every_evaluation(finished):
    rows = [json.loads(line) for line in (finished / "downstream.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(r["student"]) == set(r["teacher"]) == {"demo_arithmetic", "demo_recall", "demo_ppl"}
        assert set(r["student"]["demo_arithmetic"]) == set(r["student"]["demo_recall"]) == {"acc", "acc_norm"}
        assert set(r["student"]["demo_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
        assert r["teacher"] == rows[0]["teacher"]  # scored once
    assert rows[0]["student"] != rows[-1]["student"]
    result = json.loads((finished / "eval.json").read_text())
    assert result["step"] == 4 and result["downstream"] == rows[-1]["student"]
    assert result["teacher_downstream"] == rows[-1]["teacher"] and "student_loss" in result
    # The teacher beats the 4-step student on the demo domain's perplexity.
    assert rows[-1]["teacher"]["demo_ppl"]["bits_per_byte"] < rows[-1]["student"]["demo_ppl"]["bits_per_byte"]
    import aim
    from aim.sdk.index_manager import RepoIndexManager

    repo = aim.Repo(str(finished))
    RepoIndexManager.get_index_manager(repo).index(repo.list_all_runs()[0])
    names = {m.name for m in next(iter(repo.iter_runs())).metrics()}
    assert {"downstream.demo_arithmetic.acc", "downstream.demo_ppl.bits_per_byte",
            "downstream_teacher.demo_arithmetic.acc_norm"} <= names
    log = (finished.parent / "log.txt").read_text()
    assert "downstream: 3 lm-eval tasks, 18 documents, 54 requests at each evaluation (every evaluation)" in log
    assert "downstream @ 4: demo_arithmetic acc " in log and "(teacher " in log


def test_requests_longer_than_seq_len_are_truncated_and_logged(finished):
    """The story-recall prompts (70 to 95 tokens) do not fit rows of 64: the run says how many of each task's
    requests are cut on the left, as lm-eval cuts them at max_length, and scores them (the command line cuts them
    alike: `test_the_runs_scores_equal_the_command_line_on_the_exported_student`)."""
    log = (finished.parent / "log.txt").read_text()
    assert "downstream: 24 of 24 requests of task demo_recall are longer than training.seq_len 64 tokens: they are " \
           "truncated on the left, as lm-eval truncates at max_length 64" in log
    assert "requests of task demo_arithmetic" not in log and "requests of task demo_ppl" not in log


def test_an_interrupted_run_resumes_its_downstream_metrics_exactly(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    run = Run(_run_config(out))

    def kill(step, state):
        if step == 3:  # scored at 3; the last checkpoint is at 2
            raise Killed

    run.on_step = kill
    with pytest.raises(Killed):
        run.train()
    assert [json.loads(line)["step"] for line in (out / "downstream.jsonl").read_text().splitlines()] == [1, 2, 3]
    Run(_run_config(out)).train()  # resumes at 2: the line of step 3 is dropped, then 3 and 4 are scored again
    assert (out / "downstream.jsonl").read_text() == (finished / "downstream.jsonl").read_text()
    assert (out / "eval.json").read_text() == (finished / "eval.json").read_text()
    Run(_run_config(out)).train()  # finished: its last evaluation again, its downstream line as it was
    assert (out / "downstream.jsonl").read_text() == (finished / "downstream.jsonl").read_text()
    assert (out / "eval.json").read_text() == (finished / "eval.json").read_text()


def test_the_runs_scores_equal_the_command_line_on_the_exported_student(finished, tmp_path, monkeypatch):
    """`python -m vishwam.evaluate` on the run's exported student, on the run's documents (`--samples`) and at its
    max_length (training.seq_len), gives the run's last scores: the training loop's packing at the micro-batch
    shape and the command line's are the same numbers."""
    monkeypatch.chdir(ROOT)
    last = json.loads((finished / "downstream.jsonl").read_text().splitlines()[-1])

    names = ["demo_arithmetic", "demo_recall", "demo_ppl"]
    chosen = subset(load_tasks(names, include_path=str(TASKS))[0]["tasks"], 6, 1234)
    out = tmp_path / "student.json"
    assert evaluate_main(["--model", str(finished / "student"), "--tasks", ",".join(names),
                          "--include-path", str(TASKS), "--samples", json.dumps(chosen), "--max-length",
                          "64", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for task, metrics in last["student"].items():
        for metric, value in metrics.items():
            assert results[task][f"{metric},none"] == pytest.approx(value, rel=1e-5), (task, metric)


# ------------------------------------------------------------------------------------------------ parity


def _hf(model_dir: Path, include: Path, tasks: list[str], shots: int, limit: int) -> dict:
    """lm-eval's own `hf` backend (transformers) on the same tasks, as its command line runs it."""
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                                   num_fewshot=shots, limit=limit, batch_size=8, device="cpu", log_samples=True,
                                   task_manager=TaskManager(include_path=str(include), include_defaults=False))


def _ours(model_dir: Path, include: Path, tasks: list[str], shots: int, limit: int, out: Path) -> tuple[dict, dict]:
    assert evaluate_main(["--model", str(model_dir), "--tasks", ",".join(tasks), "--include-path", str(include),
                          "--num-fewshot", str(shots), "--limit", str(limit), "--batch-size", "4", "--log-samples",
                          "--out", str(out)]) == 0
    samples = {t: [json.loads(line) for line in out.with_name(f"{out.stem}_samples_{t}.jsonl").read_text().splitlines()]
               for t in tasks}
    return json.loads(out.read_text()), samples


def _responses(row: dict, kind: str) -> tuple[list, list]:
    """A sample's requests (their text) and responses as Python values, from lm-eval's in-memory form or its saved
    one (arguments as `gen_args_i.arg_j`, responses as strings)."""
    args = row["arguments"]
    args = [tuple(a.values()) for a in args.values()] if isinstance(args, dict) else [tuple(a) for a in args]
    if kind == "generate":
        args = [a[:1] for a in args]  # the context (the generation kwargs are the task's)
    resps = []
    for (r,) in row["resps"]:
        if kind == "loglikelihood":
            resps.append((float(r[0]), str(r[1]) == "True"))
        else:
            resps.append(float(r) if kind == "rolling" else str(r))
    return args, resps


@pytest.mark.parametrize("model,shots", [("teacher", 0), ("teacher", 2), ("student", 0), ("student", 2)])
def test_scores_equal_lm_evals_hf_backend(model, shots, finished, tmp_path, monkeypatch):
    """Per task, `acc` and `acc_norm` equal lm-eval `hf`'s, and each request's log-likelihood is within 1e-4
    relative of it (float32), its greedy flag the same: three multiple-choice tasks 0-shot and 2-shot, the
    perplexity task (its metrics too), and (teacher, 0-shot) greedy generation. The requests are lm-eval's: a
    2-shot context joins its examples with the few-shot delimiter and every continuation starts with the target
    delimiter, so changing either breaks this test."""
    monkeypatch.chdir(ROOT)
    include = tmp_path / "tasks"
    include.mkdir()
    for name in [*MULTIPLE_CHOICE, "demo_ppl"]:
        shutil.copy(TASKS / f"{name}.yaml", include)
    tasks = [*MULTIPLE_CHOICE, "demo_ppl"]
    if (model, shots) == ("teacher", 0):
        (include / "demo_arithmetic_gen.yaml").write_text(GENERATE)
        tasks.append("demo_arithmetic_gen")
    model_dir = TEACHER if model == "teacher" else finished / "student"
    theirs = _hf(model_dir, include, tasks, shots, limit=8)
    ours, samples = _ours(model_dir, include, tasks, shots, limit=8, out=tmp_path / "ours.json")
    kinds = {"demo_ppl": "rolling", "demo_arithmetic_gen": "generate"}
    for task in tasks:
        kind = kinds.get(task, "loglikelihood")
        mine, ref = ours["results"][task], theirs["results"][task]
        assert ours["n-samples"][task] == theirs["n-samples"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in ref:
                assert mine[metric] == ref[metric], (task, metric)
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            if metric in ref:
                assert mine[metric] == pytest.approx(ref[metric], rel=1e-4), (task, metric)
        by_doc = {row["doc_id"]: _responses(row, kind) for row in theirs["samples"][task]}
        assert sorted(by_doc) == sorted(row["doc_id"] for row in samples[task])
        for row in samples[task]:
            args, resps = _responses(row, kind)
            ref_args, ref_resps = by_doc[row["doc_id"]]
            assert args == ref_args, (task, row["doc_id"])
            for got, want in zip(resps, ref_resps, strict=True):
                if kind == "loglikelihood":  # (log-likelihood, greedy)
                    assert got[0] == pytest.approx(want[0], rel=1e-4) and got[1] == want[1], (task, row["doc_id"])
                elif kind == "rolling":  # a document's log-likelihood
                    assert got == pytest.approx(want, rel=1e-4), (task, row["doc_id"])
                else:  # a generation, cut at its stop string
                    assert got == want, (task, row["doc_id"])
            if task in MULTIPLE_CHOICE:  # lm-eval's few-shot join and target delimiter, as the requests carry them
                for context, continuation in args:
                    assert context.count("\n\n") == shots and continuation.startswith(" "), (context, continuation)


# --------------------------------------------------------------------------------------------- bad input


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "vishwam.evaluate", "--model", str(TEACHER), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _bad_tasks(tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\n  dataset_path: [json\n")
    (bad / "missing.yaml").write_text((TASKS / "demo_arithmetic.yaml").read_text().replace(
        "task: demo_arithmetic", "task: missing_data").replace("demo_arithmetic.test.jsonl", "nothere.jsonl"))
    return bad


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "results.json"
    proc = _cli("--tasks", "demo_arithmetic", "--include-path", str(_bad_tasks(tmp_path)), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: lm-eval task file ") and "broken.yaml does not parse" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["unparseable", "missing_data", "limit", "unknown"])
def test_bad_input_names_what_is_wrong_and_writes_nothing(case, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = _bad_tasks(tmp_path)
    out = tmp_path / "results.json"
    args, error, match = {
        "unparseable": (["--tasks", "missing_data", "--include-path", str(bad)], ConfigError,
                        r"lm-eval task file .*broken.yaml does not parse"),
        "missing_data": (["--tasks", "missing_data", "--include-path", str(_only(bad, "missing.yaml"))], DataError,
                         r"lm-eval task 'missing_data' .*missing.yaml\): data file .*nothere.jsonl not found"),
        "limit": (["--tasks", "demo_arithmetic", "--include-path", str(TASKS), "--limit", "0"], ConfigError,
                  r"--limit must be >= 1, got 0"),
        "unknown": (["--tasks", "demo_arithmetic,demo_arithmetc", "--include-path", str(TASKS)], ConfigError,
                    r"unknown lm-eval task 'demo_arithmetc': not a registered task, group or tag nor a task of .*; "
                    r"did you mean 'demo_arithmetic'"),
    }[case]
    with pytest.raises(error, match=match):
        evaluate_main(["--model", str(TEACHER), *args, "--out", str(out)])
    assert not out.exists()


def _only(directory: Path, name: str) -> Path:
    keep = directory.parent / f"only_{name}"
    keep.mkdir()
    shutil.copy(directory / name, keep)
    return keep


def test_a_bad_task_stops_a_run_before_it_changes_its_output(finished, tmp_path, monkeypatch):
    """A finished run re-run with an unknown task, a task file that does not parse or a missing data file stops
    with its one-line error, and its output directory is byte for byte as it was; a limit of 0 is a config error
    naming the key."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _tree(out)
    bad = _bad_tasks(tmp_path)
    cases = [(["--training.downstream.tasks", "nope"], ConfigError, "unknown lm-eval task 'nope'"),
             (["--training.downstream.tasks", "missing_data", "--training.downstream.include-path", str(bad)],
              ConfigError, "broken.yaml does not parse"),
             (["--training.downstream.tasks", "missing_data", "--training.downstream.include-path",
               str(_only(bad, "missing.yaml"))], DataError, "nothere.jsonl not found")]
    for flags, error, match in cases:
        with pytest.raises(error, match=match):
            Run(_run_config(out, "--training.max-steps", "6", *flags)).train()
        assert _tree(out) == before
    with pytest.raises(ConfigError, match=r"config key 'training.downstream.limit' must be > 0, got 0"):
        _run_config(out, "--training.downstream.limit", "0")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_score_as_one_process(tmp_path):
    """Two `jax.distributed` processes (2 CPU devices each; rows and weights over data x fsdp = 2 x 2) build the
    same requests, run the same programs and write the downstream line one process with 4 devices writes."""
    from conftest import CPU_COLLECTIVE_TIMEOUTS

    def command(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "run.py"), "--config", "configs/distill.yaml", "--training.output-dir",
                str(out), "--training.max-steps", "1", "--training.eval-every", "1", "--training.eval-batches", "1",
                "--training.batch-size", "4", "--training.seq-len", "64", "--parallelism.data", "2",
                "--distillation.student-model.init", "random",
                "--parallelism.fsdp", "2", "--tracking.aim", "false", "--training.downstream.tasks", "demo_arithmetic",
                "demo_ppl", "--training.downstream.include-path", str(TASKS), "--training.downstream.limit", "4"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 " + CPU_COLLECTIVE_TIMEOUTS}
    single = subprocess.run(command(tmp_path / "one"), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    env2 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 " + CPU_COLLECTIVE_TIMEOUTS}
    port, logs, procs = _free_port(), [tmp_path / f"process{i}.log" for i in range(2)], []
    for i in range(2):  # each process logs to a file: a full pipe would block it and fail the job on a timeout
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                command(tmp_path / "two") + ["--distributed.coordinator-address", f"127.0.0.1:{port}",
                                             "--distributed.num-processes", "2", "--distributed.process-id", str(i)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env2))
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join(f"--- process {i}: {c}\n" + logs[i].read_text()[-2000:]
                                      for i, c in enumerate(codes))
    one = json.loads((tmp_path / "one" / "downstream.jsonl").read_text())
    two = json.loads((tmp_path / "two" / "downstream.jsonl").read_text())
    assert one["step"] == two["step"] == 1
    for who in ("student", "teacher"):
        assert one[who]["demo_arithmetic"] == two[who]["demo_arithmetic"]
        for metric, value in one[who]["demo_ppl"].items():
            assert two[who]["demo_ppl"][metric] == pytest.approx(value, rel=1e-5)
    assert "downstream @ 1" in logs[0].read_text() and "downstream @ 1" not in logs[1].read_text()  # process 0 logs
