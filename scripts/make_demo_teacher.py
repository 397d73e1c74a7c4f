"""Train the demo teacher that ships with vishwam: a byte-level BPE tokenizer and a small Qwen2 model, pretrained
on the synthetic corpus of `scripts/make_demo_corpus.py` and saved in HF format (sharded safetensors).

Runs on CPU in a few minutes; everything is seeded, so a rerun on the same software gives the same tokenizer
and (up to floating-point reduction order) the same weights.

Usage::

    python scripts/make_demo_corpus.py     # the corpus first
    python scripts/make_demo_teacher.py    # writes vishwam/assets/demo/teacher/
    python scripts/make_demo_teacher.py --steps 20 --out-dir /tmp/teacher   # a quick smoke run

The quality benchmark's teacher, pretrained on real text (the Python standard library, `make_pysrc_corpus.py`),
comes from the same script with a larger model and vocabulary (`benchmarks/assets/pysrc/teacher/README.md` has
the command); it also records the SHA-256 of the corpus it was trained on in `training_data.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import vishwam
from models import CausalLM, ModelConfig
from vishwam.data.text import load_token_stream
from vishwam.data.windows import PackedDataset, batch_for_step, eval_batches

DEMO_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vishwam", "assets",
                                         "demo"))
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]  # ids 0 and 1
EOS_ID, PAD_ID = 0, 1
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
    "model_max_length": 2048,
}
CONFIG = ModelConfig(
    model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, qkv_bias=True, o_bias=False, rope_theta=10000.0,
    max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    bos_token_id=None,
)
# Qwen2's pre-tokenisation (transformers `models/qwen2/tokenization_qwen2.py`): digits split one by one.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SEQ_LEN = 128
BATCH_SIZE = 32
SEED = 0
# 2-3 shards for this ~3.7 MB float32 model, so the demo exercises sharded loading.
MAX_SHARD_SIZE = "1600KB"


def train_tokenizer(train_path: str, out_dir: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with Qwen2's normalizer and pre-tokenizer, trained on the documents of
    `train_path`, written to `out_dir` as `tokenizer.json` + `tokenizer_config.json`.

    The pipeline must be Qwen2's exactly: for a `model_type: qwen2` checkpoint, transformers 5's `AutoTokenizer`
    builds a `Qwen2Tokenizer` from the vocab and merges alone and rebuilds the normalizer and pre-tokenizer in
    code, so any other pre-tokenisation would give different ids there than `tokenizers` gives here.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    with open(train_path, encoding="utf-8") as f:
        documents = [json.loads(line)["text"] for line in f if line.strip()]
    tokenizer.train_from_iterator(documents, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"{token} should have id {i}"
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
        f.write("\n")
    return tokenizer


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best context-free predictor."""
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def corpus_record(train_path: str, eval_path: str) -> dict:
    """The corpus files' names, sizes and SHA-256 (written beside the teacher as `training_data.json`)."""
    record = {}
    for name, path in (("train", train_path), ("eval", eval_path)):
        with open(path, "rb") as f:
            data = f.read()
        record[name] = {"file": os.path.basename(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return record


def loss_fn(model: CausalLM, input_ids, labels, mask):
    logits = model(input_ids).logits.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1)


def make_train_step(optimizer: optax.GradientTransformation):
    @eqx.filter_jit
    def train_step(model, opt_state, input_ids, labels, mask):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, input_ids, labels, mask)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return train_step


@eqx.filter_jit
def eval_step(model, input_ids, labels, mask):
    """Summed token NLL and token count of one batch."""
    mask = mask.astype(jnp.float32)
    return loss_fn(model, input_ids, labels, mask) * mask.sum(), mask.sum()


def evaluate(model, dataset: PackedDataset, batch_size: int = BATCH_SIZE) -> float:
    total = count = 0.0
    for batch in eval_batches(dataset, batch_size, n=10**9):
        nll, n = eval_step(model, batch["input_ids"], batch["labels"], batch["mask"])
        total, count = total + float(nll), count + float(n)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEMO_DIR, help="where train.jsonl and eval.jsonl are")
    parser.add_argument("--out-dir", default=os.path.join(DEMO_DIR, "teacher"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--vocab-size", type=int, default=CONFIG.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=CONFIG.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=CONFIG.intermediate_size)
    parser.add_argument("--layers", type=int, default=CONFIG.num_hidden_layers)
    parser.add_argument("--heads", type=int, default=CONFIG.num_attention_heads)
    parser.add_argument("--kv-heads", type=int, default=CONFIG.num_key_value_heads)
    parser.add_argument("--max-shard-size", default=MAX_SHARD_SIZE)
    args = parser.parse_args()
    config = dataclasses.replace(
        CONFIG, vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads)
    batch_size = args.batch_size
    start = time.perf_counter()
    train_path = os.path.join(args.data_dir, "train.jsonl")
    eval_path = os.path.join(args.data_dir, "eval.jsonl")

    with tempfile.TemporaryDirectory() as tok_dir:
        train_tokenizer(train_path, tok_dir, config.vocab_size)
        train_tokens = load_token_stream(train_path, tok_dir, EOS_ID)
        eval_tokens = load_token_stream(eval_path, tok_dir, EOS_ID)
        train_set = PackedDataset(train_tokens, SEQ_LEN, name="demo train")
        eval_set = PackedDataset(eval_tokens, SEQ_LEN, name="demo eval")
        text_bytes = os.path.getsize(train_path)
        print(f"tokenizer: vocab {config.vocab_size}, {len(train_tokens)} train tokens "
              f"({text_bytes / len(train_tokens):.2f} bytes/token), {len(eval_tokens)} eval tokens; "
              f"{train_set.num_windows} train windows, {eval_set.num_windows} eval windows")
        print(f"unigram entropy of the train tokens: {unigram_entropy(train_tokens, config.vocab_size):.3f} nats")

        model = CausalLM(config, key=jax.random.key(SEED))
        print(f"teacher: {vishwam.count_parameters(model):,} parameters")
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=args.lr, warmup_steps=args.warmup, decay_steps=args.steps,
            end_value=args.lr * 0.05,
        )
        optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01),
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        train_step = make_train_step(optimizer)

        epochs = args.steps * batch_size / train_set.num_windows
        print(f"training {args.steps} steps of {batch_size} x {SEQ_LEN} tokens ({epochs:.1f} epochs)")
        recent: list[float] = []
        train_start = time.perf_counter()
        for step in range(args.steps):
            batch = batch_for_step(train_set, seed=SEED, step=step, batch_size=batch_size)
            model, opt_state, loss = train_step(model, opt_state, batch["input_ids"], batch["labels"],
                                                batch["mask"].astype(np.float32))
            recent.append(float(loss))
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                elapsed = time.perf_counter() - train_start
                print(f"step {step + 1:5d}  loss {np.mean(recent):.4f}  lr {float(schedule(step)):.2e}  "
                      f"{elapsed:6.1f}s", flush=True)
                recent = []
        train_time = time.perf_counter() - train_start
        train_loss = evaluate(model, PackedDataset(train_tokens[: len(eval_tokens) * 4], SEQ_LEN), batch_size)
        eval_loss = evaluate(model, eval_set, batch_size)
        print(f"final: train loss {train_loss:.4f} (first {4 * len(eval_tokens)} train tokens), eval loss "
              f"{eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}); training took {train_time:.0f}s")

        out = vishwam.save_pretrained(model, args.out_dir, dtype=np.float32, max_shard_size=args.max_shard_size,
                                      tokenizer_from=tok_dir)
        record = {**corpus_record(train_path, eval_path), "steps": args.steps, "eval_loss": round(eval_loss, 4)}
        with open(os.path.join(out, "training_data.json"), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    files = sorted(os.listdir(out))
    print(f"saved {out}: " + ", ".join(f"{f} ({os.path.getsize(os.path.join(out, f)) / 1e3:.0f} KB)"
                                        for f in files))
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
