"""Build the offline teacher cache: `python -m vishwam.cache --config configs/x.yaml [flags]`.

Runs the teacher once over every training (and eval) window and stores its top-k logits, tail logsumexp, label
log-probabilities and, when feature matching is on, the mapped layers' hidden states in
`distillation.teacher_model.cache_dir`. Interrupted builds resume after the last finished shard. Training with
`loading: cached` then reads the cache instead of running the teacher.
"""

from __future__ import annotations

import sys

from .build import prepare
from .cli import parse_args, run_main
from .errors import ConfigError
from .teachers import build_caches
from .tracking import log


def main(argv: list[str]) -> int:
    cfg, _ = parse_args(argv)
    if not cfg.distillation.teacher_model.cache_dir:
        raise ConfigError("config key 'distillation.teacher_model.cache_dir' is required to build a teacher cache")
    run = prepare(cfg)
    # Resumable: finished shards whose checksums match are kept.
    build_caches(cfg, run.lazy_teacher, run.splits, run.objective, vocab_size=run.vocab_size, mesh=run.mesh, log=log,
                 always=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
