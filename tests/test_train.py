"""The main job end to end on tiny models: outputs, exact resume, sharding equivalence, non-finite skips."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_config, make_hf_model, save_hf

from vishwam.config.cli import load_config
from vishwam.run.loop import Run

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_sec", "peak_rss_gb"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    save_hf(make_hf_model(hf_config("qwen2", layers=4, kv_heads=2)), d / "teacher")
    rng = np.random.default_rng(0)
    # A learnable stream: a noisy cyclic pattern.
    base = np.tile(np.arange(2, 40), 300)
    noise = rng.integers(2, 96, base.size)
    stream = np.where(rng.random(base.size) < 0.2, noise, base).astype(np.int32)
    np.save(d / "train.npy", stream[:9000])
    np.save(d / "eval.npy", stream[9000:])
    return d


def write_config(assets: Path, out: Path, extra: str = "") -> Path:
    text = textwrap.dedent(f"""
        distillation:
          teacher_model:
            path: {assets / 'teacher'}
            dtype: float32
          student_model:
            init: random
            num_hidden_layers: 2
            hidden_size: 32
            intermediate_size: 32
        data:
          train: {assets / 'train.npy'}
          eval: {assets / 'eval.npy'}
        training:
          output_dir: {out}
          max_steps: 6
          batch_size: 4
          seq_len: 16
          learning_rate: 0.003
          warmup_steps: 2
          log_every: 1
          eval_every: 3
          eval_batches: 2
          save_every: 2
          compute_dtype: float32
        distillation_params:
          kd_weight: 1.0
          ce_weight: 0.5
          feature_weight: 0.5
          attention_weight: 0.2
        tracking:
          aim: false
    """)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(text + textwrap.dedent(extra))
    return path


def run(config: Path, *flags: str, on_step=None):
    r = Run(load_config(str(config), flags))
    r.on_step = on_step
    return r, r.train()


def read_metrics(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_short_run_writes_outputs_and_exports(assets, tmp_path):
    out = tmp_path / "run"
    r, result = run(write_config(assets, out))
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "distill/kd", "distill/ce", "distill/feature", "distill/attention", "temperature", "lr",
                "grad_norm"):
        assert all(np.isfinite(row[key]) for row in rows), key
    assert "tokens_per_sec" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) >= {"student_loss", "student_ppl", "teacher_loss", "teacher_ppl", "kl", "top1_agreement", "step"}
    assert ev["step"] == 6 and ev["student_ppl"] == pytest.approx(np.exp(ev["student_loss"]))
    assert (out / "config.yaml").is_file()
    # The export loads in transformers, holds no training-only tensor, and gives the trained pytree's logits.
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "student", attn_implementation="eager")
    names = set(exported.state_dict())
    assert not any("projection" in n for n in names)
    ids = np.random.default_rng(0).integers(2, 96, (2, 10))
    with torch.no_grad():
        ref = exported(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(result["state"].student(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_interrupted_run_resumes_bitwise(assets, tmp_path):
    full_out = tmp_path / "full"
    _, full = run(write_config(assets, full_out))

    cut_out = tmp_path / "cut"
    config = write_config(assets, cut_out)

    class Stop(Exception):
        pass

    def stop_at_5(step, state):
        if step == 5:  # after the step-4 checkpoint, in the middle of the next interval
            raise Stop

    with pytest.raises(Stop):
        run(config, on_step=stop_at_5)
    _, resumed = run(config)
    for a, b in zip(jax.tree.leaves(eqx.filter(full["state"], eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed["state"], eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert read_metrics(full_out) == read_metrics(cut_out)
    assert json.loads((full_out / "eval.json").read_text()) == json.loads((cut_out / "eval.json").read_text())


def test_sigkill_during_checkpoint_save_resumes_exactly(assets, tmp_path):
    """A process killed while an async save is in flight leaves no usable half checkpoint; the rerun resumes from
    the newest complete one and ends equal to an uninterrupted run."""
    full_out = tmp_path / "full"
    _, full = run(write_config(assets, full_out))
    out = tmp_path / "killed"
    config = write_config(assets, out)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.argv = ["run.py", "--config", {str(config)!r}]
        import vishwam.train.resume as t
        original = t.Checkpointer.save
        def save(self, step, state, meta):
            original(self, step, state, meta)
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # the step-4 save is still being written
        t.Checkpointer.save = save
        sys.path.insert(0, {str(ROOT)!r})
        import runpy
        runpy.run_path({str(ROOT / 'run.py')!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _, resumed = run(config)
    for a, b in zip(jax.tree.leaves(eqx.filter(full["state"], eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed["state"], eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert read_metrics(full_out) == read_metrics(out)


@pytest.mark.parametrize("mesh", [("2", "1", "2"), ("1", "4", "1")], ids=["data2xtensor2", "fsdp4"])
def test_sharded_runs_match_single_device(assets, tmp_path, mesh):
    base_out = tmp_path / "one"
    run(write_config(assets, base_out), "--training.max-steps", "3", "--training.eval-every", "100")
    out = tmp_path / "many"
    r, _ = run(write_config(assets, out), "--training.max-steps", "3", "--training.eval-every", "100",
               "--parallelism.data", mesh[0], "--parallelism.fsdp", mesh[1], "--parallelism.tensor", mesh[2])
    q = r.state.student.model.layers.self_attn.q_proj.weight
    assert len(q.sharding.device_set) == 4
    for a, b in zip(read_metrics(base_out), read_metrics(out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for key in ("distill/kd", "distill/ce", "distill/feature", "distill/attention"):
            # Each component to 1e-5 of the objective: KL terms near zero are differences of ~4.5-sized fp32 sums,
            # so their own relative error under a different reduction order is larger than their share of it.
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5 * a["loss"]), key


def test_nonfinite_step_is_skipped_and_counted(assets, tmp_path):
    from distill.objective import TeacherOutputs
    from vishwam.train.step import StepConfig, make_train_step

    r = Run(load_config(str(write_config(assets, tmp_path / "nan")), ["--distillation-params.feature-weight", "0",
                                                                       "--distillation-params.attention-weight", "0"]))
    r.on_step = None
    captured = {}

    def grab(step, state):
        captured["state"] = state

    r.on_step = grab
    r.cfg = dataclasses.replace(r.cfg, training=dataclasses.replace(r.cfg.training, max_steps=1))
    r.train()
    state = captured["state"]
    from vishwam.train.step import make_optimizer

    optimizer, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.0,
                                         grad_clip=1.0)
    step = make_train_step(StepConfig(r.objective, jnp.float32, 1, False), optimizer, schedule)
    batch = {k: jnp.asarray(v) for k, v in r.train_data.batch(np.arange(4)).items()}
    logits = jnp.zeros((4, 16, 96)).at[1, 3, 5].set(jnp.nan)
    before = jax.tree.map(np.asarray, eqx.filter(state.student, eqx.is_array))
    skipped_before = int(state.skipped)
    new_state, metrics = step(None, state, batch, TeacherOutputs(logits=logits))  # donates `state`
    assert float(metrics["skipped"]) == 1.0
    assert int(new_state.skipped) == skipped_before + 1 and int(new_state.nonfinite) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(eqx.filter(new_state.student, eqx.is_array))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_run_of_nonfinite_steps_stops_the_run(assets, tmp_path, monkeypatch):
    """A teacher that yields NaN makes every step non-finite: the run stops with a one-line error once
    `max_nonfinite_steps` in a row are seen (read one step behind the queued step), not silently at max_steps."""
    from vishwam.errors import VishwamError

    original = Run.open_teacher

    def nan_teacher(self):
        source = original(self)
        source.model = jax.tree.map(lambda x: x * jnp.nan if eqx.is_inexact_array(x) else x, source.model)
        return source

    monkeypatch.setattr(Run, "open_teacher", nan_teacher)
    r = Run(load_config(str(write_config(assets, tmp_path / "nanrun")), [
        "--training.max-nonfinite-steps", "2", "--training.max-steps", "8", "--training.save-every", "100",
        "--distillation-params.eplb.enabled", "false", "--distillation.student-model.init", "random"]))
    seen = []
    r.on_step = lambda step, state: seen.append((step, int(state.skipped)))
    with pytest.raises(VishwamError, match="2 non-finite steps in a row at step 2"):
        r.train()
    assert seen == [(1, 1), (2, 2)], seen  # step 3 was queued when step 2's count was read, and nothing later


@pytest.mark.parametrize("tied", [False, True])
def test_fused_lm_head_step_matches_autodiff_step(tied):
    """KD + CE fused with the student's LM head (the default) equals differentiating the separate losses on
    materialised logits: the gradient of every student parameter, and the train step's loss, components and
    gradient norm. (Not the updated parameters: AdamW's first step moves a parameter by ~lr·sign(g), so a
    near-zero gradient turns rounding-level differences into visible ones.)"""
    from distill.config import DistillationParams, TemperatureConfig
    from distill.objective import Objective, TeacherOutputs, distill_loss
    from models import ModelConfig, init_model
    from vishwam.train.step import StepConfig, init_state, make_optimizer, make_train_step

    cfg = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4, qkv_bias=True,
                      tie_word_embeddings=tied)
    teacher = init_model(dataclasses.replace(cfg, hidden_size=24, head_dim=6, tie_word_embeddings=False),
                         key=jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 48, (4, 9))
    batch = {"input_ids": ids[:, :-1].astype(np.int32), "labels": ids[:, 1:].astype(np.int32),
             "mask": np.ones((4, 8), np.int32)}
    batch["mask"][1, :3] = 0
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    student = init_model(cfg, key=jax.random.key(1))
    metrics, grads = [], []
    for fused in (True, False):
        spec = Objective(DistillationParams(kd_weight=1.0, ce_weight=0.3, label_smoothing=0.1,
                                            temperature=TemperatureConfig(start=2.0), logit_chunk_size=3,
                                            fused_logit_loss=fused))
        t_out = TeacherOutputs(logits=teacher(jbatch["input_ids"], attention_mask=jbatch["mask"]).logits)
        assert spec.fuses_lm_head(t_out.dense) == fused

        # The objective as the step calls it: gradients with respect to every student parameter.
        def loss(model, spec=spec, t_out=t_out):
            fuse = spec.fuses_lm_head(t_out.dense)
            out = model(jbatch["input_ids"], attention_mask=jbatch["mask"], output_logits=not fuse)
            head = model.unembedding_weight() if out.logits is None else None
            return distill_loss(spec, out, t_out, jbatch["labels"], jbatch["mask"], jnp.asarray(0), None, None,
                                head_weight=head)[0]

        grads.append(eqx.filter_jit(eqx.filter_grad(loss))(student))
        # And the whole step: loss, components, gradient norm.
        optimizer, schedule = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.01,
                                             grad_clip=1.0)
        fresh = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, student)  # donated
        state = init_state(fresh, None, None, optimizer, jax.random.key(2), ())
        step = make_train_step(StepConfig(spec, jnp.float32, 1, False), optimizer, schedule)
        _, m = step(teacher, state, dict(jbatch), None)
        metrics.append({k: float(v) for k, v in m.items()})
    assert set(metrics[0]) == set(metrics[1])
    for key in metrics[1]:
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-7), key
    for a, b in zip(*(jax.tree.leaves(eqx.filter(g, eqx.is_array)) for g in grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b))))


def _cli(*args, cwd=None):
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", ["teacher", "shard", "key", "data", "mapping", "vocab", "arch"])
def test_bad_input_exits_2_with_one_line_and_keeps_output(assets, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    flags: list[str] = []
    extra = ""
    needle = ""
    if case == "teacher":
        flags = ["--distillation.teacher-model.path", str(tmp_path / "missing")]
        needle = str(tmp_path / "missing")
    elif case == "shard":
        import shutil

        shutil.copytree(assets / "teacher", tmp_path / "t")
        shard = sorted((tmp_path / "t").glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-64])
        flags = ["--distillation.teacher-model.path", str(tmp_path / "t")]
        needle = str(shard)
    elif case == "key":
        extra = "training:\n  max_stepz: 3\n"
    elif case == "data":
        flags = ["--data.train", str(tmp_path / "nope.jsonl")]
        needle = f"data file not found: {tmp_path / 'nope.jsonl'}"
    elif case == "mapping":
        extra = ""
        flags = ["--distillation-params.layer-mapping.strategy", "explicit",
                 "--distillation-params.layer-mapping.pairs", "0", "1", "1", "9"]
        needle = "layer mapping: pair (1, 9): teacher layer 9 out of range [0, 4)"
    elif case == "vocab":
        np.save(tmp_path / "big.npy", np.arange(0, 500, dtype=np.int32))
        flags = ["--data.train", str(tmp_path / "big.npy")]
        needle = f"{tmp_path / 'big.npy'} holds token id 499"
    elif case == "arch":
        flags = ["--distillation.student-model.num-attention-heads", "3",
                 "--distillation.student-model.num-key-value-heads", "2"]
        needle = ("config key 'distillation.student_model.num_key_value_heads' must divide num_attention_heads (3), "
                  "got 2")
    config = write_config(assets, out)
    if extra:
        config.write_text(config.read_text().replace("training:\n", extra.replace("training:\n", "training:\n") if
                                                     case != "key" else "training:\n  max_stepz: 3\n", 1))
    if case == "key":
        needle = f"unknown config key 'training.max_stepz' in {config}"
    proc = _cli("--config", str(config), *flags)
    _assert_user_error(proc, needle)
    assert (out / "keep.txt").read_text() == "precious"
    if case == "key":
        assert str(config) in proc.stderr
    debug = _cli("--config", str(config), *flags, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(assets, tmp_path):
    """Two `jax.distributed` processes on 127.0.0.1 (2 CPU devices each) give the losses of one process with 4."""
    one = tmp_path / "one"
    config_one = write_config(assets, one)
    flags = ["--training.max-steps", "3", "--training.eval-every", "100", "--parallelism.data", "2",
             "--parallelism.fsdp", "2"]
    from conftest import CPU_COLLECTIVE_TIMEOUTS

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4 " + CPU_COLLECTIVE_TIMEOUTS,
           "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(config_one), *flags],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    multi = tmp_path / "multi"
    config_multi = write_config(assets, multi)
    port = _free_port()
    env2 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 " + CPU_COLLECTIVE_TIMEOUTS}
    # Each process writes to its own files: waiting on one process's pipes while the other's fill up would
    # block the other on a write, stop its heartbeats and fail the job on a timeout.
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "--config", str(config_multi), *flags,
                 "--distributed.coordinator-address", f"127.0.0.1:{port}", "--distributed.num-processes", "2",
                 "--distributed.process-id", str(i)],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env2))
    codes = [p.wait(timeout=600) for p in procs]
    tails = "\n".join(f"--- process {i}: exit {c}\n" + logs[i].read_text()[-2000:] for i, c in enumerate(codes))
    assert codes == [0, 0], tails
    a, b = read_metrics(one), read_metrics(multi)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["distill/kd"] == pytest.approx(rb["distill/kd"], rel=1e-5, abs=1e-5 * ra["loss"])
    assert (multi / "student" / "config.json").is_file()


def test_aim_run_records_hparams_and_metrics(assets, tmp_path):
    out = tmp_path / "aim"
    run(write_config(assets, out), "--training.max-steps", "2", "--tracking.aim", "true", "--tracking.repo",
        str(tmp_path / "aimrepo"), "--tracking.experiment", "unit")
    import aim
    from aim.sdk.index_manager import RepoIndexManager

    repo = aim.Repo(str(tmp_path / "aimrepo"))
    hashes = repo.list_all_runs()
    assert len(hashes) == 1
    RepoIndexManager.get_index_manager(repo).index(hashes[0])  # what `aim up` does when it starts
    runs = list(repo.iter_runs())
    assert len(runs) == 1
    r = runs[0]
    assert r.experiment == "unit"
    assert r["hparams"]["training"]["max_steps"] == 2
    names = {m.name for m in r.metrics()}
    assert {"loss", "distill.kd", "lr", "grad_norm", "tokens_per_sec"} <= names
    assert r["mapping_history"][0]["pairs"] == [[0, 1], [1, 3]]


def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    flags = ["--training.max-steps", "2", "--distillation-params.attention-weight", "0",
             "--distillation-params.feature-weight", "0", "--training.grad-clip", "0"]
    _, one = run(write_config(assets, tmp_path / "one"), *flags)
    _, acc = run(write_config(assets, tmp_path / "acc"), *flags, "--training.grad-accum-steps", "2")
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "acc")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(eqx.filter(one["state"].student, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(acc["state"].student, eqx.is_array))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_resume_never_prunes_the_teacher_again(assets, tmp_path, monkeypatch):
    """`init: from_teacher` runs once: a resumed run restores into an abstract state (shapes and shardings) and
    reads no teacher for pruning; it ends as the uninterrupted run does."""
    import vishwam.run.build as build

    flags = ("--distillation.student-model.init", "from_teacher")
    _, full = run(write_config(assets, tmp_path / "full"), *flags)
    config = write_config(assets, tmp_path / "cut")

    class Stop(Exception):
        pass

    def stop_at_5(step, state):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        run(config, *flags, on_step=stop_at_5)

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruning ran again on resume")

    monkeypatch.setattr(build, "init_student_from_teacher", no_pruning)
    _, resumed = run(config, *flags)
    for a, b in zip(jax.tree.leaves(eqx.filter(full["state"], eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed["state"], eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_device_holds_its_share_of_every_micro_batch():
    """The host batch, interleaved, splits in the step into the same micro-batches as the host's consecutive
    ones, and with its rows over 4 devices each micro-batch is spread over all 4 (the micro-batch axis is not
    sharded); a contiguous split put micro-batch m on the devices of block m alone."""
    from jax.sharding import NamedSharding, PartitionSpec

    from vishwam.sharding import make_mesh
    from vishwam.train.step import interleave_micro_batches, split_micro_batches

    accum, rows = 4, 16
    host = {"input_ids": np.arange(rows * 3, dtype=np.int32).reshape(rows, 3)}
    micro = split_micro_batches(interleave_micro_batches(host, accum), accum)["input_ids"]
    np.testing.assert_array_equal(np.asarray(micro), host["input_ids"].reshape(accum, rows // accum, 3))
    mesh = make_mesh(1, 4, 1)
    x = jax.device_put(jnp.asarray(interleave_micro_batches(host, accum)["input_ids"]),
                       NamedSharding(mesh, PartitionSpec("fsdp")))
    split = jax.jit(lambda t: split_micro_batches(t, accum))(x)
    for m in range(accum):
        assert {s.device for s in split[m].addressable_shards if s.data.size} == set(mesh.devices.flat)
        assert all(s.data.shape[0] == rows // accum // 4 for s in split[m].addressable_shards)
