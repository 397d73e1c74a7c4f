"""The planner's figures against XLA's compiled bytes, for every program of a mid-size config's runs.

The config: a 34M-parameter bfloat16 Qwen2 teacher (8 layers of 512, 8/4 heads, MLP 1536, vocabulary 8192; its
config.json alone), a 4-layer half-width student pruned from it (float32 parameters, bfloat16 compute), 16 x 512
tokens a step in 2 micro-batches, fsdp 4, logit chunks of 128, feature matching with EPLB re-mapping; with a
resident, a cached and a streamed teacher, on-policy distillation on the demo chat data, and lm-eval tasks scored at
evaluations (`downstream`), and across tokenizers (`cross`, `cross_streamed`). Each program is
planned (`vishwam.plan.program_plan`, the train step by `vishwam.plan.planner`) and compiled (`vishwam.compile.programs`) for the
target; one line per program: planner and XLA bytes per device (MiB) and their ratio.

    python -m benchmarks.plan_vs_xla [--target tpu:v5p-8] [--layouts resident cached streamed on_policy downstream]
                                     [--programs eval ...] [--json OUT]

`tpu:v5p-8` needs the [tpu] extra (libtpu); `cpu:4` compiles on 4 simulated CPU devices (XLA:CPU's figures).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import DEMO, ROOT, write_json
from vishwam.compile.targets import configure_process

TEACHER = dict(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4, head_dim=64, qkv_bias=True)
CROSS = ["--distillation.student-model.tokenizer", str(ROOT / "benchmarks" / "assets" / "pysrc" / "teacher"),
         "--distillation.student-model.vocab-size", "6144", "--distillation.student-model.init", "random",
         "--distillation-params.feature-weight", "0", "--distillation-params.eplb.enabled", "false",
         "--distillation-params.ce-weight", "1"]
LAYOUTS = {
    "resident": [],
    "cached": ["--distillation.teacher-model.loading", "cached"],
    "streamed": ["--distillation.teacher-model.loading", "streamed"],
    "on_policy": ["--data.train", str(DEMO / "chat_train.jsonl"), "--data.eval", str(DEMO / "chat_train.jsonl"),
                  "--data.tokenizer", str(DEMO / "chat_teacher"), "--distillation-params.on-policy.fraction", "0.5",
                  "--distillation-params.on-policy.max-new-tokens", "64", "--distillation.student-model.init",
                  "random"],
    # lm-eval requests scored at the micro-batch's shape (the tasks are not read to compile)
    "downstream": ["--training.downstream.tasks", "demo_arithmetic"],
    # across tokenizers: the pysrc teacher's 2,048-id tokenizer as the student's, its vocabulary 6,144; ALM + CE +
    # the shared-vocabulary KL (every part of the cross step), 640 teacher tokens a window
    "cross": CROSS + ["--distillation-params.shared-kl-weight", "1"],
    # and with a streamed teacher (its labels' log-probabilities an argument of the step; no shared KL)
    "cross_streamed": CROSS + ["--distillation.teacher-model.loading", "streamed"],
}


def mid_config(directory: Path) -> Path:
    """Write the mid-size run config (and the teacher's config.json) under `directory`."""
    import yaml

    from models import ModelConfig

    (directory / "teacher").mkdir(parents=True, exist_ok=True)
    (directory / "teacher" / "config.json").write_text(json.dumps(ModelConfig(**TEACHER).to_hf(dtype="bfloat16")))
    unused = str(directory / "unused.npy")
    text = {
        "distillation": {
            "teacher_model": {"path": str(directory / "teacher"), "dtype": "bfloat16",
                              "cache_dir": str(directory / "cache")},
            "student_model": {"init": "from_teacher", "num_hidden_layers": 4, "hidden_size": 256,
                              "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2}},
        "data": {"train": unused, "eval": unused},
        "training": {"output_dir": str(directory / "out"), "batch_size": 16, "seq_len": 512, "grad_accum_steps": 2,
                     "compute_dtype": "bfloat16", "param_dtype": "float32", "eval_batches": 2},
        "distillation_params": {"kd_weight": 1.0, "feature_weight": 1.0, "logit_chunk_size": 128,
                                "eplb": {"enabled": True, "num_stages": 2, "stage_steps": 2, "probe_tokens": 1024}},
        "parallelism": {"fsdp": 4},
        "tracking": {"aim": False},
    }
    (directory / "mid.yaml").write_text(yaml.safe_dump(text))
    return directory / "mid.yaml"


def tiled_bytes(tree) -> int:
    """Bytes on one device of the abstract leaves of `tree` with their last two dimensions padded to XLA:TPU's
    tiles (128 lanes; 8 sublanes of 32 bits, so 16 rows of 16-bit and 32 of 8-bit elements) and at least 512 bytes a
    buffer: the most a TPU buffer of that shard shape takes."""
    import math

    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            shape = list(leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)) or [1]
            item = np.dtype(leaf.dtype).itemsize
            shape[-1] = -(-shape[-1] // 128) * 128
            if len(shape) > 1:
                rows = 8 * 4 // item
                shape[-2] = -(-shape[-2] // rows) * rows
            total += max(512, math.prod(shape) * item)
    return total


def compare(config: Path, target: str, layouts, programs=None, log=print) -> list[dict]:
    """Plan and compile the programs of each layout; one row per program."""
    import jax

    from vishwam.compile.programs import AbstractRun, compile_program
    from vishwam.compile.targets import resolve_target
    from vishwam.config.cli import load_config
    from vishwam.plan.planner import Planner, Setup
    from vishwam.plan.program_plan import ProgramPlanner, device_bytes

    rows = []
    for layout in layouts:
        cfg = load_config(str(config), LAYOUTS[layout])
        run = AbstractRun(cfg, resolve_target(target, cfg.parallelism.num_devices))
        planner = Planner(cfg, run.t_config)
        programs_planner = ProgramPlanner(planner, cfg.parallelism)
        for name, (fn, args, kwargs) in run.programs().items():
            if programs and name not in programs and f"{layout}:{name}" not in programs:
                continue
            xla = compile_program(name, fn, args, kwargs)
            if name == "train":
                plan = planner.plan(Setup.from_config(cfg), None, "")
                planned = {"total_bytes": plan.total_bytes, "argument_bytes": None, "output_bytes": None}
            else:
                outputs = run.abstract_outputs(name, fn, args, kwargs)
                p = programs_planner.plan(name, args, kwargs, outputs)
                planned = {"total_bytes": p.total_bytes, "argument_bytes": p.argument_bytes,
                           "output_bytes": p.output_bytes, "tiled_output_bytes": tiled_bytes(outputs)}
            planned["buffers"] = sum(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((args, kwargs)))
            # The most XLA:TPU's tiles can add to the arguments (a [2, 8192] float32 shard takes 8 rows).
            planned["argument_padding"] = tiled_bytes((args, kwargs)) - device_bytes((args, kwargs))
            row = {"layout": layout, "program": name, "planner": planned,
                   "xla": {k: getattr(xla, k) for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                                        "temp_bytes", "total_bytes", "compile_seconds", "error")}}
            row["ratio"] = None if not xla.total_bytes else planned["total_bytes"] / xla.total_bytes
            rows.append(row)
            mib = lambda n: f"{n / 2**20:9.1f}" if n is not None else f"{'-':>9}"  # noqa: E731
            log(f"{layout:10} {name:18} planner {mib(planned['total_bytes'])}  XLA {mib(xla.total_bytes)} MiB  "
                f"ratio {row['ratio'] or float('nan'):5.2f}  ({xla.compile_seconds:.1f} s"
                f"{', ' + xla.error[:80] if xla.error else ''})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="tpu:v5p-8")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--programs", nargs="+", default=None,
                        help="program names (every layout's), or LAYOUT:PROGRAM for one layout's")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    configure_process(args.target)
    with tempfile.TemporaryDirectory() as d:
        config = mid_config(Path(d))
        print(f"planner vs XLA, mid-size config, {args.target}; MiB per device; ratio = planner / XLA", flush=True)
        rows = compare(config, args.target, args.layouts, args.programs, log=lambda s: print(s, flush=True))
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
