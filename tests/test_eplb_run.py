"""EPLB re-mapping through the run's loop: what a remap carries over and what it starts afresh, and a bitwise
resume across a remap.

The mapping CKA picks on random tiny models is whatever it is, so the tests pin the new assignment by replacing
`best_monotone_assignment` where `vishwam.train.remap` looks it up; everything else is the loop's own path.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest
import yaml
from hf_fixtures import hf_config, make_hf_model, save_hf

import vishwam.train.remap as remap_module
from models.pytree import named_leaves
from vishwam.config.cli import load_config
from vishwam.run.loop import Run

NEW_PAIRS = [(0, 0), (1, 1), (2, 3)]  # uniform for 3 of 4 layers is (0, 0), (1, 2), (2, 3): only pair 1 changes


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eplb_run")
    save_hf(make_hf_model(hf_config("qwen2", layers=4, kv_heads=2)), d / "teacher")
    rng = np.random.default_rng(1)
    np.save(d / "train.npy", rng.integers(2, 96, 6000).astype(np.int32))
    return d


def config(assets, out):
    text = {
        "distillation": {"teacher_model": {"path": str(assets / "teacher"), "dtype": "float32"},
                         "student_model": {"init": "random", "num_hidden_layers": 3, "hidden_size": 32,
                                           "intermediate_size": 32}},
        "data": {"train": str(assets / "train.npy")},
        "training": {"output_dir": str(out), "max_steps": 6, "batch_size": 4, "seq_len": 16, "log_every": 1,
                     "save_every": 2, "compute_dtype": "float32", "warmup_steps": 1},
        "distillation_params": {"kd_weight": 1.0, "feature_weight": 1.0,
                                "eplb": {"enabled": True, "num_stages": 2, "stage_steps": 3, "ramp_steps": 0}},
        "tracking": {"aim": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(text))
    return load_config(str(path))


@pytest.fixture
def pinned(monkeypatch):
    calls = []
    real = remap_module.remap

    def recording(state, *args, **kwargs):
        before = jax.tree.map(np.asarray, eqx.filter(state, eqx.is_array))
        after, sim = real(state, *args, **kwargs)
        calls.append((before, jax.tree.map(np.asarray, eqx.filter(after, eqx.is_array))))
        return after, sim

    monkeypatch.setattr(remap_module, "best_monotone_assignment", lambda sim, students: NEW_PAIRS)
    monkeypatch.setattr("vishwam.run.loop.remap", recording)
    return calls


def _named(tree, part: str) -> dict:
    return {n: v for n, v in named_leaves(tree) if part in n}


def test_a_remap_restarts_the_changed_pair_and_carries_the_rest(assets, tmp_path, pinned):
    run = Run(config(assets, tmp_path / "run"))
    run.train()
    assert len(pinned) == 1  # one stage boundary, at step 3
    before, after = pinned[0]
    assert after.step == 3 and [tuple(p) for p in after.mapping] == NEW_PAIRS
    # The changed pair 1 (active since step 0): a new projection, its AdamW moments and balancer state zeroed.
    assert not np.array_equal(after.projections.projections[1].weight, before.projections.projections[1].weight)
    moments = _named(after.opt_state, ".1.projections.1.")
    assert moments and all(not np.any(v) for v in moments.values())
    assert any(np.any(v) for v in _named(before.opt_state, ".1.projections.1.").values())
    assert before.balancer.count[1] > 0 and after.balancer.count[1] == 0 and after.balancer.magnitude[1] == 0
    # The unchanged pairs 0 and 2 and the student: exactly as they were.
    for p in (0, 2):
        np.testing.assert_array_equal(after.projections.projections[p].weight,
                                      before.projections.projections[p].weight)
        for name, value in _named(before.opt_state, f".1.projections.{p}.").items():
            np.testing.assert_array_equal(_named(after.opt_state, name)[name], value)
        assert after.balancer.count[p] == before.balancer.count[p]
        assert after.balancer.magnitude[p] == before.balancer.magnitude[p]
    assert before.balancer.count[0] > 0
    for (n, a), (_, b) in zip(named_leaves(before.student), named_leaves(after.student)):
        np.testing.assert_array_equal(a, b, err_msg=n)
    student_moments = _named(before.opt_state, ".0.model.")
    assert student_moments
    for name, value in student_moments.items():
        np.testing.assert_array_equal(_named(after.opt_state, name)[name], value)
    assert run.objective.feature_pairs == tuple(NEW_PAIRS)  # the next steps are traced for the new mapping


def test_a_run_resumes_bitwise_across_a_remap(assets, tmp_path, pinned):
    full = Run(config(assets, tmp_path / "full"))
    full.train()

    class Stop(Exception):
        pass

    def stop(step, state):
        if step == 5:  # after the remap at 3 and the checkpoint at 4
            raise Stop

    cut = Run(config(assets, tmp_path / "cut"))
    cut.on_step = stop
    with pytest.raises(Stop):
        cut.train()
    resumed = Run(config(assets, tmp_path / "cut"))
    resumed.train()
    assert resumed.objective.feature_pairs == tuple(NEW_PAIRS)  # read back from the checkpoint's mapping
    for (n, a), (_, b) in zip(named_leaves(eqx.filter(full.state, eqx.is_array)),
                              named_leaves(eqx.filter(resumed.state, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=n)
