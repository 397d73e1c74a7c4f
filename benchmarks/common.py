"""What the benchmark scripts share: where the repository is, logging and timing, child processes that answer in
JSON, the machine's CPU and commit, mean ± sd over seeds, and markdown and JSON output.

Imports nothing heavy (no JAX, no torch): the torch child processes import the scripts that import this, and must
not start JAX.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: The repository root (this file is `benchmarks/common.py`).
ROOT = Path(__file__).resolve().parents[1]
#: The embedded demo: teacher, chat teacher and data.
DEMO = ROOT / "vishwam" / "assets" / "demo"


def log(msg: str):
    """A progress or warning line on stderr, so that stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


def timed_call(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and its wall seconds. Asynchronous work (JAX's dispatch, CUDA launches) must be waited for inside
    `fn`."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def timed(fn: Callable[[], object]) -> float:
    """The wall seconds of `fn()` (see `timed_call`)."""
    return timed_call(fn)[1]


def python_child(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`python *args` in a fresh interpreter from `ROOT`, with `ROOT` first on its PYTHONPATH (so that the child
    imports this checkout's `benchmarks` and `vishwam`, not an installed copy) and `env` added to this process's
    environment. Output is captured as text; `check` raises on a non-zero exit."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check,
                          timeout=timeout)


def last_json(stdout: str) -> dict:
    """The JSON object a child printed on its last line (what it printed before is ignored)."""
    return json.loads(stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform` knows."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return model


def git_commit() -> str:
    """The checkout's short commit hash ("" outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def mean_sd(values: Sequence[float], fmt: str = "{:.4f}") -> str:
    """`mean ± sd` of `values` (the sample standard deviation; 0 for a single value), each formatted by `fmt`."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> list[str]:
    """The lines of a markdown table; the columns whose indices are in `right` are right-aligned. An empty cell
    is written `| |`."""
    right = set(right)

    def line(cells):
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    return [line(header), "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|",
            *map(line, rows)]


def write_json(path: str | os.PathLike, data) -> None:
    """`data` as indented JSON; what JSON cannot hold is written as its `str`."""
    Path(path).write_text(json.dumps(data, indent=2, default=str))
