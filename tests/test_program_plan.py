"""The planner's figures for the run's programs (`vishwam.plan.program_plan`) against XLA's compiled bytes, at the
mid-size config of `benchmarks/plan_vs_xla.py` (a 34M-parameter bfloat16 teacher, its half-width student pruned
from it, 16 x 512 tokens a step, fsdp 4) with resident, cached and streamed teachers.

Compiled for tpu:v5p-8 through libtpu when it is installed (the `[tpu]` extra, which CI installs): XLA's TPU
compiler, the target the planner's temporaries are set against. Without libtpu the programs compile on 4
simulated CPU devices and only what every compiler agrees on is held (arguments and outputs): XLA:CPU keeps other
temporaries than XLA:TPU (bfloat16 work in float32, a schedule for speed), so its totals are not the planner's.

Held within 15% of XLA's total (argument + output + temporary - aliased bytes): every program the dry run compiles
at this size with each kind of teacher: the train step, evaluation, the EPLB probe, pruning's importance pass and
slicing, the cache build, a streamed teacher's layer group and head, the on-policy prefill and decode, and the
scoring of lm-eval requests (the student's and the resident teacher's); across tokenizers, the cross step and its
evaluation with a resident teacher, and a streamed teacher's head to its labels' log-probabilities.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # about 3 minutes of TPU compiles on two cores: `pytest -m slow`
TPU = importlib.util.find_spec("libtpu") is not None
TARGET = "tpu:v5p-8" if TPU else "cpu:4"
PROGRAMS = ("train", "eval", "eplb_probe", "prune_importance", "prune_slice", "cache_build", "streamed_group",
            "streamed_head")
# Every layout's programs; the on-policy layout's others are the resident layout's on chat rows: its generation
# programs alone.
HELD = tuple(f"{layout}:{p}" for layout in ("resident", "cached", "streamed") for p in PROGRAMS) + (
    "on_policy:on_policy_prefill", "on_policy:on_policy_decode", "downstream:downstream",
    "downstream:downstream_teacher", "cross:train", "cross:eval", "cross_streamed:streamed_head")
# Not held yet: a cross run's train step, evaluation and layer group with a streamed teacher (planner / XLA:TPU
# 1.34, 0.84 and 1.24 at this size: the student's backward is over-planned where no teacher phase hides it).


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_vs_xla") / "rows.json"
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    layouts = ["resident", "cached", "streamed", "on_policy", "downstream", "cross", "cross_streamed"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_vs_xla", "--target", TARGET, "--layouts", *layouts,
                           "--programs", *HELD, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    rows = json.loads(out.read_text())
    assert {(r["layout"], r["program"]) for r in rows} == {
        ("resident", "train"), ("resident", "eval"), ("resident", "eplb_probe"), ("resident", "prune_importance"),
        ("resident", "prune_slice"), ("cached", "train"), ("cached", "eval"), ("cached", "cache_build"),
        ("cached", "prune_importance"), ("cached", "prune_slice"), ("streamed", "train"), ("streamed", "eval"),
        ("streamed", "eplb_probe"), ("streamed", "streamed_group"), ("streamed", "streamed_head"),
        ("streamed", "prune_importance"), ("streamed", "prune_slice"), ("on_policy", "on_policy_prefill"),
        ("on_policy", "on_policy_decode"), ("downstream", "downstream"), ("downstream", "downstream_teacher"),
        ("cross", "train"), ("cross", "eval"), ("cross_streamed", "streamed_head")}
    for r in rows:
        assert r["xla"]["error"] is None, r
    return rows


def test_planned_arguments_and_outputs_are_xlas(rows):
    """Arguments and outputs on one device are counted exactly: XLA's own figures, but for the padding XLA gives a
    buffer. Arguments: within 4 KiB a buffer (tiny ones, such as masks, padded to a tile), or at most the padding of
    the same shapes to XLA:TPU's tiles (a decode step's [2, 8192] float32 logits take 8 rows). Outputs: at least the
    planner's, and at most the same shapes padded to XLA:TPU's tiles (a [2, 8192] float32 shard takes 8 rows) plus
    a pointer each (XLA:CPU). (The train step's planner, `vishwam.plan.planner`, plans its total by category.)"""
    for r in rows:
        if r["program"] == "train":
            continue
        planned, xla = r["planner"], r["xla"]
        extra = xla["argument_bytes"] - planned["argument_bytes"]
        assert -4096 * planned["buffers"] <= extra <= max(4096 * planned["buffers"], planned["argument_padding"]), r
        assert planned["output_bytes"] <= xla["output_bytes"] <= planned["tiled_output_bytes"] + 8 * 64, r


@pytest.mark.skipif(not TPU, reason="libtpu (the [tpu] extra) is not installed: XLA:CPU's temporaries are not what the "
                                    "planner models; arguments and outputs are still held")
def test_planned_totals_are_within_15_percent_of_xla_tpu(rows):
    bad = [f"{r['layout']} {r['program']}: ratio {r['ratio']:.2f}" for r in rows if not 0.85 <= r["ratio"] <= 1.15]
    assert not bad, bad
