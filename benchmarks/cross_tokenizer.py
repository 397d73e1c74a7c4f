"""Cross-tokenizer distillation, measured: the pysrc teacher (2,048-token byte-level BPE) into a student with its
own tokenizer (a byte-level BPE of another size with single-digit pre-tokenisation, trained here on the same
corpus), bits per UTF-8 byte on held-out standard-library modules.

Cells (equal steps and tokens, `--seeds` seeds each): `ce` (the student's own next-token loss only), `alm+ce`
(ALM chunk-likelihood matching, `distill.cross_tokenizer.alm_loss`, plus CE) and `alm+ce+shared` (plus the
shared-vocabulary KL at one-token-each-side chunks). The step is `vishwam.train.cross_step` driven directly (run.py
does not drive cross-tokenizer runs yet); sequence-level KD and the same-tokenizer reference are not cells yet.

Usage::

    python benchmarks/cross_tokenizer.py --steps 150 --seeds 3 --out docs/results/cross_tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import vishwam
from distill.cross_tokenizer import token_logprobs
from models import ModelConfig, init_model
from vishwam.data.alignment import shared_vocab, token_byte_lengths
from vishwam.data.cross_windows import build_cross_windows
from vishwam.train.cross_step import CrossStepConfig, make_cross_train_step
from vishwam.train.step import init_state, make_optimizer

TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "pysrc" / "teacher"
EVAL_EVERY = 20  # as scripts/make_pysrc_corpus.py: every 20th module by name is held out
CELLS = {"ce": dict(alm_weight=0.0, ce_weight=1.0, shared_kl_weight=0.0),
         "alm+ce": dict(alm_weight=1.0, ce_weight=1.0, shared_kl_weight=0.0),
         "alm+ce+shared": dict(alm_weight=1.0, ce_weight=1.0, shared_kl_weight=1.0)}


def corpus(max_bytes: int) -> tuple[list[str], list[str]]:
    """The standard library's top-level modules, sorted by name; every 20th held out; each split cut at
    `max_bytes` of text."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)
    train, held = [], []
    for i, path in enumerate(paths):
        (held if i % EVAL_EVERY == 0 else train).append(path.read_text(encoding="utf-8", errors="replace"))
    cut = lambda docs: [d for d, total in zip(docs, np.cumsum([len(d) for d in docs])) if total <= max_bytes]  # noqa: E731
    return cut(train) or train[:1], cut(held) or held[:1]


def student_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """The student's tokenizer: byte-level BPE, digits one at a time, trained on the training split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def bits_per_byte(model, windows, byte_lengths, batch: int, *, teacher: bool = False) -> float:
    """Bits per byte of every label of `windows` (the teacher's side when `teacher`)."""
    fn = jax.jit(lambda m, ids, mask, labels: -jnp.sum(token_logprobs(m(ids, attention_mask=mask).logits, labels,
                                                                      mask)))
    nll = n_bytes = 0.0
    for start in range(0, len(windows) - batch + 1, batch):
        b = windows.batch(np.arange(start, start + batch))
        side = "teacher_" if teacher else ""
        ids, labels, lmask = b[f"{side}input_ids"], b[f"{side}labels"], b[f"{side}mask"]
        nll += float(fn(model, jnp.asarray(ids), jnp.asarray(lmask), jnp.asarray(labels)))
        n_bytes += float(np.sum(byte_lengths[labels] * lmask))
    return nll / (math.log(2) * n_bytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--student-vocab", type=int, default=1024)
    ap.add_argument("--train-bytes", type=int, default=400_000)
    ap.add_argument("--eval-bytes", type=int, default=60_000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    train_docs, eval_docs = corpus(args.train_bytes)
    eval_docs = corpus(args.eval_bytes)[1]
    t_tok = Tokenizer.from_file(str(TEACHER_DIR / "tokenizer.json"))
    s_tok = student_tokenizer(train_docs, args.student_vocab)
    eos_s, eos_t = s_tok.token_to_id("<|endoftext|>"), t_tok.token_to_id("<|endoftext|>")
    t_len = int(args.seq_len * 1.5)
    train = build_cross_windows(train_docs, s_tok, t_tok, seq_len=args.seq_len, teacher_seq_len=t_len,
                                student_eos=eos_s, teacher_eos=eos_t, name="train")
    held = build_cross_windows(eval_docs, s_tok, t_tok, seq_len=args.seq_len, teacher_seq_len=t_len,
                               student_eos=eos_s, teacher_eos=eos_t, name="eval")
    teacher = vishwam.load_pretrained(str(TEACHER_DIR), dtype=jnp.float32)
    shared = tuple(jnp.asarray(x) for x in shared_vocab(s_tok, t_tok))
    s_bytes = token_byte_lengths(s_tok)
    t_bytes = token_byte_lengths(t_tok, 2048)
    cfg = ModelConfig(model_type="qwen2", vocab_size=s_tok.get_vocab_size(), hidden_size=96, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=32)
    report = {"train_windows": len(train), "eval_windows": len(held), "shared_vocab": int(len(shared[0])),
              "counted_chunk_fraction": float(train.chunk_mask.mean()),
              "teacher_bpb": bits_per_byte(teacher, held, t_bytes, args.batch, teacher=True), "cells": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "cells"}), flush=True)
    for name, weights in CELLS.items():
        results = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            optimizer, schedule = make_optimizer(learning_rate=args.lr, warmup_steps=10, total_steps=args.steps,
                                          weight_decay=0.01, grad_clip=1.0)
            state = init_state(init_model(cfg, key=jax.random.key(seed)), None, None, optimizer,
                               jax.random.key(seed), [])
            step = make_cross_train_step(CrossStepConfig(num_chunks=train.num_chunks, chunk_size=32, **weights),
                                         optimizer, schedule, shared=shared)
            rng = np.random.default_rng(seed)
            for _ in range(args.steps):
                rows = rng.choice(len(train), args.batch, replace=False)
                state, _ = step(teacher, state, {k: jnp.asarray(v) for k, v in train.batch(rows).items()}, None)
            bpb = bits_per_byte(state.student, held, s_bytes, args.batch)
            results.append(bpb)
            print(json.dumps({"cell": name, "seed": seed, "student_bpb": bpb,
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        report["cells"][name] = {"student_bpb": results, "mean": float(np.mean(results)),
                                 "spread": float(np.max(results) - np.min(results))}
    print("| cell | student bpb (mean over seeds) | spread |\n|---|---|---|")
    for name, cell in report["cells"].items():
        print(f"| {name} | {cell['mean']:.4f} | {cell['spread']:.4f} |")
    print(f"| teacher | {report['teacher_bpb']:.4f} | |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
