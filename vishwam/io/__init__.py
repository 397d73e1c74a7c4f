"""Files in and out: atomic writes, the safetensors format read slice by slice, and HF checkpoints.

- `files`: `atomic_write` (the one way a file is written) and `sha256_file`.
- `safetensors_io`: the safetensors reader/writer, every byte range checked, bfloat16 included.
- `checkpoint`: HF checkpoints in (`open_pretrained`, `load_pretrained`: lazy, partitioned, straight into sharded
  leaves); `export`: out (`save_pretrained`, and the clean-up of a killed export).

Imports `models`, `vishwam.errors` and `vishwam.sharding` only.
"""
