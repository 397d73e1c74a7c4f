"""Generate text with any supported checkpoint: `python -m vishwam.generate --model DIR --prompt TEXT`.

    python -m vishwam.generate --model DIR (--prompt TEXT | --prompts FILE.jsonl) [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--batch-size B] [--dtype bfloat16]
        [--fsdp N] [--tensor N] [--out FILE.jsonl]

Prompts are tokenized with the checkpoint's own `tokenizer.json` (special tokens as the tokenizer adds them, as
`tokenizer(text)` does in transformers), generated in batches of similar length (`vishwam.generation.sampler`), and
written as `{"prompt", "completion", "text"}` rows in input order (`text` is the prompt followed by the
completion, so the file is a `data.train` dataset: run on the teacher, this is sequence-level distillation).
A row ends at the checkpoint's EOS ids (`generation_config.json`, else `config.json`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import jinja2
import numpy as np
from tqdm import tqdm

from vishwam.config.cli import parse_flags, run_main
from vishwam.data.chat import find_template
from vishwam.data.text import load_tokenizer, read_prompts
from vishwam.errors import ConfigError, DataError
from vishwam.generation.sampler import check_generation, checkpoint_eos_ids, generate, left_pad, until_eos
from vishwam.io.checkpoint import LazyCheckpoint, open_pretrained, resolve_checkpoint_dir
from vishwam.io.files import atomic_write, require_directory
from vishwam.plan.capacity import device_capacity
from vishwam.sharding import make_mesh


@dataclasses.dataclass(frozen=True)
class GenerateFlags:
    """Continue prompts with a checkpoint's greedy or sampled completions."""

    model: str
    """An HF checkpoint directory (config.json, safetensors, tokenizer.json)."""
    prompt: str | None = None
    """One prompt."""
    prompts: str | None = None
    """A .jsonl file with a string field `prompt` (or `text`) per line."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 is greedy."""
    top_k: int = 0
    """Keep the k most probable tokens when sampling (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    seed: int = 0
    batch_size: int = 8
    """Prompts per generate call."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Compute dtype (default: as stored)."""
    fsdp: int = 1
    tensor: int = 1
    chat: bool = False
    """Each prompt is a user turn, rendered with the checkpoint's chat template for the assistant's answer; the
    rows then carry `messages` (the user turn and the answer) instead of `text`."""
    out: str | None = None
    """Write the rows here (.jsonl) instead of printing them."""


def _prompts(flags: GenerateFlags) -> list[str]:
    if (flags.prompt is None) == (flags.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
    return [flags.prompt] if flags.prompt is not None else read_prompts(flags.prompts)


def _check_lengths(flags: GenerateFlags, lazy: LazyCheckpoint, encoded: list[list[int]], mesh) -> None:
    """`--max-new-tokens` after the longest prompt within the model's positions, and its batches' KV cache beside
    the weights within a device (`vishwam.generation.sampler.check_generation`), before any weight is read."""
    c = lazy.config
    if flags.dtype is not None:
        itemsize = jnp.dtype(flags.dtype).itemsize
    else:  # as stored
        itemsize = max(1, round(lazy.nbytes() / c.num_parameters()))
    devices = 1 if mesh is None else mesh.size
    rows = flags.batch_size if len(encoded) > flags.batch_size else len(encoded)  # every batch filled to the size
    check_generation({"model": (c, itemsize)}, rows=rows, prompt_len=max(map(len, encoded)),
                     max_new_tokens=flags.max_new_tokens, mesh=mesh, capacity=device_capacity(devices)[0],
                     resident_bytes=c.num_parameters() * itemsize // devices, what="--max-new-tokens")


def main(argv: list[str]) -> int:
    flags = parse_flags(GenerateFlags, argv, __doc__.splitlines()[0])
    if flags.max_new_tokens < 1 or flags.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    if flags.fsdp < 1 or flags.tensor < 1:
        raise ConfigError(f"--fsdp and --tensor must be >= 1 (mesh axis sizes), got {flags.fsdp} and {flags.tensor}")
    if flags.temperature < 0 or flags.top_k < 0 or not 0 < flags.top_p <= 1:
        raise ConfigError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    prompts = _prompts(flags)
    if flags.out is not None and Path(flags.out).is_dir():
        raise ConfigError(f"--out {flags.out} is a directory; name a .jsonl file")
    if flags.out is not None:  # before generating: a file where the folder of --out should be
        require_directory(Path(flags.out).parent, f"the folder of --out {flags.out}")

    directory = resolve_checkpoint_dir(flags.model)
    tokenizer = load_tokenizer(str(directory))
    mesh = make_mesh(fsdp=flags.fsdp, tensor=flags.tensor) if flags.fsdp * flags.tensor > 1 else None
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[flags.dtype]
    lazy = open_pretrained(directory)  # config, index and shard headers: no weight is read before the checks
    eos = checkpoint_eos_ids(directory, lazy.config)
    pad = lazy.config.pad_token_id if lazy.config.pad_token_id is not None else (eos[0] if eos else 0)
    if flags.chat:  # each prompt a user turn, rendered for the assistant's answer as apply_chat_template does
        template = find_template(None, directory)
        if template is None:
            raise ConfigError(f"--chat: {directory} has no chat template (chat_template.jinja, or chat_template in "
                              "tokenizer_config.json)")
        rendered = []
        for i, p in enumerate(prompts):
            try:
                rendered.append(template.render([{"role": "user", "content": p}], add_generation_prompt=True))
            except jinja2.TemplateError as error:  # raise_exception, the sandbox's SecurityError, 1 // 0, ...
                message = " ".join(str(error).split()) or type(error).__name__
                raise DataError(f"--chat: the chat template {template.source} fails to render prompt {i}: "
                                f"{message}") from None
        encoded = [e.ids for e in tokenizer.encode_batch(rendered, add_special_tokens=False)]
    else:
        encoded = [e.ids for e in tokenizer.encode_batch(prompts)]
    if not all(encoded):
        raise DataError(f"prompt {next(i for i, e in enumerate(encoded) if not e)} tokenizes to no tokens")
    _check_lengths(flags, lazy, encoded, mesh)
    try:
        model = lazy.load(dtype=dtype, mesh=mesh)
    finally:
        lazy.close()
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # batches of similar length
    completions: dict[int, str] = {}
    key = jax.random.key(flags.seed)
    bar = tqdm(total=len(prompts), unit="rows", desc="generate", file=sys.stderr, disable=None)
    new_tokens, start = 0, time.perf_counter()
    for first in range(0, len(order), flags.batch_size):
        rows = order[first:first + flags.batch_size]
        rows = rows + rows[-1:] * (flags.batch_size - len(rows)) if len(order) > flags.batch_size else rows
        ids, mask = left_pad([encoded[i] for i in rows])
        width = ids.shape[1]
        out = np.asarray(generate(model, ids, mask, max_new_tokens=flags.max_new_tokens,
                                  temperature=flags.temperature, top_k=flags.top_k, top_p=flags.top_p,
                                  eos_token_id=eos, pad_token_id=pad, key=jax.random.fold_in(key, first)))
        for r, i in enumerate(rows):
            if i in completions:
                continue  # a repeated row filling the last batch
            new, ended = until_eos(out[r, width:].tolist(), eos)
            new_tokens += len(new) + ended
            completions[i] = tokenizer.decode(new, skip_special_tokens=True)
            bar.update(1)
        bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} tokens/s")
    bar.close()
    seconds = time.perf_counter() - start
    print(f"generated {len(prompts)} rows, {new_tokens} tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} "
          "tokens/s, compilation included)", file=sys.stderr)
    def row(i: int, p: str) -> dict:
        if flags.chat:  # a chat row as it is (sequence-level KD on chat data)
            return {"prompt": p, "completion": completions[i],
                    "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": completions[i]}]}
        return {"prompt": p, "completion": completions[i], "text": p + completions[i]}

    lines = [json.dumps(row(i, p), ensure_ascii=False) for i, p in enumerate(prompts)]
    if flags.out is None:
        print("\n".join(lines))
    else:
        atomic_write(flags.out, "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} rows to {flags.out}", file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """`vishwam.generate` names both this command and the function: calling the module calls the function, so
    `vishwam.generate(model, ...)` works whether or not this module was imported first."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(run_main(main))
