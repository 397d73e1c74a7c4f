"""The report: the machine the run is on, one `Row` per figure (value, unit, how it was measured) for the matmul
peaks, each size's step and memory, and the markdown table they are printed as."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import platform

import jax

from benchmarks.bench.measure import PhaseMemory, flops_unit
from benchmarks.bench.sizes import BenchSize
from benchmarks.common import cpu_model, markdown_table


@dataclasses.dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    how: str


def fmt(value: float) -> str:
    if math.isnan(value):  # a side that failed (its row says why)
        return "—"
    if isinstance(value, int) or (abs(value) >= 100 and float(value).is_integer()):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown(rows: list[Row]) -> str:
    return "\n".join(markdown_table(["size", "metric", "value", "unit", "how measured"],
                                    [(r.section, r.metric, fmt(r.value), r.unit, r.how) for r in rows], right=[2]))


def error_line(text: str) -> str:
    """The last non-empty line of a traceback (`torch.OutOfMemoryError: CUDA out of memory. ...`), fit for a table
    cell."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output").replace("|", "/")[:300]


def machine_info() -> dict:
    """The host, the versions, and JAX's backend and device (this starts JAX's backend)."""
    try:  # the version only: torch is never imported into this process
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    devices = jax.devices()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": len(devices), "device_kind": devices[0].device_kind, "torch": torch_version,
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def machine_line(info: dict) -> str:
    """`machine_info` (with `loadavg_end`) in one line, the table's heading."""
    device = "" if info["backend"] == "cpu" else f", {info['devices']} × {info['device_kind']}"
    return (f"{info['cpu']}, {info['cores']} cores{device}, jax {info['jax']} ({info['backend']}), torch "
            f"{info['torch']}; load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at "
            "end")


def peak_rows(peaks: list[float], n: int, dtype: str, torch_results: list[dict | None]) -> list[Row]:
    """The JAX matmul peak (the best of the `peaks` samples of `n`×`n` products) and torch's (the best over the
    torch processes of `torch_results` that did not fail)."""
    peak = max(peaks)
    scale, unit = flops_unit(peak)
    rows = [Row("machine", f"JAX matmul peak ({dtype})", peak / scale, unit,
                f"jitted `jnp.dot` {n}×{n}, 2n³/t, best of 10 × {len(peaks)} samples over the run "
                f"(samples {', '.join(f'{p / scale:.0f}' for p in peaks)})")]
    torch_ok = [t for t in torch_results if t is not None and "error" not in t]
    if torch_ok:
        t_peak = max(t["matmul_peak"] for t in torch_ok)
        where = "CUDA" if torch_ok[0].get("device") == "cuda" else f"{torch_ok[0]['threads']} threads"
        rows.append(Row("machine", f"torch matmul peak ({dtype})", t_peak / scale, unit,
                        f"`a @ b` {n}×{n}, best of 10 in each torch process, {where}"))
    return rows


def torch_how(t: dict) -> str:
    if t.get("device") == "cuda":
        return "eager transformers `Qwen2ForCausalLM` (sdpa) + fused `torch.optim.AdamW`, CUDA, own process"
    return f"eager transformers `Qwen2ForCausalLM` (sdpa) + `torch.optim.AdamW`, {t['threads']} threads, own process"


def step_rows(size: BenchSize, r: dict, peak: float, torch_r: dict | None, dtype: str) -> list[Row]:
    """The rows of one size; a side whose figures are `{"error": ...}` gets one `FAILED` row (value NaN)."""
    s, flops = size.name, size.flops_per_step()
    shape = f"batch {size.batch} × seq {size.seq}, {dtype}"
    if size.chunk_size:
        shape += f", logit losses in chunks of {size.chunk_size} positions"
    if r.get("attention", "xla") != "xla":
        shape += f", vishwam attention: {r['attention']}"
    rows = [
        Row(s, "teacher params", size.teacher.num_parameters() / 1e6, "M", f"`ModelConfig.num_parameters()`; {shape}"),
        Row(s, "student params", size.student.num_parameters() / 1e6, "M", "`ModelConfig.num_parameters()`"),
        Row(s, "model FLOPs per step", flops / 1e9, "GFLOP",
            "tokens × (teacher `flops_per_token` + 3 × student `flops_per_token`)"),
    ]
    tps = None
    if "error" in r:
        rows.append(Row(s, "vishwam step", float("nan"), "ms", f"FAILED: {r['error']}"))
    else:
        tps = size.tokens / r["step_s"]
        rows += [
            Row(s, "vishwam trace + lower", r["lower_s"], "s",
                f"`step.lower(...)`, wall (CPU {r['lower_cpu_s']:.2f} s): Python tracing to StableHLO"),
            Row(s, "vishwam XLA compile", r["compile_s"], "s",
                f"`lowered.compile()`, wall (CPU {r['compile_cpu_s']:.2f} s)"),
            Row(s, "vishwam step", r["step_s"] * 1e3, "ms",
                f"median of {r['steps']} steps after warm-up, `block_until_ready`; best "
                f"{r['best_step_s'] * 1e3:.0f} ms"),
            Row(s, "vishwam teacher forward alone", r["teacher_forward_s"] * 1e3, "ms",
                f"jitted `teacher_outputs`, median (best {min(r['teacher_forward_times_s']) * 1e3:.0f} ms); "
                f"{r['teacher_forward_s'] / r['step_s']:.0%} of the median step"),
            Row(s, "vishwam throughput", tps, "tokens/s", "batch × seq / median step"),
            Row(s, "vishwam MFU", 100 * flops / r["step_s"] / peak, "%", "model FLOPs per step / step time / JAX "
                f"matmul peak; loss {r['first_loss']:.3f} → {r['last_loss']:.3f}, {r['skipped']} skipped"),
        ]
        if "gemm_rate" in r:
            rows.append(gemm_row(size, "JAX", r["gemm_rate"], peak))
    if torch_r is not None and "error" in torch_r:
        rows.append(Row(s, "torch step", float("nan"), "ms", f"FAILED: {torch_r['error']}"))
    elif torch_r is not None:
        t_tps = size.tokens / torch_r["step_s"]
        rows += [
            Row(s, "torch step", torch_r["step_s"] * 1e3, "ms", f"{torch_how(torch_r)}, median; best "
                f"{torch_r['best_step_s'] * 1e3:.0f} ms"),
            Row(s, "torch teacher forward alone", torch_r["teacher_forward_s"] * 1e3, "ms",
                f"`no_grad` forward, median (best {min(torch_r['teacher_forward_times_s']) * 1e3:.0f} ms); "
                f"{torch_r['teacher_forward_s'] / torch_r['step_s']:.0%} of the median step"),
            Row(s, "torch throughput", t_tps, "tokens/s", "batch × seq / median step"),
            Row(s, "torch MFU", 100 * flops / torch_r["step_s"] / peak, "%",
                f"same FLOPs / JAX matmul peak; loss {torch_r['first_loss']:.3f} → {torch_r['last_loss']:.3f}"),
        ]
        if "gemm_rate" in torch_r:
            rows.append(gemm_row(size, "torch", torch_r["gemm_rate"], peak))
        if tps is not None:
            rows.append(Row(s, "ratio vishwam / torch", tps / t_tps, "×", "tokens/s over tokens/s (medians); "
                            f"best-step ratio {torch_r['best_step_s'] / r['best_step_s']:.2f}×"))
    return rows


def gemm_row(size: BenchSize, framework: str, rate: float, peak: float) -> Row:
    """One framework's matmul rate at the step's most common shape, against the JAX square-matmul peak."""
    m, k, n = size.gemm_shape()
    scale, unit = flops_unit(peak)
    return Row(size.name, f"{framework} matmul at the teacher's MLP shape", rate / scale, unit,
               f"`x @ W.T`, x {m}×{k}, W {n}×{k}, best of 20; {100 * rate / peak:.0f}% of the JAX square peak")


def hwm(resettable: bool) -> str:
    return "VmHWM reset at phase start" if resettable else "VmHWM since process start (reset refused)"


def memory_rows(size: BenchSize, r: dict, torch_r: dict | None, mem: PhaseMemory) -> list[Row]:
    """One size's peak memory: the vishwam phase's RSS (from `mem`) and device peak, torch's RSS and device peak."""
    rows = []
    phase = mem.phases.get(f"{size.name}: vishwam step")
    if phase is not None:
        rows.append(Row(size.name, "vishwam phase peak RSS", phase["peak_mb"], "MB",
                        f"{hwm(mem.resettable)} (RSS then {phase['start_mb']:.0f} MB); models, compile, warm-up steps"))
    if r.get("device_peak_bytes"):
        rows.append(Row(size.name, "vishwam device peak memory", r["device_peak_bytes"] / 1e9, "GB",
                        "`jax.devices()[0].memory_stats()['peak_bytes_in_use']` since process start (XLA pool "
                        f"{(r.get('device_bytes_limit') or 0) / 1e9:.1f} GB)"))
    if torch_r is not None and "error" not in torch_r:
        rows.append(Row(size.name, "torch phase peak RSS", torch_r["peak_mb"], "MB",
                        f"torch process, {hwm(torch_r['resettable'])} (RSS then {torch_r['start_mb']:.0f} "
                        "MB); models, warm-up steps"))
        if torch_r.get("device_peak_bytes"):
            rows.append(Row(size.name, "torch device peak memory", torch_r["device_peak_bytes"] / 1e9, "GB",
                            "`torch.cuda.max_memory_allocated()` over models, warm-up and timed steps "
                            f"(reserved {torch_r['device_peak_reserved_bytes'] / 1e9:.1f} GB)"))
    return rows
