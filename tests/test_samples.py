"""Samples at eval: the student's and teacher's greedy continuations in samples.jsonl, each equal to
transformers' generate on the same weights; rows dropped on resume like metrics.jsonl; a bad prompts file
stops the run before it writes anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_fixtures import hf_greedy_completions

from vishwam.config.cli import load_config
from vishwam.errors import DataError
from vishwam.run.loop import Run

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vishwam" / "assets" / "demo" / "teacher"
PROMPTS = ["Seven plus five is", "Mira met Kai at the park. She"]


def _config(out: Path, steps: int, *extra: str):
    return load_config(str(ROOT / "configs" / "distill.yaml"), [
        "--training.output-dir", str(out), "--training.max-steps", str(steps), "--training.eval-every", "1",
        "--training.save-every", "2", "--training.eval-batches", "1", "--training.batch-size", "4",
        "--training.seq-len", "32", "--training.sample-max-new-tokens", "12", "--tracking.aim", "false",
        "--training.sample-prompts", *PROMPTS, *extra])


def _hf_greedy(directory: Path, prompts, new_tokens: int) -> list[str]:
    return hf_greedy_completions(directory, TEACHER, prompts, new_tokens)


class Killed(Exception):
    pass


def test_samples_at_every_eval_equal_transformers_and_survive_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    run = Run(_config(out, 4))

    def kill(step, state):
        if step == 3:  # evaluated (and sampled) at 3, last checkpoint at 2
            raise Killed

    run.on_step = kill
    with pytest.raises(Killed):
        run.train()
    assert [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()] == [1, 1, 2, 2, 3, 3]
    Run(_config(out, 4)).train()  # resumes at step 2: the rows of step 3 are dropped, then 3 and 4 written
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (1, 2, 3, 4) for p in PROMPTS]
    assert [r["teacher"] for r in rows] == _hf_greedy(TEACHER, PROMPTS, 12) * 4
    # The final student, as exported, continues the prompts as the last rows say.
    assert [r["student"] for r in rows[-2:]] == _hf_greedy(out / "student", PROMPTS, 12)


def test_a_bad_prompts_file_stops_the_run_before_it_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"prompts.jsonl:2: a row needs a non-empty string field 'prompt'"):
        Run(_config(out, 2, "--training.sample-prompts-file", str(bad))).train()
    assert not out.exists() or not any(out.iterdir())


def test_samples_are_aim_texts(tmp_path, monkeypatch):
    import aim
    from aim.sdk.index_manager import RepoIndexManager
    from aim.storage.context import Context

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    Run(_config(out, 2, "--tracking.aim", "true")).train()
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    repo = aim.Repo(str(out))
    RepoIndexManager.get_index_manager(repo).index(repo.list_all_runs()[0])
    run = next(iter(repo.iter_runs()))
    for i, prompt in enumerate(PROMPTS):
        steps, (texts, *_) = run.get_text_sequence("samples.student", Context({"prompt": i})).data.items_list()
        assert list(steps) == [1, 2]
        assert [t.data for t in texts] == [prompt + r["student"] for r in rows if r["prompt"] == prompt]
        steps, (texts, *_) = run.get_text_sequence("samples.teacher", Context({"prompt": i})).data.items_list()
        assert list(steps) == [1] and texts[0].data == prompt + rows[i]["teacher"]  # once per run
