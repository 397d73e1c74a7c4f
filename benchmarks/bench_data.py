"""The token store at size: build throughput, the run's start-up against the corpus size, and read throughput.

    python -m benchmarks.bench_data [--out DIR] [--tokens 10e6] [--large 500e6]

1. A text corpus of real text (this Python's standard library modules, each copy marked, as `.jsonl`) of about
   `--tokens` tokens of the pysrc teacher's 2,048-token BPE (`benchmarks/assets/pysrc/teacher`).
2. Build throughput: `tokenizers` alone (`encode_batch` over the corpus's documents, held in memory, one process)
   against `python -m vishwam.data`'s builder with 1 and 2 worker processes on the same files (reading, JSON,
   tokenizing, checksums and writing included), tokens/s.
3. Start-up: `run.py` to its first step (`--training.max-steps 1`, no evaluation) on stores of about 1x, 10x and
   50x `--tokens` tokens: its wall seconds and peak RSS. The larger stores repeat the built store's shards (real
   tokens; a store named directly by `data.train`), so what grows is what a run's start touches.
4. Read throughput: random windows of 4,097 tokens read through `PackedDataset.batch` from the largest store,
   tokens/s on one host (cold pages: the store is larger than what was read before).

Prints a table and the raw figures as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "benchmarks/assets/pysrc/teacher"
TOKENS_PER_BYTE = 0.34  # the pysrc BPE on this corpus (measured below; the corpus size is set from it)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def corpus(path: Path, tokens: float) -> int:
    """Write stdlib modules, repeated and marked, to `path` until about `tokens` tokens; **returns** its bytes."""
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)
    texts = [m.read_text(encoding="utf-8", errors="replace") for m in modules]
    target = int(tokens / TOKENS_PER_BYTE)
    written, copy = 0, 0
    with open(path, "w") as f:
        while written < target:
            for text in texts:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target:
                    break
            copy += 1
    return path.stat().st_size


def tokenizers_alone(path: Path) -> tuple[int, float]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TEACHER / "tokenizer.json"))
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(docs), 1024):
        n += sum(len(e.ids) for e in tokenizer.encode_batch(docs[i:i + 1024], add_special_tokens=False))
    return n, time.perf_counter() - t0


def build(path: Path, store: Path, workers: int) -> tuple[int, float]:
    shutil.rmtree(store, ignore_errors=True)
    code = ("import sys, time\nfrom vishwam.config.sections import DataConfig\nfrom vishwam.data import splits\n"
            f"d = DataConfig(train=({str(path)!r},), store_dir={str(store)!r})\nt0 = time.perf_counter()\n"
            f"s = splits.store_for(d.train, d, 'train', tokenizer_path={str(TEACHER / 'tokenizer.json')!r}, eos_id=0,"
            f" vocab_size=None, log=lambda m: None, workers={workers})\n"
            "print(s.num_tokens, time.perf_counter() - t0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    n, seconds = out.stdout.split()
    return int(n), float(seconds)


def replicate(store: Path, copies: int, out: Path) -> int:
    """A store holding `copies` repetitions of `store`'s shards (hard links: real bytes, no disk doubled)."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "shards").mkdir(parents=True)
    manifest = json.loads((store / "manifest.json").read_text())
    shards = []
    for c in range(copies):
        for s in manifest["shards"]:
            name = f"{c:03d}{s['name']}"
            for f in (store / "shards").glob(f"{s['name']}.*"):
                os.link(f, out / "shards" / f"{name}.{f.name.split('.', 1)[1]}")
            shards.append({**s, "name": name})
    manifest.update(shards=shards, tokens=manifest["tokens"] * copies)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest["tokens"]


def start_up(store: Path, out: Path) -> dict:
    """`run.py` through its first step on `store` (and its export): wall seconds and the process's peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run.py", "--config", str(ROOT / "configs/distill.yaml"), "--distillation.teacher-model.path",
            str(TEACHER), "--data.train", str(store), "--data.eval", str(store), "--training.max-steps", "1",
            "--training.eval-batches", "0", "--training.output-dir", str(out), "--training.seq-len", "256",
            "--tracking.aim", "false"]
    code = ("import atexit, runpy, sys\nfrom vishwam.tracking import peak_rss_bytes\n"
            "atexit.register(lambda: print('PEAK_RSS', peak_rss_bytes(), file=sys.stderr, flush=True))\n"
            f"sys.argv = {argv!r}\nrunpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS")))
    return {"seconds": seconds, "peak_rss_mib": peak / 2**20}


def read_rate(store: Path, seconds: float = 10.0) -> float:
    from vishwam.data.store import TokenStore
    from vishwam.data.windows import PackedDataset

    s = TokenStore(store)
    data = PackedDataset.from_store(s, 0, s.num_tokens, 4096, name="bench")
    rng = np.random.default_rng(0)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        batch = data.batch(rng.integers(0, data.num_windows, 64))
        n += batch["input_ids"].size
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/vishwam_bench_data"))
    p.add_argument("--tokens", type=float, default=10e6, help="the corpus's size in tokens (about)")
    p.add_argument("--large", type=int, default=60, help="the largest store is this many times the corpus")
    p.add_argument("--copies", default=None, help="comma-separated store sizes, in copies of the corpus, whose start-up "
                   "is measured (default: 1, 10 and --large)")
    p.add_argument("--starts-only", action="store_true",
                   help="reuse the store built in --out by an earlier run: only the start-up and read measurements")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    text = args.out / "corpus.jsonl"
    if not args.starts_only:
        size = corpus(text, args.tokens)
        log(f"corpus {text}: {size / 2**20:.1f} MiB")
        n, t = tokenizers_alone(text)
        record(what="tokenizers alone, 1 process", tokens=n, seconds=t, tokens_per_s=n / t)
        alone = n / t
        for workers in (1, 2):
            n, t = build(text, args.out / f"store{workers}", workers)
            record(what=f"store build, {workers} worker{'s' * (workers > 1)}", tokens=n, seconds=t,
                   tokens_per_s=n / t, vs_tokenizers=n / t / alone)
    store = args.out / "store1" / "train"
    sizes = [int(c) for c in args.copies.split(",")] if args.copies else [1, 10, args.large]
    stores = {1: store} if 1 in sizes else {}
    for copies in [c for c in sizes if c > 1]:
        tokens = replicate(store, copies, args.out / f"store_x{copies}")
        stores[copies] = args.out / f"store_x{copies}"
        log(f"store x{copies}: {tokens:,} tokens")
    for copies, path in stores.items():
        r = start_up(path, args.out / f"run_x{copies}")
        tokens = json.loads((path / "manifest.json").read_text())["tokens"]
        record(what=f"run.py start to step 1, store of {tokens / 1e6:.0f}M tokens", tokens=tokens, **r)
    rate = read_rate(stores[max(stores)])
    record(what="random 4,097-token windows read from the largest store, one host", tokens_per_s=rate)
    print("\n| measurement | tokens | seconds | tokens/s | peak RSS MiB |\n|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r['tokens']:,}" if "tokens" in r else "", f"{r['seconds']:.1f}" if "seconds" in r else "",
                 f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "",
                 f"{r['peak_rss_mib']:,.0f}" if "peak_rss_mib" in r else ""]
        print(f"| {r['what']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
