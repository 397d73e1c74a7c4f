"""Downstream evaluation benchmarks on the demo domain's lm-eval tasks (`vishwam/assets/demo/tasks`).

    python -m benchmarks.downstream --part quality [--steps 200] [--seeds 0 1 2]   # about 10 minutes on 2 cores
    python -m benchmarks.downstream --part speed [--batch-size 16]                 # about 4 minutes on 2 cores

- **quality**: does KD's lower eval loss show up as task accuracy? The demo student (`configs/distill.yaml`,
  pruned from the teacher) is distilled with the config's objective (forward KL at T = 1) and with CE on the
  labels alone, the same steps, for each seed; every run scores all five multiple-choice tasks (all 300 documents
  each) and the perplexity task in the loop at its last step (`training.downstream`), the teacher once. Printed:
  per objective, the mean and standard deviation over the seeds of the eval loss and of each task's `acc`
  (`acc_norm` for the perplexity task: bits per byte), the teacher's row, and the raw `eval.json`s as JSON.
- **speed**: requests per second of `python -m vishwam.evaluate` against lm-eval's own `hf` backend
  (transformers, float32) on the demo teacher, the same six tasks (5,158 log-likelihood requests, 120 documents
  scored whole) and the same `--batch-size` (lm-eval: requests per forward pass; vishwam: rows per program call,
  each row packing as many requests as fit), one after the other in fresh processes. The time is the backend's
  own (its `loglikelihood` and `loglikelihood_rolling` calls, vishwam's compilation included), and the whole
  command's; the two backends' results must agree to the item (the script checks `acc`/`acc_norm`).

The printed lines are the raw output committed under `docs/results/`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = "vishwam/assets/demo/tasks"
MULTIPLE_CHOICE = ["demo_arithmetic", "demo_story_sums", "demo_counting", "demo_recall", "demo_agreement"]
TASKS = MULTIPLE_CHOICE + ["demo_ppl"]
TEACHER = "vishwam/assets/demo/teacher"
P = "--distillation-params."
OBJECTIVES = {"KD (forward KL, T = 1)": [],
              "CE on the labels alone": [f"{P}kd-weight", "0", f"{P}ce-weight", "1", f"{P}feature-weight", "0",
                                         f"{P}attention-weight", "0"]}


def _header(command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return f"# python -m benchmarks.downstream {command}; commit {commit}; {datetime.date.today().isoformat()}"


# ---------------------------------------------------------------------------------------------------- quality


def _run(out: Path, steps: int, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "run.py"), "--config", "configs/distill.yaml", "--training.max-steps",
           str(steps), "--training.seed", str(seed), "--training.eval-every", str(steps), "--training.save-every",
           str(steps), "--training.output-dir", str(out), "--tracking.aim", "false",
           "--training.downstream.tasks", *TASKS, "--training.downstream.include-path", TASKS_DIR, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = json.loads((out / "eval.json").read_text())
    result["seconds"] = time.perf_counter() - start
    return result


def _cell(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def quality(steps: int, seeds: list[int]) -> None:
    print(_header(f"--part quality --steps {steps} --seeds {' '.join(map(str, seeds))}"), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in OBJECTIVES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for i, (name, extra) in enumerate(OBJECTIVES.items()):
                result = _run(Path(tmp) / f"{i}_{seed}", steps, seed, extra)
                runs[name].append(result)
                print(f"# seed {seed}, {name}: eval loss {result['student_loss']:.4f}, "
                      + ", ".join(f"{t} {result['downstream'][t].get('acc', float('nan')):.3f}"
                                  for t in MULTIPLE_CHOICE) + f" ({result['seconds']:.0f} s)", flush=True)
    columns = ["eval loss", *[f"{t.removeprefix('demo_')} acc" for t in MULTIPLE_CHOICE], "mean acc",
               "ppl bits/byte"]
    print(f"| student ({len(seeds)} seeds, {steps} steps) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))

    def row(name: str, results: list[dict], key: str, loss: str) -> str:
        cells = [_cell([r[loss] for r in results])]
        cells += [_cell([r[key][t]["acc"] for r in results]) for t in MULTIPLE_CHOICE]
        cells.append(_cell([statistics.mean(r[key][t]["acc"] for t in MULTIPLE_CHOICE) for r in results]))
        cells.append(_cell([r[key]["demo_ppl"]["bits_per_byte"] for r in results]))
        return f"| {name} | " + " | ".join(cells) + " |"

    for name, results in runs.items():
        print(row(name, results, "downstream", "student_loss"))
    print(row("the teacher", runs[next(iter(runs))][:1], "teacher_downstream", "teacher_loss"))
    acc_norm = {name: {t: _cell([r["downstream"][t]["acc_norm"] for r in results]) for t in MULTIPLE_CHOICE}
                for name, results in runs.items()}
    print("# acc_norm: " + json.dumps(acc_norm))
    print(json.dumps({name: results for name, results in runs.items()}))


# ------------------------------------------------------------------------------------------------------ speed


def _timed(cls, names: tuple[str, ...], clock: dict) -> None:
    """Add the time and request count of `cls`'s methods `names` to `clock`."""
    for name in names:
        method = getattr(cls, name)

        def wrapper(self, requests, *args, __method=method, __name=name, **kwargs):
            start = time.perf_counter()
            out = __method(self, requests, *args, **kwargs)
            clock[__name] = clock.get(__name, 0.0) + time.perf_counter() - start
            clock[__name + "_requests"] = clock.get(__name + "_requests", 0) + len(requests)
            return out

        setattr(cls, name, wrapper)


def backend(which: str, batch_size: int, out: Path) -> None:
    """One backend's run of the six tasks (in this process); its clock and results to `out`."""
    import os

    os.chdir(ROOT)
    clock: dict = {}
    start = time.perf_counter()
    if which == "hf":
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        _timed(HFLM, ("loglikelihood", "loglikelihood_rolling"), clock)
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={TEACHER},dtype=float32", tasks=TASKS,
                                          batch_size=batch_size, device="cpu",
                                          task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False))
    else:
        from vishwam.downstream.harness import _lm_class
        from vishwam.evaluate import main

        _timed(_lm_class(), ("loglikelihood", "loglikelihood_rolling"), clock)
        main(["--model", TEACHER, "--tasks", ",".join(TASKS), "--include-path", TASKS_DIR, "--batch-size",
              str(batch_size), "--out", str(out.with_suffix(".results.json"))])
        results = json.loads(out.with_suffix(".results.json").read_text())
    clock["command"] = time.perf_counter() - start
    out.write_text(json.dumps({"clock": clock, "results": results["results"]}, default=str))


def speed(batch_size: int) -> None:
    print(_header(f"--part speed --batch-size {batch_size}"), flush=True)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("hf", "vishwam"):
            out = Path(tmp) / f"{which}.json"
            proc = subprocess.run([sys.executable, "-m", "benchmarks.downstream", "--backend", which, "--batch-size",
                                   str(batch_size), "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
            found[which] = json.loads(out.read_text())
    for task in MULTIPLE_CHOICE:
        for metric in ("acc,none", "acc_norm,none"):
            a, b = (found[w]["results"][task][metric] for w in ("hf", "vishwam"))
            assert a == b, f"{task} {metric}: hf {a}, vishwam {b}"
    print(f"| backend (batch size {batch_size}) | log-likelihood requests/s | documents scored whole/s | "
          "backend seconds | whole command, s |")
    print("|---|---|---|---|---|")
    for which, name in (("hf", "lm-eval `hf` (transformers, torch CPU)"), ("vishwam", "`python -m vishwam.evaluate`")):
        c = found[which]["clock"]
        ll, rolling = c["loglikelihood"], c.get("loglikelihood_rolling", 0.0)
        print(f"| {name} | {c['loglikelihood_requests'] / ll:.1f} | "
              f"{c.get('loglikelihood_rolling_requests', 0) / max(rolling, 1e-9):.1f} | {ll + rolling:.1f} | "
              f"{c['command']:.1f} |")
    hf, ours = (found[w]["clock"] for w in ("hf", "vishwam"))
    ratio = (hf["loglikelihood"] + hf.get("loglikelihood_rolling", 0)) / (
        ours["loglikelihood"] + ours.get("loglikelihood_rolling", 0))
    print(f"# vishwam / hf, backend time: {ratio:.1f}x faster; acc and acc_norm equal on every task")
    print(json.dumps({w: found[w]["clock"] for w in found}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["quality", "speed"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", choices=["hf", "vishwam"], help=argparse.SUPPRESS)  # one speed run
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        backend(args.backend, args.batch_size, Path(args.json))
    elif args.part == "quality":
        quality(args.steps, args.seeds)
    elif args.part == "speed":
        speed(args.batch_size)
    else:
        parser.error("give --part quality or --part speed")


if __name__ == "__main__":
    main()
