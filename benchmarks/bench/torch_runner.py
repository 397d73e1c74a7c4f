"""The torch side: the same step written the usual way in eager PyTorch + transformers (`Qwen2ForCausalLM`,
`torch.optim.AdamW`) on the same shapes and loss, timed in a child process (`run_torch` starts it, `torch_worker`
is what it runs).

torch is imported inside functions only: the vishwam process never imports it."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np

from benchmarks.bench.measure import MB, PhaseMemory, build_and_time, gemm_rate_torch, matmul_peak_torch
from benchmarks.bench.report import error_line
from benchmarks.bench.sizes import OPTIMIZER, PARAMS, BenchSize, random_batch, resolve_size
from benchmarks.common import last_json, log, python_child, timed
from models import ModelConfig


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
            out.update(device_peak_bytes=cuda.max_memory_allocated(),
                       device_peak_reserved_bytes=cuda.max_memory_reserved(), gpu=cuda.get_device_name(0))
        return out


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
    out = build_and_time(lambda: TorchRunner(bench, dtype, device), batches, warmup, steps, mem, "torch step")
    out["gemm_rate"] = gemm_rate_torch(*bench.gemm_shape(), 20, dtype, device)
    return {**out, "matmul_peak": peak, "threads": torch.get_num_threads(), **mem.phases["torch step"],
            "resettable": mem.resettable,
            "process_peak_mb": mem.overall_peak() / MB, "torch_version": torch.__version__}


# PyTorch runs in a child process. Run in the vishwam process right after JAX work, torch's steps were at times
# several-fold slower (two thread pools, OpenMP's and XLA's, sharing the cores); its own process removes that
# question, and gives its memory figures a clean baseline.
_TORCH_SCRIPT = """
import json, sys
from benchmarks.bench.torch_runner import torch_worker
print(json.dumps(torch_worker(**json.loads(sys.argv[1]))))
"""


def run_torch(size: BenchSize, dtype: str, steps: int, warmup: int, matmul_n: int, threads: int | None = None,
              device: str = "auto", shrink: bool = False, timeout: float | None = None) -> dict:
    """`torch_worker` in a child process, which imports `benchmarks.bench.torch_runner` from the repository root
    (put first on its PYTHONPATH by `python_child`). The child sees only the CPU as a JAX platform, so that
    importing vishwam there can never claim GPU memory. **Returns:** its figures, or `{"error": ..., "stderr":
    ...}` when it failed or ran past `timeout` seconds (the failure is logged, not raised, so the vishwam figures
    survive)."""
    args = {"size": size.name, "batch": size.batch, "seq": size.seq, "dtype": dtype, "steps": steps,
            "warmup": warmup, "matmul_n": matmul_n, "threads": threads, "device": device, "shrink": shrink}
    try:
        out = python_child(["-c", _TORCH_SCRIPT, json.dumps(args)], env={"JAX_PLATFORMS": "cpu"}, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log(f"warning: [{size.name}] the torch benchmark ran past {timeout:.0f} s and was stopped\n{stderr[-2000:]}")
        return {"error": f"timed out after {timeout:.0f} s", "stderr": stderr[-4000:]}
    if out.returncode:
        log(f"warning: [{size.name}] the torch benchmark failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        return {"error": f"exit {out.returncode}: {error_line(out.stderr)}", "stderr": out.stderr[-4000:]}
    return last_json(out.stdout)
