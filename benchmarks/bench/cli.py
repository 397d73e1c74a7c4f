"""`python -m benchmarks.bench`: the command line, and the order of the phases of one run (torch first for an
accelerator size; per size the matmul peak, the vishwam step, the torch step; then the checkpoint load and the
compile-vs-depth phase; the table and the JSON last)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import traceback

import benchmarks.bench
from benchmarks.bench.jax_runner import time_jax
from benchmarks.bench.load_depth import bench_checkpoint, bench_compile_depth, checkpoint_rows, depth_rows
from benchmarks.bench.measure import MB, PhaseMemory, attention_kernel, flops_unit, matmul_peak_jax
from benchmarks.bench.report import (
    Row,
    error_line,
    machine_info,
    machine_line,
    markdown,
    memory_rows,
    peak_rows,
    step_rows,
)
from benchmarks.bench.sizes import ACCEL_MATMUL_N, ALL, DTYPES, SIZES, BenchSize, random_batch, resolve_size
from benchmarks.bench.torch_runner import run_torch
from benchmarks.common import log, write_json


def bench_size(size: BenchSize, dtype: str, steps: int, warmup: int, with_torch: bool, mem: PhaseMemory,
               matmul_n: int = 2048, torch_threads: int | None = None, torch_result: dict | None = None,
               torch_device: str = "auto", shrink: bool = False, torch_timeout: float | None = None) -> dict:
    """Time the vishwam step here (model build, compile and `warmup` steps form one memory phase: by then the
    steady-state memory is reached), then the torch step in a child process (unless `torch_result` was measured
    before, as for accelerator sizes). **Returns:** per framework, `time_runner`'s figures (and the torch
    process's memory and matmul peak), or `{"error": ...}` for a side that failed (for vishwam: accelerator sizes
    only; elsewhere its errors propagate). On an accelerator, a vishwam step that fails with cuDNN attention for
    another reason than memory is run once more with XLA's attention (`attention` in its figures says so)."""
    batches = [random_batch(size, seed) for seed in range(1, 1 + warmup + steps)]
    kernel = attention_kernel(size, dtype)
    try:
        results = {"vishwam": {**time_jax(size, dtype, steps, warmup, mem, batches), "attention": kernel}}
    except Exception as e:  # an OOM on the accelerator must not lose the torch figures
        if not size.accelerator:
            raise
        log(f"warning: [{size.name}] the vishwam benchmark failed:\n{traceback.format_exc()[-4000:]}")
        first = (str(e).strip().splitlines() or [""])[0]  # XLA's OOM: "RESOURCE_EXHAUSTED: Out of memory ..."
        error = error_line(f"{type(e).__name__}: {first}")
        results = {"vishwam": {"error": error, "attention": kernel}}
        memory = "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower()
        if "cudnn" in kernel and not memory:
            log(f"[{size.name}] once more with XLA's attention instead of cuDNN ...")
            gc.collect()
            try:
                r = time_jax(size, dtype, steps, warmup, mem, batches, attention_impl="xla")
                results = {"vishwam": {**r, "attention": f"xla (cuDNN failed: {error[:120]})"}}
            except Exception:  # noqa: BLE001 - reported as the failure it is
                log(f"warning: [{size.name}] failed with XLA's attention too:\n{traceback.format_exc()[-4000:]}")
    if torch_result is not None:
        results["torch"] = torch_result
    elif with_torch:
        results["torch"] = run_torch(size, dtype, steps, warmup, matmul_n, torch_threads, torch_device, shrink,
                                     torch_timeout)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                description=benchmarks.bench.__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=[*SIZES, "all"], default="demo",
                   help=f"teacher/student pair; `all` = {', '.join(ALL)} (`gpu` is for one 80 GB accelerator)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=None, help="override the size's batch")
    p.add_argument("--seq", type=int, default=None, help="override the size's sequence length")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (params stay fp32)")
    p.add_argument("--skip-torch", action="store_true", help="skip the PyTorch + transformers comparison")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the torch process (default: torch's own choice)")
    p.add_argument("--torch-device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the torch step runs (auto: CUDA when torch sees a GPU)")
    p.add_argument("--torch-timeout", type=float, default=None,
                   help="stop the torch process after this many seconds and report it as failed")
    p.add_argument("--matmul-n", type=int, default=None,
                   help=f"side of the square matmul for the peak (default 2048; {ACCEL_MATMUL_N} for `gpu`)")
    p.add_argument("--load-repeats", type=int, default=3, help="checkpoint loads (best is reported)")
    p.add_argument("--skip-load", action="store_true", help="skip the checkpoint-load phase (skipped for `gpu`)")
    p.add_argument("--skip-depth", action="store_true", help="skip the compile-vs-depth phase (skipped for `gpu`)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    # Smoke tests only: both models cut to 2 layers and a 4096-token vocabulary (see `resolve_size`).
    p.add_argument("--shrink", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    names = ALL if args.size == "all" else [args.size]
    sizes = [resolve_size(name, args.batch, args.seq, args.shrink) for name in names]
    accelerator_only = all(size.accelerator for size in sizes)
    n = args.matmul_n or (ACCEL_MATMUL_N if any(size.accelerator for size in sizes) else 2048)
    dt = args.dtype
    torch_kw = {"threads": args.torch_threads, "device": args.torch_device, "shrink": args.shrink,
                "timeout": args.torch_timeout}

    # An accelerator size's torch step runs first, before this process starts JAX's backend: XLA reserves most of
    # the GPU's memory when it starts (75% by default), which would leave torch too little.
    early_torch: dict[str, dict] = {}
    if not args.skip_torch:
        for size in sizes:
            if size.accelerator:
                log(f"[{size.name}] torch step first (in a child process, before JAX starts) ...")
                t = early_torch[size.name] = run_torch(size, dt, args.steps, args.warmup, n, **torch_kw)
                if "error" not in t:
                    log(f"[{size.name}] torch ({t['device']}): {t['step_s'] * 1e3:.1f} ms/step, "
                        f"{size.tokens / t['step_s']:,.0f} tokens/s, teacher forward "
                        f"{t['teacher_forward_s'] * 1e3:.1f} ms, matmul peak "
                        f"{t['matmul_peak'] / flops_unit(t['matmul_peak'])[0]:.1f} {flops_unit(t['matmul_peak'])[1]}"
                        + (f", device peak {t['device_peak_bytes'] / 1e9:.2f} GB" if "device_peak_bytes" in t
                           else ""))

    info = machine_info()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        log("warning: JAX_COMPILATION_CACHE_DIR is set; compile times may come from the persistent cache")
    log(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['loadavg_start']}; JAX backend "
        f"{info['backend']} ({info['devices']} × {info['device_kind']})")
    mem = PhaseMemory()
    rows: list[Row] = []
    details: dict = {"machine": info, "args": vars(args), "sizes": {}}

    # The peak is sampled before each size and at the end and the best sample kept: the hardware's peak is fixed,
    # and another process taking a core during one sample only lowers that sample.
    peaks: list[float] = []

    def sample_peak():
        peaks.append(matmul_peak_jax(n, 10, DTYPES[dt]))
        scale, unit = flops_unit(peaks[-1])
        log(f"matmul peak sample: {peaks[-1] / scale:.1f} {unit}")

    measured = []
    for size in sizes:
        sample_peak()
        log(f"[{size.name}] teacher {size.teacher.num_parameters() / 1e6:.1f}M, student "
            f"{size.student.num_parameters() / 1e6:.1f}M params, batch {size.batch} × seq {size.seq}")
        results = bench_size(size, dt, args.steps, args.warmup, not args.skip_torch, mem, matmul_n=n,
                             torch_threads=args.torch_threads, torch_result=early_torch.get(size.name),
                             torch_device=args.torch_device, shrink=args.shrink, torch_timeout=args.torch_timeout)
        measured.append((size, results["vishwam"], results.get("torch")))
        r, t = results["vishwam"], results.get("torch")
        flops = size.flops_per_step()
        msg = (f"[{size.name}] vishwam: FAILED ({r['error']})" if "error" in r else
               f"[{size.name}] vishwam: {r['step_s'] * 1e3:.1f} ms/step, {size.tokens / r['step_s']:,.0f} tokens/s, "
               f"MFU {100 * flops / r['step_s'] / max(peaks):.1f}% (of the best peak so far), compile "
               f"{r['lower_s'] + r['compile_s']:.1f} s, attention {r['attention']}"
               + (f", device peak {r['device_peak_bytes'] / 1e9:.2f} GB" if r.get("device_peak_bytes") else ""))
        if t is not None:
            msg += (f"; torch: FAILED ({t['error']})" if "error" in t else
                    f"; torch: {t['step_s'] * 1e3:.1f} ms/step, MFU {100 * flops / t['step_s'] / max(peaks):.1f}%")
        log(msg)
    sample_peak()
    peak = max(peaks)
    rows += peak_rows(peaks, n, dt, [t for _, _, t in measured])
    details["matmul_peak_samples"] = peaks

    for size, r, torch_r in measured:
        rows += step_rows(size, r, peak, torch_r, dt)
        rows += memory_rows(size, r, torch_r, mem)
        details["sizes"][size.name] = {"vishwam": r, "torch": torch_r, "tokens": size.tokens,
                                       "flops_per_step": size.flops_per_step(), "chunk_size": size.chunk_size,
                                       "teacher": dataclasses.asdict(size.teacher),
                                       "student": dataclasses.asdict(size.student)}
    mfu = [r.value for r in rows if r.metric.endswith("MFU")]
    if any(v > 100 for v in mfu):
        log("warning: an MFU above 100%: every matmul-peak sample was taken while the CPU was contended")

    if args.skip_load or accelerator_only:
        log("checkpoint load: skipped")
    else:
        log("checkpoint load: saving the d512 teacher ...")
        ck = bench_checkpoint(SIZES["d512"].teacher, args.load_repeats)
        rows += checkpoint_rows(ck, args.load_repeats)
        details["checkpoint"] = ck

    if args.skip_depth or accelerator_only:
        log("compile time vs depth: skipped")
    else:
        log("compile time vs depth ...")
        depths = bench_compile_depth(SIZES["demo"], (4, 32), args.dtype)
        rows += depth_rows(depths)
        details["compile_depth"] = depths

    rows.append(Row("process", "peak RSS", mem.overall_peak() / MB, "MB", "max VmHWM over all phases"))
    info["loadavg_end"] = os.getloadavg()
    details["memory_phases"] = mem.phases

    busy = max(info["loadavg_start"][0], info["loadavg_end"][0])
    if busy > info["cores"] + 1:  # the benchmark's own threads account for up to `cores` of the load
        log(f"warning: load average {busy:.1f} on {info['cores']} cores during the run: other processes "
            "competed for the CPU, so times are inflated and noisy (eager torch, whose OpenMP regions wait on every "
            "thread, suffers most); compare runs made on a quiet machine")
    failed = [r for r in rows if r.how.startswith("FAILED")]
    if failed:
        log("warning: " + "; ".join(f"{r.section} {r.metric} FAILED" for r in failed) + " (see above)")
    print(f"\n{machine_line(info)}\n")
    print(markdown(rows))
    if args.json:
        details["rows"] = [dataclasses.asdict(r) for r in rows]
        write_json(args.json, details)
    return rows
