"""Compile vishwam.generate's prefill and decode programs for the Qwen2.5-32B teacher (bf16) on tpu:v5p-16 (fsdp=8),
batch 8, prompt 1024, 256 new tokens, from abstract inputs, and print XLA's bytes per chip:
`python -m benchmarks.compile_generate` (needs the [tpu] extra)."""
import os, time
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
import jax
jax.config.update("jax_platforms", "cpu")
import jax.numpy as jnp, equinox as eqx
from vishwam.targets import resolve_target
from vishwam import specs
from vishwam.sharding import make_mesh, tree_shardings
from vishwam.generation import _prefill, _decode, CACHE_AXES, _eos_array
from vishwam.sharding import spec_for, rows_sharding
from jax.sharding import NamedSharding
from models import init_model, cast_floating
from models.decode import KVCache
t = resolve_target("tpu:v5p-16", 8)
mesh = make_mesh(1, 8, 1, devices=t.devices)
cfg = specs.resolve_architecture("Qwen/Qwen2.5-32B")
m = eqx.filter_eval_shape(lambda k: cast_floating(init_model(cfg, key=k), jnp.bfloat16), jax.random.key(0))
arr, static = eqx.partition(m, lambda x: isinstance(x, jax.ShapeDtypeStruct))
sh = tree_shardings(arr, mesh)
m = eqx.combine(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), arr, sh), static)
B, P, N = 8, 1024, 256
slots = P + N - 1
cs = NamedSharding(mesh, spec_for(CACHE_AXES, (cfg.num_hidden_layers, B, cfg.num_key_value_heads, slots, cfg.head_dim), mesh))
rs = rows_sharding(mesh, B)
ids = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=rs); mask = jax.ShapeDtypeStruct((B, P), bool, sharding=rs)
for name, fn, args, kw in [("prefill", _prefill, (m, ids, mask), dict(slots=slots, cache_sharding=cs, attention_impl="xla"))]:
    t0 = time.time(); c = fn.lower(*args, **kw).compile(); a = c.memory_analysis()
    print(name, f"args {a.argument_size_in_bytes/2**30:.2f} out {a.output_size_in_bytes/2**30:.2f} temp {a.temp_size_in_bytes/2**30:.2f} GiB/chip, {time.time()-t0:.0f} s")
logits, cache = jax.eval_shape(lambda *a: _prefill(*a, slots=slots, cache_sharding=cs, attention_impl="xla"), m, ids, mask)
cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, KVCache(cs, cs, rs, rows_sharding(mesh, B, 1), NamedSharding(mesh, jax.sharding.PartitionSpec())))
t0 = time.time()
c = _decode.lower(m, cache, jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=rs), jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1), _eos_array([]), jnp.int32(0), max_new_tokens=N, cache_sharding=cs).compile()
a = c.memory_analysis()
print("decode", f"args {a.argument_size_in_bytes/2**30:.2f} out {a.output_size_in_bytes/2**30:.2f} alias {a.alias_size_in_bytes/2**30:.2f} temp {a.temp_size_in_bytes/2**30:.2f} GiB/chip, {time.time()-t0:.0f} s")
