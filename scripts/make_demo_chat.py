"""Make the embedded chat demo: chat-formatted data from the demo corpus's grammar, and a chat teacher fine-tuned
from the demo teacher on it (the teacher `configs/chat.yaml` distils, on-policy).

1. Conversations (`chat_train.jsonl`, `chat_eval.jsonl` in `vishwam/assets/demo/`, seeded, byte-identical on
   every run): a user asks for a sum, a count, the number after another, the bigger or smaller of two, the
   length of a list, or a sentence, and the assistant answers in the corpus's own words; a third of the
   conversations go on with a second question, some start with a system line.
2. The chat teacher (`vishwam/assets/demo/chat_teacher/`): the demo teacher's weights, fine-tuned with
   next-token cross-entropy on the assistant tokens only (vishwam's packing: rows packed with segment ids),
   saved with the tokenizer and `chat_template.jinja` beside it.

Usage::

    python scripts/make_demo_chat.py                 # about 4 minutes on 2 CPU cores
    python scripts/make_demo_chat.py --steps 20 --out-dir /tmp/chat_teacher   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_demo_corpus as corpus  # noqa: E402

import vishwam  # noqa: E402
from vishwam.data.chat import find_template  # noqa: E402
from vishwam.data.chat_rows import encode_rows, pack_rows  # noqa: E402
from vishwam.data.text import load_tokenizer  # noqa: E402
from vishwam.data.windows import batch_for_step, eval_batches  # noqa: E402

DEMO_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vishwam", "assets",
                                         "demo"))
TRAIN_SEED, EVAL_SEED = 20261203, 4417
TRAIN_ROWS, EVAL_ROWS = 4000, 240
SEQ_LEN, BATCH_SIZE, SEED = 128, 32, 0
# "User:" / "Assistant:" lines; each assistant turn ends in the EOS token, which the loss counts.
TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{ m.content }}{{ '\\n' }}"
    "{%- elif m.role == 'user' -%}User: {{ m.content }}{{ '\\n' }}"
    "{%- else -%}Assistant:{{ '\\n' }}{{ m.content }}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{{ '\\n' }}{%- endif -%}"
)
SYSTEM = ["You are a helpful assistant.", "Answer in words.", "Be brief."]


def exchange(s: corpus.Sampler) -> tuple[str, str]:
    """One (question, answer) in the corpus's words."""
    kind = s.pick([("sum", 4), ("count", 3), ("after", 2), ("compare", 2), ("list", 2), ("sentence", 2)])[0]
    if kind == "sum":
        fact = corpus.arithmetic_fact(s, digits=s.chance(0.3))
        left = fact.split(" = ")[0] if " = " in fact else fact.split(" is ")[0]
        return f"What is {left[0].lower() + left[1:] if not left[0].isdigit() else left}?", fact
    if kind == "sentence":
        return "Write a sentence.", corpus.grammar_sentence(s, s.pick([("present", 2), ("past", 1)])[0])
    while True:
        text = corpus.counting_sentence(s)
        if kind == "count" and text.startswith("Count"):
            question, answer = text.split(": ")
            return question + ".", corpus.sentence(answer)
        if kind == "after" and text.startswith("The number after"):
            return "What is " + text.split(" is ")[0].lower().replace("the number", "the number") + "?", text
        if kind == "compare" and text.startswith("Which"):
            question, answer = text.split("? ")
            return question + "?", answer
        if kind == "list" and " has these " in text:
            items, total = text.split(". That is ")
            owner, listed = items.split(" has these ")
            name = listed.split(":")[0]
            return f"{owner} has these {listed}. How many {name} is that?", f"That is {total}"


def conversation(s: corpus.Sampler) -> dict:
    messages = [{"role": "system", "content": s.pick(SYSTEM)}] if s.chance(0.2) else []
    for _ in range(2 if s.chance(0.33) else 1):
        question, answer = exchange(s)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_rows(path: str, seed: int, n: int) -> None:
    s = corpus.Sampler(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(s)) + "\n")


def loss_fn(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["mask"], segment_ids=batch["segment_ids"]).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0), mask.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEMO_DIR)
    parser.add_argument("--out-dir", default=os.path.join(DEMO_DIR, "chat_teacher"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    start = time.perf_counter()
    train_path, eval_path = (os.path.join(args.data_dir, f"chat_{split}.jsonl") for split in ("train", "eval"))
    write_rows(train_path, TRAIN_SEED, TRAIN_ROWS)
    write_rows(eval_path, EVAL_SEED, EVAL_ROWS)

    base = os.path.join(DEMO_DIR, "teacher")
    template_path = os.path.join(args.data_dir, "chat_template.jinja.tmp")
    with open(template_path, "w") as f:
        f.write(TEMPLATE)
    template = find_template(template_path, Path(base))
    os.remove(template_path)
    tokenizer = load_tokenizer(os.path.join(base, "tokenizer.json"))
    log = lambda line: print(line, flush=True)  # noqa: E731
    splits = {name: pack_rows(encode_rows(path, tokenizer, template, loss_on="assistant", eos_id=0), SEQ_LEN,
                              name=name, log=log)
              for name, path in (("chat train", train_path), ("chat eval", eval_path))}

    model = vishwam.load_pretrained(base, dtype=np.float32)
    step_loss = eqx.filter_jit(lambda m, b: loss_fn(m, b))

    def evaluate(m) -> float:
        total = count = 0.0
        for batch in eval_batches(splits["chat eval"], BATCH_SIZE, n=10**9):
            loss, n = step_loss(m, {k: jnp.asarray(v) for k, v in batch.items() if k != "window"})
            total, count = total + float(loss) * float(n), count + float(n)
        return total / count

    print(f"demo teacher before fine-tuning: assistant-token eval loss {evaluate(model):.4f}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(40, args.steps // 4), args.steps, args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, opt_state, batch):
        (loss, _), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    recent, t0 = [], time.perf_counter()
    for step in range(args.steps):
        batch = batch_for_step(splits["chat train"], seed=SEED, step=step, batch_size=BATCH_SIZE)
        model, opt_state, loss = train_step(model, opt_state, {k: jnp.asarray(v) for k, v in batch.items()
                                                               if k != "window"})
        recent.append(float(loss))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1:4d}  loss {np.mean(recent):.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
            recent = []
    eval_loss = evaluate(model)
    print(f"chat teacher: assistant-token eval loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.3f}) after "
          f"{args.steps} steps of {BATCH_SIZE} x {SEQ_LEN} tokens")
    vishwam.save_pretrained(model, args.out_dir, dtype=np.float32, max_shard_size="1600KB", tokenizer_from=base)
    shutil.copy(os.path.join(base, "tokenizer_config.json"), os.path.join(args.out_dir, "tokenizer_config.json"))
    with open(os.path.join(args.out_dir, "chat_template.jinja"), "w") as f:  # after the save, which writes anew
        f.write(TEMPLATE)
    print(f"saved {args.out_dir}: " + ", ".join(sorted(os.listdir(args.out_dir))))
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
