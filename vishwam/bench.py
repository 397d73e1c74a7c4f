"""Throughput, compile-time, memory and checkpoint-load benchmarks: `python -m vishwam.bench`.

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

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from distill.objective import ObjectiveSpec, teacher_outputs
from models import ModelConfig, init_model

from .checkpoint import open_pretrained, save_pretrained
from .memory import peak_rss_bytes, rss_bytes
from .train_state import StepConfig, init_state, make_optimizer, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MB = 1e6

#: The objective both frameworks compute: forward KL at T=2 (scaled by T²) + 0.5 · cross-entropy.
SPEC = ObjectiveSpec(kd_weight=1.0, ce_weight=0.5, kd_kind="forward_kl", temperature_start=2.0)
OPTIMIZER = {"learning_rate": 3e-4, "warmup_steps": 0, "total_steps": 1000, "weight_decay": 0.01, "grad_clip": 1.0}


def qwen2(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> ModelConfig:
    return ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, qkv_bias=True, max_position_embeddings=4096)


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """One teacher/student pair and the batch shape it is timed at."""

    name: str
    teacher: ModelConfig
    student: ModelConfig
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

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
}


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


def matmul_peak_jax(n: int, repeats: int, dtype) -> float:
    """FLOP/s of the best of `repeats` jitted `n×n @ n×n` products (2n³ FLOPs each)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * n**3 / min(timed(lambda: dot(a, b).block_until_ready()) for _ in range(repeats))


def matmul_peak_torch(n: int, repeats: int, dtype: str) -> float:
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(repeats))


def random_batch(size: BenchSize, seed: int) -> dict[str, np.ndarray]:
    """Uniform random tokens; labels are the inputs shifted by one, every position counts."""
    ids = np.random.default_rng(seed).integers(0, size.student.vocab_size, (size.batch, size.seq + 1))
    return {"input_ids": ids[:, :-1].astype(np.int32), "labels": ids[:, 1:].astype(np.int32),
            "mask": np.ones((size.batch, size.seq), np.int32)}


# --------------------------------------------------------------------------------------------- vishwam


def build_jax_step(size: BenchSize, dtype: str, key):
    """Teacher, train state and the jitted step, assembled as `vishwam.trainer.Run.train` does (single device:
    no mesh, no state shardings). Params are fp32; the teacher is stored and the step computes in `dtype`."""
    k_teacher, k_student, k_state = jax.random.split(key, 3)
    teacher = init_model(size.teacher, key=k_teacher, dtype=DTYPES[dtype])
    student = init_model(size.student, key=k_student, dtype=jnp.float32)
    optimizer, schedule = make_optimizer(**OPTIMIZER)
    state = init_state(student, None, None, optimizer, k_state, ())
    step = make_train_step(StepConfig(SPEC, DTYPES[dtype], grad_accum_steps=1, remat=False), optimizer, schedule)
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
    """The vishwam step for one size, compiled ahead of time; `step` and `teacher_forward` return seconds."""

    def __init__(self, size: BenchSize, dtype: str):
        self.teacher, self.state, step = build_jax_step(size, dtype, jax.random.key(0))
        times = compile_step(step, self.teacher, self.state, random_batch(size, 0))
        self.compiled = times.pop("compiled")
        self.compile_times = times
        self.losses: list[float] = []
        # The teacher forward alone, as the step runs it, to say where the step's time goes.
        self._forward = eqx.filter_jit(lambda t, ids, mask: teacher_outputs(t, ids, mask, SPEC).logits)

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
        return {**self.compile_times, "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "skipped": int(self.state.skipped)}


# --------------------------------------------------------------------------------------------- torch


class TorchRunner:
    """The same step in eager PyTorch + transformers: teacher forward under no_grad, student forward and
    backward, the same loss, gradient clipping and AdamW (no decay on vectors, as `make_optimizer`). With
    bfloat16 the teacher is stored in bf16 and the student runs under CPU autocast."""

    def __init__(self, size: BenchSize, dtype: str):
        import torch
        import transformers

        self.torch = torch
        torch.manual_seed(0)

        def hf_model(cfg: ModelConfig):
            hf = transformers.Qwen2Config(**cfg.to_hf())
            return transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")

        bf16 = dtype == "bfloat16"
        self.teacher = hf_model(size.teacher).eval()
        if bf16:
            self.teacher = self.teacher.to(torch.bfloat16)
        self.student = hf_model(size.student).train()
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": OPTIMIZER["weight_decay"]},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=OPTIMIZER["learning_rate"], betas=(0.9, 0.95))
        self.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        self.losses: list[float] = []

    def _loss(self, batch):
        import torch.nn.functional as F

        torch, temperature = self.torch, SPEC.temperature_start
        ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
        labels = torch.from_numpy(batch["labels"].astype(np.int64))
        with torch.no_grad(), self.autocast():
            t_logits = self.teacher(input_ids=ids, use_cache=False).logits.float()
        with self.autocast():
            s_logits = self.student(input_ids=ids, use_cache=False).logits.float()
        v = s_logits.shape[-1]
        log_q = F.log_softmax(s_logits / temperature, dim=-1).reshape(-1, v)
        log_p = F.log_softmax(t_logits / temperature, dim=-1).reshape(-1, v)
        kd = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
        ce = F.cross_entropy(s_logits.reshape(-1, v), labels.reshape(-1))
        return SPEC.kd_weight * kd + SPEC.ce_weight * ce

    def step(self, batch: dict[str, np.ndarray]) -> float:
        t0 = time.perf_counter()
        loss = self._loss(batch)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, OPTIMIZER["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return seconds

    def teacher_forward(self, batch: dict[str, np.ndarray]) -> float:
        ids = self.torch.from_numpy(batch["input_ids"].astype(np.int64))

        def forward():
            with self.torch.no_grad(), self.autocast():
                self.teacher(input_ids=ids, use_cache=False)

        return timed(forward)

    def summary(self) -> dict:
        return {"first_loss": self.losses[0], "last_loss": self.losses[-1], "threads": self.torch.get_num_threads()}


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
                 threads: int | None = None) -> dict:
    """The torch side of `bench_size`, run in its own process (see `_TORCH_SCRIPT`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    bench = dataclasses.replace(SIZES[size], batch=batch, seq=seq)
    mem = PhaseMemory()
    peak = matmul_peak_torch(matmul_n, 10, dtype)
    batches = [random_batch(bench, seed) for seed in range(1, 1 + warmup + steps)]
    with mem.phase("torch step"):
        runner = TorchRunner(bench, dtype)
        for b in batches[:warmup]:
            runner.step(b)
    out = time_runner(runner, batches[warmup:], max(3, steps))
    return {**out, "matmul_peak": peak, "threads": torch.get_num_threads(), **mem.phases["torch step"],
            "resettable": mem.resettable,
            "process_peak_mb": mem.overall_peak() / MB}


# PyTorch runs in a child process. Run in the vishwam process right after JAX work, torch's steps were at times
# several-fold slower (two thread pools, OpenMP's and XLA's, sharing the cores); its own process removes that
# question, and gives its memory figures a clean baseline.
_TORCH_SCRIPT = """
import json, sys
from vishwam.bench import torch_worker
print(json.dumps(torch_worker(**json.loads(sys.argv[1]))))
"""


def bench_size(size: BenchSize, dtype: str, steps: int, warmup: int, with_torch: bool, mem: PhaseMemory,
               matmul_n: int = 2048, torch_threads: int | None = None) -> dict:
    """Time the vishwam step here (model build, compile and `warmup` steps form one memory phase: by then the
    steady-state memory is reached), then the torch step in a child process. **Returns:** per framework,
    `time_runner`'s figures (and the torch process's memory and matmul peak)."""
    batches = [random_batch(size, seed) for seed in range(1, 1 + warmup + steps)]
    with mem.phase(f"{size.name}: vishwam step"):
        runner = JaxRunner(size, dtype)
        for batch in batches[:warmup]:
            runner.step(batch)
    results = {"vishwam": time_runner(runner, batches[warmup:], max(3, steps))}
    del runner
    if with_torch:
        args = {"size": size.name, "batch": size.batch, "seq": size.seq, "dtype": dtype, "steps": steps,
                "warmup": warmup, "matmul_n": matmul_n, "threads": torch_threads}
        out = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, json.dumps(args)], capture_output=True,
                             text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"the torch benchmark failed:\n{out.stderr[-4000:]}")
        results["torch"] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------------------------- checkpoint, depth


# Each load runs in a fresh interpreter, so earlier phases' freed-but-kept allocator pages cannot absorb it; the
# baseline is taken after imports and JAX start-up, as in tests/test_checkpoint_errors.py.
_LOAD_SCRIPT = """
import json, resource, sys, time
import jax
import vishwam.checkpoint
from vishwam.memory import peak_rss_bytes
jax.numpy.zeros(1).block_until_ready()
base = peak_rss_bytes()
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
jax.block_until_ready(vishwam.checkpoint.load_pretrained(sys.argv[1]))
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
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    try:  # the version only: torch is never imported into this process
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {"cpu": model, "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": len(jax.devices()), "torch": torch_version, "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def step_rows(size: BenchSize, r: dict, peak: float, torch_r: dict | None, dtype: str) -> list[Row]:
    s, flops = size.name, size.flops_per_step()
    tps = size.tokens / r["step_s"]
    shape = f"batch {size.batch} × seq {size.seq}, {dtype}"
    rows = [
        Row(s, "teacher params", size.teacher.num_parameters() / 1e6, "M", f"`ModelConfig.num_parameters()`; {shape}"),
        Row(s, "student params", size.student.num_parameters() / 1e6, "M", "`ModelConfig.num_parameters()`"),
        Row(s, "model FLOPs per step", flops / 1e9, "GFLOP",
            "tokens × (teacher `flops_per_token` + 3 × student `flops_per_token`)"),
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
    if torch_r is not None:
        t_tps = size.tokens / torch_r["step_s"]
        rows += [
            Row(s, "torch step", torch_r["step_s"] * 1e3, "ms", f"eager transformers `Qwen2ForCausalLM` (sdpa) + "
                f"`torch.optim.AdamW`, {torch_r['threads']} threads, own process, median; best "
                f"{torch_r['best_step_s'] * 1e3:.0f} ms"),
            Row(s, "torch teacher forward alone", torch_r["teacher_forward_s"] * 1e3, "ms",
                f"`no_grad` forward, median (best {min(torch_r['teacher_forward_times_s']) * 1e3:.0f} ms); "
                f"{torch_r['teacher_forward_s'] / torch_r['step_s']:.0%} of the median step"),
            Row(s, "torch throughput", t_tps, "tokens/s", "batch × seq / median step"),
            Row(s, "torch MFU", 100 * flops / torch_r["step_s"] / peak, "%",
                f"same FLOPs / JAX matmul peak; loss {torch_r['first_loss']:.3f} → {torch_r['last_loss']:.3f}"),
            Row(s, "ratio vishwam / torch", tps / t_tps, "×", "tokens/s over tokens/s (medians); best-step ratio "
                f"{torch_r['best_step_s'] / r['best_step_s']:.2f}×"),
        ]
    return rows


def hwm(resettable: bool) -> str:
    return "VmHWM reset at phase start" if resettable else "VmHWM since process start (reset refused)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vishwam.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=[*SIZES, "all"], default="demo")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=None, help="override the size's batch")
    p.add_argument("--seq", type=int, default=None, help="override the size's sequence length")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (params stay fp32)")
    p.add_argument("--skip-torch", action="store_true", help="skip the PyTorch + transformers comparison")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in the torch process (default: torch's own choice)")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul for the peak")
    p.add_argument("--load-repeats", type=int, default=3, help="checkpoint loads (best is reported)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    names = list(SIZES) if args.size == "all" else [args.size]
    sizes = [dataclasses.replace(SIZES[n], batch=args.batch or SIZES[n].batch, seq=args.seq or SIZES[n].seq)
             for n in names]
    info = machine_info()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        log("warning: JAX_COMPILATION_CACHE_DIR is set; compile times may come from the persistent cache")
    log(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['loadavg_start']}")
    mem = PhaseMemory()
    rows: list[Row] = []
    details: dict = {"machine": info, "args": vars(args), "sizes": {}}

    n, dt = args.matmul_n, args.dtype
    # The peak is sampled before each size and at the end and the best sample kept: the hardware's peak is fixed,
    # and another process taking a core during one sample only lowers that sample.
    peaks: list[float] = []

    def sample_peak():
        peaks.append(matmul_peak_jax(n, 10, DTYPES[dt]))
        log(f"matmul peak sample: {peaks[-1] / 1e9:.1f} GFLOP/s")

    measured = []
    for size in sizes:
        sample_peak()
        log(f"[{size.name}] teacher {size.teacher.num_parameters() / 1e6:.1f}M, student "
            f"{size.student.num_parameters() / 1e6:.1f}M params, batch {size.batch} × seq {size.seq}")
        results = bench_size(size, dt, args.steps, args.warmup, not args.skip_torch, mem, matmul_n=n,
                             torch_threads=args.torch_threads)
        measured.append((size, results["vishwam"], results.get("torch")))
        log(f"[{size.name}] vishwam: {results['vishwam']['step_s'] * 1e3:.0f} ms/step"
            + (f"; torch: {results['torch']['step_s'] * 1e3:.0f} ms/step" if "torch" in results else ""))
    sample_peak()
    peak = max(peaks)
    rows.append(Row("machine", f"JAX matmul peak ({dt})", peak / 1e9, "GFLOP/s",
                    f"jitted `jnp.dot` {n}×{n}, 2n³/t, best of 10 × {len(peaks)} samples over the run "
                    f"(samples {', '.join(f'{p / 1e9:.0f}' for p in peaks)})"))
    torch_peaks = [t["matmul_peak"] for _, _, t in measured if t is not None]
    if torch_peaks:
        rows.append(Row("machine", f"torch matmul peak ({dt})", max(torch_peaks) / 1e9, "GFLOP/s",
                        f"`a @ b` {n}×{n}, best of 10 in each torch process, {measured[0][2]['threads']} threads"))
    details["matmul_peak_samples"] = peaks

    for size, r, torch_r in measured:
        rows += step_rows(size, r, peak, torch_r, dt)
        phase = mem.phases[f"{size.name}: vishwam step"]
        rows.append(Row(size.name, "vishwam phase peak RSS", phase["peak_mb"], "MB",
                        f"{hwm(mem.resettable)} (RSS then {phase['start_mb']:.0f} MB); models, compile, "
                        "warm-up steps"))
        if torch_r is not None:
            rows.append(Row(size.name, "torch phase peak RSS", torch_r["peak_mb"], "MB",
                            f"torch process, {hwm(torch_r['resettable'])} (RSS then {torch_r['start_mb']:.0f} "
                            "MB); models, warm-up steps"))
        details["sizes"][size.name] = {"vishwam": r, "torch": torch_r, "tokens": size.tokens,
                                       "flops_per_step": size.flops_per_step(),
                                       "teacher": dataclasses.asdict(size.teacher),
                                       "student": dataclasses.asdict(size.student)}
    mfu = [r.value for r in rows if r.metric.endswith("MFU")]
    if any(v > 100 for v in mfu):
        log("warning: an MFU above 100%: every matmul-peak sample was taken while the CPU was contended")

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

    log("compile time vs depth ...")
    depths = bench_compile_depth(SIZES["demo"], (4, 32), args.dtype)
    total = {k: v["lower_s"] + v["compile_s"] for k, v in depths.items()}
    total_cpu = {k: v["lower_cpu_s"] + v["compile_cpu_s"] for k, v in depths.items()}
    for layers, v in depths.items():
        rows.append(Row("depth", f"step compile, {layers}-layer student", total[layers], "s",
                        f"trace+lower {v['lower_s']:.2f} s + XLA {v['compile_s']:.2f} s wall; CPU "
                        f"{total_cpu[layers]:.2f} s; demo widths and teacher"))
    rows.append(Row("depth", "compile ratio 32 / 4 layers", total[32] / total[4], "×",
                    f"wall; CPU-seconds ratio {total_cpu[32] / total_cpu[4]:.2f}× (`lax.scan` over stacked layers)"))
    details["compile_depth"] = depths

    rows.append(Row("process", "peak RSS", mem.overall_peak() / MB, "MB", "max VmHWM over all phases"))
    info["loadavg_end"] = os.getloadavg()
    details["memory_phases"] = mem.phases

    busy = max(info["loadavg_start"][0], info["loadavg_end"][0])
    if busy > info["cores"] + 1:  # the benchmark's own threads account for up to `cores` of the load
        log(f"warning: load average {busy:.1f} on {info['cores']} cores during the run: other processes "
            "competed for the CPU, so times are inflated and noisy (eager torch, whose OpenMP regions wait on every "
            "thread, suffers most); compare runs made on a quiet machine")
    print(f"\n{info['cpu']}, {info['cores']} cores, jax {info['jax']} ({info['backend']}), torch {info['torch']}; "
          f"load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end\n")
    print(markdown(rows))
    if args.json:
        details["rows"] = [dataclasses.asdict(r) for r in rows]
        with open(args.json, "w") as f:
            json.dump(details, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
