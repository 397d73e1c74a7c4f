"""vishwam: distill large Hugging Face LLMs into smaller students with JAX + Equinox.

The API for notebooks and IPython::

    import vishwam, jax.numpy as jnp
    model = vishwam.load_pretrained("path/to/hf_dir", dtype=jnp.bfloat16)
    out = model(input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    print(vishwam.summary(model))
    vishwam.save_pretrained(model, "out_dir")
    tokens = vishwam.generate(model, input_ids, mask, max_new_tokens=64)  # greedy; temperature/top_k/top_p/key

Attributes are imported lazily, so `import vishwam` is cheap and sets no JAX configuration.

The package is a tree of subsystems that import one way (`tests/test_structure.py` holds it acyclic); at the
root sit what every subsystem shares and the command lines:

- `errors` (every user error), `sharding` (the one rule table from logical axes to the mesh), `tracking`
  (`metrics.jsonl`, Aim, the progress line, the log, process memory);
- `io` <- `config` <- `data` <- `teacher`; `plan`; `generation` <- `train` <- `compile` <- `run`; `generation` <-
  `downstream` (lm-eval tasks) <- `compile`, `run`;
- `generate` (`python -m vishwam.generate`), `evaluate` (`python -m vishwam.evaluate`) and `cache`
  (`python -m vishwam.cache`).

Imports `models` and `distill`, never `run.py` or `benchmarks`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "vishwam.io.checkpoint",
    "open_pretrained": "vishwam.io.checkpoint",
    "save_pretrained": "vishwam.io.export",
    "LazyCheckpoint": "vishwam.io.checkpoint",
    "summary": "models.pytree",
    "count_parameters": "models.pytree",
    "parameter_counts": "models.pytree",
    "make_mesh": "vishwam.sharding",
    "generate": "vishwam.generation.sampler",
    "shard_tree": "vishwam.sharding",
    "VishwamError": "vishwam.errors",
    "CheckpointError": "vishwam.errors",
    "ConfigError": "vishwam.errors",
    "DataError": "vishwam.errors",
    "CausalLM": "models",
    "CausalLMOutput": "models",
    "ModelConfig": "models",
    "init_model": "models",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vishwam' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
