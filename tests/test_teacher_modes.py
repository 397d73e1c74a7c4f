"""Streamed and cached teachers: equal to resident, bounded residency, checksummed resumable caches."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import hf_config, make_hf_model, save_hf
from test_train import read_metrics, run, write_config

import vishwam
from distill.logits import teacher_topk
from vishwam.data import PackedDataset
from vishwam.errors import DataError
from vishwam.streamed import StreamedTeacher
from vishwam.teacher_cache import TeacherCache, build_cache


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    return save_hf(make_hf_model(hf_config("qwen3", layers=6)), d, max_shard_size="15KB")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, teacher_dir):
    d = tmp_path_factory.mktemp("assets")
    import shutil

    shutil.copytree(teacher_dir, d / "teacher")
    rng = np.random.default_rng(0)
    stream = np.where(rng.random(6000) < 0.2, rng.integers(2, 96, 6000), np.tile(np.arange(2, 32), 200))
    np.save(d / "train.npy", stream[:5000].astype(np.int32))
    np.save(d / "eval.npy", stream[5000:].astype(np.int32))
    return d


def test_streamed_equals_resident_with_bounded_shards(teacher_dir):
    lazy = vishwam.open_pretrained(teacher_dir)
    resident = lazy.load()
    streamed = StreamedTeacher(lazy, dtype=None, max_resident_shards=2)
    assert len(streamed.groups) > 1
    for a, b in streamed.groups:  # each group touches at most one shard (half the budget, for prefetch)
        assert len(lazy.shards_of_layers(a, b)) <= 1 or b - a == 1
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)))
    mask = jnp.ones((2, 12), jnp.int32).at[0, :3].set(0)
    ref = resident(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    out = streamed(ids, mask, output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), rtol=1e-6, atol=1e-6)
    for x, y in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    for x, y in zip(out.attentions, ref.attentions):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert streamed.max_groups_resident == 2
    streamed.close()


def test_streamed_run_losses_equal_resident(assets, tmp_path):
    flags = ["--training.max-steps", "3", "--distillation-params.attention-weight", "0"]
    run(write_config(assets, tmp_path / "resident"), *flags)
    run(write_config(assets, tmp_path / "streamed"), *flags, "--distillation.teacher-model.loading", "streamed",
        "--distillation.teacher-model.max-resident-shards", "2")
    for a, b in zip(read_metrics(tmp_path / "resident"), read_metrics(tmp_path / "streamed")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        for key in ("distill/kd", "distill/ce", "distill/feature"):
            # Components to 1e-6 of the objective (the KD term is a small difference of ~4.5-sized fp32 sums).
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6 * a["loss"]), key


@pytest.fixture
def small_cache(teacher_dir, tmp_path):
    teacher = vishwam.load_pretrained(teacher_dir)
    tokens = np.random.default_rng(1).integers(2, 96, 40 * 9).astype(np.int32)
    data = PackedDataset(tokens, 8)
    directory = tmp_path / "cache"
    index = build_cache(teacher, data, directory, top_k=5, vocab_size=96, hidden_layers=(2,), windows_per_shard=16,
                        batch_size=4)
    return teacher, data, directory, index


def test_cache_holds_the_teachers_topk(small_cache):
    teacher, data, directory, index = small_cache
    assert len(index["shards"]) == 3 and index["bytes_per_token"] > 0
    cache = TeacherCache(directory, seq_len=8, top_k=5, num_windows=data.num_windows, hidden_layers=(2,))
    windows = np.array([3, 17, 39])
    batch = data.batch(windows)
    out = teacher(jnp.asarray(batch["input_ids"]), output_hidden_states=True)
    values, indices, tail = teacher_topk(out.logits, 5)
    rows = cache.rows(windows)
    np.testing.assert_allclose(rows["topk_values"], np.asarray(values), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rows["topk_indices"], np.asarray(indices))
    np.testing.assert_allclose(rows["tail_logsumexp"], np.asarray(tail), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows["hidden_2"], np.asarray(out.hidden_states[3]), rtol=1e-6, atol=1e-6)
    logp = np.asarray(jnp.log(jnp.exp(out.logits) / jnp.exp(out.logits).sum(-1, keepdims=True)))
    label_logp = np.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
    np.testing.assert_allclose(rows["label_logprob"], label_logp, rtol=1e-5, atol=1e-5)


def test_truncated_cache_shard_is_named(small_cache):
    _, data, directory, _ = small_cache
    victim = directory / "cache-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-40])
    cache = TeacherCache(directory, seq_len=8, top_k=5, num_windows=data.num_windows, hidden_layers=(2,))
    with pytest.raises(vishwam.VishwamError, match="cache-00001.safetensors"):
        cache.rows(np.array([20]))


def test_checksum_mismatch_is_named(small_cache):
    _, data, directory, _ = small_cache
    victim = directory / "cache-00002.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # same size, one flipped byte in the data section
    victim.write_bytes(bytes(raw))
    cache = TeacherCache(directory, seq_len=8, top_k=5, num_windows=data.num_windows, hidden_layers=(2,))
    cache.rows(np.array([0]))  # an intact shard reads fine
    with pytest.raises(DataError, match="cache-00002.safetensors.*checksum"):
        cache.rows(np.array([35]))


def test_interrupted_build_resumes_without_redoing_finished_shards(teacher_dir, tmp_path, monkeypatch):
    import vishwam.teacher_cache as T

    teacher = vishwam.load_pretrained(teacher_dir)
    data = PackedDataset(np.random.default_rng(2).integers(2, 96, 48 * 9).astype(np.int32), 8)
    directory = tmp_path / "cache"
    calls = {"n": 0}
    original = T._cache_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # batches of 4, 16 windows a shard: dies in the middle of the second shard
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(T, "_cache_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, data, directory, top_k=4, vocab_size=96, windows_per_shard=16, batch_size=4)
    index = json.loads((directory / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["cache-00000.safetensors"]
    first_mtime = (directory / "cache-00000.safetensors").stat().st_mtime_ns
    calls["n"] = 0
    monkeypatch.setattr(T, "_cache_rows", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), original(*a, **k))[1])
    index = build_cache(teacher, data, directory, top_k=4, vocab_size=96, windows_per_shard=16, batch_size=4)
    assert calls["n"] == 8  # only shards 1 and 2 (4 batches each) were computed again
    assert (directory / "cache-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert len(index["shards"]) == 3


def test_cached_run_trains_close_to_live_teacher(assets, tmp_path):
    flags = ["--training.max-steps", "6", "--distillation-params.attention-weight", "0",
             "--distillation-params.ce-weight", "0"]
    _, live = run(write_config(assets, tmp_path / "live"), *flags)
    _, cached = run(write_config(assets, tmp_path / "cached"), *flags, "--distillation.teacher-model.loading",
                    "cached", "--distillation.teacher-model.cache-dir", str(tmp_path / "cache"),
                    "--distillation.teacher-model.top-k", "32")
    assert (tmp_path / "cache" / "train" / "index.json").is_file()
    a, b = live["eval"]["student_loss"], cached["eval"]["student_loss"]
    assert abs(a - b) / a < 0.02
    assert cached["eval"]["teacher_loss"] == pytest.approx(live["eval"]["teacher_loss"], rel=1e-5)
