"""Benchmark the teacher loading modes: `python -m benchmarks.bench_teacher [--json PATH]`.

1. Peak memory of one teacher forward pass, resident vs streamed, on a ~600 MB fp32 teacher saved in 8 shards,
   streamed with `max_resident_shards=2`. Each mode runs in a fresh subprocess; the figure is the process's
   peak RSS (VmHWM) and the part of it above the post-import baseline, and the two modes' outputs are checked
   to agree.
2. Distillation-step throughput with a live resident teacher vs a top-k teacher cache (same student, same
   batches), plus the cache's bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

_CHILD = textwrap.dedent("""
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    import vishwam
    from vishwam.tracking import peak_rss_bytes
    from vishwam.teacher.streamed import StreamedTeacher
    jnp.zeros(1).block_until_ready()
    import vishwam.io.checkpoint
    base = peak_rss_bytes()
    path, mode = sys.argv[1], sys.argv[2]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (4, 128)))
    t0 = time.perf_counter()
    lazy = vishwam.open_pretrained(path)
    if mode == "resident":
        model = lazy.load()
        logits = model(ids).logits
    else:
        model = StreamedTeacher(lazy, dtype=None, max_resident_shards=2)
        logits = model(ids).logits
        model.close()
    logits = np.asarray(logits)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "base": base, "peak": peak_rss_bytes(), "seconds": seconds,
                      "checkpoint_bytes": lazy.nbytes(), "checksum": float(np.abs(logits).sum()),
                      "groups": len(model.groups) if mode == "streamed" else 1}))
""")


def _make_teacher(path: Path):
    import jax
    import jax.numpy as jnp

    import vishwam
    from models import ModelConfig, init_model

    config = ModelConfig(model_type="qwen2", vocab_size=4096, hidden_size=1280, intermediate_size=4096,
                         num_hidden_layers=8, num_attention_heads=10, num_key_value_heads=2, head_dim=128,
                         qkv_bias=True)
    model = init_model(config, key=jax.random.key(0), dtype=jnp.float32)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model))
    vishwam.save_pretrained(model, path, max_shard_size=int(nbytes / 8) + 1)
    return nbytes


def memory_comparison(workdir: Path) -> dict:
    path = workdir / "teacher600mb"
    nbytes = _make_teacher(path)
    shards = len(list(path.glob("*.safetensors")))
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    results = {}
    for mode in ("resident", "streamed"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), mode], capture_output=True, text=True,
                              env=env, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    r, s = results["resident"], results["streamed"]
    agree = abs(r["checksum"] - s["checksum"]) <= 1e-5 * abs(r["checksum"])
    return {
        "teacher_mb": nbytes / 1e6, "shards": shards, "streamed_groups": s["groups"],
        "resident_peak_mb": r["peak"] / 1e6, "streamed_peak_mb": s["peak"] / 1e6,
        "resident_extra_mb": (r["peak"] - r["base"]) / 1e6, "streamed_extra_mb": (s["peak"] - s["base"]) / 1e6,
        "peak_ratio": s["peak"] / r["peak"], "extra_ratio": (s["peak"] - s["base"]) / (r["peak"] - r["base"]),
        "resident_seconds": r["seconds"], "streamed_seconds": s["seconds"], "outputs_agree": agree,
    }


def cache_throughput(workdir: Path, steps: int) -> dict:
    from vishwam.config.cli import load_config
    from vishwam.run.loop import Run

    root = Path(__file__).resolve().parents[1]
    cfg_path = root / "configs" / "distill.yaml"
    common = ["--training.max-steps", str(steps), "--training.eval-every", str(10**6), "--training.save-every",
              str(10**6), "--training.log-every", str(max(1, steps // 3)), "--tracking.aim", "false",
              "--distillation-params.attention-weight", "0", "--distillation-params.eplb.remap", "false",
              "--distillation.teacher-model.path", str(root / "vishwam/assets/demo/teacher"),
              "--data.train", str(root / "vishwam/assets/demo/train.jsonl"),
              "--data.eval", str(root / "vishwam/assets/demo/eval.jsonl")]
    out = {}
    for mode in ("resident", "cached"):
        flags = [*common, "--training.output-dir", str(workdir / mode), "--distillation.teacher-model.loading", mode,
                 "--distillation.teacher-model.cache-dir", str(workdir / "cache")]
        if mode == "cached":  # build first, so the timing below is training only
            from vishwam.cache import main as build

            build(["--config", str(cfg_path), *flags])
        run = Run(load_config(str(cfg_path), flags))
        t0 = time.perf_counter()
        run.train()
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (workdir / mode / "metrics.jsonl").read_text().splitlines()]
        out[mode] = {"tokens_per_sec_last_interval": rows[-1]["tokens_per_sec"], "wall_seconds": wall}
    index = json.loads((workdir / "cache" / "train" / "index.json").read_text())
    out["cache_bytes_per_token"] = index["bytes_per_token"]
    out["cached_over_resident"] = (out["cached"]["tokens_per_sec_last_interval"]
                                   / out["resident"]["tokens_per_sec_last_interval"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=60, help="training steps per mode for the cache comparison")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mem = memory_comparison(work)
        print("| teacher forward (4×128 tokens) | resident | streamed (max_resident_shards=2) |")
        print("|---|---|---|")
        print(f"| checkpoint | {mem['teacher_mb']:.0f} MB fp32 in {mem['shards']} shards | "
              f"{mem['streamed_groups']} layer groups |")
        print(f"| peak RSS (VmHWM) | {mem['resident_peak_mb']:.0f} MB | {mem['streamed_peak_mb']:.0f} MB "
              f"({mem['peak_ratio']:.2f}×) |")
        print(f"| peak RSS above the post-import baseline | {mem['resident_extra_mb']:.0f} MB | "
              f"{mem['streamed_extra_mb']:.0f} MB ({mem['extra_ratio']:.2f}×) |")
        print(f"| load + forward time | {mem['resident_seconds']:.1f} s | {mem['streamed_seconds']:.1f} s |")
        print(f"| outputs agree (1e-5) | {mem['outputs_agree']} | |")
        result = {"memory": mem}
        if not args.skip_cache:
            cache = cache_throughput(work, args.steps)
            result["cache"] = cache
            print()
            print("| distillation step, demo shapes | live resident teacher | top-k cache (k=64) |")
            print("|---|---|---|")
            print(f"| tokens/s (the last third of {args.steps} steps, after compilation) | "
                  f"{cache['resident']['tokens_per_sec_last_interval']:.0f} | "
                  f"{cache['cached']['tokens_per_sec_last_interval']:.0f} ({cache['cached_over_resident']:.2f}×) |")
            print(f"| cache size | | {cache['cache_bytes_per_token']:.0f} bytes/token |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
