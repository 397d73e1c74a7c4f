"""lm-eval tasks by name, loaded and checked before anything is written, and set up as lm-eval's command line sets
them up.

`load_tasks(names, include_path=...)` finds each name among lm-eval's registered tasks, groups and tags and the
YAML files under `include_path` (only those, when they hold every name: the registry's thousands of files take
seconds to index), builds it (its dataset is read then: a local `data_files` entry or the HF datasets cache) and
turns every failure into one line naming it:

- an `include_path` that is not a directory, or a YAML file under it that does not parse (lm-eval itself skips
  such a file silently, and the task is then merely unknown);
- an unknown name (with the closest registered ones);
- a data file that is missing, a dataset that cannot be reached, any other error lm-eval raises building it.

`prepare(tasks, num_fewshot, seed)` sets each task's shots and few-shot seed as `lm_eval.simple_evaluate` does
(a task whose YAML sets `num_fewshot: 0` keeps it), and `subset(tasks, limit, seed)` picks a fixed, seeded subset
of each task's documents (`evaluate`'s `samples`). lm-eval is the `[eval]` extra: it is imported here, inside
functions, and only when tasks are asked for.
"""

from __future__ import annotations

import difflib
import glob
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml

from vishwam.errors import ConfigError, DataError

#: lm-eval's default few-shot seed (`--fewshot_random_seed`), used for the few-shot draws and for `subset`.
FEWSHOT_SEED = 1234
#: `dataset_path` values that name a `datasets` builder reading local `data_files`.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


def require_lm_eval():
    """lm-eval's modules, or a one-line error naming the extra that installs it."""
    try:
        import lm_eval.api.model  # the optional [eval] extra
        import lm_eval.evaluator
        import lm_eval.tasks
    except ImportError as error:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness ({error}): pip install -e '.[eval]'") from None
    return lm_eval


class _TolerantLoader(yaml.SafeLoader):
    """YAML as lm-eval writes it: its `!function module.name` tags are read as plain values."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_task_files(include_path: str) -> None:
    """`include_path` is a directory and every `*.yaml` under it parses (else a one-line `ConfigError`)."""
    root = Path(include_path)
    if not root.is_dir():
        raise ConfigError(f"lm-eval task directory {include_path} is not a directory")
    for path in sorted(root.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)  # a SafeLoader: nothing runs
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"lm-eval task file {path} does not parse: {' '.join(str(error).split())}") from None


def task_manager(names: Sequence[str], include_path: str | None):
    """An lm-eval `TaskManager` that knows `names`: `include_path`'s tasks alone when they hold them all."""
    lm_eval = require_lm_eval()
    if include_path is not None:
        check_task_files(include_path)
        local = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return lm_eval.tasks.TaskManager(include_path=include_path)


def _data_files(cfg: dict | None) -> list[str]:
    """The local files a task's YAML names (`dataset_kwargs.data_files` of a json/csv/parquet/... dataset)."""
    if not isinstance(cfg, dict) or cfg.get("dataset_path") not in LOCAL_BUILDERS:
        return []
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    values = files.values() if isinstance(files, dict) else [files]
    out: list[str] = []
    for value in values:
        out.extend([value] if isinstance(value, str) else list(value or []))
    return [f for f in out if isinstance(f, str)]


def _check_data_files(name: str, entry) -> None:
    for file in _data_files(getattr(entry, "cfg", None)):
        if "://" in file:
            continue
        if not (glob.glob(file) if glob.has_magic(file) else os.path.exists(file)):
            raise DataError(f"lm-eval task '{name}' ({entry.yaml_path}): data file {file} not found (relative paths "
                            f"are relative to the working directory, {os.getcwd()})")


def _unknown(name: str, manager, include_path: str | None) -> ConfigError:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    where = f" nor a task of {include_path}" if include_path else " (a local task's YAML goes in a directory given as " \
                                                                   "include path)"
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown lm-eval task '{name}': not a registered task, group or tag{where}{hint}")


def load_tasks(names: Sequence[str], *, include_path: str | None = None) -> tuple[dict, list, object]:
    """Build the tasks `names` (see the module docstring).

    **Returns:** `(loaded, top, manager)`: lm-eval's `{"tasks", "groups", "group_map"}` of every leaf task and
    group, the objects the names resolved to (what `lm_eval.simple_evaluate` takes as `tasks`), and the
    `TaskManager`."""
    if not names:
        raise ConfigError("no lm-eval task given")
    manager = task_manager(names, include_path)
    top = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None and not (name.endswith(".yaml") and os.path.isfile(name)):
            raise _unknown(name, manager, include_path)
        if entry is not None:
            _check_data_files(name, entry)
        try:
            built = manager.load([name])
        except FileNotFoundError as error:
            raise DataError(f"lm-eval task '{name}': {' '.join(str(error).split())}") from None
        except Exception as error:  # lm-eval and datasets raise many kinds (unreachable hub, bad template, ...)
            raise ConfigError(f"lm-eval task '{name}' cannot be built: {type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]}") from None
        top.extend(_top_level(built, name))
    loaded = manager.load(top)  # flattened (objects are taken as they are, nothing is built again)
    return loaded, top, manager


def _top_level(built: dict, name: str) -> list:
    """The objects one name resolved to: its group, or its task (a tag: its tasks)."""
    groups = built.get("groups") or {}
    if name in groups:
        return [groups[name]]
    tasks = built["tasks"]
    return [tasks[name]] if name in tasks else list(tasks.values())


def prepare(tasks: dict, *, num_fewshot: int | None, seed: int | None = FEWSHOT_SEED,
            log: Callable[[str], None] | None = None) -> None:
    """Each task's shots (`num_fewshot`, unless its YAML fixes 0; unset: the YAML's, else 0) and few-shot seed, as
    `lm_eval.simple_evaluate` sets them. Calling it again re-seeds the few-shot draws, so building the requests
    again draws the same examples."""
    for name, task in tasks.items():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default == 0 and num_fewshot != 0:
            if log is not None:
                log(f"downstream: task {name} fixes num_fewshot 0 in its YAML; it stays 0-shot")
        elif num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)


def subset(tasks: dict, limit: int | None, seed: int) -> dict[str, list[int]] | None:
    """A fixed, seeded choice of `limit` documents of each task (all of a task that has no more), sorted:
    `lm_eval.evaluator.evaluate`'s `samples`. None without a limit."""
    if limit is None:
        return None
    chosen = {}
    for name, task in sorted(tasks.items()):
        n = len(task.eval_docs)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # a task's subset ignores the other tasks
        chosen[name] = sorted(int(d) for d in rng.choice(n, size=min(limit, n), replace=False))
    return chosen


def output_types(tasks: dict) -> dict[str, str]:
    """Each task's lm-eval output type (`multiple_choice`, `loglikelihood`, `loglikelihood_rolling`,
    `generate_until`)."""
    return {name: task.get_config("output_type") for name, task in tasks.items()}


__all__ = ["FEWSHOT_SEED", "check_task_files", "load_tasks", "output_types", "prepare", "require_lm_eval", "subset",
           "task_manager"]
