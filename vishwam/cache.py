"""Build the offline teacher cache: `python -m vishwam.cache --config configs/x.yaml [flags]`.

Runs the teacher once over every training (and eval) window and stores its top-k logits, tail logsumexp, label
log-probabilities and, when feature matching is on, the mapped layers' hidden states in
`distillation.teacher_model.cache_dir`. Interrupted builds resume after the last finished shard; a cache built
for another fingerprint (teacher, tokenizer, data, seq_len, top_k, ...) is rebuilt from scratch. Training with
`loading: cached` then reads the cache instead of running the teacher (and stops if its fingerprint differs).
In a multi-process job every process runs this command (the teacher is sharded over them all); process 0 writes.
"""

from __future__ import annotations

import sys

import jax

from vishwam.config.cli import parse_args, run_main
from vishwam.errors import ConfigError
from vishwam.run.build import prepare
from vishwam.sharding import detected_cluster
from vishwam.teacher.sources import build_caches, cache_inputs
from vishwam.tracking import log


def main(argv: list[str]) -> int:
    cfg, _ = parse_args(argv)
    if not cfg.distillation.teacher_model.cache_dir:
        raise ConfigError("config key 'distillation.teacher_model.cache_dir' is required to build a teacher cache")
    if cfg.distributed.num_processes > 1 or detected_cluster() is not None:
        # As run.py: cross-process collectives on CPU hosts go through gloo (GPU/TPU backends bring their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    run = prepare(cfg, training=False)
    run.checkpoints.close()
    # Resumable: finished shards whose checksums match are kept; a stale cache is rebuilt from scratch.
    splits, vocab_size = cache_inputs(run.cfg, run.lazy_teacher, run.splits, run.vocab_size)
    build_caches(run.cfg, run.lazy_teacher, splits, run.objective, vocab_size=vocab_size, mesh=run.mesh, log=log,
                 always=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
