"""The teacher cache built by two `jax.distributed` processes: every process runs the (sharded) teacher, process 0
alone writes each file, once per write, through a unique temporary name renamed into place, and the cache equals
the one a single process builds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CPU_COLLECTIVE_TIMEOUTS
from hf_fixtures import hf_config, make_hf_model, save_hf

from vishwam.cache import main as cache_main
from vishwam.io.safetensors_io import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]

# Runs `python -m vishwam.cache` with every module's `atomic_write` (the project's one way to write a file)
# wrapped: each call appends "<jax.process_index()> <path>" to this process's log, then writes.
LAUNCHER = textwrap.dedent("""
    import os, sys
    import jax
    import vishwam.cache, vishwam.io.files
    from vishwam.config.cli import run_main

    log, argv = sys.argv[1], sys.argv[2:]
    original = vishwam.io.files.atomic_write

    def logged(path, content):
        with open(log, "a") as f:
            f.write(f"{jax.process_index()} {os.fspath(path)}\\n")
        return original(path, content)

    patched = [name for name, m in list(sys.modules.items())
               if name.startswith("vishwam") and getattr(m, "atomic_write", None) is original]
    assert {"vishwam.io.files", "vishwam.teacher.cache", "vishwam.io.safetensors_io"} <= set(patched), patched
    for name in patched:
        sys.modules[name].atomic_write = logged
    sys.exit(run_main(vishwam.cache.main, argv))
""")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_multihost")
    save_hf(make_hf_model(hf_config("qwen2", layers=2, kv_heads=2)), d / "teacher")
    rng = np.random.default_rng(0)
    # 270 training windows of 17 tokens: two shards of the cache (256 windows each); 20 eval windows: one.
    np.save(d / "train.npy", rng.integers(2, 96, 270 * 17).astype(np.int32))
    np.save(d / "eval.npy", rng.integers(2, 96, 20 * 17).astype(np.int32))
    text = {
        "distillation": {"teacher_model": {"path": str(d / "teacher"), "dtype": "float32", "loading": "cached",
                                           "cache_dir": str(d / "cache"), "top_k": 8},
                         "student_model": {"init": "random", "num_hidden_layers": 1, "hidden_size": 32}},
        "distillation_params": {"attention_weight": 0.0, "feature_weight": 0.5},  # hidden states cached too
        "data": {"train": str(d / "train.npy"), "eval": str(d / "eval.npy")},
        "training": {"output_dir": str(d / "out"), "batch_size": 4, "seq_len": 16, "compute_dtype": "float32"},
        "parallelism": {"data": 1, "fsdp": 2, "tensor": 2},
        "tracking": {"aim": False},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(text))
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: np.array(f.read(k)) for k in f.keys()}


def test_two_process_cache_is_written_by_process_0_alone_and_equals_one_process(config, tmp_path):
    d = config
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 " + CPU_COLLECTIVE_TIMEOUTS,
           "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    logs = [tmp_path / f"writes.{i}.log" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, str(tmp_path / "launcher.py"), str(logs[i]), "--config", str(d / "c.yaml"),
         "--distributed.coordinator-address", f"127.0.0.1:{port}", "--distributed.num-processes", "2",
         "--distributed.process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    # Process 1 wrote nothing; process 0's writes all say process 0.
    assert not logs[1].exists() or logs[1].read_text() == ""
    writes = [line.split(" ", 1) for line in logs[0].read_text().splitlines()]
    assert writes and {who for who, _ in writes} == {"0"}
    cache = d / "cache"
    # The cache's writes (the data's token store, prepared on first use, is written through atomic_write too).
    paths = [Path(p) for _, p in writes if cache in Path(p).parents]
    shard_counts = {}
    for split, num_shards in (("train", 2), ("eval", 1)):
        index = json.loads((cache / split / "index.json").read_text())
        files = sorted(f.name for f in (cache / split).iterdir())
        shards = [s["file"] for s in index["shards"]]
        assert len(shards) == num_shards and files == sorted(shards + ["index.json"])  # no .tmp left, nothing else
        for name in shards:  # each shard written once, by process 0
            assert paths.count(cache / split / name) == 1, name
        # The index: a fresh one (no shards), one per finished shard, and the last with bytes_per_token.
        assert paths.count(cache / split / "index.json") == num_shards + 2
        shard_counts[split] = num_shards
    assert len(paths) == sum(2 * n + 2 for n in shard_counts.values())  # nothing else was written

    # One process over 4 devices, the same mesh: the same fingerprint and, bit for bit, the same rows. Each device
    # runs the same partitioned program on the same shard; the weights are split 2 ways over `fsdp` (across the
    # two processes) and 2 ways over `tensor`, so every all-reduce adds 2 partial sums, and IEEE addition is
    # commutative: the transport (gloo between processes, in-process here) cannot change a bit. (On a 4-way
    # `fsdp` split the sums' order differs, and so do the last bits.) The hidden states are sharded over `fsdp`,
    # hence across processes: process 0 had to gather them.
    single = tmp_path / "single"
    assert cache_main(["--config", str(d / "c.yaml"), "--distillation.teacher-model.cache-dir", str(single)]) == 0
    for split in ("train", "eval"):
        a = json.loads((cache / split / "index.json").read_text())
        b = json.loads((single / split / "index.json").read_text())
        assert a["fingerprint"] == b["fingerprint"] and a["hidden_layers"] == b["hidden_layers"]
        assert len(a["hidden_layers"]) == 1
        for sa, sb in zip(a["shards"], b["shards"]):
            ta, tb = _tensors(cache / split / sa["file"]), _tensors(single / split / sb["file"])
            assert set(ta) == set(tb) == {"topk_values", "topk_indices", "tail_logsumexp", "label_logprob",
                                          f"hidden_{a['hidden_layers'][0]}"}
            for name in ta:
                np.testing.assert_array_equal(ta[name], tb[name], err_msg=f"{split} {sa['file']} {name}")
