"""Cross-tokenizer distillation, measured: the pysrc teacher (2,048-token byte-level BPE) into a student with its
own tokenizer (a byte-level BPE of another size with single-digit pre-tokenisation, trained here on the same
corpus), bits per UTF-8 byte on held-out standard-library modules.

Cells (`--cells`, comma-separated; each trained for `--steps` steps of `--batch` rows of `--seq-len` student
tokens, on `--seeds` seeds):

- `ce`: the student's own next-token loss on the corpus only.
- `seq-kd`: sequence-level KD. Prompts are the first `--seqkd-prompt` teacher tokens of training windows (drawn
  by the seed); the teacher continues each by `--seqkd-new` tokens sampled at T = 1 (no top-k/top-p) with
  `vishwam.generation.sampler.generate`; prompt + completion is decoded to text, re-tokenized by the student's
  tokenizer and packed into windows like the corpus. Each step's rows are `--seqkd-fraction` teacher windows
  (each used once) and the rest corpus windows, trained by CE alone. `seq-kd:F` sets the fraction.
- `alm+ce`: ALM chunk-likelihood matching (`distill.cross_tokenizer.alm_loss`) at `--alm-temperature`, plus CE.
- `alm+ce+shared`: plus the shared-vocabulary KL at one-token-each-side chunks, weight `--shared-kl-weight`.
- `alm:T:W`: ALM + CE at temperature T with shared-vocabulary KL weight W (the sweep's cells); `kl:W`: CE and
  the shared-vocabulary KL at weight W, no ALM.
- `same-tok-kd`: the reference. The same-size student with the TEACHER's tokenizer (its embedding and head sized
  for 2,048 ids), on the corpus tokenized by the teacher's tokenizer, trained by forward-KL KD (T = 1) + CE
  against the teacher through `vishwam.train.step.make_train_step`. Equal steps and rows of `--seq-len` tokens
  counted on the student's side: its windows are `--seq-len` teacher-tokenizer tokens, so its steps see the bytes
  those tokens hold (printed as `bytes_per_window` for each data source). `same-tok-ce`: that student by CE
  alone (what the teacher's tokenizer gives without the teacher).

Bits per byte (`bpb`) are over the same held-out bytes for every model whatever its tokenizer: the held-out
windows' counted chunks (a chunk is a span both tokenizations have a boundary at each end of, wholly inside the
window on both sides, not the window's first), each model scoring the chunks from its own side's tokens of the
window; the bytes of the counted chunks are checked equal on the two sides. `bpb_own_labels` is every label of
the model's own side of the window (the metric of the earlier version of this script, student side).

The cross-tokenizer step is `vishwam.train.cross_step` driven directly (run.py does not drive cross-tokenizer runs
yet), called in one place (`cross_train_step`).

Usage (the runs behind docs/cross_tokenizer.md; each log's first line is its command)::

    python benchmarks/cross_tokenizer.py --steps 150 --seeds 2 --cells ce,alm:1:0,alm:10:0,alm:100:0,...,seq-kd:1 \
        --out docs/results/cross_tokenizer_sweep.json           # the sweep, docs/results/cross_tokenizer_sweep.log
    python benchmarks/cross_tokenizer.py --steps 150 --seeds 3 --cells ce,seq-kd,alm+ce,alm+ce+shared,alm:1:0,\
        alm:1:1,kl:1,same-tok-kd --alm-temperature 10 --out docs/results/cross_tokenizer.json
"""

from __future__ import annotations

import argparse
import functools
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
from distill.config import DistillationParams, TemperatureConfig
from distill.cross_tokenizer import chunk_logprobs, token_logprobs
from distill.objective import Objective
from models import ModelConfig, init_model
from vishwam.data.cross.alignment import shared_vocab, token_byte_lengths
from vishwam.data.cross.windows import build_cross_windows
from vishwam.generation.sampler import generate
from vishwam.train.cross_step import CrossStepConfig, make_cross_train_step
from vishwam.train.step import StepConfig, init_state, make_optimizer, make_train_step

TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "pysrc" / "teacher"
EVAL_EVERY = 20  # as scripts/make_pysrc_corpus.py: every 20th module by name is held out
DEFAULT_CELLS = "ce,seq-kd,alm+ce,alm+ce+shared,alm:10:0,alm:10:1,kl:1,same-tok-ce,same-tok-kd"


def corpus(train_chars: int, eval_chars: int) -> tuple[list[str], list[str]]:
    """The standard library's top-level modules, sorted by name; every 20th held out. Training: the modules in
    order up to `train_chars` characters in all. Held out: in order, every module that still fits in
    `eval_chars` (one too big for what is left is skipped, not the end)."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)
    train, held = [], []
    for i, path in enumerate(paths):
        (held if i % EVAL_EVERY == 0 else train).append(path.read_text(encoding="utf-8", errors="replace"))
    train = [d for d, total in zip(train, np.cumsum([len(d) for d in train])) if total <= train_chars] or train[:1]
    kept, room = [], eval_chars
    for d in held:
        if len(d) <= room:
            kept.append(d)
            room -= len(d)
    return train, kept or held[:1]


def student_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """The student's tokenizer: byte-level BPE, digits one at a time, trained on the training split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def pack(docs: list[list[int]], eos: int, seq_len: int) -> np.ndarray:
    """Token id lists joined with `eos` after each and cut into `[n, seq_len + 1]` windows that overlap by one token
    (as `build_cross_windows` and `PackedDataset` cut a stream)."""
    stream = np.concatenate([np.asarray(d + [eos], np.int32) for d in docs])
    n = (len(stream) - 1) // seq_len
    return np.stack([stream[w * seq_len: w * seq_len + seq_len + 1] for w in range(n)])


def lm_batch(windows: np.ndarray) -> dict[str, jax.Array]:
    return {"input_ids": jnp.asarray(windows[:, :-1]), "labels": jnp.asarray(windows[:, 1:]),
            "mask": jnp.ones(windows[:, 1:].shape, bool)}


# ------------------------------------------------------------------------------------------------------ evaluation


@functools.partial(jax.jit, static_argnames="num_chunks")
def _chunk_logps(model, ids, in_mask, labels, label_mask, chunk, *, num_chunks):
    logits = model(ids, attention_mask=in_mask).logits
    return chunk_logprobs(token_logprobs(logits, labels, label_mask), chunk, num_chunks)


class HeldOut:
    """The held-out windows' two sides, with the bytes of each counted chunk (equal on both sides, checked)."""

    def __init__(self, windows, s_bytes: np.ndarray, t_bytes: np.ndarray, batch: int):
        self.batches = [windows.batch(np.arange(i, i + batch)) for i in range(0, len(windows) - batch + 1, batch)]
        sides = {}
        for side, table in (("", s_bytes), ("teacher_", t_bytes)):
            per_chunk, own = [], 0
            for b in self.batches:
                labels, mask, chunk = b[f"{side}labels"], b[f"{side}mask"], b[f"{side or 'student_'}chunk"]
                nbytes = table[labels] * mask
                own += int(nbytes.sum())
                acc = np.zeros(b["chunk_mask"].shape, np.int64)
                for r in range(len(labels)):
                    keep = mask[r] & (chunk[r] >= 0)
                    np.add.at(acc[r], chunk[r][keep], nbytes[r][keep])
                per_chunk.append(acc)
            sides[side] = (per_chunk, own)
        counted = [b["chunk_mask"] for b in self.batches]
        s_chunks, t_chunks = sides[""][0], sides["teacher_"][0]
        s_total = sum(int((c * m).sum()) for c, m in zip(s_chunks, counted))
        t_total = sum(int((c * m).sum()) for c, m in zip(t_chunks, counted))
        if s_total != t_total or any(((s != t) & m).any() for s, t, m in zip(s_chunks, t_chunks, counted)):
            raise AssertionError(f"counted chunks differ in bytes: student {s_total}, teacher {t_total}")
        self.chunk_bytes = s_total
        self.own_bytes = {"student": sides[""][1], "teacher": sides["teacher_"][1]}
        self.counted_fraction = s_total / sides[""][1]

    def bits_per_byte(self, model, side: str) -> dict[str, float]:
        """`bpb` on the counted chunks and `bpb_own_labels` on every label of `side` ("student" or "teacher")."""
        p = "" if side == "student" else "teacher_"
        nll_chunks = nll_all = 0.0
        for b in self.batches:
            in_mask = b["mask"] if side == "student" else b["teacher_input_mask"]
            logps = np.asarray(_chunk_logps(model, jnp.asarray(b[f"{p}input_ids"]), jnp.asarray(in_mask),
                                            jnp.asarray(b[f"{p}labels"]), jnp.asarray(b[f"{p}mask"]),
                                            jnp.asarray(b[f"{p or 'student_'}chunk"]),
                                            num_chunks=b["chunk_mask"].shape[1]))
            nll_chunks -= float((logps * b["chunk_mask"]).sum())
            nll_all -= float(logps.sum())  # every label has a chunk id inside the window
        return {"bpb": nll_chunks / (math.log(2) * self.chunk_bytes),
                "bpb_own_labels": nll_all / (math.log(2) * self.own_bytes[side])}


# ------------------------------------------------------------------------------------------------------ the steps


def cross_train_step(cfg: CrossStepConfig, optimizer, schedule, shared):
    """The one use of `vishwam.train.cross_step.make_cross_train_step`. Returns `(teacher, state, batch) ->
    (state, metrics)`."""
    step = make_cross_train_step(cfg, optimizer, schedule, shared=shared)
    return lambda teacher, state, batch: step(teacher, state, batch, None)


def lm_train_step(params: DistillationParams, optimizer, schedule, *, teacher_layers: int, steps: int):
    """The same-tokenizer step (`make_train_step`) for `params` (CE only, or KD + CE), resident teacher.
    Returns `(teacher, state, batch) -> (state, metrics)`."""
    objective = Objective.build(params, student_layers=2, teacher_layers=teacher_layers, total_steps=steps)
    step = make_train_step(StepConfig(objective=objective, compute_dtype=jnp.float32, grad_accum_steps=1,
                                      remat=False), optimizer, schedule)
    return lambda teacher, state, batch: step(teacher, state, batch, None)


def parse_cell(name: str, args) -> dict:
    """A cell name -> what it runs: kind ("cross", "seq-kd", "same-tok-kd") and its settings."""
    if name == "ce":
        return dict(kind="cross", alm_weight=0.0, ce_weight=1.0, shared_kl_weight=0.0,
                    alm_temperature=args.alm_temperature)
    if name == "alm+ce":
        return dict(kind="cross", alm_weight=1.0, ce_weight=1.0, shared_kl_weight=0.0,
                    alm_temperature=args.alm_temperature)
    if name == "alm+ce+shared":
        return dict(kind="cross", alm_weight=1.0, ce_weight=1.0, shared_kl_weight=args.shared_kl_weight,
                    alm_temperature=args.alm_temperature)
    if name.startswith("alm:"):
        _, t, w = name.split(":")
        return dict(kind="cross", alm_weight=1.0, ce_weight=1.0, shared_kl_weight=float(w), alm_temperature=float(t))
    if name.startswith("kl:"):
        return dict(kind="cross", alm_weight=0.0, ce_weight=1.0, shared_kl_weight=float(name.split(":")[1]),
                    alm_temperature=args.alm_temperature)
    if name == "seq-kd" or name.startswith("seq-kd:"):
        fraction = float(name.split(":")[1]) if ":" in name else args.seqkd_fraction
        return dict(kind="seq-kd", fraction=fraction)
    if name == "same-tok-kd":
        return dict(kind="same-tok-kd", kd_weight=1.0, ce_weight=1.0, kd_temperature=1.0)
    if name == "same-tok-ce":
        return dict(kind="same-tok-kd", kd_weight=0.0, ce_weight=1.0, kd_temperature=1.0)
    raise SystemExit(f"unknown cell {name!r}")


def teacher_completions(teacher, train, t_tok, s_tok, *, windows_needed: int, seed: int, args) -> tuple[np.ndarray, dict]:
    """Sequence-level KD data: the teacher's completions of prompts from the training windows, re-tokenized by the
    student's tokenizer and packed into at least `windows_needed` windows. Returns the windows and timings."""
    rng = np.random.default_rng(10_000 + seed)
    eos_t, eos_s = t_tok.token_to_id("<|endoftext|>"), s_tok.token_to_id("<|endoftext|>")
    docs, gen_s, tok_s, n_prompts, n_new, n_eos = [], 0.0, 0.0, 0, 0, 0
    key = jax.random.key(seed)
    rows = rng.permutation(len(train))
    valid = train.teacher_valid[:, : args.seqkd_prompt].all(axis=1)
    rows = rows[valid[rows]]
    k = 0
    while True:
        take = rows[k: k + args.seqkd_batch]
        k += args.seqkd_batch
        prompts = train.teacher[take, : args.seqkd_prompt]
        t0 = time.perf_counter()
        out = np.asarray(generate(teacher, prompts, max_new_tokens=args.seqkd_new, temperature=1.0,
                                  eos_token_id=eos_t, pad_token_id=eos_t, key=jax.random.fold_in(key, k)))
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for row in out:
            new = row[args.seqkd_prompt:]
            ended = np.flatnonzero(new == eos_t)
            n_eos += bool(len(ended))
            new = new[: ended[0]] if len(ended) else new
            n_new += len(new)
            text = t_tok.decode(np.concatenate([row[: args.seqkd_prompt], new]).tolist(), skip_special_tokens=True)
            docs.append(s_tok.encode(text, add_special_tokens=False).ids)
        tok_s += time.perf_counter() - t0
        n_prompts += len(take)
        if sum(len(d) + 1 for d in docs) - 1 >= windows_needed * args.seq_len:
            break
        if k >= len(rows):
            raise SystemExit("seq-kd: ran out of prompts")
    windows = pack(docs, eos_s, args.seq_len)[:windows_needed]
    info = {"prompts": n_prompts, "teacher_tokens_generated": n_new, "ended_with_eos": n_eos,
            "generate_seconds": round(gen_s, 2), "decode_retokenize_seconds": round(tok_s, 2),
            "student_windows": len(windows)}
    return windows, info


def run_cell(cell: dict, seed: int, ctx: dict, args) -> dict:
    """Train one cell on one seed; its bits per byte, seconds and what it generated."""
    t0 = time.perf_counter()
    teacher, train, held = ctx["teacher"], ctx["train"], ctx["held"]
    optimizer, schedule = make_optimizer(learning_rate=args.lr, warmup_steps=10, total_steps=args.steps,
                                         weight_decay=0.01, grad_clip=1.0)
    cfg = ctx["t_cfg"] if cell["kind"] == "same-tok-kd" else ctx["s_cfg"]
    state = init_state(init_model(cfg, key=jax.random.key(seed)), None, None, optimizer, jax.random.key(seed), [])
    rng = np.random.default_rng(seed)
    out = {}
    if cell["kind"] == "cross":
        step = cross_train_step(CrossStepConfig(num_chunks=train.num_chunks, chunk_size=32,
                                                **{k: v for k, v in cell.items() if k != "kind"}),
                                optimizer, schedule, ctx["shared"])
        for _ in range(args.steps):
            rows = rng.choice(len(train), args.batch, replace=False)
            state, _ = step(teacher, state, {k: jnp.asarray(v) for k, v in train.batch(rows).items()})
        side = "student"
    elif cell["kind"] == "seq-kd":
        n_teacher = round(args.batch * cell["fraction"])
        step = lm_train_step(DistillationParams(kd_weight=0.0, ce_weight=1.0), optimizer, schedule,
                             teacher_layers=teacher.config.num_hidden_layers, steps=args.steps)
        kd_windows = np.zeros((0, args.seq_len + 1), np.int32)
        if n_teacher:
            kd_windows, out["seq_kd"] = teacher_completions(teacher, train, ctx["t_tok"], ctx["s_tok"],
                                                            windows_needed=args.steps * n_teacher, seed=seed,
                                                            args=args)
            out["seq_kd"]["bytes_per_window"] = float(ctx["s_bytes"][kd_windows[:, 1:]].sum(1).mean())
            print(json.dumps({"cell": "seq-kd", "seed": seed, **out["seq_kd"]}), flush=True)
        order = rng.permutation(len(kd_windows))
        for i in range(args.steps):
            rows = rng.choice(len(train), args.batch - n_teacher, replace=False)
            windows = np.concatenate([train.student[rows], kd_windows[order[i * n_teacher: (i + 1) * n_teacher]]])
            state, _ = step(teacher, state, lm_batch(windows))
        side = "student"
    else:
        t = cell["kd_temperature"]
        params = DistillationParams(kd_weight=cell["kd_weight"], ce_weight=cell["ce_weight"],
                                    temperature=TemperatureConfig(schedule="constant", start=t, end=t))
        step = lm_train_step(params, optimizer, schedule, teacher_layers=teacher.config.num_hidden_layers,
                             steps=args.steps)
        windows = ctx["teacher_windows"]
        for _ in range(args.steps):
            rows = rng.choice(len(windows), args.batch, replace=False)
            state, _ = step(teacher, state, lm_batch(windows[rows]))
        side = "teacher"
    out.update(held.bits_per_byte(state.student, side))
    out["skipped_steps"] = int(state.skipped)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default=DEFAULT_CELLS, help=f"comma-separated cells (default {DEFAULT_CELLS})")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--student-vocab", type=int, default=1024)
    ap.add_argument("--train-bytes", type=int, default=400_000)
    ap.add_argument("--eval-bytes", type=int, default=60_000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alm-temperature", type=float, default=1.0,
                    help="the alm+ce and alm+ce+shared cells' (1: docs/cross_tokenizer.md, Measured)")
    ap.add_argument("--shared-kl-weight", type=float, default=1.0, help="the alm+ce+shared cell's")
    ap.add_argument("--seqkd-fraction", type=float, default=0.5, help="each step's rows from the teacher")
    ap.add_argument("--seqkd-prompt", type=int, default=16, help="teacher tokens of each prompt")
    ap.add_argument("--seqkd-new", type=int, default=112, help="teacher tokens sampled after each prompt")
    ap.add_argument("--seqkd-batch", type=int, default=64, help="prompts per generate call")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()
    cells = {name: parse_cell(name, args) for name in args.cells.split(",")}

    train_docs, eval_docs = corpus(args.train_bytes, args.eval_bytes)
    t_tok = Tokenizer.from_file(str(TEACHER_DIR / "tokenizer.json"))
    s_tok = student_tokenizer(train_docs, args.student_vocab)
    eos_s, eos_t = s_tok.token_to_id("<|endoftext|>"), t_tok.token_to_id("<|endoftext|>")
    train = build_cross_windows(train_docs, s_tok, t_tok, seq_len=args.seq_len,
                                teacher_seq_len=int(args.seq_len * 1.5), student_eos=eos_s, teacher_eos=eos_t,
                                name="train")
    # Held out: room for the whole teacher side of nearly every window, so that nearly every chunk counts.
    held_windows = build_cross_windows(eval_docs, s_tok, t_tok, seq_len=args.seq_len,
                                       teacher_seq_len=3 * args.seq_len, student_eos=eos_s, teacher_eos=eos_t,
                                       name="eval")
    teacher = vishwam.load_pretrained(str(TEACHER_DIR), dtype=jnp.float32)
    s_bytes, t_bytes = token_byte_lengths(s_tok), token_byte_lengths(t_tok, teacher.config.vocab_size)
    held = HeldOut(held_windows, s_bytes, t_bytes, args.batch)
    teacher_windows = pack([t_tok.encode(d, add_special_tokens=False).ids for d in train_docs], eos_t, args.seq_len)
    dims = dict(model_type="qwen2", hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=3, num_key_value_heads=1, head_dim=32)
    ctx = dict(teacher=teacher, train=train, held=held, t_tok=t_tok, s_tok=s_tok, s_bytes=s_bytes,
               teacher_windows=teacher_windows, shared=tuple(jnp.asarray(x) for x in shared_vocab(s_tok, t_tok)),
               s_cfg=ModelConfig(vocab_size=s_tok.get_vocab_size(), **dims),
               t_cfg=ModelConfig(vocab_size=teacher.config.vocab_size, **dims))
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "jax_backend": jax.default_backend(),
              "train_chars": sum(map(len, train_docs)), "eval_chars": sum(map(len, eval_docs)),
              "train_windows": len(train), "teacher_tokenizer_train_windows": len(teacher_windows),
              "eval_windows": len(held_windows), "shared_vocab": len(ctx["shared"][0]),
              "counted_chunk_fraction": float(train.chunk_mask.mean()),
              "eval_counted_bytes": held.chunk_bytes, "eval_counted_fraction_of_student_label_bytes":
                  round(held.counted_fraction, 4),
              "bytes_per_window": {"corpus_student_tokenizer": float(s_bytes[train.student[:, 1:]].sum(1).mean()),
                                   "corpus_teacher_tokenizer": float(t_bytes[teacher_windows[:, 1:]].sum(1).mean())},
              "teacher": held.bits_per_byte(teacher, "teacher"), "cells": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "cells"}), flush=True)
    for name, cell in cells.items():
        runs = []
        for seed in range(args.seeds):
            result = run_cell(cell, seed, ctx, args)
            runs.append(result)
            print(json.dumps({"cell": name, "seed": seed, **{k: v for k, v in result.items() if k != "seq_kd"}}),
                  flush=True)
        bpb = [r["bpb"] for r in runs]
        report["cells"][name] = {"settings": cell, "runs": runs, "bpb": bpb, "mean": float(np.mean(bpb)),
                                 "spread": float(np.max(bpb) - np.min(bpb)),
                                 "seconds": float(sum(r["seconds"] for r in runs))}
    report["wall_seconds"] = round(time.perf_counter() - wall0, 1)
    table = markdown(report)
    print(table, flush=True)
    print(json.dumps({"wall_seconds": report["wall_seconds"]}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.table is not None:
        args.table.write_text(table + "\n")
    return 0


def markdown(report: dict) -> str:
    """Means, spreads (max - min over seeds) and, against `ce` on the same seed, the paired differences."""
    cells = report["cells"]
    base = cells.get("ce")
    lines = [("| cell | bits/byte per seed | mean | spread (max - min) | minus CE-only, per seed | mean paired "
              "difference | train seconds (all seeds) |"), "|---|---|---|---|---|---|---|"]
    for name, cell in cells.items():
        per_seed = ", ".join(f"{v:.4f}" for v in cell["bpb"])
        diff = mean_diff = ""
        if base is not None and name != "ce":
            d = [a - b for a, b in zip(cell["bpb"], base["bpb"])]
            diff, mean_diff = ", ".join(f"{v:+.4f}" for v in d), f"{np.mean(d):+.4f}"
        lines.append(f"| {name} | {per_seed} | {cell['mean']:.4f} | {cell['spread']:.4f} | {diff} | {mean_diff} | "
                     f"{cell['seconds']:.0f} |")
    lines.append(f"| teacher (reference) | {report['teacher']['bpb']:.4f} | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
