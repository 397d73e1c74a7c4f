"""lm-eval tasks in a run (`training.downstream`): the student scored at evaluations, the teacher once.

`Downstream(cfg, ...)` loads and checks the tasks when the run is prepared, before it writes anything (an unknown
task, a task file that does not parse, a missing data file: one line, exit 2), sets their shots and few-shot seed
as lm-eval's command line does, draws the fixed subset of `limit` documents, and builds every request once to
count those longer than `training.seq_len` (they are truncated as lm-eval truncates at `max_length`, and logged).

At an evaluation (every one, or every `every` steps and the last) `at_eval` scores the student with
`lm_eval.evaluator.evaluate` over `vishwam.downstream.harness`: requests packed into the training micro-batch's
`[rows, seq_len]` shape, the scoring program on the run's mesh, in the compute dtype. A resident teacher is scored
the first time, on the same documents, in its own dtype (a streamed or cached teacher is not: its entries are
absent). The results go to:

- `eval.json`: `downstream: {task: {metric: value}}` and `teacher_downstream` (the last scored evaluation's);
- `output_dir/downstream.jsonl`: one line per scored evaluation, `{"step", "student", "teacher"}` (process 0; on
  resume the lines after the checkpoint are dropped, as `samples.jsonl`'s);
- Aim: `downstream/<task>/<metric>` (and `downstream_teacher/...`, once), the eval context;
- the log: one line per scored evaluation.

Every process builds the same requests in the same order and runs the same programs; process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax

from models import CausalLM
from vishwam.config.sections import RunConfig
from vishwam.config.specs import DTYPES
from vishwam.downstream.harness import harness_lm
from vishwam.downstream.scoring import Scorer
from vishwam.downstream.tasks import load_tasks, prepare, require_lm_eval, subset
from vishwam.downstream.tokens import HarnessTokenizer
from vishwam.errors import ConfigError
from vishwam.io.files import atomic_write
from vishwam.tracking import strict_json, truncate_jsonl


def flatten(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `results` as `{task: {metric: value}}`: every task and group, the `none` filter's metrics under
    their own names, other filters' as `metric,filter`; no stderr, no alias."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if key in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[metric if filter_name in ("", "none") else key] = float(value)
        out[task] = metrics
    return out


class Downstream:
    """A run's lm-eval tasks (see the module docstring); does nothing when `training.downstream.tasks` is empty.

    **Arguments:** the run's config and output directory; `tokenizer_path` (the run's tokenizer, with the teacher's
    `tokenizer_config.json` beside it), `eos_ids` (the teacher checkpoint's), `mesh`, `log`."""

    def __init__(self, cfg: RunConfig, out: Path, *, tokenizer_path: str | None, eos_ids: list[int], mesh,
                 log: Callable[[str], None], teacher: tuple[str, list[int]] | None = None):
        tr, d = cfg.training, cfg.training.downstream
        self.cfg, self.log = d, log
        self.enabled = bool(d.tasks)
        self.path = out / "downstream.jsonl"
        self.eval_path = out / "eval.json"
        self.max_steps, self.eval_every = tr.max_steps, tr.eval_every
        self.teacher_metrics: dict | None = None
        self.teacher_noted = False
        self.resume_step: int | None = None
        self.last: dict | None = None
        if not self.enabled:
            return
        self.lm_eval = require_lm_eval()
        if tokenizer_path is None:
            raise ConfigError("config key 'training.downstream.tasks' needs a tokenizer: set data.tokenizer (the "
                              "teacher has no tokenizer.json)")
        self.loaded, self.top, _ = load_tasks(d.tasks, include_path=d.include_path)
        self.tokenizer = HarnessTokenizer(tokenizer_path, fallback_eos=eos_ids[0] if eos_ids else None)
        self.eos_ids = eos_ids
        # A cross-tokenizer run's teacher is scored with its own tokenizer and EOS ids.
        self.teacher_tokenizer, self.teacher_eos_ids = self.tokenizer, eos_ids
        if teacher is not None:
            self.teacher_tokenizer = HarnessTokenizer(teacher[0], fallback_eos=teacher[1][0] if teacher[1] else None)
            self.teacher_eos_ids = teacher[1]
        self.mesh, self.rows, self.seq_len = mesh, tr.micro_batch_size, tr.seq_len
        self.compute_dtype = DTYPES[tr.compute_dtype]
        self.teacher_dtype = DTYPES[cfg.distillation.teacher_model.dtype]
        self.chunk_size = cfg.distillation_params.logit_chunk_size
        self.samples = subset(self.loaded["tasks"], d.limit, d.seed)
        self._check_requests()

    def _prepared(self) -> None:
        """Shots and a fresh few-shot seed: every evaluation builds the same requests."""
        prepare(self.loaded["tasks"], num_fewshot=self.cfg.num_fewshot, seed=self.cfg.seed)

    def _check_requests(self) -> None:
        """Build each task's requests once (a template error stops the run now) and log how many are longer than
        `training.seq_len`."""
        self._prepared()
        names = sorted(self.loaded["tasks"])
        counts = {}
        for name in names:
            task = self.loaded["tasks"][name]
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bar
                    task.build_all_requests(samples=None if self.samples is None else self.samples[name], rank=0,
                                            world_size=1)
            except Exception as error:  # a template naming a missing field, a bad filter, ...
                raise ConfigError(f"lm-eval task '{name}' cannot build its requests: {type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:300]}") from None
            pairs = [i.args for i in task.instances if i.request_type == "loglikelihood"]
            # A request is its context's and continuation's tokens (an empty context: the prefix token's).
            lengths = [len(self.tokenizer.encode(context + continuation)) + (context == "")
                       for context, continuation in pairs]
            counts[name] = (len(task.instances), sum(n > self.seq_len + 1 for n in lengths))
        documents = sum(len(self.samples[n]) if self.samples else len(self.loaded["tasks"][n].eval_docs) for n in names)
        self.log(f"downstream: {len(names)} lm-eval tasks, {documents} documents, "
                 f"{sum(c[0] for c in counts.values())} requests at each evaluation "
                 f"({'every evaluation' if self.cfg.every is None else f'every {self.cfg.every} steps'})")
        for name, (total, long) in counts.items():
            if long:
                self.log(f"downstream: {long} of {total} requests of task {name} are longer than training.seq_len "
                         f"{self.seq_len} tokens: they are truncated on the left, as lm-eval truncates at "
                         f"max_length {self.seq_len}")

    def truncate(self, resume_step: int) -> None:
        """On resume, drop the lines written after the checkpoint, and take the last kept one as the latest."""
        self.resume_step = resume_step if resume_step > 0 else None
        if not self.enabled or jax.process_index() != 0:
            return
        truncate_jsonl(self.path, resume_step)
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            self.last = json.loads(lines[-1]) if lines else None

    def due(self, step: int) -> bool:
        every = self.cfg.every
        return self.enabled and (every is None or step % every == 0 or step == self.max_steps)

    def score(self, model: CausalLM, compute_dtype, *, teacher: bool = False) -> dict[str, dict[str, float]]:
        """`{task: {metric: value}}` of `model` (the student, or with `teacher` the teacher) on the run's
        documents."""
        self._prepared()
        scorer = Scorer(rows=self.rows, seq_len=self.seq_len, compute_dtype=compute_dtype, mesh=self.mesh,
                        chunk_size=self.chunk_size)
        tokenizer, eos_ids = (self.teacher_tokenizer, self.teacher_eos_ids) if teacher else (self.tokenizer,
                                                                                             self.eos_ids)
        lm = harness_lm(model, tokenizer, scorer, max_length=self.seq_len, compute_dtype=compute_dtype,
                        eos_ids=eos_ids, generate_batch=self.rows)  # truncations: logged at the start
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars, once per task and evaluation
            results = self.lm_eval.evaluator.evaluate(lm=lm, task_dict=self.loaded, samples=self.samples,
                                                      bootstrap_iters=0, log_samples=False)
        return flatten(results)

    def at_eval(self, step: int, result: dict, student: CausalLM, teacher, track: Callable[[dict], None]) -> dict:
        """At an evaluation: score when due (see the module docstring); `result` (evaluation's) with the latest
        downstream metrics, written to `eval.json` (process 0). `track` takes the flat metrics for Aim."""
        if not self.enabled:
            return result
        # A finished run run again evaluates its last step again: the line written for it then stands (the same
        # decision on every process, so that they all run the same programs).
        if self.due(step) and step != self.resume_step:
            student_metrics = self.score(student, self.compute_dtype)
            if self.teacher_metrics is None and isinstance(teacher, CausalLM):
                self.teacher_metrics = self.score(teacher, self.teacher_dtype, teacher=True)
                track(_flat("downstream_teacher", self.teacher_metrics))
            elif self.teacher_metrics is None and not self.teacher_noted:
                self.teacher_noted = True
                self.log("downstream: the teacher is not resident (streamed or cached): it is not scored")
            track(_flat("downstream", student_metrics))
            self.last = {"step": step, "student": student_metrics, "teacher": self.teacher_metrics}
            if jax.process_index() == 0:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(strict_json(self.last) + "\n")
            self.log(f"downstream @ {step}: " + " | ".join(_summary(task, student_metrics.get(task, {}),
                                                                  (self.teacher_metrics or {}).get(task))
                                                         for task in self._shown(student_metrics)))
        result = dict(result)
        if self.last is not None:
            result["downstream"] = self.last["student"]
            if self.last.get("teacher") is not None:
                result["teacher_downstream"] = self.last["teacher"]
        if jax.process_index() == 0:
            atomic_write(self.eval_path, strict_json(result, indent=2) + "\n")
        return result

    def _shown(self, metrics: dict) -> list[str]:
        """The names the config gave (groups, not their subtasks), else every task."""
        named = [getattr(t, "name", None) or getattr(t, "task_name", None) for t in self.top]
        return [n for n in named if n in metrics] or sorted(metrics)


def _flat(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{task}/{m}": v for task, values in metrics.items() for m, v in values.items()
            if math.isfinite(v)}


def _summary(task: str, student: dict, teacher: dict | None) -> str:
    parts = []
    for metric, value in student.items():
        other = "" if teacher is None or metric not in teacher else f" (teacher {teacher[metric]:.4g})"
        parts.append(f"{metric} {value:.4g}{other}")
    return f"{task} " + ", ".join(parts)


__all__ = ["Downstream", "flatten"]
