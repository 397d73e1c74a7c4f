"""The train state and the programs a run steps through: the distillation step, evaluation, EPLB re-mapping, and
checkpoints of the state.

- `step`: `TrainState`, the optimizer, `make_train_step` (micro-batches, remat, the fused objective).
- `cross_step`: `make_cross_train_step`, the cross-tokenizer step (ALM + CE + shared-vocabulary KL).
- `evaluation`: `eval_sums` (one jitted program) and `evaluate` against the teacher on `data.eval`.
- `remap`: EPLB re-mapping at stage boundaries (the CKA probe program).
- `resume`: orbax checkpoints of the state, and resuming from the newest complete one.

Imports `models`, `distill` and every `vishwam` package but `compile` and `run`.
"""
