"""Two `jax.distributed` processes prepare one token store together (each tokenizes its share of the units, process 0
writes the manifest) and each reads only the rows of its own devices; their global batches equal one process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import CPU_COLLECTIVE_TIMEOUTS

from vishwam.config.sections import DataConfig
from vishwam.data import splits
from vishwam.data.windows import batch_for_step
from vishwam.train.step import interleave_micro_batches

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "vishwam/assets/demo/teacher/tokenizer.json")
SEQ, ROWS, ACCUM, STEPS = 31, 8, 2, 3

WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from vishwam.config.sections import DataConfig
    from vishwam.data import prepare, splits
    from vishwam.data.windows import StepReader
    from vishwam.sharding import batch_sharding, global_batch, make_mesh

    port, pid, files, store, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    prepare.UNIT_BYTES = 20_000  # several units, split between the processes
    built = []
    real = prepare.build_unit
    prepare.build_unit = lambda job: built.append(job[0]) or real(job)
    d = DataConfig(train=tuple(files), store_dir=store)
    train, _ = splits.load_splits(d, seq_len=SEQ, tokenizer_path=TOKENIZER, eos_id=0, vocab_size=None, log=print,
                                  workers=1, process_index=pid, process_count=2,
                                  barrier=multihost_utils.sync_global_devices)
    mesh = make_mesh(1, 4, 1)
    reader = StepReader(train, batch_sharding(mesh), seed=3, rows=ROWS, accum=ACCUM)
    result = {"built": built, "local": reader.local, "read": [], "batches": []}
    for step in range(STEPS):
        batch = reader.get(step)
        arrays = global_batch({k: batch[k] for k in batch if k != "window"}, batch_sharding(mesh))
        result["read"].append(batch.rows_read)
        full = {k: multihost_utils.process_allgather(v, tiled=True).tolist() for k, v in arrays.items()}
        result["batches"].append(full)
        if step + 1 < STEPS:
            reader.ahead(step + 1)
    reader.close()
    open(out, "w").write(json.dumps(result))
""").replace("SEQ", str(SEQ)).replace("ROWS", str(ROWS)).replace("ACCUM", str(ACCUM)).replace(
    "STEPS", str(STEPS)).replace("TOKENIZER", repr(TOKENIZER))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_prepare_one_store_and_read_only_their_rows(tmp_path):
    lines = (ROOT / "vishwam/assets/demo/train.jsonl").read_text().splitlines()
    files = []
    for i in range(2):
        f = tmp_path / f"part{i}.jsonl"
        f.write_text("\n".join(lines[i * 300:(i + 1) * 300]) + "\n")
        files.append(str(f))
    (tmp_path / "worker.py").write_text(WORKER)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 " + CPU_COLLECTIVE_TIMEOUTS,
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i), json.dumps(files),
                               str(tmp_path / "store"), str(outs[i])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(o.read_text()) for o in outs]

    # The units were split: each process tokenized its own share, together all of them once.
    built = [sorted(r["built"]) for r in results]
    assert built[0] and built[1] and not set(built[0]) & set(built[1])
    manifest = json.loads((tmp_path / "store/train/manifest.json").read_text())
    assert sorted(built[0] + built[1]) == list(range(len(manifest["shards"])))

    # One process's view of the same data: the same global batches, each process having read half the rows.
    d = DataConfig(train=tuple(files), store_dir=str(tmp_path / "store"))
    train, _ = splits.load_splits(d, seq_len=SEQ, tokenizer_path=TOKENIZER, eos_id=0, vocab_size=None,
                                  log=lambda m: None, workers=1)
    for step in range(STEPS):
        expected = batch_for_step(train, seed=3, step=step, batch_size=ROWS)
        expected = interleave_micro_batches(expected, ACCUM)
        for r in results:
            for key, value in r["batches"][step].items():
                np.testing.assert_array_equal(np.asarray(value), expected[key], err_msg=f"step {step} {key}")
    for r in results:
        assert r["read"] == [ROWS // 2] * STEPS, r["read"]  # 2 of 4 devices' rows: half the batch, once
        assert sum(b - a for a, b in r["local"]) == ROWS // 2
    assert results[0]["local"] != results[1]["local"]
