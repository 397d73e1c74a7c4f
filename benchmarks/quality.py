"""Which objectives pay: a grid of distillation objectives on a teacher pretrained on real text, at equal steps.

The teacher is `benchmarks/assets/pysrc/teacher` (2.4M parameters, Qwen2 architecture, its own 2,048-token BPE),
pretrained by `scripts/make_demo_teacher.py` on the Python standard library's source (`scripts/make_pysrc_corpus.py`;
the corpus is regenerated from this Python when missing, and a warning says when it differs from the one the
teacher was trained on). Every cell trains the same student (pruned from the teacher unless the cell says
`random`) for the same steps on the same batches (a function of the seed), changing only the flags in its row,
and evaluates it on the held-out modules: eval loss and perplexity of the student, KL(teacher || student) and
top-1 agreement with the teacher, and the training tokens/s. Seeds change the data order and the student's
random parts; the figures are mean ± sample sd over seeds.

Usage::

    python benchmarks/quality.py --seeds 0 1 2 --steps 150 --out docs/results/quality.md
    python benchmarks/quality.py --cells ce_only kl_t1 --seeds 0     # a few cells

Each finished run is appended to `--raw` (JSON lines) at once; rerunning with the same `--raw` skips the
(cell, seed, steps) runs already there, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: run as a script

from benchmarks.common import ROOT, git_commit, log, markdown_table, mean_sd, timed_call  # noqa: E402
from vishwam.config.cli import load_config  # noqa: E402
from vishwam.run.loop import Run  # noqa: E402

ASSETS = ROOT / "benchmarks" / "assets" / "pysrc"
TEACHER = ASSETS / "teacher"

P = "--distillation-params."
CE_ONLY = [f"{P}kd-weight", "0", f"{P}ce-weight", "1"]
KL_T1 = [f"{P}temperature.schedule", "constant", f"{P}temperature.start", "1.0"]
COSINE = [f"{P}temperature.schedule", "cosine", f"{P}temperature.start", "2.0", f"{P}temperature.end", "1.0"]


def eplb(steps: int) -> list[str]:
    return [f"{P}eplb.enabled", "true", f"{P}eplb.num-stages", "2", f"{P}eplb.stage-steps", str(steps // 3),
            f"{P}eplb.ramp-steps", str(steps // 6)]


def cells(steps: int) -> dict[str, tuple[str, list[str]]]:
    """name: (what the cell changes, its flags). Every cell starts from BASE's objective: forward KL alone at
    T = 1 ... unless its flags say otherwise."""
    depth4 = ["--distillation.student-model.num-hidden-layers", "1"]
    random = ["--distillation.student-model.init", "random"]
    return {
        "ce_only": ("CE on the labels alone (no teacher)", CE_ONLY),
        "kl_t1": ("forward KL, T = 1", KL_T1),
        "kl_t2": ("forward KL, T = 2", [f"{P}temperature.schedule", "constant", f"{P}temperature.start", "2.0"]),
        "kl_cosine": ("forward KL, T cosine 2 -> 1", COSINE),
        "kl_adaptive": ("forward KL, T adaptive in [0.5, 4]", [f"{P}temperature.schedule", "adaptive"]),
        "kl_ce0.1": ("forward KL T = 1 + 0.1 CE", [*KL_T1, f"{P}ce-weight", "0.1"]),
        "kl_ce0.5": ("forward KL T = 1 + 0.5 CE", [*KL_T1, f"{P}ce-weight", "0.5"]),
        "rkl": ("reverse KL, T = 1", [*KL_T1, f"{P}kd-loss", "reverse_kl"]),
        "jsd0.5": ("JSD(beta = 0.5), T = 1", [*KL_T1, f"{P}kd-loss", "jsd", f"{P}jsd-beta", "0.5"]),
        "kl+feat_mse": ("KL T = 1 + 0.5 feature MSE (normalized)", [*KL_T1, f"{P}feature-weight", "0.5"]),
        "kl+feat_mse_raw": ("KL T = 1 + 0.5 feature MSE (not normalized)",
                            [*KL_T1, f"{P}feature-weight", "0.5", f"{P}feature-normalize", "false"]),
        "kl+feat_cos": ("KL T = 1 + 0.5 feature cosine", [*KL_T1, f"{P}feature-weight", "0.5", f"{P}feature-loss",
                                                           "cosine"]),
        "kl+attn": ("KL T = 1 + 0.1 attention KL", [*KL_T1, f"{P}attention-weight", "0.1"]),
        "kl+feat_mse+eplb": ("KL T = 1 + 0.5 feature MSE + EPLB (2 stages, balanced, remap; EPLB acts on the "
                             "feature pairs)", [*KL_T1, f"{P}feature-weight", "0.5", *eplb(steps)]),
        "old_default": ("the previous configs/distill.yaml: KL T cosine 2 -> 1 + 0.1 CE + 0.5 features + 0.1 "
                        "attention + EPLB", [*COSINE, f"{P}ce-weight", "0.1",
                                             f"{P}feature-weight", "0.5", f"{P}attention-weight", "0.1",
                                             *eplb(steps)]),
        "random:ce_only": ("init random, CE alone", [*random, *CE_ONLY]),
        "random:kl_t1": ("init random, forward KL T = 1", [*random, *KL_T1]),
        "4x:ce_only": ("1-layer student (depth 4x), CE alone", [*depth4, *CE_ONLY]),
        "4x:kl_t1": ("1-layer student (depth 4x), forward KL T = 1", [*depth4, *KL_T1]),
    }


BASE = """\
distillation:
  teacher_model: {{path: {teacher}, dtype: float32, loading: resident}}
  student_model: {{init: from_teacher, num_hidden_layers: 2, hidden_size: 96, num_attention_heads: 3,
                  num_key_value_heads: 1, intermediate_size: 256}}
data: {{train: {train}, eval: {eval}}}
training: {{output_dir: {out}, seed: {seed}, max_steps: {steps}, batch_size: 16, seq_len: 128, learning_rate: 0.003,
           warmup_steps: {warmup}, weight_decay: 0.01, grad_clip: 1.0, compute_dtype: float32, log_every: 10,
           eval_every: {steps}, eval_batches: 32, save_every: {steps}, keep_checkpoints: 1}}
distillation_params: {{kd_weight: 1.0, ce_weight: 0.0, feature_weight: 0.0, attention_weight: 0.0,
                      kd_loss: forward_kl, temperature: {{schedule: constant, start: 1.0, end: 1.0}}}}
tracking: {{aim: false}}
"""


def corpus() -> tuple[Path, Path]:
    """The corpus files, regenerated when missing; warns when they differ from the teacher's."""
    train, evaluation = ASSETS / "train.jsonl", ASSETS / "eval.jsonl"
    if not (train.is_file() and evaluation.is_file()):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_pysrc_corpus.py")], check=True)
    record = json.loads((TEACHER / "training_data.json").read_text())
    for name, path in (("train", train), ("eval", evaluation)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != record[name]["sha256"]:
            log(f"warning: {path} differs from the corpus the teacher was trained on (another Python version?); "
                f"figures will not match docs/results/quality.md")
    return train, evaluation


def run_cell(flags: list[str], seed: int, steps: int, tmp: Path, data: tuple[Path, Path]) -> dict:
    out = tmp / f"run{len(list(tmp.iterdir()))}"
    base = tmp / f"{out.name}.yaml"
    base.write_text(BASE.format(teacher=TEACHER, train=data[0], eval=data[1], out=out, seed=seed, steps=steps,
                                warmup=max(steps // 10, 1)))
    result, seconds = timed_call(Run(load_config(str(base), flags)).train)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m][1:]  # the first includes compiling
    e = result["eval"]
    jax.clear_caches()
    return {"eval_loss": e["student_loss"], "ppl": e["student_ppl"], "kl": e["kl"], "top1": e["top1_agreement"],
            "teacher_loss": e["teacher_loss"], "tokens_per_sec": statistics.median(speeds) if speeds else None,
            "seconds": seconds}


def table(rows: list[dict], names: dict[str, tuple[str, list[str]]], steps: int) -> list[str]:
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        if r["steps"] == steps:
            by_cell.setdefault(r["cell"], []).append(r)
    ce = by_cell.get("ce_only")
    ce_loss = statistics.mean(r["eval_loss"] for r in ce) if ce else None

    cells = []
    for name, (what, _) in names.items():
        rs = by_cell.get(name)
        if not rs:
            continue
        loss = [r["eval_loss"] for r in rs]
        delta = f"{100 * (statistics.mean(loss) / ce_loss - 1):+.1f}%" if ce_loss else "–"
        speed = [r["tokens_per_sec"] for r in rs if r["tokens_per_sec"]]
        cells.append([f"`{name}`", what, len(rs), mean_sd(loss, "{:.3f}"), delta,
                      mean_sd([r["ppl"] for r in rs], "{:.2f}"), mean_sd([r["kl"] for r in rs], "{:.3f}"),
                      mean_sd([r["top1"] for r in rs], "{:.3f}"), f"{statistics.mean(speed):,.0f}"])
    teacher = [r["teacher_loss"] for r in rows if r["steps"] == steps]
    if teacher:
        cells.append(["teacher", "–", "–", f"{statistics.mean(teacher):.3f}", "–", "–", "–", "–", "–"])
    return markdown_table(["cell", "what it changes", "seeds", "eval loss", "vs CE-only", "ppl", "KL to teacher",
                           "top-1 agreement", "tokens/s"], cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--cells", nargs="+", default=None, help="a subset of the grid's cells, by name")
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "quality_raw.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = parser.parse_args()
    names = cells(args.steps)
    chosen = args.cells or list(names)
    unknown = [c for c in chosen if c not in names]
    if unknown:
        sys.exit(f"unknown cells {unknown}; the grid has {list(names)}")
    data = corpus()
    done = []
    if args.raw.is_file():
        done = [json.loads(line) for line in args.raw.read_text().splitlines() if line.strip()]
    have = {(r["cell"], r["seed"], r["steps"]) for r in done}
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in chosen:
                if (name, seed, args.steps) in have:
                    continue
                figures = run_cell(names[name][1], seed, args.steps, Path(tmp), data)
                row = {"cell": name, "seed": seed, "steps": args.steps, **figures, "commit": commit,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")}
                done.append(row)
                args.raw.parent.mkdir(parents=True, exist_ok=True)
                with args.raw.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed}: eval loss {row['eval_loss']:.4f}, kl {row['kl']:.4f}, top-1 "
                      f"{row['top1']:.3f}, {row['seconds']:.0f}s", flush=True)
    lines = [f"# python benchmarks/quality.py {' '.join(sys.argv[1:])}", f"# jax {jax.__version__}, "
             f"{jax.devices()[0].platform}; raw rows: {args.raw.relative_to(ROOT) if args.raw.is_relative_to(ROOT) else args.raw}",
             "", f"{args.steps} steps of 16 x 128 tokens per run; student 2 layers x 96 wide (teacher 4 x 192) unless "
             f"the cell says otherwise; eval on the {32 * 16} held-out windows of 128 tokens; mean ± sd over seeds.",
             "", *table(done, names, args.steps)]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
