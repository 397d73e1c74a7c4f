"""Off-policy vs on-policy distillation on the chat demo, at equal steps.

Each arm trains `configs/chat.yaml`'s student from the chat teacher (`vishwam/assets/demo/chat_teacher`, fine-tuned
for the purpose by `scripts/make_demo_chat.py`) for the same number of steps and rows per step, changing only
`distillation_params.on_policy`:

- `off-policy`: fraction 0 (KD on the data's answers only);
- `on-policy b=0.5`, `on-policy b=1`: fraction 0.5, generalised JSD with beta 0.5 / reverse KL.

Then, on held-out prompts (the eval conversations up to their last assistant turn), each student writes its
greedy continuation (up to 32 tokens, ending at EOS); the teacher and the student score it, and the figures are:

- `reverse KL`: mean over the continuation's tokens of KL(student || teacher), the divergence on the student's own
  outputs that on-policy distillation targets (the exposure-bias gap off-policy training never sees);
- `forward KL`: KL(teacher || student) on the same tokens;
- `exact`: the share of prompts whose greedy answer equals the reference answer token for token;
- `data loss`: the run's own eval (cross-entropy of the assistant tokens of the eval conversations).

Usage::

    python benchmarks/on_policy.py --seeds 0 1 2 --steps 200 --out docs/results/on_policy_chat.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: run as a script

from benchmarks.common import ROOT, markdown_table, mean_sd  # noqa: E402
from models import cast_floating  # noqa: E402
from vishwam.config.cli import load_config  # noqa: E402
from vishwam.config.sections import StudentConfig  # noqa: E402
from vishwam.generation.on_policy import prompt_answers, rollout_batch, rollout_rows  # noqa: E402
from vishwam.generation.sampler import checkpoint_eos_ids, generate, left_pad  # noqa: E402
from vishwam.io.checkpoint import load_pretrained  # noqa: E402
from vishwam.run.loop import Run  # noqa: E402

OFF, ON = ["--distillation-params.on-policy.fraction", "0.0"], ["--distillation-params.on-policy.fraction", "0.5"]
BETA = "--distillation-params.on-policy.beta"
# name: (the first stage's flags, the second stage's flags or None). A second stage starts from the first
# stage's exported student (a fresh optimizer), so "warm" arms run twice the steps of the others.
ARMS = {"off-policy": (OFF, None),
        "on-policy b=0.5": ([*ON, BETA, "0.5"], None),
        "on-policy b=1": ([*ON, BETA, "1.0"], None),
        "off-policy, then off-policy (2x steps)": (OFF, OFF),
        "off-policy, then on-policy b=0.5 (2x steps)": (OFF, [*ON, BETA, "0.5"])}


def held_out(student, teacher, prompts, answers, eos, seq_len, max_new_tokens=32, batch=32) -> dict:
    rkl = fkl = count = exact = 0.0
    student_c = cast_floating(student, jnp.float32)
    for i in range(0, len(prompts), batch):
        chunk, refs = prompts[i:i + batch], answers[i:i + batch]
        ids, mask = left_pad(chunk)
        out = np.asarray(generate(student_c, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos))
        rows = rollout_rows(chunk, out[:, ids.shape[1]:], eos, seq_len)
        b = rollout_batch(rows, seq_len)
        inputs = dict(attention_mask=jnp.asarray(b["mask"]), segment_ids=jnp.asarray(b["segment_ids"]))
        log_q = jax.nn.log_softmax(student_c(jnp.asarray(b["input_ids"]), **inputs).logits.astype(jnp.float32), -1)
        log_p = jax.nn.log_softmax(teacher(jnp.asarray(b["input_ids"]), **inputs).logits.astype(jnp.float32), -1)
        m = jnp.asarray(b["loss_mask"], jnp.float32)
        rkl += float((jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1) * m).sum())
        fkl += float((jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1) * m).sum())
        count += float(m.sum())
        for r, ref in enumerate(refs):
            got = rows["tokens"][r, rows["prompt_len"][r]: rows["length"][r]]
            ref = ref[: next((k + 1 for k, t in enumerate(ref) if t in eos), len(ref))]  # to its EOS, as `got`
            exact += float(len(got) == len(ref) and (got == ref).all())
    return {"reverse_kl": rkl / count, "forward_kl": fkl / count, "exact": exact / len(prompts),
            "completion_len": count / len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "chat.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--out", default=None, help="also write the table and raw rows here (markdown)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    lines = [f"# {' '.join(sys.argv)}", f"# jax {jax.__version__}, {jax.devices()[0].platform}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}"]
    teacher = eos = prompts = answers = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            first_stage: dict[str, Path] = {}

            def train_stage(flags, start):
                out = Path(tmp) / f"run{len(list(Path(tmp).iterdir()))}"
                cfg = load_config(args.config, ["--training.output-dir", str(out), "--training.seed", str(seed),
                                                "--training.max-steps", str(args.steps), "--training.eval-every",
                                                str(args.steps), "--training.save-every", str(args.steps),
                                                "--tracking.aim", "false", *flags])
                if start is not None:  # from the first stage's exported student
                    student = StudentConfig(init="path", path=str(start))
                    cfg = dataclasses.replace(cfg, distillation=dataclasses.replace(cfg.distillation,
                                                                                    student_model=student))
                run = Run(cfg)
                return cfg, run, run.train(), out / "student"

            for arm, (flags, then) in ARMS.items():
                t0 = time.perf_counter()
                if then is None:
                    cfg, run, result, exported = train_stage(flags, None)
                    first_stage[" ".join(flags)] = exported
                else:  # the arm of the first stage's flags ran earlier for this seed
                    cfg, run, result, _ = train_stage(then, first_stage[" ".join(flags)])
                seconds = time.perf_counter() - t0
                if teacher is None:
                    teacher = load_pretrained(cfg.distillation.teacher_model.path, dtype=jnp.float32)
                    eos = checkpoint_eos_ids(Path(cfg.distillation.teacher_model.path), teacher.config)
                    prompts, answers = map(list, zip(*prompt_answers(run.prepared.eval_data)[: args.prompts]))
                figures = held_out(result["state"].student, teacher, prompts, answers, eos, cfg.training.seq_len)
                figures.update(data_loss=result["eval"]["student_loss"], seconds=seconds, seed=seed, arm=arm)
                results[arm].append(figures)
                lines.append("# raw " + json.dumps(figures))
                print(lines[-1], flush=True)

    def cell(rows, key, fmt="{:.4f}"):
        return mean_sd([r[key] for r in rows], fmt)

    table = ["", f"{args.steps} steps of configs/chat.yaml per arm and stage (wall s: the arm's last stage), seeds "
             f"{args.seeds}; held-out: "
             f"{len(prompts)} eval prompts, greedy continuations of up to 32 tokens. mean ± sd over seeds.", "",
             *markdown_table(["arm", "reverse KL (student's own tokens)", "forward KL (same tokens)", "exact answers",
                              "data loss (eval CE)", "completion tokens", "wall s"],
                             [[arm, cell(rows, "reverse_kl"), cell(rows, "forward_kl"), cell(rows, "exact", "{:.3f}"),
                               cell(rows, "data_loss"), cell(rows, "completion_len", "{:.1f}"),
                               cell(rows, "seconds", "{:.0f}")] for arm, rows in results.items()])]
    print("\n".join(table))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text("\n".join(lines + table) + "\n")


if __name__ == "__main__":
    main()
