#!/usr/bin/env python
"""Count how often a run enters each project module between `run.py`'s start and the start of its training loop.

    PYTHONPATH=ROOT python scripts/count_hops.py --root ROOT [--out FILE.json] -- \\
        --config configs/distill.yaml --training.max-steps 1 --tracking.aim false --training.output-dir /tmp/x

runs `ROOT/run.py` with those arguments (in `ROOT`, as `python run.py ...` would) under a `sys.setprofile` hook on
the main thread, and stops the process when the loop asks for its first batch (the first call of `batch_for_step`
made from the loop module), before the first train step runs. A project module is a file under `ROOT/vishwam`,
`ROOT/models`, `ROOT/distill`, or `ROOT/run.py`.

What is counted, per project module M:
- `hops`: calls into a function of M whose nearest project caller (the closest frame below it on the stack that is
  in a project module; library frames such as `jax` or `dataclasses` in between are skipped) is in another module.
  This is what a reader following the run from file to file does: each hop is opening M again.
- `calls`: every call of a function of M (hops included).
- package hops: the hops whose caller is in another package (`vishwam.plan`, `vishwam.io`, ...; a root module of
  `vishwam` such as `vishwam.sharding` is its own unit; `models` and `distill` are one unit each).
Module bodies run at import (and every call made while one runs) are not counted: importing is not following the
run. Resumed generators count as calls (the profiler reports them so). `docs/architecture.md` has the figures
before and after the package layout; the raw output is in `docs/results/hops_*.txt`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import runpy
import sys
import time
from pathlib import Path

PACKAGES = ("vishwam", "models", "distill")


def unit(module: str) -> str:
    """The package a module belongs to: `vishwam.plan` for `vishwam.plan.shapes`, `vishwam.sharding` for a root module of
    `vishwam`, `models` and `distill` whole, `run` for run.py."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "vishwam" else parts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose run.py is followed (default: this one)")
    parser.add_argument("--out", type=Path, help="also write the counts as JSON here")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then run.py's arguments")
    args = parser.parse_args()
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    root = args.root.resolve()
    run_py = str(root / "run.py")
    prefix = str(root) + os.sep
    os.chdir(root)
    sys.path.insert(0, str(root))

    names: dict[object, str | None] = {}

    def module_of(code) -> str | None:
        try:
            return names[code]
        except KeyError:
            pass
        name = None
        path = code.co_filename
        if path == run_py:
            name = "run"
        elif path.startswith(prefix) and path.endswith(".py") and path[len(prefix):].split(os.sep)[0] in PACKAGES:
            name = path[len(prefix):-3].replace(os.sep, ".").removesuffix(".__init__")
        names[code] = name
        return name

    hops: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    edges: collections.Counter = collections.Counter()
    importing = 0
    t0 = time.perf_counter()

    def finish() -> None:
        sys.setprofile(None)
        if importing:
            print(f"warning: stopped inside {importing} module bodies; counts may be short", file=sys.stderr)
        seconds = time.perf_counter() - t0
        crossing: collections.Counter = collections.Counter()
        for (a, b), n in edges.items():
            if a is None or unit(a) != unit(b):
                crossing[unit(b)] += n
        result = {"root": str(root), "argv": ["run.py", *run_args], "seconds": round(seconds, 1),
                  "total_hops": sum(hops.values()), "total_calls": sum(calls.values()),
                  "package_hops": dict(crossing.most_common()), "total_package_hops": sum(crossing.values()),
                  "modules": {m: {"hops": hops[m], "calls": calls[m]} for m in sorted(calls, key=lambda m: -hops[m])},
                  "edges": {f"{a} -> {b}": n for (a, b), n in edges.most_common()}}
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\n# hops into each project module, run.py start -> the loop's first batch ({seconds:.0f} s profiled)")
        print(f"# root {root}; argv: run.py {' '.join(run_args)}")
        print(f"{'module':<34} {'hops':>6} {'calls':>8}")
        for m, c in result["modules"].items():
            print(f"{m:<34} {c['hops']:>6} {c['calls']:>8}")
        print(f"{'total':<34} {result['total_hops']:>6} {result['total_calls']:>8}")
        print("\n# hops that cross a package boundary, by the package entered (vishwam's subpackages and root modules,")
        print("# models, distill, run; in a flat vishwam/ every vishwam module is its own unit)")
        for u, n in result["package_hops"].items():
            print(f"{u:<34} {n:>6}")
        print(f"{'total':<34} {result['total_package_hops']:>6}")
        print("\n# hops by (nearest project caller -> callee module)")
        for edge, n in result["edges"].items():
            print(f"{n:>6}  {edge}")
        sys.stdout.flush()
        os._exit(0)  # the loop has started: nothing after it is counted, so do not run the step

    def profile(frame, event, arg):
        nonlocal importing
        if event == "call":
            code = frame.f_code
            if code.co_name == "<module>" and code.co_filename != run_py:
                importing += 1
                return
            if importing:
                return
            m = module_of(code)
            if m is None:
                return
            caller, f = None, frame.f_back
            while f is not None:
                caller = module_of(f.f_code)
                if caller is not None:
                    break
                f = f.f_back
            if code.co_name == "batch_for_step" and caller is not None and caller.endswith("loop"):
                finish()
            calls[m] += 1
            if caller != m:
                hops[m] += 1
                edges[(caller, m)] += 1
        elif event == "return" and frame.f_code.co_name == "<module>" and frame.f_code.co_filename != run_py:
            importing -= 1

    sys.argv = [run_py, *run_args]
    sys.setprofile(profile)
    try:
        runpy.run_path(run_py, run_name="__main__")
    except SystemExit as e:
        sys.setprofile(None)
        print(f"run.py exited ({e.code}) before its loop started", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
