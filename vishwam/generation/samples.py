"""Samples at evaluation: what the student writes, next to what the teacher writes, as training goes.

With `training.sample_prompts` (and/or `training.sample_prompts_file`) set, every evaluation generates the
student's greedy continuation of each prompt (`vishwam.generation.sampler.generate`, on the run's mesh, in the compute
dtype), and the teacher's once per run when it is resident (a streamed or cached teacher cannot generate: its
column is null). Rows `{"step", "prompt", "student", "teacher"}` are appended to `output_dir/samples.jsonl`
(process 0; on resume the rows after the checkpoint are dropped, as in `metrics.jsonl`) and tracked in Aim as
text. The prompts are read and tokenized before the run writes anything, so a bad prompts file stops it at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from models import CausalLM, cast_floating
from vishwam.config.sections import RunConfig
from vishwam.data.text import load_tokenizer, read_prompts
from vishwam.errors import ConfigError, DataError
from vishwam.generation.sampler import generate, left_pad, until_eos
from vishwam.tracking import truncate_jsonl


class Samples:
    """The sample prompts of a run, tokenized and left-padded, and where their continuations go."""

    def __init__(self, cfg: RunConfig, tokenizer_path: str | None, out: Path, *, vocab_size: int,
                 eos: list[int], pad: int, teacher: dict | None = None):
        """`teacher`: the teacher's own `tokenizer_path`, `vocab_size`, `eos` and `pad` when they are not the
        student's (a cross-tokenizer run): its prompts are tokenized and its continuations decoded with them."""
        tr = cfg.training
        self.teacher_side = None if teacher is None else Samples(cfg, out=out, **teacher)
        self.prompts = list(tr.sample_prompts) + (read_prompts(tr.sample_prompts_file) if tr.sample_prompts_file
                                                  else [])
        self.path = out / "samples.jsonl"
        self.max_new_tokens, self.eos, self.pad = tr.sample_max_new_tokens, eos, pad
        self.teacher_text: list[str | None] | None = None
        if not self.prompts:
            return
        if tokenizer_path is None:
            raise ConfigError("config key 'training.sample_prompts' needs a tokenizer: set data.tokenizer (the "
                              "teacher has no tokenizer.json)")
        self.tokenizer = load_tokenizer(tokenizer_path)
        encoded = [e.ids for e in self.tokenizer.encode_batch(self.prompts)]
        for prompt, ids in zip(self.prompts, encoded):
            if not ids or max(ids) >= vocab_size:
                raise DataError(f"sample prompt {prompt[:40]!r} tokenizes to {'no tokens' if not ids else 'ids'}"
                                f"{'' if not ids else f' beyond the vocabulary ({max(ids)} >= {vocab_size})'}")
        self.ids, self.mask = left_pad(encoded)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def truncate(self, resume_step: int) -> None:
        """On resume, drop the rows written after the checkpoint (process 0)."""
        if jax.process_index() == 0:
            truncate_jsonl(self.path, resume_step)

    def _complete(self, model: CausalLM) -> list[str]:
        out = np.asarray(generate(model, self.ids, self.mask, max_new_tokens=self.max_new_tokens,
                                  eos_token_id=self.eos, pad_token_id=self.pad))[:, self.ids.shape[1]:]
        return [self.tokenizer.decode(until_eos(row, self.eos)[0], skip_special_tokens=True) for row in out.tolist()]

    def __call__(self, step: int, student: CausalLM, teacher: CausalLM | None, compute_dtype) -> list[dict]:
        """Generate and record the samples of `step`; returns the rows."""
        if not self.enabled:
            return []
        if self.teacher_text is None:
            self.teacher_text = ((self.teacher_side or self)._complete(teacher) if isinstance(teacher, CausalLM)
                                 else [None] * len(self.prompts))
        student_text = self._complete(cast_floating(student, compute_dtype))
        rows = [{"step": step, "prompt": p, "student": s, "teacher": t}
                for p, s, t in zip(self.prompts, student_text, self.teacher_text)]
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return rows


__all__ = ["Samples"]
