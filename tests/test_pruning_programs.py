"""Pruning (`init: from_teacher`) as bounded programs: importance equal to transformers' activations read with
forward hooks, computed in the teacher's dtype; the student sliced one layer at a time straight into its
training sharding and dtype, equal to the unsharded slice."""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_config, left_padded_batch, make_hf_model, save_hf
from jax.sharding import NamedSharding, PartitionSpec

import vishwam
from distill.student_init import importance_scores, init_student_from_teacher, student_config_from_teacher
from vishwam.sharding import tree_shardings


def _hf_importance(hf, ids, mask, positions):
    """Minitron's statistics read off transformers' forward pass: |norm outputs| (both norms of every layer and
    the final one), |down_proj input|, and each head's L2 norm at o_proj's input, averaged over real tokens."""
    cfg = hf.config
    grab = {"embed": [], "mlp": [], "heads": []}
    real = torch.tensor(mask, dtype=torch.bool)

    def mean(x):  # [b, s, ...] -> [...]
        return x[real].double().mean(0)

    hooks = []
    for layer in hf.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(lambda m, i, o: grab["embed"].append(mean(o.abs()))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, i: grab["mlp"].append(mean(i[0].abs()))))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, i, hd=head_dim: grab["heads"].append(
                mean(i[0].reshape(*i[0].shape[:2], -1, hd).norm(dim=-1)))))
    hooks.append(hf.model.norm.register_forward_hook(lambda m, i, o: grab["embed"].append(mean(o.abs()))))
    with torch.no_grad():
        hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    for h in hooks:
        h.remove()
    return {"embed": torch.stack(grab["embed"]).sum(0).numpy(), "mlp": torch.stack(grab["mlp"]).numpy(),
            "heads": torch.stack(grab["heads"]).numpy()}


@pytest.mark.parametrize("family,kv", [("qwen2", 2), ("qwen3", 1), ("llama", 4)])
def test_importance_equals_transformers_activations(tmp_path, family, kv):
    hf = make_hf_model(hf_config(family, kv_heads=kv, layers=3))
    model = vishwam.load_pretrained(save_hf(hf, tmp_path), dtype=jnp.float32)
    ids, mask, positions = left_padded_batch(seq=9)
    ref = _hf_importance(hf, ids, mask, positions)
    ours = importance_scores(model, jnp.asarray(ids), jnp.asarray(mask))
    for name in ("embed", "mlp", "heads"):
        # float32 sums of a few dozen terms of O(1) values: relative error a few ulps; 1e-5 leaves margin
        np.testing.assert_allclose(np.asarray(ours[name]), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_importance_of_packed_rows_equals_the_rows_apart(tmp_path):
    """Chat data packs rows with segment ids: ranked on a packed probe, each row sees only itself, so the
    statistics equal those of the same rows run apart (left-padded, the same real tokens) to float32 rounding."""
    hf = make_hf_model(hf_config("qwen2", layers=3))
    model = vishwam.load_pretrained(save_hf(hf, tmp_path), dtype=jnp.float32)
    rng = np.random.default_rng(1)
    a, b = rng.integers(2, 96, 5), rng.integers(2, 96, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    apart = np.zeros((2, 7), np.int32)
    apart[0, 2:], apart[1] = a, b
    mask = np.ones((2, 7), np.int32)
    mask[0, :2] = 0
    ours = importance_scores(model, packed, jnp.ones_like(packed), segment_ids=segments)
    ref = importance_scores(model, jnp.asarray(apart), jnp.asarray(mask))
    crossed = importance_scores(model, packed, jnp.ones_like(packed))
    for name in ("embed", "mlp", "heads"):
        np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(ref[name]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(crossed["heads"]), np.asarray(ref["heads"]), rtol=1e-3)  # it would tell


def test_importance_runs_in_the_teachers_dtype(tmp_path):
    """A bf16 teacher is ranked in bf16 (no float32 copy of it): its statistics agree with the float32
    teacher's to bf16's precision (8 mantissa bits, a few roundings deep: 5e-2 relative), and the program's
    weight arguments are bf16."""
    hf = make_hf_model(hf_config("qwen2", layers=3))
    path = save_hf(hf, tmp_path)
    f32 = vishwam.load_pretrained(path, dtype=jnp.float32)
    bf16 = vishwam.load_pretrained(path, dtype=jnp.bfloat16)
    ids, mask, _ = left_padded_batch(seq=9)
    a = importance_scores(f32, jnp.asarray(ids), jnp.asarray(mask))
    b = importance_scores(bf16, jnp.asarray(ids), jnp.asarray(mask))
    for name in ("embed", "mlp", "heads"):
        np.testing.assert_allclose(np.asarray(b[name], np.float32), np.asarray(a[name]), rtol=5e-2, atol=1e-3)
    from distill.student_init import activation_stats

    hlo = activation_stats.lower(bf16, jnp.asarray(ids), jnp.asarray(mask) > 0).as_text()
    assert "tensor<3x48x32xbf16>" in hlo and "tensor<3x48x32xf32>" not in hlo  # stacked gate_proj: never cast


def test_pruned_student_comes_out_sharded_and_equal(tmp_path):
    hf = make_hf_model(hf_config("qwen2", kv_heads=2, layers=4, intermediate_size=64))
    path = save_hf(hf, tmp_path)
    t_single = vishwam.load_pretrained(path, dtype=jnp.bfloat16)
    mesh = vishwam.make_mesh(fsdp=2, tensor=2)
    t_sharded = vishwam.load_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
    s_cfg = student_config_from_teacher(t_single.config, hidden_size=16, num_hidden_layers=2,
                                        intermediate_size=32, num_key_value_heads=1)
    ids, mask, _ = left_padded_batch()
    kw = dict(pairs=((0, 1), (1, 3)), probe_ids=jnp.asarray(ids), probe_mask=jnp.asarray(mask),
              key=jax.random.key(0), dtype=jnp.float32)
    single = init_student_from_teacher(t_single, s_cfg, **kw)
    shardings = tree_shardings(eqx.filter(single, eqx.is_array), mesh)
    sharded = init_student_from_teacher(t_sharded, s_cfg, **kw, shardings=shardings)
    for a, b, want in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert b.dtype == jnp.float32 and b.sharding.is_equivalent_to(want, b.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # gathers of the same bf16 values
    q = sharded.model.layers.self_attn.q_proj.weight
    assert not q.sharding.is_fully_replicated and q.sharding.spec != PartitionSpec()
    assert isinstance(q.sharding, NamedSharding)


ROOT = Path(__file__).resolve().parents[1]


def _demo_run(tmp_path, *flags):
    from vishwam.config.cli import load_config
    from vishwam.run.loop import Run

    root = ROOT
    return Run(load_config(str(root / "configs" / "distill.yaml"), [
        "--training.output-dir", str(tmp_path / "out"), "--tracking.aim", "false", "--training.seq-len", "32",
        "--distillation.teacher-model.cache-dir", str(tmp_path / "cache"), "--data.train",
        str(root / "vishwam/assets/demo/eval.jsonl"), *flags]))


def test_a_streamed_or_cached_teacher_prunes_the_same_student_without_loading_whole(tmp_path, monkeypatch):
    """`init: from_teacher` under `streamed` and `cached` ranks the teacher group by group and loads only the
    mapped layers for slicing (never `LazyCheckpoint.load`, the whole model), giving the resident run's
    student bit for bit (the same float32 operations per layer)."""
    from vishwam.io.checkpoint import LazyCheckpoint
    from vishwam.run import build

    monkeypatch.chdir(ROOT)
    students = {}
    for loading in ("resident", "streamed", "cached"):
        run = _demo_run(tmp_path / loading, "--distillation.teacher-model.loading", loading,
                        "--distillation-params.attention-weight", "0")
        teacher = run.open_teacher()
        whole_loads = []
        original = LazyCheckpoint.load
        monkeypatch.setattr(LazyCheckpoint, "load", lambda self, *a, **k: whole_loads.append(1) or original(
            self, *a, **k))
        students[loading] = build.init_student(run.prepared, teacher, jax.random.key(0))
        monkeypatch.setattr(LazyCheckpoint, "load", original)
        teacher.close()
        assert not whole_loads or loading == "resident", loading
    for loading in ("streamed", "cached"):
        for a, b in zip(jax.tree.leaves(students["resident"]), jax.tree.leaves(students[loading])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_student_ranks_a_bf16_teacher_in_bf16(tmp_path, monkeypatch):
    from distill import student_init
    from vishwam.run import build

    seen = []
    original = student_init.activation_stats
    monkeypatch.setattr(student_init, "activation_stats",
                        lambda teacher, *args, **kw: seen.append(teacher.model.layers.mlp.gate_proj.weight.dtype)
                        or original(teacher, *args, **kw))
    monkeypatch.chdir(ROOT)
    run = _demo_run(tmp_path, "--distillation.teacher-model.dtype", "bfloat16")
    student = build.init_student(run.prepared, run.open_teacher(), jax.random.key(0))
    assert seen == [jnp.bfloat16]  # the teacher as loaded, not a float32 copy of it
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(student))  # training.param_dtype


def test_a_run_restarted_before_its_first_checkpoint_reads_the_pruned_student_back(tmp_path, monkeypatch):
    """The pruned student is saved to output_dir/init_student with a stamp; a run killed before its first
    checkpoint, then rerun, does not prune again and ends bit for bit like an uninterrupted run. A changed
    student section makes the stamp differ, and pruning runs again."""
    import shutil

    from vishwam.run import build

    monkeypatch.chdir(ROOT)
    flags = ("--training.max-steps", "2", "--training.save-every", "100", "--training.eval-every", "100",
             "--training.batch-size", "4")

    class Killed(Exception):
        pass

    whole = _demo_run(tmp_path / "whole", *flags)
    whole.train()
    killed = _demo_run(tmp_path / "killed", *flags)
    killed.on_step = lambda step, state: (_ for _ in ()).throw(Killed())
    with pytest.raises(Killed):
        killed.train()
    assert not (tmp_path / "killed" / "out" / "checkpoints").exists() or not any(
        (tmp_path / "killed" / "out" / "checkpoints").iterdir())
    assert (tmp_path / "killed" / "out" / "init_student" / build.INIT_STAMP).is_file()
    calls = []
    original = build.importance_scores
    monkeypatch.setattr(build, "importance_scores", lambda *a, **k: calls.append(1) or original(*a, **k))
    rerun = _demo_run(tmp_path / "killed", *flags)
    rerun.train()
    assert calls == []  # read back, not pruned again
    for a, b in zip(jax.tree.leaves(eqx.filter(whole.state.student, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(rerun.state.student, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = _demo_run(tmp_path / "killed", *flags, "--distillation.student-model.intermediate-size", "96",
                      "--training.output-dir", str(tmp_path / "killed" / "out2"))
    shutil.copytree(tmp_path / "killed" / "out" / "init_student", tmp_path / "killed" / "out2" / "init_student")
    build.init_student(other.prepared, other.open_teacher(), jax.random.key(0))
    assert calls == [1]  # another student: the saved one is not reused
