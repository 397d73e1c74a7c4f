"""The run configuration and what it implies before anything is loaded.

- `sections`: `RunConfig` and its sections, nested frozen dataclasses with field docstrings (the `--help` text and
  `docs/config.md`).
- `cli`: YAML, then tyro flags, into a `RunConfig`; `run_main` turns a user error into one line and exit 2.
- `specs`: the teacher's and student's architectures and the objective, as pure functions of the config.

Imports `models`, `distill`, `vishwam.errors` and `vishwam.io`.
"""
