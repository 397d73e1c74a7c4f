"""The memory planner: exact weight bytes per device from the abstract pytrees, the dry run of the 32B -> 7B
config offline, and the one-line ConfigError naming what would fit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import ml_dtypes
import numpy as np
import pytest

from models import CausalLM, ModelConfig
from vishwam.config import specs
from vishwam.config.cli import load_config
from vishwam.errors import CheckpointError, ConfigError
from vishwam.io.checkpoint import LazyCheckpoint, hf_names
from vishwam.io.safetensors_io import write_file
from vishwam.plan import fit, planner

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "qwen2.5-32b-to-7b.yaml")
BIG = 2**50  # a capacity everything fits in
TINY = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, qkv_bias=True)


@pytest.fixture(autouse=True)
def _no_capacity_override(monkeypatch):
    monkeypatch.delenv("VISHWAM_DEVICE_MEMORY", raising=False)


@pytest.fixture(scope="module")
def teacher():
    return specs.resolve_architecture("Qwen/Qwen2.5-32B")


def _cfg(*overrides):
    return load_config(CONFIG, overrides)


def _leaves(config):
    """`(dotted name, ShapeDtypeStruct)` of the abstract model."""
    abstract = eqx.filter_eval_shape(CausalLM, config, key=jax.random.key(0))
    return [(jax.tree_util.keystr(path, simple=True, separator="."), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
            if isinstance(leaf, jax.ShapeDtypeStruct)]


def _bytes(config, itemsize, divisor=lambda name, shape: 1):
    """`(total, per device)` bytes of the abstract model, each leaf divided by `divisor(name, shape)`."""
    total = per_device = 0
    for name, leaf in _leaves(config):
        n = math.prod(leaf.shape) * itemsize
        total += n
        per_device += n // divisor(name, leaf.shape)
    return total, per_device


def _write_checkpoint(directory: Path, config: ModelConfig, weights: bool = True) -> Path:
    """An HF checkpoint of bf16 zeros with each decoder layer in its own shard file (no JAX work)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf(dtype="bfloat16")))
    if not weights:
        return directory
    files: dict[str, dict[str, np.ndarray]] = {}
    for name, leaf in _leaves(config):
        stacked = name.startswith("model.layers.")
        for i, tensor in enumerate(hf_names(name, config.num_hidden_layers)):
            fname = f"layer-{i:03d}.safetensors" if stacked else "outside.safetensors"
            shape = leaf.shape[1:] if stacked else leaf.shape
            files.setdefault(fname, {})[tensor] = np.zeros(shape, ml_dtypes.bfloat16)
    weight_map = {}
    for fname, tensors in files.items():
        write_file(directory / fname, tensors)
        weight_map.update(dict.fromkeys(tensors, fname))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


# ---------------------------------------------------------------------------------------------- architecture


def test_bundled_qwen_32b_architecture_and_param_counts(teacher):
    assert (teacher.hidden_size, teacher.intermediate_size, teacher.num_hidden_layers) == (5120, 27648, 64)
    assert (teacher.num_attention_heads, teacher.num_key_value_heads, teacher.vocab_size) == (40, 8, 152064)
    assert teacher.rope_theta == 1e6 and teacher.rms_norm_eps == 1e-5 and not teacher.tie_word_embeddings
    assert teacher.num_parameters() == pytest.approx(32.76e9, rel=1e-3)
    # Qwen2.5-7B's exact shape, and the config's student (7 KV heads: pruning keeps the teacher's groups whole).
    qwen7b = teacher.replace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4)
    assert qwen7b.num_parameters() == pytest.approx(7.6e9, rel=0.01)
    plan = planner.plan(_cfg(), teacher, device_bytes=BIG)
    assert plan.student_config.num_parameters() == pytest.approx(7.6e9, rel=0.02)
    assert plan.student_config.head_dim == 128 and plan.student_config.hidden_size == 3584


def test_teacher_config_resolution(tmp_path):
    local = _write_checkpoint(tmp_path / "local", TINY, weights=False)
    assert specs.resolve_architecture(str(local)) == TINY  # a local directory's config.json first
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model") as info:  # offline hub: one line
        specs.resolve_architecture("no-such-org/no-such-model")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- weight bytes


def test_weight_bytes_equal_the_abstract_pytrees_divisible_fsdp(teacher):
    # fsdp=8; every sharded dim divides by 8. Feature matching on: its projections are trainable weights too.
    plan = planner.plan(_cfg("--distillation-params.feature-weight", "1.0"), teacher, device_bytes=BIG)
    t_total, _ = _bytes(teacher, 2)  # bf16 teacher
    s_total, _ = _bytes(plan.student_config, 4)  # fp32 params
    assert plan.teacher_total_bytes == t_total and plan.student_total_bytes == s_total
    # Weight matrices are split 8 ways; norms and biases (vectors per layer) are replicated.
    split = lambda name, shape: 1 if "norm" in name or "bias" in name else 8  # noqa: E731
    _, t_dev = _bytes(teacher, 2, split)
    _, s_dev = _bytes(plan.student_config, 4, split)
    assert plan.teacher_bytes == t_dev and plan.student_bytes == s_dev
    assert t_dev == pytest.approx(t_total / 8, rel=1e-3) and s_dev == pytest.approx(s_total / 8, rel=1e-3)
    assert plan.projection_bytes == 28 * 5120 * 3584 * 4 // 8  # the seed mapping pairs every student layer
    trainable = plan.student_bytes + plan.projection_bytes
    assert plan.optimizer_bytes == 2 * trainable  # AdamW mu and nu in fp32
    assert plan.gradient_bytes == trainable  # the fp32 accumulator (a micro-batch's gradient is an activation)


def test_weight_bytes_non_divisible_tensor_axis(teacher):
    """tensor=3: the vocabulary (152064) and the teacher's MLP (27648) split 3 ways; heads (40, 28), KV heads
    (8, 7) and the student's MLP (18944) do not divide by 3, so they stay whole on every device."""
    plan = planner.plan(_cfg("--parallelism.fsdp", "1", "--parallelism.tensor", "3"), teacher, device_bytes=BIG)

    def divisor(config):
        def f(name, shape):
            if "embed_tokens" in name or "lm_head" in name:
                return 3
            return 3 if ".mlp." in name and config.intermediate_size % 3 == 0 else 1
        return f

    assert plan.teacher_bytes == _bytes(teacher, 2, divisor(teacher))[1]
    assert plan.student_bytes == _bytes(plan.student_config, 4, divisor(plan.student_config))[1]
    assert plan.teacher_total_bytes / 3 < plan.teacher_bytes < plan.teacher_total_bytes


def test_streamed_teacher_uses_the_local_shard_layout(tmp_path):
    path = _write_checkpoint(tmp_path / "t", TINY)
    student = [f"--distillation.student-model.{k}" for k in ("hidden-size", "intermediate-size", "num-hidden-layers",
                                                              "num-attention-heads", "num-key-value-heads")]
    cfg = _cfg("--distillation.teacher-model.path", str(path), "--distillation.teacher-model.loading", "streamed",
               "--distillation.teacher-model.max-resident-shards", "2", "--parallelism.fsdp", "1",
               "--training.seq-len", "32", *[x for k, v in zip(student, (16, 16, 2, 2, 1)) for x in (k, str(v))])
    plan = planner.plan(cfg, device_bytes=BIG)
    ckpt = LazyCheckpoint(path)
    groups = ckpt.layer_groups(2)
    ckpt.close()
    assert groups == [(0, 2), (2, 4), (4, 6)]  # one shard file per layer, two files at a time
    layers = sum(math.prod(leaf.shape) * 2 for name, leaf in _leaves(TINY) if name.startswith("model.layers."))
    outside = plan.teacher_total_bytes - layers
    assert plan.teacher_bytes == 2 * layers // 6 + outside
    assert "holds 2 of 6 layers" in plan.render()


# ---------------------------------------------------------------------------------------------- fitting


def test_no_fit_names_streamed_loading(teacher):
    small_step = ("--training.batch-size", "8", "--training.grad-accum-steps", "1")
    cfg = _cfg(*small_step)
    resident = planner.plan(cfg, teacher, device_bytes=BIG)
    streamed = planner.plan(_cfg(*small_step, "--distillation.teacher-model.loading", "streamed"), teacher,
                            device_bytes=BIG)
    assert streamed.teacher_bytes < resident.teacher_bytes and streamed.total_bytes < resident.total_bytes
    plan = planner.plan(cfg, teacher, device_bytes=(resident.total_bytes + streamed.total_bytes) // 2)
    assert plan.fits is False and "NO (short by" in plan.render()
    with pytest.raises(ConfigError, match=r"switch distillation\.teacher_model\.loading to streamed would need "
                                          r"[\d.]+ GiB/device") as info:
        fit.check_fits(plan, cfg)
    assert "\n" not in str(info.value)


def test_no_fit_names_a_mesh(teacher):
    cfg = _cfg("--parallelism.data", "8", "--parallelism.fsdp", "1")  # pure data parallel: all replicated
    plan = planner.plan(cfg, teacher, device_bytes=80 * 2**30)
    assert plan.fits is False
    with pytest.raises(ConfigError, match=r"set parallelism\.data=1, parallelism\.fsdp=8 \(8 devices\) would need"):
        fit.check_fits(plan, cfg)


def test_nothing_fits_names_the_closest(teacher):
    cfg = _cfg()
    plan = planner.plan(cfg, teacher, device_bytes=2**30)
    with pytest.raises(ConfigError, match=r"nothing tried fits: the closest, .+, would still need [\d.]+ GiB"):
        fit.check_fits(plan, cfg)


def test_unknown_capacity_is_not_checked(teacher, capsys):
    cfg = _cfg()  # 8 devices planned on a host with fewer (and CPUs report no memory limit)
    plan = planner.plan(cfg, teacher, device_count=1)
    assert plan.capacity is None and plan.fits is None
    fit.check_fits(plan, cfg)  # does not raise
    assert fit.check_and_summarize(cfg, teacher).total_bytes == plan.total_bytes
    assert "GiB/device" in capsys.readouterr().err
    assert planner.plan(cfg, teacher, device_bytes=BIG).fits is True


# ------------------------------------------------------------------------------------------------ dry run


def _dry_run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VISHWAM_DEVICE_MEMORY")}
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", **env_extra)
    # Report the process's peak RSS (VmHWM) after run.py exits, to show that nothing big was allocated.
    code = ("import runpy, sys\nfrom vishwam.tracking import peak_rss_bytes\n"
            f"sys.argv = ['run.py', '--config', {CONFIG!r}, '--training.dry-run', 'true']\n"
            "try:\n    runpy.run_path('run.py', run_name='__main__')\n"
            "finally:\n    print(f'PEAK_RSS {peak_rss_bytes()}', file=sys.stderr)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_the_plan_offline():
    proc = _dry_run({})
    assert proc.returncode == 0, proc.stderr
    for text in ("GiB/device", "Qwen/Qwen2.5-32B", "32.76B params", "teacher weights (resident)", "optimizer state",
                 "activations", "total", "capacity", "data=1 fsdp=8 tensor=1"):
        assert text in proc.stdout
    peak = int(proc.stderr.split("PEAK_RSS ")[1].split()[0])
    assert peak < 2 * 2**30  # the 32B teacher alone is 61 GiB of weights: none of it exists


def test_dry_run_that_does_not_fit_exits_2_with_one_line():
    proc = _dry_run({"VISHWAM_DEVICE_MEMORY": "16GiB"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("PEAK_RSS")]
    assert len(errors) == 1 and errors[0].startswith("error: memory plan:") and "GiB/device" in errors[0]
    assert "Traceback" not in proc.stderr and "fits" in proc.stdout
