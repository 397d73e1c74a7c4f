"""Prepare a config's data as token stores: `python -m vishwam.data --config C [--workers N] [config flags]`.

The same code `run.py` runs on first use (`vishwam.data.splits.load_splits`): the config's `data` section,
tokenized with the teacher's tokenizer (or `data.tokenizer`; a cross-tokenizer run's with both, aligned), into `data.store_dir` (or the fingerprinted default
under `~/.cache/vishwam/data`), `--workers` processes (default: `data.workers`, 0 = one per core). A finished
store is opened and reported, not built again; an interrupted build resumes after its finished shards. With
several processes (the config's `distributed` section, or a SLURM / Open MPI / TPU pod job), they split the
shards and process 0 writes each manifest. For a chat run the packing plan of `training.seq_len` is made too.
"""

from __future__ import annotations

import sys

import jax
from jax.experimental import multihost_utils

from vishwam.config import specs
from vishwam.config.cli import parse_args, run_main
from vishwam.data.splits import load_splits, split_args
from vishwam.errors import ConfigError
from vishwam.io.checkpoint import resolve_checkpoint_dir
from vishwam.sharding import setup_distributed
from vishwam.tracking import log


def _workers(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--workers N` (or `--workers=N`) taken out of `argv`."""
    rest, workers = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--workers" or arg.startswith("--workers="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            try:
                workers = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"flag --workers takes a whole number of processes, got {value!r}") from None
            if workers < 1:
                raise ConfigError(f"flag --workers must be >= 1, got {workers}")
        else:
            rest.append(arg)
    return workers, rest


def main(argv: list[str]) -> int:
    workers, rest = _workers(argv)
    cfg, _ = parse_args(rest)
    barrier, index, count = None, 0, 1
    d = cfg.distributed
    if d.num_processes > 1 or d.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        setup_distributed(d)
        barrier, index, count = multihost_utils.sync_global_devices, jax.process_index(), jax.process_count()
    teacher = cfg.distillation.teacher_model.path
    t_config = specs.resolve_architecture(teacher)
    s_config = specs.student_config(cfg, t_config)
    directory = resolve_checkpoint_dir(teacher)
    load_splits(cfg.data, seq_len=cfg.training.seq_len, **split_args(cfg, directory, t_config, s_config), log=log,
                workers=workers or cfg.data.workers, process_index=index, process_count=count, barrier=barrier)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
