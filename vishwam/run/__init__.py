"""A run from its config to the exported student: `run.py` calls `loop.train(cfg)`.

- `build`: `prepare(cfg)` (everything that needs no weights: config checks, data, mesh, plan), the teacher and the
  initial state.
- `cross_tokenizer`: a cross-tokenizer run's checks, FVT embeddings for the pruned student, the shared vocabulary
  and the step's settings.
- `loop`: `Run`: compile check -> teacher -> state -> the loop (batch -> step -> log -> maybe evaluate, save,
  re-map) -> export.

The top of the package graph: imports every other `vishwam` package.
"""
