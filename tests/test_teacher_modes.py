"""Streamed and cached teachers: equal to resident, bounded residency, checksummed resumable caches."""

from __future__ import annotations

import json
import re
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import hf_config, make_hf_model, save_hf
from test_train import read_metrics, run, write_config

import vishwam
from distill.logits import teacher_topk
from vishwam.data.windows import PackedDataset
from vishwam.errors import DataError
from vishwam.sharding import make_mesh, shard_tree
from vishwam.teacher.cache import TeacherCache, build_cache
from vishwam.teacher.streamed import StreamedTeacher


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
    # The teacher and the rows spread over 4 devices, logits in chunks of 3 positions (not dividing the 8 of a
    # window), as a run builds it.
    mesh = make_mesh(1, 4, 1)
    index = build_cache(shard_tree(teacher, mesh), data, directory, top_k=5, vocab_size=96, hidden_layers=(2,),
                        windows_per_shard=16, batch_size=4, mesh=mesh, chunk_size=3)
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
    with pytest.raises(vishwam.VishwamError, match=re.escape(str(victim))):
        cache.rows(np.array([20]))


def test_checksum_mismatch_is_named(small_cache):
    _, data, directory, _ = small_cache
    victim = directory / "cache-00002.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # same size, one flipped byte in the data section
    victim.write_bytes(bytes(raw))
    cache = TeacherCache(directory, seq_len=8, top_k=5, num_windows=data.num_windows, hidden_layers=(2,))
    cache.rows(np.array([0]))  # an intact shard reads fine
    with pytest.raises(DataError, match=re.escape(f"teacher cache shard {victim} fails its checksum")):
        cache.rows(np.array([35]))


def test_interrupted_build_resumes_without_redoing_finished_shards(teacher_dir, tmp_path, monkeypatch):
    import vishwam.teacher.cache as T

    teacher = vishwam.load_pretrained(teacher_dir)
    data = PackedDataset(np.random.default_rng(2).integers(2, 96, 48 * 9).astype(np.int32), 8)
    directory = tmp_path / "cache"
    calls = {"n": 0}
    original = T.cache_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # batches of 4, 16 windows a shard: dies in the middle of the second shard
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(T, "cache_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, data, directory, top_k=4, vocab_size=96, windows_per_shard=16, batch_size=4)
    index = json.loads((directory / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["cache-00000.safetensors"]
    first_mtime = (directory / "cache-00000.safetensors").stat().st_mtime_ns
    calls["n"] = 0
    monkeypatch.setattr(T, "cache_rows", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), original(*a, **k))[1])
    index = build_cache(teacher, data, directory, top_k=4, vocab_size=96, windows_per_shard=16, batch_size=4)
    assert calls["n"] == 8  # only shards 1 and 2 (4 batches each) were computed again
    assert (directory / "cache-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert len(index["shards"]) == 3


# ------------------------------------------------------------------ cached KD against a float64 reference
#
# What a top-k cache is supposed to give (distill/logits/sparse.py): per token, the forward KL · T² between the
# teacher and the student both collapsed onto k + 1 buckets, the teacher's k top ids and one tail bucket. The
# teacher's tail bucket is held as the logsumexp L of its other logits at T = 1; at temperature T it gets the logit
# log(n) + (L - log n) / T (n = vocab - k: exact at T = 1, "all tail logits equal" otherwise). The student's tail
# bucket is exact: the logsumexp of its other logits at T. The reference below computes that in float64 from the
# live teacher's full logits (its own top-k, its own tail), and the full (uncollapsed) KL beside it.

TOP_K = 32
EPS32 = float(np.finfo(np.float32).eps)
# The loss's inputs, logits of size < 1 and tail logsumexps of ~4.5 (log of ~64 near-uniform tail ids), are fp32
# numbers below 8, whose ulp is <= 2^-21 = 4.8e-7. Two fp32 evaluations of the same model on the same tokens (the
# cache build's jitted teacher and this test's eager one; the step's jitted student and this test's) differ only by
# reassociation, by a few ulps: DELTA = 4 ulps. The clean test checks it on the cached values and the student.
DELTA = 4 * 2.0**-21


def _lse(x):
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def _reference_kd(t, s, k, temp):
    """float64 per token (`t`, `s`: `[N, vocab]` teacher and student logits): the collapsed KL · T² the cache is
    supposed to give, the full KL · T², the teacher's tail mass at T = 1, the top-k ids, the largest
    |log(p_b / q_b)| over buckets (collapsed and full), the largest |logit| / T, and (at T = 1) the chain-rule bound
    of full - collapsed."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    n_tok, vocab = t.shape
    order = np.argsort(-t, axis=-1, kind="stable")
    top, rest = order[:, :k], order[:, k:]
    rows = np.arange(n_tok)[:, None]
    n = vocab - k
    tail_lse = _lse(t[rows, rest])
    teacher_b = np.concatenate([t[rows, top] / temp, (np.log(n) + (tail_lse - np.log(n)) / temp)[:, None]], -1)
    log_p = teacher_b - _lse(teacher_b)[:, None]
    s_t = s / temp
    s_lse = _lse(s_t)
    log_q = np.concatenate([s_t[rows, top] - s_lse[:, None], (_lse(s_t[rows, rest]) - s_lse)[:, None]], -1)
    collapsed = temp**2 * np.sum(np.exp(log_p) * (log_p - log_q), -1)
    log_pf = t / temp - _lse(t / temp)[:, None]
    log_qf = s_t - s_lse[:, None]
    full = temp**2 * np.sum(np.exp(log_pf) * (log_pf - log_qf), -1)
    tail_mass = np.exp(tail_lse - _lse(t))
    # Chain rule at T = 1: full - collapsed = p_tail · KL(p(.|tail) || q(.|tail)), and a KL is at most the largest
    # log-ratio of its two distributions: <= p_tail · max_{i in tail} log(p_i q_tail / (q_i p_tail)).
    cond_ratio = (log_pf[rows, rest] - log_p[:, -1:]) - (log_qf[rows, rest] - log_q[:, -1:])
    chain_bound = tail_mass * np.max(cond_ratio, -1)
    return dict(collapsed=collapsed, full=full, tail_mass=tail_mass, top=top, vocab=vocab, chain_bound=chain_bound,
                ratio=np.max(np.abs(log_p - log_q), -1), ratio_full=np.max(np.abs(log_pf - log_qf), -1),
                logit_scale=np.maximum(np.abs(t).max(-1), np.abs(s).max(-1)) / temp)


def _kd_tolerance(ref, temp, n_tokens, key="ratio"):
    """|fp32 loss - float64 reference| bound for a mean over `n_tokens` of per-token KL · T².

    - Inputs: logits off by at most DELTA. Per token, with u = s/T, d KL / d u_j = q_j - p_b(j) q_j / q_b(j), whose
      |.| sum to <= 2; with w = t/T (top ids and the tail logit), d KL / d w_b = p_b (log(p_b/q_b) - KL), whose
      |.| sum to <= 2 R, R = max_b |log(p_b/q_b)|. So |d(T² KL)| <= T · DELTA · (2 + 2R).
    - The loss's own fp32 arithmetic: each log-softmax term is off by <= ~4 eps (|x/T| + logsumexp) <= 4 eps Λ
      (Λ = max |logit| / T + log vocab), each p by ~4 eps relative; KL = Σ p (log p - log q) is then off by
      <= 4 eps Λ + 4 eps R (the p weights sum to 1): T² · 8 eps (Λ + R).
    - The fp32 mean over the tokens: <= n_tokens · eps · |mean|.
    """
    r = float(np.max(ref[key]))
    lam = float(np.max(ref["logit_scale"])) + np.log(ref["vocab"])
    mean = float(np.mean(ref["collapsed" if key == "ratio" else "full"]))
    return temp * DELTA * (2 + 2 * r) + temp**2 * 8 * EPS32 * (lam + r) + n_tokens * EPS32 * abs(mean)


def _device_copy(tree):
    return jax.tree.map(jnp.asarray, jax.device_get(tree))


def _capturing_run(monkeypatch, config, *flags):
    """A run that keeps every student its steps saw: `students[j]` is the one step j + 1 was computed with."""
    import vishwam.run.build as build

    students = []
    original = build.build_state

    def capture(*args, **kwargs):
        state, shardings = original(*args, **kwargs)
        students.append(_device_copy(state.student))  # copied: the step donates the state's buffers
        return state, shardings

    monkeypatch.setattr(build, "build_state", capture)
    r, result = run(config, *flags, on_step=lambda step, state: students.append(_device_copy(state.student)))
    monkeypatch.setattr(build, "build_state", original)
    return r, result, students


def _step_references(r, students, teacher, temp, rows):
    """The float64 reference of every logged step: its batch (`batch_for_step`), the live teacher's full logits,
    the student that step saw."""
    from vishwam.data.windows import batch_for_step

    tr = r.cfg.training
    refs = []
    for row in rows:
        batch = batch_for_step(r.train_data, seed=tr.seed, step=row["step"] - 1, batch_size=tr.batch_size)
        ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["mask"])
        vocab = r.prepared.vocab_size
        t = np.asarray(teacher(ids, attention_mask=mask).logits, np.float64)[..., :vocab]
        student = students[row["step"] - 1]
        s = np.asarray(student(ids, attention_mask=mask).logits, np.float64)[..., :vocab]
        valid = batch["mask"].reshape(-1) > 0
        ref = _reference_kd(t.reshape(-1, vocab)[valid], s.reshape(-1, vocab)[valid], TOP_K, temp)
        refs.append(dict(ref, batch=batch, ids=ids, mask=mask, student=student, n=int(valid.sum())))
    return refs


def _assert_kd_matches(row, ref, temp):
    """The logged sparse KD of one step equals the float64 collapsed KL to the fp32 tolerance."""
    want = float(np.mean(ref["collapsed"]))
    tol = _kd_tolerance(ref, temp, ref["n"])
    assert abs(row["distill/kd"] - want) <= tol, (row["step"], row["distill/kd"], want, tol)


CACHED_FLAGS = ("--training.max-steps", "4", "--distillation-params.attention-weight", "0",
                "--distillation-params.ce-weight", "0", "--distillation.teacher-model.top-k", str(TOP_K))


@pytest.fixture(scope="module")
def cached_t1(assets, tmp_path_factory):
    """A 4-step cached run at T = 1 (its cache is built on the way) with the students of its steps."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("cached_t1")
    try:
        r, result, students = _capturing_run(
            mp, write_config(assets, d / "run"), *CACHED_FLAGS, "--distillation-params.temperature.start", "1.0",
            "--distillation.teacher-model.loading", "cached",
            "--distillation.teacher-model.cache-dir", str(d / "cache"))
    finally:
        mp.undo()
    return r, result, students, d


def test_cached_run_kd_is_the_collapsed_kl_of_the_live_teacher(assets, tmp_path, cached_t1):
    r, cached, students, d = cached_t1
    assert (d / "cache" / "train" / "index.json").is_file()
    rows = read_metrics(d / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and len(students) == 5
    teacher = vishwam.load_pretrained(assets / "teacher")
    refs = _step_references(r, students, teacher, 1.0, rows)
    cache = TeacherCache(d / "cache" / "train", seq_len=r.cfg.training.seq_len, top_k=TOP_K)
    for row, ref in zip(rows, refs):
        # The premises: the cache holds the live teacher's top-k ids, and its values and tail logsumexps within
        # DELTA of the live teacher's; the student's jitted logits (as in the step) are within DELTA of eager ones.
        cached_rows = cache.rows(ref["batch"]["window"])
        valid = ref["batch"]["mask"].reshape(-1) > 0
        np.testing.assert_array_equal(np.sort(cached_rows["topk_indices"].reshape(-1, TOP_K)[valid], -1),
                                      np.sort(ref["top"], -1))
        t_live = np.asarray(teacher(ref["ids"], attention_mask=ref["mask"]).logits)
        np.testing.assert_allclose(cached_rows["topk_values"], np.take_along_axis(t_live, cached_rows["topk_indices"],
                                                                                  -1), rtol=0, atol=DELTA)
        tail_live = np.asarray(teacher_topk(jnp.asarray(t_live), TOP_K)[2])
        np.testing.assert_allclose(cached_rows["tail_logsumexp"], tail_live, rtol=0, atol=DELTA)
        assert max(np.abs(t_live).max(), np.abs(tail_live).max()) < 8  # DELTA's premise
        eager = ref["student"](ref["ids"], attention_mask=ref["mask"]).logits
        jitted = eqx.filter_jit(lambda m, i, k: m(i, attention_mask=k).logits)(ref["student"], ref["ids"], ref["mask"])
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0, atol=DELTA)

        # The cached run's KD is the collapsed KL, to fp32 rounding.
        _assert_kd_matches(row, ref, 1.0)
        # And it is below the full KL (data processing: collapsing both distributions onto the same buckets),
        # by at most the teacher's tail mass times the largest log-ratio inside the tail (the chain rule).
        tol_full = _kd_tolerance(ref, 1.0, ref["n"], key="ratio_full")
        gap = float(np.mean(ref["full"])) - row["distill/kd"]
        assert -tol_full <= gap <= float(np.mean(ref["chain_bound"])) + tol_full, (gap, tol_full)
        assert np.all(ref["full"] - ref["collapsed"] <= ref["chain_bound"] + 1e-12)
        assert np.all(ref["collapsed"] <= ref["full"] + 1e-12)
        # exp(L - logsumexp) of two fp32 numbers each within DELTA (plus an ulp of rounding) of the reference's.
        assert row["distill/teacher_tail_mass"] == pytest.approx(float(np.mean(ref["tail_mass"])), abs=4 * DELTA)

    # The live teacher's run starts from the same student: its first KD is the full KL of the reference.
    _, live = run(write_config(assets, tmp_path / "live"), *CACHED_FLAGS, "--distillation-params.temperature.start",
                  "1.0")
    first = read_metrics(tmp_path / "live")[0]
    assert abs(first["distill/kd"] - float(np.mean(refs[0]["full"]))) <= _kd_tolerance(refs[0], 1.0, refs[0]["n"],
                                                                                         key="ratio_full")
    # The cached label log-probabilities give the live teacher's eval loss.
    assert cached["eval"]["teacher_loss"] == pytest.approx(live["eval"]["teacher_loss"], rel=1e-5)


def _corrupt_cache(directory, window, token, name, delta):
    """Add `delta` to one cached value (`topk_values[.., 0]`, the top-1 logit, or `tail_logsumexp`) of `window`
    at position `token`, and re-checksum the shard in index.json: the checksum no longer catches it."""
    import hashlib

    from vishwam.io.safetensors_io import SafetensorsFile, write_file

    index = json.loads((directory / "index.json").read_text())
    shard, row = divmod(window, index["windows_per_shard"])
    entry = index["shards"][shard]
    path = directory / entry["file"]
    with SafetensorsFile(path) as f:
        tensors = {key: np.array(f.read(key)) for key in f.keys()}
    if name == "topk_values":
        tensors[name][row, token, 0] += delta  # stays the largest: the cache's order holds
    else:
        tensors[name][row, token] += delta
    write_file(path, tensors, {"format": "vishwam-teacher-cache"})
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "index.json").write_text(json.dumps(index, indent=1))


@pytest.mark.parametrize("name", ["topk_values", "tail_logsumexp"])
def test_one_corrupted_cache_value_fails_the_kd_comparison(assets, tmp_path, monkeypatch, cached_t1, name):
    """The same comparison at T = 2 (the tail as if its logits were equal) passes on the intact steps and fails on
    the step whose batch holds one corrupted cached value (checksums updated, so nothing else notices)."""
    r, _, _, d = cached_t1
    from vishwam.data.windows import batch_for_step

    shutil.copytree(d / "cache", tmp_path / "cache")
    victim_step = 2
    window = int(batch_for_step(r.train_data, seed=r.cfg.training.seed, step=victim_step - 1,
                                batch_size=r.cfg.training.batch_size)["window"][1])
    _corrupt_cache(tmp_path / "cache" / "train", window, token=5, name=name, delta=1.0)
    r2, _, students = _capturing_run(
        monkeypatch, write_config(assets, tmp_path / "run"), *CACHED_FLAGS, "--distillation-params.temperature.start",
        "2.0", "--distillation.teacher-model.loading", "cached", "--distillation.teacher-model.cache-dir",
        str(tmp_path / "cache"))
    rows = read_metrics(tmp_path / "run")
    refs = _step_references(r2, students, vishwam.load_pretrained(assets / "teacher"), 2.0, rows)
    for row, ref in zip(rows, refs):
        if row["step"] == victim_step:
            with pytest.raises(AssertionError):
                _assert_kd_matches(row, ref, 2.0)
        else:
            _assert_kd_matches(row, ref, 2.0)
