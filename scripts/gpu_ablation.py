"""On a GPU: what cuDNN attention and the fused KD + CE loss each buy in the `gpu` benchmark step.

Builds the step of `python -m benchmarks.bench --size gpu` (bf16) three ways in one process — as shipped (cuDNN
attention, fused loss), with XLA attention, and with the autodiff loss — and times each the same way as the bench
(median of `--steps` steps after warm-up, `block_until_ready`), interleaving the variants round by round.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks`
from benchmarks.bench.jax_runner import JaxRunner  # noqa: E402
from benchmarks.bench.measure import matmul_peak_jax  # noqa: E402
from benchmarks.bench.sizes import DTYPES, PARAMS, random_batch, resolve_size  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--shrink", action="store_true", help="tiny models (CPU smoke test)")
    args = p.parse_args()
    size = resolve_size("gpu", args.batch, args.seq, args.shrink)
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; batch {size.batch} × seq {size.seq}")
    variants = {}
    for name, attention, fused in (("cudnn attention + fused loss", "auto", True),
                                   ("xla attention + fused loss", "xla", True),
                                   ("cudnn attention + autodiff loss", "auto", False)):
        params = dataclasses.replace(PARAMS, fused_logit_loss=fused)
        try:
            variants[name] = JaxRunner(size, "bfloat16", attention_impl=attention, params=params)
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
            print(f"{name}: failed to build: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        print(f"built {name}", flush=True)
    batches = [random_batch(size, seed) for seed in range(args.steps + 1)]
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, runner in variants.items():
            runner.step(batches[0])
            times[name] += [runner.step(b) for b in batches[1:]]
    flops = size.flops_per_step()
    peak = matmul_peak_jax(8192 if jax.default_backend() == "gpu" else 512, 10, DTYPES["bfloat16"])
    print(f"\nbf16 matmul peak {peak / 1e12:.0f} TFLOP/s\n")
    print("| variant | step (median) | tokens/s | MFU | vs shipped |")
    print("|---|---:|---:|---:|---:|")
    ref = np.median(times[next(iter(times))]) if times else None
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"| {name} | {med * 1e3:.1f} ms | {size.tokens / med:,.0f} | {100 * flops / med / peak:.1f}% | "
              f"{ref / med:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
