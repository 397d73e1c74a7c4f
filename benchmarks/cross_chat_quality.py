"""Chat rows across tokenizers: does ALM on the assistant turns help a student with its own tokenizer and template?

    python -m benchmarks.cross_chat_quality [--steps 200] [--seeds 0 1 2] [--cells ...] [--out DIR]

`configs/chat.yaml` as shipped (the demo chat teacher, 2-layer half-width student pruned from it, 16 x 128
tokens a step), but the student has the pysrc 2,048-id tokenizer and a ChatML-like template of its own
(`benchmarks.bench_cross_data.chat_student`), and on-policy distillation is off (it is refused across
tokenizers). Cells, each over `--seeds`: CE alone on the student's assistant tokens (`alm_weight 0`, no shared KL)
against ALM + CE, and ALM + CE + the shared-vocabulary KL (the cross-tokenizer defaults with `ce_weight 1`). The figure is
`eval.json`'s `student_bpb` on the held-out chat rows (`chat_eval.jsonl`): bits per byte of the student's
assistant tokens (the same tokens and bytes in every cell: one tokenizer, one template); the teacher's own, over
its assistant tokens, for scale.

Prints each run's figures as JSON lines, then a table of mean and spread (max - min) per cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_cross_data import chat_student

ROOT = Path(__file__).resolve().parents[1]
CELLS = {
    "CE alone": ["--distillation-params.alm-weight", "0", "--distillation-params.shared-kl-weight", "0"],
    "ALM + CE": ["--distillation-params.shared-kl-weight", "0"],
    "ALM + CE + shared KL": [],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--out", type=Path, default=Path("/tmp/vishwam_cross_chat_quality"))
    args = p.parse_args(argv)
    student = chat_student(args.out / "student_tokenizer")
    results: dict[str, list[dict]] = {}
    for cell in args.cells:
        flags = CELLS[cell]
        for seed in args.seeds:
            out = args.out / f"{cell.replace(' ', '_').replace('+', 'p')}-{seed}"
            cmd = [sys.executable, "run.py", "--config", "configs/chat.yaml", "--distillation.student-model.tokenizer",
                   student, "--distillation-params.on-policy.fraction", "0", "--distillation-params.ce-weight", "1",
                   "--training.max-steps", str(args.steps), "--training.eval-every", str(args.steps),
                   "--training.save-every", str(args.steps), "--training.seed", str(seed), "--training.output-dir",
                   str(out), "--data.store-dir", str(args.out / "store"), "--tracking.aim", "false", *flags]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                                       "HF_HUB_OFFLINE": "1"})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            ev = json.loads((out / "eval.json").read_text())
            row = {"cell": cell, "seed": seed, **{k: ev[k] for k in ("student_bpb", "teacher_bpb", "chunk_kl",
                                                                      "chunks", "step")}}
            results.setdefault(cell, []).append(row)
            print(json.dumps(row), flush=True)
    print("| cell | student bits/byte (assistant turns, held out), mean | spread | teacher |")
    print("|---|---|---|---|")
    for cell, rows in results.items():
        bpb = [r["student_bpb"] for r in rows]
        print(f"| {cell} | {sum(bpb) / len(bpb):.3f} | {max(bpb) - min(bpb):.3f} | {rows[0]['teacher_bpb']:.3f} |")


if __name__ == "__main__":
    main()
