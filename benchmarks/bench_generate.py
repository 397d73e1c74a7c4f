"""Generation speed: vishwam's KV-cache `generate` against transformers' `generate`, same weights, same shapes.

    python -m benchmarks.bench_generate [--batches 1 8] [--prompt 128] [--new 128] [--repeats 3]

For each model (the embedded demo teacher, 0.9M parameters, and `d512`, a 58M-parameter Qwen2 with a 32k
vocabulary, random weights) and each batch size, both frameworks run greedy generation of exactly `--new` tokens
(no EOS) after a `--prompt`-token prompt, float32 on this machine's CPU:

- prefill ms: the prompt's forward pass that fills the cache (vishwam: the prefill program; transformers:
  `generate(max_new_tokens=1)`, which is the prefill and one token choice);
- decode tokens/s: batch x (new - 1) tokens over the time after the prefill (vishwam: the decode program,
  its `while_loop` over every step; transformers: `generate(max_new_tokens=new)` minus its prefill).

Each figure is the median of `--repeats` runs after a warm-up run (which compiles vishwam's programs). torch
runs in a child process started before any JAX work, one framework at a time. The profile behind the figures:
XLA's cost analysis of one decode step (FLOPs and bytes accessed, so the achieved GFLOP/s and GB/s), and
torch.profiler's top operators of one transformers decode at the largest batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from benchmarks.common import DEMO, cpu_model, last_json, markdown_table, python_child, timed

D512 = dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=0)


def _prompts(vocab: int, batch: int, length: int):
    import numpy as np

    return np.random.default_rng(batch).integers(2, vocab, (batch, length)).astype(np.int64)


def torch_side(args, d512_dir: str) -> dict:
    """Child process: save the d512 checkpoint, then time transformers' generate on both models."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**D512)).save_pretrained(d512_dir)
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "rows": {}}
    for name, path in (("demo", DEMO / "teacher"), ("d512", d512_dir)):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        for batch in args.batches:
            ids = torch.tensor(_prompts(model.config.vocab_size, batch, args.prompt))
            mask = torch.ones_like(ids)

            def run(new):
                with torch.inference_mode():
                    return timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                        min_new_tokens=new, do_sample=False, pad_token_id=0))

            run(args.new)  # warm-up
            prefill = statistics.median(run(1) for _ in range(args.repeats))
            total = statistics.median(run(args.new) for _ in range(args.repeats))
            out["rows"][f"{name}/{batch}"] = {"prefill_ms": prefill * 1e3,
                                              "decode_tokens_per_s": batch * (args.new - 1) / (total - prefill)}
        if name == "d512":  # where transformers' decode time goes, at the largest batch
            batch = max(args.batches)
            ids = torch.tensor(_prompts(model.config.vocab_size, batch, args.prompt))
            with torch.inference_mode(), torch.profiler.profile() as prof:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0)
            out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    return out


def jax_side(args, d512_dir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import vishwam
    from vishwam.generation.sampler import _decode, _eos_array, _prefill, prompt_bucket

    out = {"jax": jax.__version__, "rows": {}, "cost": {}}
    for name, path in (("demo", DEMO / "teacher"), ("d512", d512_dir)):
        model = vishwam.load_pretrained(path, dtype=jnp.float32)
        for batch in args.batches:
            ids = _prompts(model.config.vocab_size, batch, args.prompt).astype(np.int32)
            assert prompt_bucket(args.prompt) == args.prompt, "pick a prompt length that is its own bucket"
            slots = args.prompt + args.new - 1
            ids_j, mask_j = jnp.asarray(ids), jnp.ones(ids.shape, bool)
            prefill = lambda: _prefill(model, ids_j, mask_j, slots=slots, cache_sharding=None,  # noqa: E731
                                       attention_impl="auto")
            decode_args = (jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1), _eos_array([]),
                           jnp.int32(0))

            def prefill_once():
                return timed(lambda: jax.block_until_ready(prefill()))

            def decode_once():
                logits, cache = jax.block_until_ready(prefill())
                return timed(lambda: jax.block_until_ready(_decode(model, cache, logits, *decode_args,
                                                                   max_new_tokens=args.new, cache_sharding=None)))

            prefill_once(), decode_once()  # compile both
            t_prefill = statistics.median(prefill_once() for _ in range(args.repeats))
            t_decode = statistics.median(decode_once() for _ in range(args.repeats))
            out["rows"][f"{name}/{batch}"] = {"prefill_ms": t_prefill * 1e3,
                                              "decode_tokens_per_s": batch * (args.new - 1) / t_decode}
            if name == "d512":
                from models.decode import decode_step

                logits, cache = prefill()
                step = jax.jit(decode_step).lower(model, cache, jnp.zeros(batch, jnp.int32)).compile()
                cost = step.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                out["cost"][batch] = {"flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0),
                                      "step_s": t_decode / (args.new - 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        print(json.dumps(torch_side(args, args.torch_child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d512 = os.path.join(tmp, "d512")
        child = python_child(["-m", "benchmarks.bench_generate", "--torch-child", d512, "--batches",
                              *map(str, args.batches), "--prompt", str(args.prompt), "--new", str(args.new),
                              "--repeats", str(args.repeats)])
        theirs = last_json(child.stdout)
        ours = jax_side(args, d512)
    print(f"# generation: prompt {args.prompt}, {args.new} new tokens, greedy, float32, CPU "
          f"({cpu_model()}, {os.cpu_count()} cores)")
    print(f"# jax {ours['jax']} | torch {theirs['torch']} ({theirs['threads']} threads) | transformers "
          f"{theirs['transformers']}; medians of {args.repeats} after a warm-up")
    cells = []
    for key, row in ours["rows"].items():
        ref = theirs["rows"][key]
        cells.append([*key.split("/"), f"{row['prefill_ms']:.1f}", f"{ref['prefill_ms']:.1f}",
                      f"{row['decode_tokens_per_s']:.0f}", f"{ref['decode_tokens_per_s']:.0f}",
                      f"{row['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x"])
    print("\n".join(markdown_table(["model", "batch", "vishwam prefill ms", "transformers prefill ms",
                                    "vishwam decode tok/s", "transformers decode tok/s", "decode ratio"], cells)))
    print("\n# vishwam decode step, d512 (XLA cost analysis of one step; time from the decode program)")
    for batch, c in ours["cost"].items():
        print(f"batch {batch}: {c['flops'] / 1e9:.3f} GFLOP, {c['bytes'] / 1e6:.1f} MB accessed per step; "
              f"{c['step_s'] * 1e3:.2f} ms/step -> {c['flops'] / c['step_s'] / 1e9:.1f} GFLOP/s, "
              f"{c['bytes'] / c['step_s'] / 1e9:.2f} GB/s")
    print(f"\n# transformers decode, d512, batch {max(args.batches)}: torch.profiler, top operators by self CPU time")
    print(theirs["profile"])


if __name__ == "__main__":
    main()
