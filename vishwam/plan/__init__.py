"""Memory planning: per-device bytes of every program of a run, from the config alone, and whether it fits.

- `planner`: `plan(cfg)`, the `Planner` and its `MemoryPlan` (teacher, student, optimizer, gradients, activations).
- `step_plan`: the train step's activations by phase; `program_plan`: every other program's bytes.
- `shapes`: bytes of abstract pytrees sharded on a mesh shape; `capacity`: how many bytes a device holds.
- `fit`: `check_fits` (the least disruptive change that would fit) and the dry run's table.

Imports `models`, `distill`, `vishwam.errors`, `vishwam.sharding`, `vishwam.io` and `vishwam.config`.
"""
