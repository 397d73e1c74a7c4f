"""What a run reports while it runs: `metrics.jsonl`, the Aim run, the progress line and the log.

Process 0 alone writes; the other processes' trackers do nothing. Tracking never takes down a run: an Aim repo
that cannot be opened is a warning, and the run goes on with `metrics.jsonl`.

`metrics.jsonl` is strict JSON, one object a line: a non-finite number (a NaN loss, an infinite gradient norm) is
written as `null`. Its fields are functions of the config and the step, so two runs of one config write equal
lines, except `WALL_CLOCK_METRICS`, which measure the machine (speeds, memory, time shares).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from vishwam.config.sections import RunConfig, config_to_dict
from vishwam.io.files import atomic_write

#: The `metrics.jsonl` fields that measure the machine the run ran on rather than the run: the only ones in which
#: two runs of one config differ.
WALL_CLOCK_METRICS = ("tokens_per_sec", "peak_rss_gb", "on_policy/gen_tokens_per_sec", "on_policy/gen_time_share")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(obj, **dumps) -> str:
    """`obj` as strict JSON, every non-finite float (nested too) as `null` (`eval.json`: a diverged student's
    loss is `null`, not the bare `NaN` that JSON readers refuse)."""
    return json.dumps(_finite(obj), allow_nan=False, **dumps)


def json_line(row: dict) -> str:
    """`row` as one line of strict JSON, a non-finite float as `null` (`json.dumps` would write bare `NaN`)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(finite, allow_nan=False)


def log(msg: str) -> None:
    """A line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a `{"step": ...}` JSON-lines file up to `step` (and up to the first unreadable line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break
    atomic_write(path, "".join(k + "\n" for k in keep))


class Tracker:
    """metrics.jsonl always (process 0), plus an Aim run when `tracking.aim` is on."""

    def __init__(self, cfg: RunConfig, out: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = out / "metrics.jsonl"
        self.run = None
        self._teacher_samples_logged = False
        if not self.enabled:
            return
        self._truncate(resume_step)
        if cfg.tracking.aim:
            try:
                import aim  # heavy, and only wanted with tracking.aim on: imported here

                repo = cfg.tracking.repo or str(out)
                self.run = aim.Run(repo=repo, experiment=cfg.tracking.experiment)
                self.run["hparams"] = json.loads(json.dumps(config_to_dict(cfg)))
            except Exception as e:  # tracking must never take down a run
                log(f"warning: Aim tracking disabled ({type(e).__name__}: {e})")
                self.run = None

    def _truncate(self, resume_step: int):
        """On resume, drop lines logged after the checkpoint, so the file equals an uninterrupted run's."""
        truncate_jsonl(self.path, resume_step)

    def log(self, step: int, metrics: dict, context: str = "train"):
        if not self.enabled:
            return
        if context == "train":
            with open(self.path, "a") as f:
                f.write(json_line({"step": step, **metrics}) + "\n")
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.run.track(v, name=k.replace("/", "."), step=step, context={"subset": context})

    def log_mapping(self, step: int, pairs, similarity=None):
        """Record the layer mapping (at start and at every EPLB re-mapping) in the Aim run."""
        if self.run is not None:
            history = self.run.get("mapping_history", None) or []
            entry = {"step": step, "pairs": [list(map(int, p)) for p in pairs]}
            if similarity is not None:
                entry["cka"] = np.round(np.asarray(similarity), 4).tolist()
            self.run["mapping_history"] = history + [entry]

    def log_samples(self, step: int, rows: list[dict]):
        """Sample continuations (`vishwam.generation.samples`) as Aim text, one sequence per prompt and model."""
        if self.run is None or not rows:
            return
        import aim  # as in __init__: only with tracking.aim on

        for i, row in enumerate(rows):
            for model in ("student", "teacher"):
                if row[model] is not None and (model == "student" or not self._teacher_samples_logged):
                    self.run.track(aim.Text(row["prompt"] + row[model]), name=f"samples.{model}", step=step,
                                   context={"prompt": i})
        self._teacher_samples_logged = True

    def close(self):
        if self.run is not None:
            self.run.close()


class Progress:
    """A progress bar (tqdm on a terminal, plain log lines otherwise) with step, loss, tokens/s and ETA."""

    def __init__(self, start: int, total: int):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = None
        if jax.process_index() == 0 and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=start, desc="distill", dynamic_ncols=True)

    def update(self, step: int, m: dict):
        desc = f"loss {m['loss']:.4f} | {m['tokens_per_sec']:.0f} tok/s"
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(desc)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        log(f"step {step}/{self.total} | {desc} | eta {eta:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _status_field(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss it does not carry over across exec)."""
    return _status_field("VmHWM")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_field("VmRSS")


__all__ = ["WALL_CLOCK_METRICS", "Progress", "Tracker", "json_line", "log", "peak_rss_bytes", "rss_bytes"]
