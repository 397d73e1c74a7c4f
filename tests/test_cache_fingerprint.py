"""The teacher cache's fingerprint: a cache built for another teacher, tokenizer, data, seq_len, top_k, dtype,
set of hidden layers or format is never reused. A training run stops with one line naming the cache and what
changed; `python -m vishwam.cache` rebuilds it from scratch; a cache of the same fingerprint is reused as it is."""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hf_fixtures import hf_config, make_hf_model, save_hf

import vishwam
import vishwam.teacher.cache as T
import vishwam.teacher.sources as teachers
from distill.logits import teacher_topk
from vishwam.cache import main as cache_main
from vishwam.config.cli import load_config, run_main
from vishwam.data.windows import PackedDataset
from vishwam.run.build import prepare
from vishwam.run.loop import train
from vishwam.teacher.cache import TeacherCache, build_cache

SEQ, TOP_K = 16, 8


def _config(d, cache):
    text = {
        "distillation": {"teacher_model": {"path": str(d / "teacher"), "dtype": "float32", "loading": "cached",
                                           "cache_dir": str(cache), "top_k": TOP_K},
                         "student_model": {"init": "random", "num_hidden_layers": 1, "hidden_size": 32}},
        "distillation_params": {"attention_weight": 0.0, "feature_weight": 0.0},
        "data": {"train": str(d / "train.npy"), "eval": str(d / "eval.npy")},
        "training": {"output_dir": str(d / "out"), "max_steps": 1, "batch_size": 4, "seq_len": SEQ,
                     "eval_every": 100, "compute_dtype": "float32"},
        "tracking": {"aim": False},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(text))
    return str(d / "c.yaml")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Assets (a teacher, train and eval tokens) and the cache `python -m vishwam.cache` built from them."""
    d = tmp_path_factory.mktemp("fingerprint")
    save_hf(make_hf_model(hf_config("qwen2", layers=2, kv_heads=2)), d / "teacher")
    rng = np.random.default_rng(0)
    np.save(d / "train.npy", rng.integers(2, 96, 60 * (SEQ + 1)).astype(np.int32))
    np.save(d / "eval.npy", rng.integers(2, 96, 12 * (SEQ + 1)).astype(np.int32))
    assert cache_main(["--config", _config(d, d / "cache")]) == 0
    return d


@pytest.fixture
def copy(base, tmp_path):
    """A private copy of the assets and of their cache, its config pointing at both."""
    for name in ("teacher", "cache"):
        shutil.copytree(base / name, tmp_path / name)
    for name in ("train.npy", "eval.npy"):
        shutil.copy2(base / name, tmp_path / name)
    return tmp_path, _config(tmp_path, tmp_path / "cache")


def _shards(d):
    return sorted(p.name for p in (d / "teacher").glob("*.safetensors"))


def _new_weights(d):
    save_hf(make_hf_model(hf_config("qwen2", layers=2, kv_heads=2), seed=1), d / "teacher")  # same shapes, files


def _new_header(d):
    path = d / "teacher" / _shards(d)[1]
    raw = path.read_bytes()
    assert raw.count(b'"format":"pt"') == 1
    path.write_bytes(raw.replace(b'"format":"pt"', b'"format":"np"'))  # same size, same data: only the header


def _new_config(d):
    cfg = json.loads((d / "teacher" / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (d / "teacher" / "config.json").write_text(json.dumps(cfg))


def _new_tokenizer(d):
    (d / "teacher" / "tokenizer.json").write_text('{"version": "1.0"}')


def _new_data(d):
    np.save(d / "train.npy", np.random.default_rng(1).integers(2, 96, 60 * (SEQ + 1)).astype(np.int32))


def _no_fingerprint(d):
    path = d / "cache" / "train" / "index.json"
    index = json.loads(path.read_text())
    del index["fingerprint"]
    path.write_text(json.dumps(index))


CHANGES = {  # change -> (what it does to the copy, flags, what the one line says the cache was built for)
    "weights": (_new_weights, [], lambda d: rf"another teacher \({re.escape(_shards(d)[0])} data changed\)"),
    "header": (_new_header, [], lambda d: rf"another teacher \({re.escape(_shards(d)[1])} header changed\)"),
    "config": (_new_config, [], lambda d: r"another teacher \(config\.json changed\)"),
    "tokenizer": (_new_tokenizer, [], lambda d: r"another tokenizer \(tokenizer\.json added\)"),
    "data": (_new_data, [],
             lambda d: r"other data \(the windows' tokens changed: sha256 [0-9a-f]{12} -> [0-9a-f]{12}\)"),
    "seq_len": (None, ["--training.seq-len", "8"], lambda d: r"seq_len=16 \(the run has 8\)"),
    "top_k": (None, ["--distillation.teacher-model.top-k", "4"], lambda d: r"^top_k=8 \(the run has 4\)$"),
    "dtype": (None, ["--distillation.teacher-model.dtype", "bfloat16"],
              lambda d: r'^teacher_dtype="float32" \(the run has "bfloat16"\)$'),
    "hidden_layers": (None, ["--distillation-params.feature-weight", "0.5"],
                      lambda d: r"^hidden_layers=\[\] \(the run has \[\d\]\)$"),
    "no_fingerprint": (_no_fingerprint, [], lambda d: r"^an unknown run \(its index\.json holds no fingerprint"),
    "version": ("version", [], lambda d: r"^version=1 \(the run has 2\)$"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_training_run_never_reuses_a_cache_built_for_something_else(copy, change, capsys, monkeypatch):
    d, config = copy
    edit, flags, said = CHANGES[change]
    if edit == "version":
        monkeypatch.setattr(teachers, "CACHE_VERSION", T.CACHE_VERSION + 1)
    elif edit is not None:
        edit(d)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (d / "cache").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda argv: train(load_config(config, argv)), flags)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:") or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # the run's log lines (its plan), then one line
    head = f"error: teacher cache {d / 'cache' / 'train'} was built for "
    tail = ("; it is never reused for another run: rebuild it with python -m vishwam.cache and this run's --config "
            "and flags")
    assert errors[0].startswith(head) and errors[0].endswith(tail), errors[0]
    assert re.search(said(d), errors[0][len(head):-len(tail)]), errors[0]
    assert {p: p.read_bytes() for p in (d / "cache").rglob("*") if p.is_file()} == before  # nothing touched
    assert not (d / "out" / "metrics.jsonl").exists()


def _no_build(*args, **kwargs):
    raise AssertionError("the cache was rebuilt")


def _open(config):
    r = prepare(load_config(config))
    return r, teachers.open_teacher(r.cfg, r.lazy_teacher, r.splits, r.objective, vocab_size=r.vocab_size,
                                    mesh=r.mesh, log=lambda msg: None)


def test_the_same_fingerprint_is_reused_as_it_is(copy, monkeypatch):
    d, config = copy
    # A copied (moved) teacher, data set and cache, data files touched: the same teacher, tokens and settings.
    (d / "train.npy").touch()
    monkeypatch.setattr(teachers, "build_cache", _no_build)
    _, source = _open(config)
    assert source.kind == "cached" and set(source.caches) == {"train", "eval"}
    source.close()


def test_the_cache_command_rebuilds_a_stale_cache_from_scratch(copy, monkeypatch):
    d, config = copy
    _new_data(d)
    eval_shard = d / "cache" / "eval" / "cache-00000.safetensors"
    eval_mtime = eval_shard.stat().st_mtime_ns
    assert cache_main(["--config", config]) == 0
    r = prepare(load_config(config))
    fingerprints = teachers.cache_fingerprints(r.cfg, r.lazy_teacher, r.splits, r.objective, vocab_size=r.vocab_size)
    for split in ("train", "eval"):
        assert json.loads((d / "cache" / split / "index.json").read_text())["fingerprint"] == fingerprints[split]
    assert eval_shard.stat().st_mtime_ns == eval_mtime  # the eval split's cache was still good: kept
    # The train rows are the teacher's on the new data (the live teacher, eagerly).
    teacher = vishwam.load_pretrained(d / "teacher")
    windows = np.array([0, 31, 59])
    batch = r.train_data.batch(windows)
    values, indices, tail = teacher_topk(teacher(jnp.asarray(batch["input_ids"])).logits, TOP_K)
    cache = TeacherCache(d / "cache" / "train", seq_len=SEQ, top_k=TOP_K, fingerprint=fingerprints["train"])
    rows = cache.rows(windows)
    np.testing.assert_array_equal(rows["topk_indices"], np.asarray(indices))
    np.testing.assert_allclose(rows["topk_values"], np.asarray(values), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows["tail_logsumexp"], np.asarray(tail), rtol=1e-6, atol=1e-6)
    # A training run now reuses it without building anything.
    monkeypatch.setattr(teachers, "build_cache", _no_build)
    _open(config)[1].close()


def test_a_build_for_another_fingerprint_resumes_nothing_and_deletes_the_old_shards(base, tmp_path, monkeypatch):
    teacher = vishwam.load_pretrained(base / "teacher")
    rng = np.random.default_rng(3)
    a = PackedDataset(rng.integers(2, 96, 40 * 9).astype(np.int32), 8)
    b = PackedDataset(rng.integers(2, 96, 20 * 9).astype(np.int32), 8)
    calls = {"n": 0}
    original = T.cache_rows

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    def listing():
        return sorted(p.name for p in (tmp_path / "c").iterdir())

    monkeypatch.setattr(T, "cache_rows", counted)
    kw = dict(top_k=4, vocab_size=96, windows_per_shard=16, batch_size=4)
    shards = [f"cache-0000{i}.safetensors" for i in range(3)]
    for fingerprint, batches in (({"x": 1}, 10), ({"x": 1}, 0), ({"x": 2}, 10)):
        calls["n"] = 0
        index = build_cache(teacher, a, tmp_path / "c", fingerprint=fingerprint, **kw)
        # The same fingerprint keeps all 3 shards; another one (same data, same settings) recomputes them all.
        assert calls["n"] == batches and listing() == shards + ["index.json"]
        assert index["fingerprint"] == fingerprint
    calls["n"] = 0
    index = build_cache(teacher, b, tmp_path / "c", fingerprint={"x": 3}, **kw)
    assert calls["n"] == 5 and listing() == shards[:2] + ["index.json"]  # a's third shard is gone
    assert index["fingerprint"] == {"x": 3} and len(index["shards"]) == 2
    fresh = build_cache(teacher, b, tmp_path / "fresh", fingerprint={"x": 3}, **kw)
    assert [s["sha256"] for s in index["shards"]] == [s["sha256"] for s in fresh["shards"]]
