"""Build the offline teacher cache: `python -m vishwam.cache --config configs/x.yaml [flags]`.

Runs the teacher once over every training (and eval) window and stores its top-k logits, tail logsumexp, label
log-probabilities and, when feature matching is on, the mapped layers' hidden states in
`distillation.teacher_model.cache_dir`. Interrupted builds resume after the last finished shard. Training with
`loading: cached` then reads the cache instead of running the teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from .cli import parse_args
    from .errors import ConfigError
    from .teacher import build_cache
    from .trainer import Run, log

    cfg, _ = parse_args(argv)
    t = cfg.distillation.teacher_model
    if not t.cache_dir:
        raise ConfigError("config key 'distillation.teacher_model.cache_dir' is required to build a teacher cache")
    run = Run(cfg)
    layers = tuple(sorted({tl for _, tl in run.pairs})) if run.spec.uses_features else ()
    teacher = run.load_teacher()
    vocab = min(run.s_config.vocab_size, run.t_config.vocab_size)
    for split, data in (("train", run.train_data), ("eval", run.eval_data)):
        if data is None:
            continue
        index = build_cache(teacher, data, Path(t.cache_dir) / split, top_k=t.top_k, vocab_size=vocab,
                            hidden_layers=layers, meta={"teacher": str(run.teacher_dir)}, log=log)
        log(f"teacher cache {split}: {index['num_windows']} windows, {len(index['shards'])} shard(s), "
            f"{index['bytes_per_token']:.0f} bytes per token")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
