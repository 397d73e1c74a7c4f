"""Generation: the KV-cache sampler programs, samples at evaluation, on-policy rollouts.

- `sampler`: `generate(model, input_ids, ...)`, the jitted, sharded prefill and decode programs.
- `samples`: the student's and teacher's continuations of `training.sample_prompts` at each evaluation.
- `on_policy`: on-policy distillation (GKD): prompts drawn from the chat data, the student's completions as rows.

The command line (`python -m vishwam.generate`) is `vishwam/generate.py`. Imports `models`, `distill`,
`vishwam.errors`, `vishwam.sharding`, `vishwam.tracking`, `vishwam.io`, `vishwam.config` and `vishwam.data`.
"""
