"""Compiling the run's programs for a machine that may not be this one.

- `programs`: the compile dry run (`--training.dry-run compile`): every device program built from abstract inputs,
  compiled for the target, its bytes beside the planner's, `memory_plan.json`.
- `targets`: the target machine (`tpu:v5p-16`, `cpu:8`, this host).
- `xla_cache`: XLA's persistent compilation cache, so each program is compiled once.

Imports every package below `vishwam.run`: `plan`, `train`, `teacher`, `generation`, `data`, `config`, `io`.
"""
