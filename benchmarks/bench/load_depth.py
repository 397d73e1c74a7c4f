"""The two phases after the step: checkpoint load speed of `load_pretrained` (a sharded safetensors export of the
`d512` teacher, each load in a fresh process) with its peak memory over the loaded bytes, and the step's compile
time for a shallow vs a deep student (the layer scan should keep it flat). Each phase's figures and its rows."""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import jax

from benchmarks.bench.jax_runner import build_jax_step, compile_step
from benchmarks.bench.measure import MB
from benchmarks.bench.report import Row
from benchmarks.bench.sizes import BenchSize, random_batch
from benchmarks.common import last_json, python_child
from models import ModelConfig, init_model
from vishwam.io.checkpoint import open_pretrained

# Each load runs in a fresh interpreter, so earlier phases' freed-but-kept allocator pages cannot absorb it; the
from vishwam.io.export import save_pretrained

# Each load runs in a fresh interpreter, so earlier phases' freed-but-kept allocator pages cannot absorb it; the
# baseline is taken after imports and JAX start-up, as in tests/test_checkpoint_errors.py.
_LOAD_SCRIPT = """
import json, resource, sys, time
import jax
import vishwam.io.checkpoint
from vishwam.tracking import peak_rss_bytes
jax.numpy.zeros(1).block_until_ready()
base = peak_rss_bytes()
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
jax.block_until_ready(vishwam.io.checkpoint.load_pretrained(sys.argv[1]))
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "extra_peak_bytes": peak_rss_bytes() - base,
                  "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime}))
"""


def bench_checkpoint(cfg: ModelConfig, repeats: int) -> dict:
    """Save a random model of `cfg` with `save_pretrained` sharded at 50MB, then time `load_pretrained` (as
    stored: fp32) in `repeats` fresh processes. The page cache is warm: the files were just written (and synced),
    and caches cannot be dropped without root."""
    tmp = tempfile.mkdtemp(prefix="vishwam-bench-")
    try:
        model = init_model(cfg, key=jax.random.key(0))
        t0 = time.perf_counter()
        path = save_pretrained(model, os.path.join(tmp, "teacher"), max_shard_size="50MB")
        save_s = time.perf_counter() - t0
        del model
        # Write the dirty pages back first, so that no load overlaps the writeback; the files stay cached.
        for name in os.listdir(path):
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        nbytes = open_pretrained(path).nbytes()
        shards = len([f for f in os.listdir(path) if f.endswith(".safetensors")])
        runs = [last_json(python_child(["-c", _LOAD_SCRIPT, str(path)]).stdout) for _ in range(repeats)]
        return {"bytes": nbytes, "shards": shards, "save_s": save_s, "load_s": min(r["seconds"] for r in runs),
                "median_load_s": statistics.median(r["seconds"] for r in runs), "runs": runs,
                "extra_peak_bytes": max(r["extra_peak_bytes"] for r in runs)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_rows(ck: dict, repeats: int) -> list[Row]:
    """The rows of `bench_checkpoint`'s figures `ck` (of `repeats` loads)."""
    kernel_s = ", ".join(f"{r['system_s']:.2f}" for r in ck["runs"])
    return [
        Row("checkpoint", "load_pretrained", ck["bytes"] / MB / ck["load_s"], "MB/s",
            f"{ck['bytes'] / MB:.0f} MB fp32 d512 teacher in {ck['shards']} shards of ≤50MB, best of "
            f"{repeats} fresh processes (median {ck['bytes'] / MB / ck['median_load_s']:.0f} MB/s); "
            f"page cache warm; kernel CPU per load {kernel_s} s"),
        Row("checkpoint", "load extra peak RSS / checkpoint bytes", ck["extra_peak_bytes"] / ck["bytes"], "×",
            "(VmHWM after − VmHWM before the load) / bytes, worst of the loads"),
        Row("checkpoint", "save_pretrained", ck["bytes"] / MB / ck["save_s"], "MB/s",
            "the same model, one save, into the page cache (before fsync)"),
    ]


def bench_compile_depth(size: BenchSize, depths: tuple[int, ...], dtype: str) -> dict[int, dict[str, float]]:
    """`compile_step`'s timings for the step with students of `size`'s widths at each depth in `depths`."""
    out = {}
    for layers in depths:
        deep = dataclasses.replace(size, student=size.student.replace(num_hidden_layers=layers))
        teacher, state, step = build_jax_step(deep, dtype, jax.random.key(layers))
        times = compile_step(step, teacher, state, random_batch(deep, 0))
        del times["compiled"]
        out[layers] = times
    return out


def depth_rows(depths: dict[int, dict[str, float]]) -> list[Row]:
    """The rows of `bench_compile_depth`'s timings at 4 and 32 layers (the demo size's widths and teacher)."""
    total = {k: v["lower_s"] + v["compile_s"] for k, v in depths.items()}
    total_cpu = {k: v["lower_cpu_s"] + v["compile_cpu_s"] for k, v in depths.items()}
    rows = [Row("depth", f"step compile, {layers}-layer student", total[layers], "s",
                f"trace+lower {v['lower_s']:.2f} s + XLA {v['compile_s']:.2f} s wall; CPU "
                f"{total_cpu[layers]:.2f} s; demo widths and teacher") for layers, v in depths.items()]
    rows.append(Row("depth", "compile ratio 32 / 4 layers", total[32] / total[4], "×",
                    f"wall; CPU-seconds ratio {total_cpu[32] / total_cpu[4]:.2f}× (`lax.scan` over stacked layers)"))
    return rows
