"""Test set-up: 4 fake CPU devices (set before JAX initialises its backend), fp32 matmuls at full precision."""

import os

# Tests may set the environment; library code never does.
# 4 fake CPU devices. Their collectives rendezvous across threads; on a loaded 2-core machine a thread can be
# starved past XLA's default termination timeout, which aborts the process, so the tests allow more time.
CPU_COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                           "--xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 " + CPU_COLLECTIVE_TIMEOUTS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def demo_slice(directory, train_rows: int = 600, eval_rows: int = 60) -> list[str]:
    """The first rows of the demo corpus written under `directory`, as `--data.train/--data.eval` flags: for runs
    that read a few windows (a whole corpus is tokenized into the store, and a cached teacher caches it all)."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo"
    flags = []
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        lines = (demo / f"{name}.jsonl").read_text().splitlines()[:rows]
        path = Path(directory) / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        flags += [f"--data.{name}", str(path)]
    return flags
