"""The run configuration and what it implies before anything is loaded.

- `sections`: `RunConfig` and its sections, nested frozen dataclasses with field docstrings (the `--help` text and
  `docs/config.md`).
- `cli`: YAML, then tyro flags, into a `RunConfig`; `run_main` turns a user error into one line and exit 2.
- `specs`: the teacher's and student's architectures and the objective, as pure functions of the config.
- `reference`: `docs/config.md`, every key's type, default and docstring, generated from `sections`
  (`python -m vishwam.config.reference`).

Imports `models`, `distill`, `vishwam.errors` and `vishwam.io`.
"""
