"""lm-eval's `LM` interface over a vishwam model: lm-eval builds the requests, vishwam scores them.

`harness_lm(model, tokenizer, scorer, ...)` is an `lm_eval.api.model.TemplateLM`, so lm-eval's own code turns
each `(context, continuation)` into token ids (`TemplateLM.loglikelihood`: an empty context conditions on the
prefix token, trailing spaces of the context move to the continuation, the pair is encoded whole and split where
the context's ids end). What it leaves to a backend is done as its `hf` backend does it:

- `tok_encode`: `vishwam.downstream.tokens.HarnessTokenizer.encode`;
- `_loglikelihood_tokens`: each request left-truncated to `max_length + 1` tokens, its last one dropped
  (`ScoredRequest`), scored by the packed program (`vishwam.downstream.scoring.Scorer`); truncations are counted
  per task and logged;
- `loglikelihood_rolling`: a document in windows of `max_length` predictions, each with as much context as fits,
  their log-probabilities summed;
- `generate_until`: the prompts left-truncated to `max_length - max_gen_toks` tokens and continued by
  `vishwam.generation.sampler.generate` (greedy unless the task samples), cut at the first stop string.

Every process makes the same calls (rank 0 of a world of 1 to lm-eval: the program itself spans the processes).
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Callable, Sequence

import jax

from models import CausalLM, cast_floating
from models.pytree import count_parameters
from vishwam.downstream.scoring import Scorer
from vishwam.downstream.tasks import require_lm_eval
from vishwam.downstream.tokens import HarnessTokenizer, ScoredRequest, rolling_windows
from vishwam.generation.sampler import generate, left_pad, until_eos

#: lm-eval's default `max_gen_toks` (`HFLM.max_gen_toks`).
MAX_GEN_TOKS = 256


@functools.cache
def _lm_class():
    """The adapter class, defined once lm-eval (an optional extra) is imported."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM  # optional extra: imported where used

    class VishwamLM(TemplateLM):
        """lm-eval's view of a vishwam model (see `vishwam.downstream.harness`)."""

        backend = "causal"

        def __init__(self, model: CausalLM, tokenizer: HarnessTokenizer, scorer: Scorer, *, max_length: int,
                     compute_dtype, eos_ids: Sequence[int], name: str, generate_batch: int,
                     log: Callable[[str], None] | None, progress: bool):
            super().__init__()
            self.model, self.tok, self.scorer = model, tokenizer, scorer
            self._max_length, self.compute_dtype, self.name = max_length, compute_dtype, name
            self.eos_ids = list(eos_ids) or [tokenizer.eot]
            self.generate_batch, self.log, self.progress = generate_batch, log, progress
            self.tokenizer = None  # lm-eval reads transformers' tokenizer attributes from it: there is none
            self._tasks: list[str] | None = None
            self.truncated: collections.Counter[str] = collections.Counter()

        @property
        def eot_token_id(self) -> int:
            return self.tok.eot

        @property
        def prefix_token_id(self) -> int:
            return self.tok.prefix

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return self.name

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tok.encode(string, add_special_tokens)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._tasks = [getattr(r, "task_name", None) or "?" for r in requests]
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self._tasks = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            scored = [ScoredRequest.of(context, continuation, self._max_length)
                      for _, context, continuation in requests]
            tasks = self._tasks or ["?"] * len(scored)
            cut = collections.Counter(t for t, r in zip(tasks, scored) if r.truncated)
            for task, n in sorted(cut.items()):
                self.truncated[task] += n
                if self.log is not None:
                    self.log(f"downstream: {n} of {tasks.count(task)} requests of task {task} are longer than "
                             f"{self._max_length} tokens: their first tokens are dropped, as lm-eval truncates at "
                             "max_length")
            return self.scorer.score(self.model, scored, desc="loglikelihood")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            owners, scored = [], []
            for i, request in enumerate(requests):
                (text,) = request.args
                for context, continuation in rolling_windows(self.tok.encode(text), self.tok.prefix,
                                                             self._max_length):
                    owners.append(i)
                    scored.append(ScoredRequest.of(context, continuation, self._max_length))
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, self.scorer.score(self.model, scored, desc="rolling")):
                totals[owner] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            groups: dict[str, list[int]] = collections.defaultdict(list)
            for i, request in enumerate(requests):
                groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
            out: list[str] = [""] * len(requests)
            model = cast_floating(self.model, self.compute_dtype)
            for indices in groups.values():
                texts = self._generate(model, [requests[i].args[0] for i in indices], dict(requests[indices[0]].args[1]))
                for i, text in zip(indices, texts):
                    out[i] = text
            return out

        def _generate(self, model: CausalLM, contexts: list[str], kwargs: dict) -> list[str]:
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            eos_text = self.tok.tokenizer.decode([self.tok.eot], skip_special_tokens=False)
            if eos_text not in until:
                until.append(eos_text)
            new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", MAX_GEN_TOKS)))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
            room = self._max_length - new
            if room <= 0:
                raise ValueError(f"max_gen_toks {new} leaves no room for a prompt in max_length {self._max_length}")
            encoded = [self.tok.encode(c)[-room:] for c in contexts]
            order = sorted(range(len(contexts)), key=lambda i: -len(encoded[i]))
            texts: list[str] = [""] * len(contexts)
            key = jax.random.key(0)
            for start in range(0, len(order), self.generate_batch):
                rows = order[start:start + self.generate_batch]
                filled = rows + rows[-1:] * (self.generate_batch - len(rows))  # one batch shape: one program
                ids, mask = left_pad([encoded[i] for i in filled])
                tokens = generate(model, ids, mask, max_new_tokens=new, temperature=temperature,
                                  top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0) or 0),
                                  eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0],
                                  key=jax.random.fold_in(key, start))
                for r, i in enumerate(rows):
                    text = self.tok.decode(until_eos(list(map(int, tokens[r, ids.shape[1]:])), self.eos_ids)[0])
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    texts[i] = text
            return texts

        def get_model_info(self) -> dict:
            dtype = getattr(self.compute_dtype, "__name__", None) or str(self.compute_dtype)
            return {"model_num_parameters": count_parameters(self.model), "model_dtype": dtype,
                    "model_revision": "", "model_sha": ""}

    return VishwamLM


def harness_lm(model: CausalLM, tokenizer: HarnessTokenizer, scorer: Scorer, *, max_length: int, compute_dtype,
               eos_ids: Sequence[int] = (), name: str = "vishwam", generate_batch: int = 8,
               log: Callable[[str], None] | None = None, progress: bool = False):
    """An `lm_eval.api.model.LM` scoring with `model` (see the module docstring).

    **Arguments:**

    - `tokenizer`: the checkpoint's tokenizer and special ids; `scorer`: the scoring program at its shapes.
    - `max_length`: lm-eval's `max_length` (requests are truncated to it, documents windowed by it); at most
      `scorer.seq_len`.
    - `compute_dtype`: the dtype generation runs the model in (scoring: the scorer's).
    - `eos_ids`: the ids a generation ends at (default: the tokenizer's EOS).
    - `generate_batch`: prompts per generation call.
    """
    if scorer.seq_len is not None and max_length > scorer.seq_len:
        raise ValueError(f"max_length {max_length} exceeds the scorer's rows of {scorer.seq_len} tokens")
    return _lm_class()(model, tokenizer, scorer, max_length=max_length, compute_dtype=compute_dtype, eos_ids=eos_ids,
                       name=name, generate_batch=generate_batch, log=log, progress=progress)


__all__ = ["MAX_GEN_TOKS", "harness_lm"]
