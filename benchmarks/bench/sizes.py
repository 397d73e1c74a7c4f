"""The teacher/student pairs the step is timed at (`SIZES`), the objective and optimizer both frameworks run, and
the random batches they are fed."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from distill.config import DistillationParams, TemperatureConfig
from distill.objective import Objective
from models import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

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


def random_batch(size: BenchSize, seed: int) -> dict[str, np.ndarray]:
    """Uniform random tokens; labels are the inputs shifted by one, every position counts."""
    ids = np.random.default_rng(seed).integers(0, size.student.vocab_size, (size.batch, size.seq + 1))
    return {"input_ids": ids[:, :-1].astype(np.int32), "labels": ids[:, 1:].astype(np.int32),
            "mask": np.ones((size.batch, size.seq), np.int32)}
