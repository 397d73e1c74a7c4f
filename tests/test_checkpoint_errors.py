"""Bad checkpoints fail with one line that names the file or tensor (CONTRACT.md §5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from hf_fixtures import hf_config, make_hf_model, save_hf

import vishwam
from vishwam.errors import CheckpointError
from vishwam.io.safetensors_io import SafetensorsFile, write_file


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hf(make_hf_model(hf_config("qwen2")), tmp_path_factory.mktemp("good"), max_shard_size="30KB")


@pytest.fixture
def ckpt(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _shards(path):
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        vishwam.load_pretrained(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert f"config.json not found in checkpoint directory {ckpt}" in _error(ckpt)


def test_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    message = _error(ckpt)
    assert "'gpt2'" in message and str(ckpt / "config.json") in message


def test_index_names_absent_shard(ckpt):
    victim = _shards(ckpt)[1]
    victim.unlink()
    message = _error(ckpt)
    assert f"{ckpt / 'model.safetensors.index.json'} names shard {victim.name} which is not in {ckpt}" in message


def test_truncated_shard(ckpt):
    victim = _shards(ckpt)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    message = _error(ckpt)
    assert str(victim) in message and "truncated" in message


def test_corrupt_shard_header(ckpt):
    victim = _shards(ckpt)[-1]
    data = bytearray(victim.read_bytes())
    data[8:40] = b"\xff" * 32
    victim.write_bytes(bytes(data))
    message = _error(ckpt)
    assert str(victim) in message and "corrupt" in message


def test_not_a_safetensors_file(ckpt):
    victim = _shards(ckpt)[0]
    victim.write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors")
    assert str(victim) in _error(ckpt)


def _rewrite_without(shard, drop=None, reshape=None):
    with SafetensorsFile(shard) as f:
        tensors = {n: f.read(n) for n in f.keys() if n != drop}
    if reshape:
        name, arr = reshape
        tensors[name] = arr
    write_file(shard, tensors)


def test_missing_tensor(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = ckpt / index["weight_map"].pop(name)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _rewrite_without(shard, drop=name)
    assert name in _error(ckpt)


def test_wrong_shape(ckpt):
    import numpy as np

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_without(ckpt / index["weight_map"][name], reshape=(name, np.zeros((8, 32), np.float32)))
    message = _error(ckpt)
    assert name in message and "(8, 32)" in message and "(16, 32)" in message


def test_unexpected_tensor(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"]["model.norm.weight"]
    import numpy as np

    _rewrite_without(shard, reshape=("model.extra_adapter.weight", np.zeros((2,), np.float32)))
    index["weight_map"]["model.extra_adapter.weight"] = shard.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model.extra_adapter.weight" in _error(ckpt)


def test_pickle_only_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config("qwen2").to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "safetensors only" in _error(tmp_path)


def test_unreachable_hub_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in message and "hub" in message


def test_full_load_peak_memory_is_bounded(tmp_path):
    """A full load of a sharded checkpoint costs at most 1.3x its bytes in extra peak RSS."""
    import torch

    hf = make_hf_model(hf_config("qwen2", layers=4, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=8192))
    path = save_hf(hf, tmp_path / "big", max_shard_size="20MB")
    del hf, torch
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np, vishwam
        from vishwam.tracking import peak_rss_bytes
        import vishwam.io.checkpoint  # imports are not part of the load
        jax.numpy.zeros(1).block_until_ready()
        base = peak_rss_bytes()
        model = vishwam.load_pretrained({str(path)!r})
        jax.block_until_ready(model)
        peak = peak_rss_bytes()
        nbytes = vishwam.open_pretrained({str(path)!r}).nbytes()
        print((peak - base) / nbytes, nbytes)
    """)
    env = {**os.environ, "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    ratio, nbytes = out.stdout.split()
    assert int(nbytes) > 40e6
    print(f"extra peak RSS / checkpoint bytes = {float(ratio):.3f}")
    assert float(ratio) <= 1.3, out.stdout


def test_failed_open_never_closes_a_reused_descriptor(tmp_path):
    """A shard whose header fails to parse closes its descriptor once: collecting the failed object later must
    not close whichever file has reused that descriptor number since."""
    import gc

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    errors = []
    for _ in range(3):
        try:
            SafetensorsFile(bad)
        except CheckpointError as e:
            errors.append(e)  # its traceback keeps the half-built object alive
    other = tmp_path / "other.bin"
    other.write_bytes(b"payload")
    with open(other, "rb") as f:  # on the descriptor number the failed opens used
        errors.clear()
        gc.collect()
        assert f.read() == b"payload"
