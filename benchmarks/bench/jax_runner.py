"""The vishwam side: the jitted distillation step from `make_train_step` (resident teacher forward inside the step,
student forward and backward, AdamW), compiled ahead of time, and its timing in this process."""

from __future__ import annotations

import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench.measure import PhaseMemory, build_and_time, device_memory_stats, gemm_rate_jax
from benchmarks.bench.sizes import DTYPES, OPTIMIZER, BenchSize, random_batch
from benchmarks.common import timed, timed_call
from distill.config import DistillationParams
from distill.objective import teacher_outputs
from models import init_model
from vishwam.train.step import StepConfig, init_state, make_optimizer, make_train_step


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
        (self.state, metrics), seconds = timed_call(
            lambda: jax.block_until_ready(self.compiled(self.teacher, self.state, inputs, None)))
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


def time_jax(size: BenchSize, dtype: str, steps: int, warmup: int, mem: PhaseMemory, batches: list,
             attention_impl: str = "auto") -> dict:
    """The vishwam side of `bench_size`: build, compile and `warmup` steps in one memory phase, then the timing.
    `attention_impl` is both models' attention (`"xla"`: the fallback when cuDNN fails on an accelerator)."""
    out = build_and_time(lambda: JaxRunner(size, dtype, attention_impl), batches, warmup, steps, mem,
                         f"{size.name}: vishwam step")
    return {**out, "gemm_rate": gemm_rate_jax(*size.gemm_shape(), 20, DTYPES[dtype])}
