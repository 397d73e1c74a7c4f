#!/usr/bin/env python
"""vishwam's main job: distil a teacher LLM into a smaller student.

    python run.py --config configs/distill.yaml [--training.max-steps 20 ...] [--debug]

Precedence: dataclass defaults < YAML < flags. `--help` lists every option. A user error (bad path, shard,
config key, data, ...) prints one line and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys


def _configure_environment():
    """Process-wide settings belong to the entry point, never to library import."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags and "collective_call_terminate_timeout" not in flags:
        # Several simulated CPU devices share few cores: give their collectives time rather than aborting.
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                                   " --xla_cpu_collective_timeout_seconds=900")


def main(argv: list[str]) -> int:
    from vishwam.config.cli import parse_args

    cfg, _ = parse_args(argv)
    from vishwam.sharding import detected_cluster

    if cfg.distributed.num_processes > 1 or detected_cluster() is not None:
        import jax

        # Cross-process collectives on CPU hosts go through gloo (GPU/TPU backends bring their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.training.dry_run == "compile":
        from vishwam.compile.targets import configure_process

        configure_process(cfg.training.compile_target)  # before JAX starts its backends
        from vishwam.compile.programs import dry_run_compile

        dry_run_compile(cfg)
        return 0
    if cfg.training.dry_run:
        from vishwam.plan.fit import print_plan

        print_plan(cfg)
        return 0
    from vishwam.run.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    _configure_environment()
    from vishwam.config.cli import run_main

    sys.exit(run_main(main))
