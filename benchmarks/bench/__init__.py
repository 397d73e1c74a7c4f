"""Throughput, compile-time, memory and checkpoint-load benchmarks: `python -m benchmarks.bench`.

What one run measures (vishwam in this process; PyTorch and each checkpoint load in child processes, so that
neither framework's idle threads nor earlier phases' memory skew the other's figures):

1. the machine's matmul peak (a square `jnp.dot` in the compute dtype, best of several; torch's for reference),
   the denominator of MFU;
2. the whole jitted distillation step (resident teacher forward inside the step, student forward and backward,
   AdamW) from `make_train_step`: trace and compile time, steady-state step time, tokens/s and MFU;
3. the same step written the usual way in PyTorch + transformers (`Qwen2ForCausalLM`, eager, `torch.optim.AdamW`)
   on the same shapes and loss, and the throughput ratio vishwam / torch;
4. peak resident memory per phase;
5. checkpoint load speed of `load_pretrained` (a sharded safetensors export of the `d512` teacher) and its peak
   memory over the loaded bytes;
6. compile time of the step for a 4-layer vs a 32-layer student (the layer scan should keep it flat).

`--size gpu` is the accelerator size (a Qwen2.5-0.5B-shaped student under a Qwen2.5-1.5B-shaped teacher, meant for
`--dtype bfloat16` on one 80 GB GPU): torch runs on CUDA when it is available, its child process runs *before* JAX
starts (XLA preallocates most of the GPU's memory when its backend starts), device peak memory is reported for
both frameworks, and phases 5 and 6 are skipped (`--skip-load`, `--skip-depth` do that for any size).

Step times are the median over `--steps` timed steps after warm-up, each ended by `jax.block_until_ready`. See
`docs/benchmarks.md` for the method and figures. Nothing here changes JAX's global configuration.

The modules, one concern each:

- `sizes`: `BenchSize`, `SIZES`, `resolve_size`, the objective (`PARAMS`) and optimizer both frameworks run,
  `random_batch`;
- `measure`: `PhaseMemory` (peak RSS per phase), the matmul rates and peaks (JAX and torch), device memory,
  `build_and_time` and `time_runner` (a runner built, warmed up and timed);
- `jax_runner`: the vishwam step (`build_jax_step`, `compile_step`, `JaxRunner`, `time_jax`);
- `torch_runner`: the PyTorch + transformers step (`TorchRunner`) and its child process (`run_torch` starts it,
  `torch_worker` is what it runs);
- `load_depth`: the checkpoint-load and compile-vs-depth phases and their rows;
- `report`: `Row`, the machine, the rows of the peaks, each size's step and memory, and the markdown table;
- `cli`: the command line (`parse_args`, `main`) and one size's run (`bench_size`).

Imports `models`, `distill`, `vishwam` and `benchmarks.common`; torch only inside `torch_runner`'s functions and
`measure`'s torch rates, so that only the torch child process imports it. This `__init__` imports nothing, so that
the child stays as light as the module it needs.
"""
