"""Compile vishwam.generate's prefill and decode programs at the flagship's size for tpu:v5p-16 (fsdp=8), from
abstract inputs (`vishwam.generation.sampler.generation_programs`, the programs `generate` runs), and print XLA's bytes
per chip:

- the Qwen2.5-32B teacher (bf16): batch 8, prompt 1024, 256 new tokens (sequence-level KD, samples at eval);
- the flagship's 7.7B student (`configs/qwen2.5-32b-to-7b.yaml`, bf16 compute) writing on-policy completions:
  8 rows (on_policy.fraction 0.125 of 8 micro-batches of 8), prompts up to 4096 + 1 - 256 tokens, 256 new tokens.

`python -m benchmarks.compile_generate` (needs the [tpu] extra; a few minutes on 2 CPU cores).
"""

import os
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_platforms", "cpu")

from benchmarks.common import ROOT  # noqa: E402
from models import cast_floating, init_model  # noqa: E402
from vishwam.compile.targets import resolve_target  # noqa: E402
from vishwam.config import specs  # noqa: E402
from vishwam.config.cli import load_config  # noqa: E402
from vishwam.generation.sampler import generation_programs  # noqa: E402
from vishwam.sharding import make_mesh, tree_shardings  # noqa: E402


def placed(config, mesh):
    model = eqx.filter_eval_shape(lambda k: cast_floating(init_model(config, key=k), jnp.bfloat16), jax.random.key(0))
    arrays, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = tree_shardings(arrays, mesh)
    return eqx.combine(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), arrays,
                                    shardings), static)


def main() -> None:
    target = resolve_target("tpu:v5p-16", 8)
    mesh = make_mesh(1, 8, 1, devices=target.devices)
    teacher = specs.resolve_architecture("Qwen/Qwen2.5-32B")
    cfg = load_config(str(ROOT / "configs" / "qwen2.5-32b-to-7b.yaml"))
    student = specs.student_config(cfg, teacher)
    print(f"# generation programs compiled for tpu:v5p-16 (fsdp=8); {time.strftime('%Y-%m-%d')}, jax "
          f"{jax.__version__}; GiB per chip of {target.capacity / 2**30:.2f}")
    for name, config, batch, prompt, new in (("teacher Qwen2.5-32B", teacher, 8, 1024, 256),
                                             ("student 7.7B on-policy", student, 8, 4096 + 1 - 256, 256)):
        model = placed(config, mesh)
        for program, (fn, args, kwargs) in generation_programs(model, batch, prompt, new, mesh,
                                                               attention_impl="xla").items():
            t0 = time.time()
            a = fn.lower(*args, **kwargs).compile().memory_analysis()
            total = a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes - a.alias_size_in_bytes
            print(f"{name} {program} (batch {batch}, prompt {prompt}, {new} new): args "
                  f"{a.argument_size_in_bytes / 2**30:.2f} out {a.output_size_in_bytes / 2**30:.2f} alias "
                  f"{a.alias_size_in_bytes / 2**30:.2f} temp {a.temp_size_in_bytes / 2**30:.2f} = "
                  f"{total / 2**30:.2f} GiB/chip, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
