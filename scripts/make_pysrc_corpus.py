"""Write the real-text corpus the quality benchmark's teacher is pretrained on: the Python standard library's
top-level modules (source with its docstrings and comments), read from the Python running this script.

Nothing is downloaded and nothing is committed: every CPython 3.11 install carries these files. Each module is
one document; the modules are sorted by name and every 20th goes to the eval split, so train and eval never
share a file. The script prints the corpus's SHA-256 (the teacher records the one it was trained on, and
`benchmarks/quality.py` warns when a regenerated corpus differs, e.g. under another Python version).

Usage::

    python scripts/make_pysrc_corpus.py     # writes benchmarks/assets/pysrc/{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "assets" / "pysrc"
EVAL_EVERY = 20


def modules() -> list[Path]:
    """The top-level `.py` modules of this Python's standard library, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)


def write(out: Path) -> str:
    """Writes `train.jsonl` and `eval.jsonl` (a `text` field per module) under `out`; returns the SHA-256 of
    both files' bytes, in that order."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "eval": []}
    for i, path in enumerate(modules()):
        text = path.read_text(encoding="utf-8", errors="replace")
        splits["eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"].append(text)
    digest = hashlib.sha256()
    for name in ("train", "eval"):
        data = "".join(json.dumps({"text": t}) + "\n" for t in splits[name]).encode("utf-8")
        (out / f"{name}.jsonl").write_bytes(data)
        digest.update(data)
        print(f"{out / (name + '.jsonl')}: {len(splits[name])} modules, {len(data) / 1e6:.2f} MB")
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}; stdlib {sysconfig.get_paths()['stdlib']}")
    print(f"corpus sha256 {write(args.out_dir)}")


if __name__ == "__main__":
    main()
