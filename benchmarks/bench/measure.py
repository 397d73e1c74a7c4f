"""How the figures are taken: peak resident memory per phase, the matmul rates that are MFU's denominator (JAX's
and torch's), the device's allocator statistics, which attention kernel the models resolve to, and a runner's
step and teacher-forward times."""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp

from benchmarks.bench.sizes import DTYPES, BenchSize
from benchmarks.common import timed
from vishwam.tracking import peak_rss_bytes, rss_bytes

MB = 1e6


class PhaseMemory:
    """Peak RSS per phase. Writing `5` to `/proc/self/clear_refs` (Linux >= 4.0) resets the kernel's high-water
    mark (VmHWM) to the current RSS, so each phase's peak is its own; where that is refused (`resettable` is
    False) the peaks are cumulative."""

    def __init__(self):
        self.process_peak = peak_rss_bytes()
        self.phases: dict[str, dict[str, float]] = {}
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def phase(self, name: str):
        gc.collect()
        self.process_peak = max(self.process_peak, peak_rss_bytes())
        self._reset()
        start = rss_bytes()
        yield
        peak = peak_rss_bytes()
        self.process_peak = max(self.process_peak, peak)
        self.phases[name] = {"start_mb": start / MB, "peak_mb": peak / MB, "extra_mb": (peak - start) / MB}

    def overall_peak(self) -> int:
        return max(self.process_peak, peak_rss_bytes())


def gemm_rate_jax(m: int, k: int, n: int, repeats: int, dtype, weight_layout: bool = True) -> float:
    """FLOP/s of the best of `repeats` jitted `[m, k] @ [k, n]` products (2mkn FLOPs each). With `weight_layout`
    the right operand is stored `[n, k]` and contracted on its last axis, as a `Linear` weight is."""
    x = jax.random.normal(jax.random.key(0), (m, k), dtype)
    w = jax.random.normal(jax.random.key(1), (n, k) if weight_layout else (k, n), dtype)
    product = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn" if weight_layout else "mk,kn->mn", x, w))
    product(x, w).block_until_ready()
    return 2 * m * k * n / min(timed(lambda: product(x, w).block_until_ready()) for _ in range(repeats))


def matmul_peak_jax(n: int, repeats: int, dtype) -> float:
    """FLOP/s of the best of `repeats` jitted `n×n @ n×n` products (2n³ FLOPs each)."""
    return gemm_rate_jax(n, n, n, repeats, dtype, weight_layout=False)


def gemm_rate_torch(m: int, k: int, n: int, repeats: int, dtype: str, device: str = "cpu",
                    weight_layout: bool = True) -> float:
    """`gemm_rate_jax` for torch (`x @ w.T` with `weight_layout`, as `nn.Linear`)."""
    import torch

    x = torch.randn(m, k, dtype=getattr(torch, dtype), device=device)
    w = torch.randn((n, k) if weight_layout else (k, n), dtype=getattr(torch, dtype), device=device)

    def product():  # CUDA launches are asynchronous: synchronise before reading the clock
        x @ w.T if weight_layout else x @ w
        if device != "cpu":
            torch.cuda.synchronize()

    product()
    return 2 * m * k * n / min(timed(product) for _ in range(repeats))


def matmul_peak_torch(n: int, repeats: int, dtype: str, device: str = "cpu") -> float:
    return gemm_rate_torch(n, n, n, repeats, dtype, device, weight_layout=False)


def flops_unit(peak: float) -> tuple[float, str]:
    """GFLOP/s on a CPU, TFLOP/s from 10 TFLOP/s up."""
    return (1e12, "TFLOP/s") if peak >= 1e13 else (1e9, "GFLOP/s")


def attention_kernel(size: BenchSize, dtype: str) -> str:
    """Which attention kernel the step's models resolve to on this backend (`"auto"`: cuDNN flash attention on a
    GPU in bf16, XLA's einsums otherwise), or "xla" where the models have no such choice."""
    try:
        from models.attention import resolve_implementation
    except ImportError:
        return "xla"
    try:
        kinds = {resolve_implementation("auto", DTYPES[dtype], cfg.head_dim, False)
                 for cfg in (size.teacher, size.student)}
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({type(e).__name__})"
    return "/".join(sorted(kinds))


def device_memory_stats() -> dict | None:
    """JAX's first device's allocator statistics (`peak_bytes_in_use`, `bytes_limit`, ...); None on CPU."""
    try:
        return jax.devices()[0].memory_stats() or None
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def build_and_time(make_runner: Callable[[], object], batches: list, warmup: int, steps: int, mem: PhaseMemory,
                   phase: str) -> dict:
    """`make_runner()` and its first `warmup` steps over `batches` in the memory phase `phase` of `mem` (by then the
    steady-state memory is reached), then `time_runner` over the other batches with `max(3, steps)` teacher
    forwards."""
    with mem.phase(phase):
        runner = make_runner()
        for batch in batches[:warmup]:
            runner.step(batch)
    return time_runner(runner, batches[warmup:], max(3, steps))


def time_runner(runner, batches: list, forward_repeats: int) -> dict:
    """`runner.step` over `batches` (after warm-up) and `forward_repeats` teacher forwards (after one untimed):
    medians, the best step, and the raw times. `runner` is a `JaxRunner` or a `TorchRunner`."""
    step_times = [runner.step(batch) for batch in batches]
    runner.teacher_forward(batches[0])
    forward_times = [runner.teacher_forward(batches[i % len(batches)]) for i in range(forward_repeats)]
    return {**runner.summary(), "step_s": statistics.median(step_times), "best_step_s": min(step_times),
            "steps": len(step_times), "teacher_forward_s": statistics.median(forward_times),
            "step_times_s": step_times, "teacher_forward_times_s": forward_times}
