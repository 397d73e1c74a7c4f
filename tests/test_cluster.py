"""Multi-host set-up without a coordinator address: a SLURM job is joined through JAX's cluster detection, and
`num_processes > 1` with no cluster to detect is a one-line error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CPU_COLLECTIVE_TIMEOUTS
from hf_fixtures import hf_config, make_hf_model, save_hf

ROOT = Path(__file__).resolve().parents[1]
SLURM_PORTS = (65535 - 2**12 + 1, 65535)  # JAX's SLURM coordinator port: SLURM_JOB_ID % 4096 + 61440


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    save_hf(make_hf_model(hf_config("qwen2", layers=2, kv_heads=2)), d / "teacher")
    np.save(d / "train.npy", np.tile(np.arange(2, 40, dtype=np.int32), 100))
    text = {
        "distillation": {"teacher_model": {"path": str(d / "teacher"), "dtype": "float32"},
                         "student_model": {"init": "random", "num_hidden_layers": 1, "hidden_size": 32}},
        "data": {"train": str(d / "train.npy")},
        "training": {"output_dir": str(d / "out"), "max_steps": 2, "batch_size": 4, "seq_len": 16, "log_every": 1,
                     "save_every": 2, "compute_dtype": "float32"},
        "parallelism": {"data": 2, "fsdp": 2},
        "tracking": {"aim": False},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(text))
    return d / "c.yaml", d / "out"


def _free_slurm_port() -> int:
    for port in range(SLURM_PORTS[0] + os.getpid() % 1000, SLURM_PORTS[1]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port in JAX's SLURM range")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def test_a_slurm_job_is_joined_without_a_coordinator_address(config):
    path, out = config
    port = _free_slurm_port()
    slurm = dict(SLURM_JOB_ID=str(port - SLURM_PORTS[0]), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                 XLA_FLAGS="--xla_force_host_platform_device_count=2 " + CPU_COLLECTIVE_TIMEOUTS)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--config", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(**slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # Process 1 wrote nothing itself: one line per step, from process 0 alone.
    assert "memory plan" in outs[0][1] and "memory plan" not in outs[1][1]


def test_several_processes_without_a_cluster_or_coordinator_is_one_line(config):
    path, _ = config
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(path),
                           "--distributed.num-processes", "2"], capture_output=True, text=True,
                          env=_env(XLA_FLAGS=""), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: config key 'distributed.coordinator_address' is unset and JAX detects no cluster for 2 processes"), lines
