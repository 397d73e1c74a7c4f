"""Throughput, compile-time, memory and checkpoint-load benchmarks: `python -m benchmarks.bench`.

What one run measures (vishwam in this process; PyTorch and each checkpoint load in child processes, so that
neither framework's idle threads nor earlier phases' memory skew the other's figures):

1. the machine's matmul peak (a square `jnp.dot` in the compute dtype, best of several; torch's for reference),
   the denominator of MFU;
2. the whole jitted distillation step (resident teacher forward inside the step, student forward and backward,
   AdamW) from `make_train_step`: trace and compile time, steady-state step time, tokens/s and MFU;
3. the same step written the usual way in PyTorch + transformers (`Qwen2ForCausalLM`, eager, `torch.optim.AdamW`)
   on the same shapes and loss, and the throughput ratio vishwam / torch;
4. peak resident memory per phase;
5. checkpoint load speed of `load_pretrained` (a sharded safetensors export of the `d512` teacher) and its peak
   memory over the loaded bytes;
6. compile time of the step for a 4-layer vs a 32-layer student (the layer scan should keep it flat).

`--size gpu` is the accelerator size (a Qwen2.5-0.5B-shaped student under a Qwen2.5-1.5B-shaped teacher, meant for
`--dtype bfloat16` on one 80 GB GPU): torch runs on CUDA when it is available, its child process runs *before* JAX
starts (XLA preallocates most of the GPU's memory when its backend starts), device peak memory is reported for
both frameworks, and phases 5 and 6 are skipped (`--skip-load`, `--skip-depth` do that for any size).

Step times are the median over `--steps` timed steps after warm-up, each ended by `jax.block_until_ready`. See
`docs/benchmarks.md` for the method and figures. Nothing here changes JAX's global configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from distill.config import DistillationParams, TemperatureConfig
from distill.objective import Objective, teacher_outputs
from models import ModelConfig, init_model
from vishwam.io.checkpoint import open_pretrained, save_pretrained
from vishwam.tracking import peak_rss_bytes, rss_bytes
from vishwam.train.step import StepConfig, init_state, make_optimizer, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MB = 1e6
#: The repository root (this file is `benchmarks/bench.py`): the torch child process imports `benchmarks.bench`
#: from here.
ROOT = Path(__file__).resolve().parents[1]

#: The objective both frameworks compute: forward KL at T=2 (scaled by T²) + 0.5 · cross-entropy.
PARAMS = DistillationParams(kd_weight=1.0, ce_weight=0.5, kd_loss="forward_kl",
                            temperature=TemperatureConfig(start=2.0))
OPTIMIZER = {"learning_rate": 3e-4, "warmup_steps": 0, "total_steps": 1000, "weight_decay": 0.01, "grad_clip": 1.0}


def qwen2(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, *, tied: bool = False,
          rope_theta: float = 10000.0, max_positions: int = 4096) -> ModelConfig:
    return ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, qkv_bias=True, max_position_embeddings=max_positions,
                       tie_word_embeddings=tied, rope_theta=rope_theta)


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """One teacher/student pair and the batch shape it is timed at."""

    name: str
    teacher: ModelConfig
    student: ModelConfig
    batch: int
    seq: int
    #: `DistillationParams.logit_chunk_size` for this size: sequence positions per chunk of the fp32 logit losses.
    chunk_size: int | None = None
    #: Sized for one accelerator: torch (on CUDA when available) is timed before JAX starts, the matmul peak uses
    #: `ACCEL_MATMUL_N`, and the checkpoint-load and compile-vs-depth phases are skipped. Not part of `--size all`.
    accelerator: bool = False

    def objective(self, params: DistillationParams | None = None) -> Objective:
        """The objective of `params` (default `PARAMS`) with this size's `logit_chunk_size`."""
        return Objective(dataclasses.replace(params or PARAMS, logit_chunk_size=self.chunk_size))

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def gemm_shape(self) -> tuple[int, int, int]:
        """`(m, k, n)` of the teacher's MLP up-projection over the step's tokens: its most common matmul."""
        return self.tokens, self.teacher.hidden_size, self.teacher.intermediate_size

    def flops_per_step(self) -> float:
        """Teacher forward (×1) + student forward and backward (×3), from `ModelConfig.flops_per_token`."""
        per_token = self.teacher.flops_per_token(self.seq) + 3 * self.student.flops_per_token(self.seq)
        return self.tokens * per_token


SIZES = {
    # The size of the embedded default run: a tiny Qwen2 teacher and a half-width, half-depth student.
    "demo": BenchSize("demo", teacher=qwen2(512, 128, 4, 4, 2, 384), student=qwen2(512, 64, 2, 4, 2, 192),
                      batch=8, seq=128),
    # A d=512 student under a d=1024 teacher, both 8 layers, an 8k vocabulary.
    # Batch 2 keeps a step near a second or two on a 2-core CPU; `--batch 8` gives 2048-token steps.
    "d512": BenchSize("d512", teacher=qwen2(8192, 1024, 8, 16, 8, 3072), student=qwen2(8192, 512, 8, 8, 4, 1536),
                      batch=2, seq=256),
    # One 80 GB GPU, bf16: a Qwen2.5-0.5B-shaped student (494M) under a Qwen2.5-1.5B-shaped teacher (1.54B), both
    # with tied embeddings and the real 151,936-token vocabulary. The logit losses run in chunks of 128 positions
    # (8 × 128 tokens × 151,936 × 4 B = 0.62 GB per fp32 tensor), never on the whole [8192, 151936] fp32 logits.
    # Device peak memory measured at 8 × 1024 on one H100 (docs/benchmarks.md): vishwam 22.8 GB, eager torch 58.1 GB.
    "gpu": BenchSize("gpu",
                     teacher=qwen2(151936, 1536, 28, 12, 2, 8960, tied=True, rope_theta=1e6, max_positions=32768),
                     student=qwen2(151936, 896, 24, 14, 2, 4864, tied=True, rope_theta=1e6, max_positions=32768),
                     batch=8, seq=1024, chunk_size=128, accelerator=True),
}
#: What `--size all` runs: the CPU sizes.
ALL = [name for name, size in SIZES.items() if not size.accelerator]
#: The matmul side for the peak on an accelerator size (unless `--matmul-n` is given).
ACCEL_MATMUL_N = 8192


def resolve_size(name: str, batch: int | None = None, seq: int | None = None, shrink: bool = False) -> BenchSize:
    """`SIZES[name]` with the batch shape overridden; `shrink` (a hidden smoke-test switch, `--shrink`) cuts both
    models to 2 layers and a 4096-token vocabulary, keeping the widths, so that the accelerator size's code path
    can be run end to end on a small CPU machine."""
    size = SIZES[name]
    size = dataclasses.replace(size, batch=batch or size.batch, seq=seq or size.seq)
    if shrink:
        small = {"num_hidden_layers": 2, "vocab_size": min(4096, size.teacher.vocab_size)}
        size = dataclasses.replace(size, teacher=size.teacher.replace(**small), student=size.student.replace(**small))
    return size


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- measuring


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


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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


def random_batch(size: BenchSize, seed: int) -> dict[str, np.ndarray]:
    """Uniform random tokens; labels are the inputs shifted by one, every position counts."""
    ids = np.random.default_rng(seed).integers(0, size.student.vocab_size, (size.batch, size.seq + 1))
    return {"input_ids": ids[:, :-1].astype(np.int32), "labels": ids[:, 1:].astype(np.int32),
            "mask": np.ones((size.batch, size.seq), np.int32)}


# --------------------------------------------------------------------------------------------- vishwam


def build_jax_step(size: BenchSize, dtype: str, key, attention_impl: str = "auto",
                   params: DistillationParams | None = None):
    """Teacher, train state and the jitted step, assembled as `vishwam.run.loop.Run.train` does (single device:
    no mesh, no state shardings). Params are fp32; the teacher is stored and the step computes in `dtype`;
    both models run `attention_impl` (`models.attention`); `params` defaults to `PARAMS`."""
    k_teacher, k_student, k_state = jax.random.split(key, 3)
    teacher = init_model(size.teacher, key=k_teacher, dtype=DTYPES[dtype])
    student = init_model(size.student, key=k_student, dtype=jnp.float32)
    optimizer, schedule = make_optimizer(**OPTIMIZER)
    state = init_state(student, None, None, optimizer, k_state, ())
    step = make_train_step(StepConfig(size.objective(params), DTYPES[dtype], grad_accum_steps=1, remat=False,
                                      attention_impl=attention_impl), optimizer, schedule)
    return teacher, state, step


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    # A copy per call: the step donates its batch buffers.
    return {k: jnp.array(v) for k, v in batch.items()}


def compile_step(step, teacher, state, batch) -> dict[str, float]:
    """AOT-compile the step. **Returns:** `compiled` and the wall and process-CPU seconds of tracing + lowering
    (`lower_s`, `lower_cpu_s`) and of XLA compilation (`compile_s`, `compile_cpu_s`). CPU seconds are less
    sensitive than wall seconds to other processes competing for the cores."""
    w0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        # The int32 batch buffers are donated but alias no output; equinox silences this on calls, not on lower.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        lowered = step.lower(teacher, state, device_batch(batch), None)
    w1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    w2, c2 = time.perf_counter(), time.process_time()
    return {"compiled": compiled, "lower_s": w1 - w0, "lower_cpu_s": c1 - c0, "compile_s": w2 - w1,
            "compile_cpu_s": c2 - c1}


class JaxRunner:
    """The vishwam step for one size, compiled ahead of time; `step` and `teacher_forward` return seconds.
    `attention_impl` and `params` go to `build_jax_step`."""

    def __init__(self, size: BenchSize, dtype: str, attention_impl: str = "auto",
                 params: DistillationParams | None = None):
        self.teacher, self.state, step = build_jax_step(size, dtype, jax.random.key(0), attention_impl, params)
        times = compile_step(step, self.teacher, self.state, random_batch(size, 0))
        self.compiled = times.pop("compiled")
        self.compile_times = times
        self.losses: list[float] = []
        # The teacher forward alone, as the step runs it, to say where the step's time goes.
        objective = size.objective(params)
        self._forward = eqx.filter_jit(
            lambda t, ids, mask: teacher_outputs(t, ids, mask, objective, attention_impl=attention_impl).logits)

    def step(self, batch: dict[str, np.ndarray]) -> float:
        inputs = device_batch(batch)
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.teacher, self.state, inputs, None)
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - t0
        self.losses.append(float(metrics["loss"]))
        return seconds

    def teacher_forward(self, batch: dict[str, np.ndarray]) -> float:
        ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["mask"])
        return timed(lambda: self._forward(self.teacher, ids, mask).block_until_ready())

    def summary(self) -> dict:
        out = {**self.compile_times, "first_loss": self.losses[0], "last_loss": self.losses[-1],
               "skipped": int(self.state.skipped)}
        stats = device_memory_stats()
        if stats is not None:  # an accelerator: the allocator's peak since the process started
            out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
            out["device_bytes_limit"] = stats.get("bytes_limit")
        return out


# --------------------------------------------------------------------------------------------- torch


class TorchRunner:
    """The same step in eager PyTorch + transformers: teacher forward under no_grad, student forward and
    backward, the same loss, gradient clipping and AdamW (no decay on vectors, as `make_optimizer`). With
    bfloat16 the teacher is stored in bf16 and the student (fp32 params) runs under autocast. On `device="cuda"`
    the models are built on the GPU, AdamW is the fused CUDA kernel (`fused=True`, PyTorch's fast path there),
    and every clock reading follows `torch.cuda.synchronize()`."""

    def __init__(self, size: BenchSize, dtype: str, device: str = "cpu"):
        import torch
        import transformers

        self.torch = torch
        self.device = device
        torch.manual_seed(0)

        def hf_model(cfg: ModelConfig):
            hf = transformers.Qwen2Config(**cfg.to_hf())
            with torch.device(device):  # initialise on the device, not on the host and then copy
                model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
            return model.to(device)

        bf16 = dtype == "bfloat16"
        self.teacher = hf_model(size.teacher).eval()
        if bf16:
            self.teacher = self.teacher.to(torch.bfloat16)
        self.student = hf_model(size.student).train()
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        cuda = {"fused": True} if device == "cuda" else {}
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": OPTIMIZER["weight_decay"]},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=OPTIMIZER["learning_rate"], betas=(0.9, 0.95), **cuda)
        self.autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
        self.losses: list[float] = []

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _inputs(self, batch):
        ids = self.torch.from_numpy(batch["input_ids"].astype(np.int64)).to(self.device)
        labels = self.torch.from_numpy(batch["labels"].astype(np.int64)).to(self.device)
        return ids, labels

    def _loss(self, ids, labels):
        import torch.nn.functional as F

        torch, temperature = self.torch, PARAMS.temperature.start
        with torch.no_grad(), self.autocast():
            t_logits = self.teacher(input_ids=ids, use_cache=False).logits.float()
        with self.autocast():
            s_logits = self.student(input_ids=ids, use_cache=False).logits.float()
        v = s_logits.shape[-1]
        log_q = F.log_softmax(s_logits / temperature, dim=-1).reshape(-1, v)
        log_p = F.log_softmax(t_logits / temperature, dim=-1).reshape(-1, v)
        kd = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
        ce = F.cross_entropy(s_logits.reshape(-1, v), labels.reshape(-1))
        return PARAMS.kd_weight * kd + PARAMS.ce_weight * ce

    def step(self, batch: dict[str, np.ndarray]) -> float:
        # The batch is on the device before the clock starts, as in `JaxRunner.step`.
        ids, labels = self._inputs(batch)
        self._sync()
        t0 = time.perf_counter()
        loss = self._loss(ids, labels)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, OPTIMIZER["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        seconds = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return seconds

    def teacher_forward(self, batch: dict[str, np.ndarray]) -> float:
        ids, _ = self._inputs(batch)
        self._sync()

        def forward():
            with self.torch.no_grad(), self.autocast():
                self.teacher(input_ids=ids, use_cache=False)
            self._sync()

        return timed(forward)

    def summary(self) -> dict:
        out = {"first_loss": self.losses[0], "last_loss": self.losses[-1], "threads": self.torch.get_num_threads(),
               "device": self.device}
        if self.device == "cuda":
            cuda = self.torch.cuda
            out.update(device_peak_bytes=cuda.max_memory_allocated(), device_peak_reserved_bytes=cuda.max_memory_reserved(),
                       gpu=cuda.get_device_name(0))
        return out


def time_runner(runner, batches: list, forward_repeats: int) -> dict:
    """`runner.step` over `batches` (after warm-up) and `forward_repeats` teacher forwards (after one untimed):
    medians, the best step, and the raw times."""
    step_times = [runner.step(batch) for batch in batches]
    runner.teacher_forward(batches[0])
    forward_times = [runner.teacher_forward(batches[i % len(batches)]) for i in range(forward_repeats)]
    return {**runner.summary(), "step_s": statistics.median(step_times), "best_step_s": min(step_times),
            "steps": len(step_times), "teacher_forward_s": statistics.median(forward_times),
            "step_times_s": step_times, "teacher_forward_times_s": forward_times}


def torch_worker(size: str, batch: int, seq: int, dtype: str, steps: int, warmup: int, matmul_n: int,
                 threads: int | None = None, device: str = "cpu", shrink: bool = False) -> dict:
    """The torch side of `bench_size`, run in its own process (see `_TORCH_SCRIPT`). `device="auto"` is CUDA when
    torch sees a GPU, else the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads:
        torch.set_num_threads(threads)
    bench = resolve_size(size, batch, seq, shrink)
    mem = PhaseMemory()
    peak = matmul_peak_torch(matmul_n, 10, dtype, device)
    batches = [random_batch(bench, seed) for seed in range(1, 1 + warmup + steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with mem.phase("torch step"):
        runner = TorchRunner(bench, dtype, device)
        for b in batches[:warmup]:
            runner.step(b)
    out = time_runner(runner, batches[warmup:], max(3, steps))
    out["gemm_rate"] = gemm_rate_torch(*bench.gemm_shape(), 20, dtype, device)
    return {**out, "matmul_peak": peak, "threads": torch.get_num_threads(), **mem.phases["torch step"],
            "resettable": mem.resettable,
            "process_peak_mb": mem.overall_peak() / MB, "torch_version": torch.__version__}


# PyTorch runs in a child process. Run in the vishwam process right after JAX work, torch's steps were at times
# several-fold slower (two thread pools, OpenMP's and XLA's, sharing the cores); its own process removes that
# question, and gives its memory figures a clean baseline.
_TORCH_SCRIPT = """
import json, sys
from benchmarks.bench import torch_worker
print(json.dumps(torch_worker(**json.loads(sys.argv[1]))))
"""


def error_line(text: str) -> str:
    """The last non-empty line of a traceback (`torch.OutOfMemoryError: CUDA out of memory. ...`), fit for a table
    cell."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output").replace("|", "/")[:300]


def run_torch(size: BenchSize, dtype: str, steps: int, warmup: int, matmul_n: int, threads: int | None = None,
              device: str = "auto", shrink: bool = False, timeout: float | None = None) -> dict:
    """`torch_worker` in a child process, which imports `benchmarks.bench` from `ROOT` (put first on its
    PYTHONPATH). The child sees only the CPU as a JAX platform, so that importing vishwam there can never claim GPU
    memory. **Returns:** its figures, or `{"error": ..., "stderr": ...}` when it failed or ran past `timeout`
    seconds (the failure is logged, not raised, so the vishwam figures survive)."""
    args = {"size": size.name, "batch": size.batch, "seq": size.seq, "dtype": dtype, "steps": steps,
            "warmup": warmup, "matmul_n": matmul_n, "threads": threads, "device": device, "shrink": shrink}
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    try:
        out = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, json.dumps(args)], capture_output=True,
                             text=True, check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log(f"warning: [{size.name}] the torch benchmark ran past {timeout:.0f} s and was stopped\n{stderr[-2000:]}")
        return {"error": f"timed out after {timeout:.0f} s", "stderr": stderr[-4000:]}
    if out.returncode:
        log(f"warning: [{size.name}] the torch benchmark failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        return {"error": f"exit {out.returncode}: {error_line(out.stderr)}", "stderr": out.stderr[-4000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_jax(size: BenchSize, dtype: str, steps: int, warmup: int, mem: PhaseMemory, batches: list,
             attention_impl: str = "auto") -> dict:
    """The vishwam side of `bench_size`: build, compile and `warmup` steps in one memory phase, then the timing.
    `attention_impl` is both models' attention (`"xla"`: the fallback when cuDNN fails on an accelerator)."""
    with mem.phase(f"{size.name}: vishwam step"):
        runner = JaxRunner(size, dtype, attention_impl)
        for batch in batches[:warmup]:
            runner.step(batch)
    out = time_runner(runner, batches[warmup:], max(3, steps))
    return {**out, "gemm_rate": gemm_rate_jax(*size.gemm_shape(), 20, DTYPES[dtype])}


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
        import traceback

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


# --------------------------------------------------------------------------------------------- checkpoint, depth


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
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, text=True,
                                 check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return {"bytes": nbytes, "shards": shards, "save_s": save_s, "load_s": min(r["seconds"] for r in runs),
                "median_load_s": statistics.median(r["seconds"] for r in runs), "runs": runs,
                "extra_peak_bytes": max(r["extra_peak_bytes"] for r in runs)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# --------------------------------------------------------------------------------------------- report


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
    lines = ["| size | metric | value | unit | how measured |", "|---|---|---:|---|---|"]
    lines += [f"| {r.section} | {r.metric} | {fmt(r.value)} | {r.unit} | {r.how} |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict:
    """The host, the versions, and JAX's backend and device (this starts JAX's backend)."""
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    try:  # the version only: torch is never imported into this process
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    devices = jax.devices()
    return {"cpu": model, "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": len(devices), "device_kind": devices[0].device_kind, "torch": torch_version,
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def flops_unit(peak: float) -> tuple[float, str]:
    """GFLOP/s on a CPU, TFLOP/s from 10 TFLOP/s up."""
    return (1e12, "TFLOP/s") if peak >= 1e13 else (1e9, "GFLOP/s")


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
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
    scale, unit = flops_unit(peak)
    rows.append(Row("machine", f"JAX matmul peak ({dt})", peak / scale, unit,
                    f"jitted `jnp.dot` {n}×{n}, 2n³/t, best of 10 × {len(peaks)} samples over the run "
                    f"(samples {', '.join(f'{p / scale:.0f}' for p in peaks)})"))
    torch_ok = [t for _, _, t in measured if t is not None and "error" not in t]
    if torch_ok:
        t_peak = max(t["matmul_peak"] for t in torch_ok)
        where = "CUDA" if torch_ok[0].get("device") == "cuda" else f"{torch_ok[0]['threads']} threads"
        rows.append(Row("machine", f"torch matmul peak ({dt})", t_peak / scale, unit,
                        f"`a @ b` {n}×{n}, best of 10 in each torch process, {where}"))
    details["matmul_peak_samples"] = peaks

    for size, r, torch_r in measured:
        rows += step_rows(size, r, peak, torch_r, dt)
        phase = mem.phases.get(f"{size.name}: vishwam step")
        if phase is not None:
            rows.append(Row(size.name, "vishwam phase peak RSS", phase["peak_mb"], "MB",
                            f"{hwm(mem.resettable)} (RSS then {phase['start_mb']:.0f} MB); models, compile, "
                            "warm-up steps"))
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
        kernel_s = ", ".join(f"{r['system_s']:.2f}" for r in ck["runs"])
        rows += [
            Row("checkpoint", "load_pretrained", ck["bytes"] / MB / ck["load_s"], "MB/s",
                f"{ck['bytes'] / MB:.0f} MB fp32 d512 teacher in {ck['shards']} shards of ≤50MB, best of "
                f"{args.load_repeats} fresh processes (median {ck['bytes'] / MB / ck['median_load_s']:.0f} MB/s); "
                f"page cache warm; kernel CPU per load {kernel_s} s"),
            Row("checkpoint", "load extra peak RSS / checkpoint bytes", ck["extra_peak_bytes"] / ck["bytes"], "×",
                "(VmHWM after − VmHWM before the load) / bytes, worst of the loads"),
            Row("checkpoint", "save_pretrained", ck["bytes"] / MB / ck["save_s"], "MB/s",
                "the same model, one save, into the page cache (before fsync)"),
        ]
        details["checkpoint"] = ck

    if args.skip_depth or accelerator_only:
        log("compile time vs depth: skipped")
    else:
        log("compile time vs depth ...")
        depths = bench_compile_depth(SIZES["demo"], (4, 32), args.dtype)
        total = {k: v["lower_s"] + v["compile_s"] for k, v in depths.items()}
        total_cpu = {k: v["lower_cpu_s"] + v["compile_cpu_s"] for k, v in depths.items()}
        for layers, v in depths.items():
            rows.append(Row("depth", f"step compile, {layers}-layer student", total[layers], "s",
                            f"trace+lower {v['lower_s']:.2f} s + XLA {v['compile_s']:.2f} s wall; CPU "
                            f"{total_cpu[layers]:.2f} s; demo widths and teacher"))
        rows.append(Row("depth", "compile ratio 32 / 4 layers", total[32] / total[4], "×",
                        f"wall; CPU-seconds ratio {total_cpu[32] / total_cpu[4]:.2f}× (`lax.scan` over stacked "
                        "layers)"))
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
    device = "" if info["backend"] == "cpu" else f", {info['devices']} × {info['device_kind']}"
    print(f"\n{info['cpu']}, {info['cores']} cores{device}, jax {info['jax']} ({info['backend']}), torch "
          f"{info['torch']}; load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at "
          "end\n")
    print(markdown(rows))
    if args.json:
        details["rows"] = [dataclasses.asdict(r) for r in rows]
        with open(args.json, "w") as f:
            json.dump(details, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
