"""The cross-tokenizer token store at two corpus sizes ten times apart: build time against a same-tokenizer store
of the same text, and the start of a run's data path (open the store, cut windows) against the corpus size.

    python -m benchmarks.bench_cross_data [--out DIR] [--tokens 1e6] [--factor 10] [--chat]

1. Corpora of real text (this Python's standard library, as `benchmarks.bench_data` writes it) of about `--tokens`
   and `--factor` times as many teacher tokens.
2. The student's tokenizer: a 1,024-id byte-level BPE with single-digit pre-tokenisation, trained here on the
   standard library (another vocabulary and pre-tokenizer than the pysrc teacher's 2,048-id BPE).
3. For each corpus, one worker each (`vishwam.data.prepare.build_store`, in a fresh process): the teacher-only
   text store and the cross store (both sides tokenized with byte offsets, aligned, written): seconds, tokens/s,
   their ratio, and the building process's peak RSS.
4. For each cross store, in a fresh process: opening it as a run does (`load_splits`) and cutting 256 random
   windows of 1,024 student tokens (teacher side 1,280): seconds to open, windows/s, and then the process's
   anonymous memory (`RssAnon`) apart from the store's file pages its memory map has touched (`RssFile`: the
   kernel's page cache, reclaimable; it grows with the distinct pages read, up to the store's size).

With `--chat`: chat rows (the demo chat corpus, `vishwam/assets/demo/chat_train.jsonl`, repeated to about
`--tokens` and `--factor` times as many teacher tokens), the demo chat teacher (its 512-id tokenizer and template)
and a student with the pysrc 2,048-id tokenizer and a ChatML-like template of its own (`vishwam.data.cross.chat`:
each side's rendering, aligned on the messages' contents); the baseline is the one-tokenizer chat store (the
teacher's side alone, rows packed with segment ids).

Prints the raw figures as JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from benchmarks.bench_data import corpus

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "benchmarks/assets/pysrc/teacher/tokenizer.json"

CHILD = r"""
import json, resource, sys, time
import numpy as np
from vishwam.config.sections import DataConfig
from vishwam.data.splits import CrossSides, load_splits
what, files, store, student, spec = sys.argv[1], sys.argv[2:-3], sys.argv[-3], sys.argv[-2], json.loads(sys.argv[-1])
cross = CrossSides(student, spec["s_eos"], spec["s_vocab"], 1280) if what != "text" else None
d = DataConfig(train=tuple(files), store_dir=store)
t0 = time.perf_counter()
train, _ = load_splits(d, seq_len=1024, tokenizer_path=spec["teacher"], eos_id=spec["t_eos"],
                       vocab_size=spec["t_vocab"], log=lambda m: None, workers=1, cross=cross)
opened = time.perf_counter() - t0
row = {"what": what, "seconds": opened}
if what == "read":
    rng = np.random.default_rng(0)
    t1 = time.perf_counter()
    for _ in range(16):
        train.batch(rng.integers(0, len(train), 16))
    row.update(windows_per_s=256 / (time.perf_counter() - t1), windows=len(train),
               student_tokens=train.streams.n_student, teacher_tokens=train.streams.n_teacher)
else:
    from vishwam.data.store import TokenStore
    row.update(tokens=int(TokenStore(store + "/train").starts[-1]))
row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
for key in ("RssAnon", "RssFile"):  # the process's own memory, and the store's pages the memory map has touched
    row[key.lower() + "_mib"] = int(status.get(key, "0 kB").split()[0]) / 1024
print(json.dumps(row))
"""
TEXT_SPEC = {"teacher": str(TEACHER), "t_vocab": 2048, "t_eos": 0, "s_vocab": 1024, "s_eos": 0}
CHAT_TEACHER = ROOT / "vishwam/assets/demo/chat_teacher"
CHAT_SPEC = {"teacher": str(CHAT_TEACHER), "t_vocab": 512, "t_eos": 0, "s_vocab": 2048, "s_eos": 0}
STUDENT_TEMPLATE = ("{% for m in messages %}<|pad|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|pad|>assistant\n{% endif %}")


def chat_student(path: Path) -> str:
    """The pysrc tokenizer with a ChatML-like template of its own, in `path`."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TEACHER.parent / name, path / name)
    (path / "chat_template.jinja").write_text(STUDENT_TEMPLATE)
    return str(path)


def chat_corpus(path: Path, tokens: float) -> None:
    """The demo chat rows repeated to about `tokens` teacher tokens (the demo file: about 232k)."""
    rows = (ROOT / "vishwam/assets/demo/chat_train.jsonl").read_text().splitlines()
    copies = max(1, round(tokens / 232_000))
    path.write_text("\n".join(rows * copies) + "\n")


def student_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)
    texts = [m.read_text(encoding="utf-8", errors="replace") for m in modules]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return str(path / "tokenizer.json")


def child(what: str, files: list[str], store: Path, student: str, spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, what, *files, str(store), student, json.dumps(spec)],
                         capture_output=True,
                         text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/vishwam_bench_cross_data"))
    p.add_argument("--tokens", type=float, default=1e6)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--chat", action="store_true", help="chat rows, each side's template (see the docstring)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    student = chat_student(args.out / "chat_student") if args.chat else student_tokenizer(args.out / "student")
    spec = CHAT_SPEC if args.chat else TEXT_SPEC
    rows = []
    for size in (args.tokens, args.tokens * args.factor):
        name = ("chat-" if args.chat else "") + f"{size:.0e}".replace("+", "")
        path = args.out / f"corpus-{name}.jsonl"
        if not path.exists():
            (chat_corpus if args.chat else corpus)(path, size)
        mib = path.stat().st_size / 2**20
        for what in ("text", "cross"):
            row = child(what, [str(path)], args.out / f"{what}-{name}", student, spec)
            rows.append({"corpus_mib": mib, **row})
            print(json.dumps(rows[-1]), flush=True)
        row = child("read", [str(path)], args.out / f"cross-{name}", student, spec)
        rows.append({"corpus_mib": mib, **row})
        print(json.dumps(rows[-1]), flush=True)
    print("| corpus MiB | text store build s | cross store build s | cross / text | build peak RSS MiB (text, cross) "
          "| open s | windows/s | after reading: anonymous RSS MiB | after reading: mapped store pages MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 3):
        text, cross, read = rows[i:i + 3]
        print(f"| {text['corpus_mib']:.1f} | {text['seconds']:.1f} | {cross['seconds']:.1f} | "
              f"{cross['seconds'] / text['seconds']:.2f} | {text['peak_rss_mib']:.0f}, {cross['peak_rss_mib']:.0f} | "
              f"{read['seconds']:.3f} | {read['windows_per_s']:.0f} | {read['rssanon_mib']:.0f} | "
              f"{read['rssfile_mib']:.0f} |")


if __name__ == "__main__":
    main()
