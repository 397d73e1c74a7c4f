"""Downstream evaluation: lm-evaluation-harness tasks scored by vishwam, in the training loop and from the command
line (`python -m vishwam.evaluate`), equal to lm-eval's own numbers.

- `tasks`: lm-eval tasks by name (registered, or YAML files under an include path), checked before anything is
  written; shots, few-shot seed and a fixed seeded subset set as lm-eval's command line sets them.
- `tokens`: requests to token ids as lm-eval's `hf` backend makes them (its tokenizer conventions, truncation,
  rolling windows).
- `packing`: requests packed first-fit into `[rows, seq_len]` batches with segment ids.
- `scoring`: `score_rows`, the one jitted, sharded program (each segment's summed log-probability and greedy
  match), and `Scorer`, which runs it over packed batches.
- `harness`: lm-eval's `LM` interface over a vishwam model (`harness_lm`).
- `in_run`: `Downstream`, the tasks at every evaluation of a run (`training.downstream`).

lm-eval is the optional `[eval]` extra, imported only inside functions. Imports `models`, `distill`,
`vishwam.errors`, `vishwam.sharding`, `vishwam.tracking`, `vishwam.io`, `vishwam.config`, `vishwam.data` and
`vishwam.generation`; `vishwam.run` and `vishwam.compile` import it, never the reverse.
"""
