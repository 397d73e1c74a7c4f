"""Distillation quality on the embedded default: `python -m benchmarks.demo_quality [--steps 300]`.

Runs `run.py --config configs/distill.yaml` three times from the same student init, data order and steps: with the
config's objective (forward KL at T = 1, chosen by `benchmarks/quality.py`), with the objective it shipped before
(KD with T cosine 2 -> 1 + 0.1 CE + 0.5 features + 0.1 attention + EPLB) and with CE on the labels alone, each in
its own output directory under a temporary folder, and prints the eval figures of each and of the teacher as the
README's table (with the command, commit and date, so that the printed lines can be committed as the table's raw
output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, git_commit, markdown_table, python_child

P = "--distillation-params."
CE_ONLY = [f"{P}kd-weight", "0", f"{P}ce-weight", "1", f"{P}feature-weight", "0", f"{P}attention-weight", "0"]
PREVIOUS = [f"{P}ce-weight", "0.1", f"{P}feature-weight", "0.5", f"{P}attention-weight", "0.1",
            f"{P}temperature.schedule", "cosine", f"{P}temperature.start", "2.0", f"{P}temperature.end", "1.0",
            f"{P}eplb.enabled", "true"]


def run(out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [str(ROOT / "run.py"), "--config", "configs/distill.yaml", "--training.max-steps", str(steps),
           "--training.output-dir", str(out), "--tracking.aim", "false", *extra]
    proc = python_child(cmd, check=False)
    if proc.returncode:
        sys.exit(f"run failed ({' '.join([sys.executable, *cmd])}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(f"# python -m benchmarks.demo_quality --steps {args.steps}; commit {git_commit()}; "
          f"{datetime.date.today().isoformat()}")
    with tempfile.TemporaryDirectory() as tmp:
        kd = run(Path(tmp) / "kd", args.steps, [])
        previous = run(Path(tmp) / "previous", args.steps, PREVIOUS)
        ce = run(Path(tmp) / "ce", args.steps, CE_ONLY)
    arms = (("`configs/distill.yaml`: forward KL, T = 1", kd),
            ("the previous default: KD (T cosine 2 -> 1) + 0.1 CE + 0.5 features + 0.1 attention + EPLB", previous),
            (f"CE on the labels alone (`{' '.join(CE_ONLY)}`)", ce))
    rows = [[name, f"{r['student_loss']:.3f}", f"{r['student_ppl']:.2f}", f"{r['kl']:.3f}",
             f"{r['top1_agreement']:.3f}"] for name, r in arms]
    rows.append(["the teacher itself", f"{kd['teacher_loss']:.3f}", f"{kd['teacher_ppl']:.2f}", "–", "–"])
    print("\n".join(markdown_table(["student trained with", "eval loss", "eval ppl", "KL to teacher",
                                    "top-1 agreement"], rows)))
    print(json.dumps({"kd": kd, "previous": previous, "ce_only": ce}))


if __name__ == "__main__":
    main()
