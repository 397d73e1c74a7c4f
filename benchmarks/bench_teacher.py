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
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks.common import DEMO, ROOT, last_json, markdown_table, python_child, timed, write_json

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
    env = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    results = {mode: last_json(python_child(["-c", _CHILD, str(path), mode], env=env).stdout)
               for mode in ("resident", "streamed")}
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

    cfg_path = ROOT / "configs" / "distill.yaml"
    common = ["--training.max-steps", str(steps), "--training.eval-every", str(10**6), "--training.save-every",
              str(10**6), "--training.log-every", str(max(1, steps // 3)), "--tracking.aim", "false",
              "--distillation-params.attention-weight", "0", "--distillation-params.eplb.remap", "false",
              "--distillation.teacher-model.path", str(DEMO / "teacher"), "--data.train", str(DEMO / "train.jsonl"),
              "--data.eval", str(DEMO / "eval.jsonl")]
    out = {}
    for mode in ("resident", "cached"):
        flags = [*common, "--training.output-dir", str(workdir / mode), "--distillation.teacher-model.loading", mode,
                 "--distillation.teacher-model.cache-dir", str(workdir / "cache")]
        if mode == "cached":  # build first, so the timing below is training only
            from vishwam.cache import main as build

            build(["--config", str(cfg_path), *flags])
        run = Run(load_config(str(cfg_path), flags))
        wall = timed(run.train)
        rows = [json.loads(x) for x in (workdir / mode / "metrics.jsonl").read_text().splitlines()]
        out[mode] = {"tokens_per_sec_last_interval": rows[-1]["tokens_per_sec"], "wall_seconds": wall}
    index = json.loads((workdir / "cache" / "train" / "index.json").read_text())
    out["cache_bytes_per_token"] = index["bytes_per_token"]
    out["cached_over_resident"] = (out["cached"]["tokens_per_sec_last_interval"]
                                   / out["resident"]["tokens_per_sec_last_interval"])
    return out


def memory_table(mem: dict) -> list[str]:
    """`memory_comparison`'s figures as a markdown table."""
    return markdown_table(["teacher forward (4×128 tokens)", "resident", "streamed (max_resident_shards=2)"], [
        ["checkpoint", f"{mem['teacher_mb']:.0f} MB fp32 in {mem['shards']} shards",
         f"{mem['streamed_groups']} layer groups"],
        ["peak RSS (VmHWM)", f"{mem['resident_peak_mb']:.0f} MB",
         f"{mem['streamed_peak_mb']:.0f} MB ({mem['peak_ratio']:.2f}×)"],
        ["peak RSS above the post-import baseline", f"{mem['resident_extra_mb']:.0f} MB",
         f"{mem['streamed_extra_mb']:.0f} MB ({mem['extra_ratio']:.2f}×)"],
        ["load + forward time", f"{mem['resident_seconds']:.1f} s", f"{mem['streamed_seconds']:.1f} s"],
        ["outputs agree (1e-5)", mem["outputs_agree"], ""]])


def cache_table(cache: dict, steps: int) -> list[str]:
    """`cache_throughput`'s figures (of `steps` steps per mode) as a markdown table."""
    resident, cached = cache["resident"], cache["cached"]
    return markdown_table(["distillation step, demo shapes", "live resident teacher", "top-k cache (k=64)"], [
        [f"tokens/s (the last third of {steps} steps, after compilation)",
         f"{resident['tokens_per_sec_last_interval']:.0f}",
         f"{cached['tokens_per_sec_last_interval']:.0f} ({cache['cached_over_resident']:.2f}×)"],
        ["cache size", "", f"{cache['cache_bytes_per_token']:.0f} bytes/token"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=60, help="training steps per mode for the cache comparison")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mem = memory_comparison(work)
        print("\n".join(memory_table(mem)))
        result = {"memory": mem}
        if not args.skip_cache:
            cache = cache_throughput(work, args.steps)
            result["cache"] = cache
            print()
            print("\n".join(cache_table(cache, args.steps)))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
