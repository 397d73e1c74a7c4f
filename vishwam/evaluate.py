"""Score lm-evaluation-harness tasks with any supported checkpoint: `python -m vishwam.evaluate --model DIR --tasks T`.

    python -m vishwam.evaluate --model DIR --tasks arc_easy,hellaswag [--include-path DIR] [--num-fewshot K]
        [--limit N | --samples JSON] [--batch-size B] [--seq-len S] [--max-length L] [--dtype bfloat16] [--fsdp N | --tensor N]
        [--fewshot-seed S] [--log-samples] --out results.json

lm-eval (the `[eval]` extra) builds the tasks' requests as its own command line does (`lm_eval.simple_evaluate`:
prompts, few-shot examples drawn with `--fewshot-seed`, target delimiter, metrics, the first `--limit` documents);
vishwam scores them (`vishwam.downstream`): requests packed into `[batch-size, seq-len]` rows, one jitted program
over the mesh. The results are lm-eval's: its table on stdout, and `--out` in its own JSON layout
(`results.<task>.<metric>,<filter>`, `configs`, `versions`, `n-shot`, ...), so tools that read `lm_eval`'s files
read this one; `--log-samples` writes each task's per-request records beside it (`<out stem>_samples_<task>.jsonl`,
lm-eval's `--log_samples` records). With the same `--max-length` the numbers are lm-eval `hf` backend's.
A bad task, task file, data file or flag is one line and exit status 2; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Literal

import jax.numpy as jnp

from vishwam.config.cli import parse_flags, run_main
from vishwam.downstream.harness import harness_lm
from vishwam.downstream.scoring import Scorer
from vishwam.downstream.tasks import FEWSHOT_SEED, load_tasks, output_types, require_lm_eval
from vishwam.downstream.tokens import HarnessTokenizer
from vishwam.errors import ConfigError
from vishwam.generation.sampler import checkpoint_eos_ids
from vishwam.io.checkpoint import load_pretrained, open_pretrained, resolve_checkpoint_dir
from vishwam.io.files import atomic_write
from vishwam.sharding import batch_shards, make_mesh

#: lm-eval's context length when neither the checkpoint nor its tokenizer gives one (`DEFAULT_MAX_LENGTH`).
DEFAULT_MAX_LENGTH = 2048
#: A tokenizer's `model_max_length` that means "unset" (transformers' `VERY_LARGE_INTEGER`).
TOKENIZER_INFINITY = int(1e30)


@dataclasses.dataclass(frozen=True)
class EvaluateFlags:
    """Score lm-eval tasks with a checkpoint; results in lm-eval's layout."""

    model: str
    """An HF checkpoint directory (config.json, safetensors, tokenizer.json) or hub id."""
    tasks: str
    """Comma-separated lm-eval task, group or tag names (registered, or YAML files under --include-path)."""
    include_path: str | None = None
    """A directory of lm-eval task YAML files (local data: dataset_path json, dataset_kwargs.data_files)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (default: each task's own, else 0)."""
    limit: int | None = None
    """Score only the first N documents of each task (lm-eval's --limit)."""
    samples: str | None = None
    """Score only these documents: a JSON object (or a .json file holding one) of task -> document indices, as
    lm-eval's --samples (a run's `training.downstream.limit` subset is in its downstream.jsonl)."""
    batch_size: int = 8
    """Rows per program call: each row of --seq-len tokens holds as many requests as fit."""
    seq_len: int | None = None
    """Tokens per row (default: the longest request's length rounded up to 64). Requests longer than this are
    truncated to it, as lm-eval truncates at max_length."""
    max_length: int | None = None
    """lm-eval's max_length: requests are left-truncated to it and documents scored in windows of it (default: the
    checkpoint's context as lm-eval reads it: max_position_embeddings, else the tokenizer's model_max_length, else
    2048)."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Compute dtype (default: as stored)."""
    fsdp: int = 1
    tensor: int = 1
    fewshot_seed: int = FEWSHOT_SEED
    """Seed of the few-shot draws (lm-eval's --fewshot_random_seed)."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for the stderr of metrics without a closed form (0: none), as lm-eval."""
    log_samples: bool = False
    """Also write each task's per-request records (lm-eval's --log_samples) beside --out."""
    tokenizer: str | None = None
    """A tokenizer.json (or its directory) when the checkpoint has none."""
    out: str | None = None
    """Write the results here (JSON, lm-eval's layout)."""


def context_length(directory: Path, config) -> int:
    """The checkpoint's context as lm-eval's `hf` backend reads it (`resolve_max_length`): `n_positions`,
    `max_position_embeddings` or `n_ctx` of its config (its `text_config` first), else the tokenizer's
    `model_max_length`, else 2048."""
    raw = json.loads((directory / "config.json").read_text())
    raw = raw.get("text_config") or raw
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if raw.get(key) is not None:
            return int(raw[key])
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(value, (int, float)) and value < TOKENIZER_INFINITY:
            return int(value)
    return int(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)


def _samples(value: str, tasks: dict) -> dict[str, list[int]]:
    """`--samples`: task -> document indices, inline JSON or a file, every index within its task's documents."""
    try:
        text = Path(value).read_text() if value.endswith(".json") else value
        chosen = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--samples {value[:80]}: not a JSON object of task -> indices ({error})") from None
    if not isinstance(chosen, dict):
        raise ConfigError(f"--samples {value[:80]}: not a JSON object of task -> indices")
    for task, indices in chosen.items():
        if task not in tasks:
            raise ConfigError(f"--samples names task '{task}', which --tasks does not")
        n = len(tasks[task].eval_docs)
        if not isinstance(indices, list) or not indices or not all(isinstance(i, int) and 0 <= i < n for i in indices):
            raise ConfigError(f"--samples: task '{task}' needs a list of document indices in [0, {n})")
    return chosen


def _check(flags: EvaluateFlags) -> list[str]:
    names = [t.strip() for t in flags.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    for flag, value, low in (("--limit", flags.limit, 1), ("--batch-size", flags.batch_size, 1),
                             ("--seq-len", flags.seq_len, 2), ("--max-length", flags.max_length, 2),
                             ("--num-fewshot", flags.num_fewshot, 0), ("--bootstrap-iters", flags.bootstrap_iters, 0),
                             ("--fsdp", flags.fsdp, 1), ("--tensor", flags.tensor, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if flags.limit is not None and flags.samples is not None:
        raise ConfigError("give at most one of --limit and --samples")
    if flags.out is not None and Path(flags.out).is_dir():
        raise ConfigError(f"--out {flags.out} is a directory; name a .json file")
    if flags.out is not None and not Path(flags.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {flags.out}: its directory does not exist")
    return names


def main(argv: list[str]) -> int:
    flags = parse_flags(EvaluateFlags, argv, __doc__.splitlines()[0])
    names = _check(flags)
    lm_eval = require_lm_eval()
    directory = resolve_checkpoint_dir(flags.model)
    config = open_pretrained(directory).config
    eos = checkpoint_eos_ids(directory, config)
    tokenizer = HarnessTokenizer(flags.tokenizer or directory, fallback_eos=eos[0] if eos else None)
    loaded, top, manager = load_tasks(names, include_path=flags.include_path)  # every task checked before loading
    samples = None if flags.samples is None else _samples(flags.samples, loaded["tasks"])
    types = output_types(loaded["tasks"])
    mesh = make_mesh(fsdp=flags.fsdp, tensor=flags.tensor) if flags.fsdp * flags.tensor > 1 else None
    if mesh is not None and flags.batch_size % batch_shards(mesh):
        raise ConfigError(f"--batch-size {flags.batch_size} must divide over --fsdp {flags.fsdp}")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[flags.dtype]
    model = load_pretrained(directory, dtype=dtype, mesh=mesh)
    compute_dtype = dtype or model.model.embed_tokens.weight.dtype
    max_length = flags.max_length or context_length(directory, config)
    if flags.seq_len is not None and flags.seq_len < max_length:
        print(f"rows of --seq-len {flags.seq_len} tokens: requests are truncated to it (max_length {max_length})",
              file=sys.stderr)
        max_length = flags.seq_len
    scorer = Scorer(rows=flags.batch_size, seq_len=flags.seq_len, compute_dtype=compute_dtype, mesh=mesh,
                    vocab_size=config.vocab_size, progress=True)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    lm = harness_lm(model, tokenizer, scorer, max_length=max_length, compute_dtype=compute_dtype, eos_ids=eos,
                    name=str(directory), generate_batch=flags.batch_size, log=log)
    start = time.perf_counter()
    results = lm_eval.evaluator.simple_evaluate(
        model=lm, tasks=top, task_manager=manager, num_fewshot=flags.num_fewshot, limit=flags.limit, samples=samples,
        bootstrap_iters=flags.bootstrap_iters, log_samples=flags.log_samples, fewshot_random_seed=flags.fewshot_seed,
        torch_random_seed=None)  # torch is lm-eval's hf backend's, never imported here
    seconds = time.perf_counter() - start
    samples = results.pop("samples", None) or {}
    results["config"].update({"model": "vishwam", "model_args": f"pretrained={directory}", "batch_size": flags.batch_size,
                              "max_length": max_length, "seq_len": flags.seq_len, "fewshot_seed": flags.fewshot_seed,
                              "eot_token_id": tokenizer.eot, "prefix_token_id": tokenizer.prefix})
    table = lm_eval.utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_eval.utils.make_table(results, "groups")
    print(table)
    requests = sum(n["effective"] for n in results.get("n-samples", {}).values())
    print(f"{len(types)} tasks ({', '.join(sorted(set(types.values())))}), {requests} documents in {seconds:.1f} s "
          f"(compilation included)", file=sys.stderr)
    if flags.out is not None:
        write_results(Path(flags.out), results, samples, lm_eval.utils)
    return 0


def write_results(out: Path, results: dict, samples: dict, utils) -> None:
    """`results` at `out` as lm-eval writes its results file (with each task's samples hash when there are
    samples), and each task's samples beside it in lm-eval's samples format (`save_results_samples`: arguments as
    `gen_args_i.arg_j`, responses as strings)."""
    if samples:
        results["task_hashes"] = {task: utils.hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                                                  for s in rows)) for task, rows in samples.items()}
    for task, rows in samples.items():
        lines = []
        for row in rows:
            row = dict(row, arguments={f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)}
                                       for i, args in enumerate(row["arguments"])},
                       resps=utils.sanitize_list(row["resps"]), filtered_resps=utils.sanitize_list(row["filtered_resps"]),
                       target=str(row["target"]))
            lines.append(json.dumps(row, default=utils.handle_non_serializable, ensure_ascii=False) + "\n")
        atomic_write(out.with_name(f"{out.stem}_samples_{task}.jsonl"), "".join(lines))
    atomic_write(out, json.dumps(results, indent=2, default=utils.handle_non_serializable, ensure_ascii=False) + "\n")
    print(f"wrote {out}" + (f" and {len(samples)} samples files beside it" if samples else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main))
