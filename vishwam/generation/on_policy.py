"""On-policy distillation (GKD): the student completes prompts of the chat data; the teacher scores them in the step.

With `distillation_params.on_policy.fraction` = λ > 0, each micro-batch of `b` rows ends in `m = round(λ·b)`
on-policy rows (`Objective.on_policy_rows`). Every `on_policy.every` steps, `OnPolicy.sample` draws the
prompts of those rows from the training data (`prompts_of`: each packed row's tokens before its last run of
target tokens, i.e. the conversation up to its last assistant turn's content), and the current student
continues them with `vishwam.generation.sampler.generate` (sampled at `on_policy.temperature` / `top_p`, up to
`max_new_tokens`, ending at the teacher's EOS ids). A row is then the prompt followed by the completion (its
EOS included), with the loss on the completion's tokens; `merge` puts those rows at the end of each
micro-batch of the data batch, whose other rows are the data's windows as without on-policy distillation.

Exact resume: the prompts of step `s` are a function of `(seed, s)` (every prompt once per epoch, in a fresh
order each epoch) and the sampling key is the run's key folded with `s` and `ROLLOUT`; the completions in use
are part of the train state (`TrainState.rollout`), so a run resumed between two samplings continues with the
ones it had.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from distill.config import OnPolicyConfig
from distill.objective import Objective
from models import CausalLM, cast_floating
from vishwam.config.sections import TrainingConfig
from vishwam.data.windows import PackedDataset, epoch_order
from vishwam.errors import ConfigError
from vishwam.generation.sampler import generate, left_pad

#: Folded into a step's key (`TrainState.rng(step)`, which EPLB re-mapping uses as it is) for its sampling.
ROLLOUT = 1


class Rollout(eqx.Module):
    """The on-policy rows in use, part of the train state: `tokens` `[rows, seq_len + 1]` (prompt, completion,
    then 0s), each row's `prompt_len` and `length` (prompt + completion tokens)."""

    tokens: Int[Array, "rows window"]
    prompt_len: Int[Array, " rows"]
    length: Int[Array, " rows"]

    @classmethod
    def empty(cls, rows: int, seq_len: int) -> "Rollout":
        zeros = jnp.zeros((rows,), jnp.int32)
        return cls(jnp.zeros((rows, seq_len + 1), jnp.int32), zeros, zeros)


def prompt_answers(dataset: PackedDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each packed row's `(prompt, answer)`: its last run of target tokens (for a conversation, its last
    assistant turn's content and end token) and every token before it (that turn's header included). Rows of
    `dataset` are its windows' segments; `dataset` must be packed from rows (`PackedDataset.of_rows`)."""
    if not dataset.packed:
        raise ValueError("prompt_answers needs rows packed with segment ids (chat data)")
    pairs = []
    for start in range(0, dataset.num_windows, 1024):  # a chunk of windows in memory at a time
        pairs.extend(_window_prompt_answers(*dataset.read(np.arange(start, min(start + 1024, dataset.num_windows)))))
    return pairs


def _window_prompt_answers(windows, segment_ids, targets) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for ids, segments, targets in zip(windows, segment_ids, targets):
        for s in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == s)
            t = targets[where]
            starts = np.flatnonzero(t & ~np.concatenate([[False], t[:-1]]))
            if len(starts) and starts[-1] > 0:
                last = starts[-1]
                run = last + np.argmin(np.append(t[last:], False))  # the end of the last run
                pairs.append((ids[where[:last]].astype(np.int32), ids[where[last:run]].astype(np.int32)))
    return pairs


def prompts_of(dataset: PackedDataset) -> list[np.ndarray]:
    """Each packed row's prompt (see `prompt_answers`)."""
    return [prompt for prompt, _ in prompt_answers(dataset)]


def step_prompts(count: int, *, seed: int, step: int, rows: int) -> np.ndarray:
    """The prompt indices of a step's `rows` on-policy rows: every one of `count` prompts once per epoch, in the
    order `np.random.default_rng([seed, epoch, ROLLOUT])` gives (`vishwam.data.text.epoch_order`, as `batch_for_step`
    visits windows)."""
    return epoch_order(step, rows, count,
                       lambda epoch: np.random.default_rng([seed, epoch, ROLLOUT]).permutation(count))


def step_rows(objective: Objective, training: TrainingConfig) -> int:
    """On-policy rows per step: `objective.on_policy_rows` in each of the step's micro-batches."""
    return objective.on_policy_rows * training.grad_accum_steps


def initial_rollout(objective: Objective, training: TrainingConfig) -> "Rollout | None":
    """The train state's `rollout` before the first sampling (None without on-policy distillation)."""
    return Rollout.empty(step_rows(objective, training), training.seq_len) if objective.on_policy_rows else None


def rollout_rows(prompts: Sequence[np.ndarray], generated: np.ndarray, eos: Sequence[int], seq_len: int
                 ) -> dict[str, np.ndarray]:
    """Prompts and the tokens generated after them (`[rows, max_new_tokens]`) as `Rollout` fields (host arrays):
    each completion runs to its first EOS id, which it keeps, or to its end; rows longer than `seq_len + 1`
    tokens are cut there."""
    rows = len(prompts)
    tokens = np.zeros((rows, seq_len + 1), np.int32)
    prompt_len, length = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for r, (prompt, new) in enumerate(zip(prompts, generated)):
        ends = np.flatnonzero(np.isin(new, np.asarray(list(eos), np.int64))) if len(eos) else []
        completion = new[: ends[0] + 1] if len(ends) else new
        row = np.concatenate([prompt, completion])[: seq_len + 1]
        tokens[r, : len(row)] = row
        prompt_len[r], length[r] = min(len(prompt), len(row)), len(row)
    return {"tokens": tokens, "prompt_len": prompt_len, "length": length}


def rollout_batch(rollout: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """The on-policy rows as batch rows: `input_ids`/`labels` (the row and its shift), `mask` and `segment_ids`
    (1 at the row's tokens), and `loss_mask` (1 where the label is a completion token)."""
    tokens, prompt_len, length = (np.asarray(rollout[k]) for k in ("tokens", "prompt_len", "length"))
    pos = np.arange(seq_len)[None, :]
    real = pos < length[:, None]
    target = (pos >= prompt_len[:, None] - 1) & (pos < length[:, None] - 1)
    return {"input_ids": np.ascontiguousarray(tokens[:, :-1]), "labels": np.ascontiguousarray(tokens[:, 1:]),
            "mask": real.astype(np.int32), "segment_ids": real.astype(np.int32), "loss_mask": target.astype(np.int32)}


def merge(data: dict[str, np.ndarray], on_policy: dict[str, np.ndarray], micro_batches: int) -> dict[str, np.ndarray]:
    """The data rows and the on-policy rows as one batch: each of the `micro_batches` micro-batches is its share
    of the data rows followed by its share of the on-policy rows (the layout `distill_loss` expects)."""
    def join(a, b):
        a = a.reshape(micro_batches, -1, *a.shape[1:])
        b = b.reshape(micro_batches, -1, *b.shape[1:])
        return np.concatenate([a, b], axis=1).reshape(-1, *a.shape[2:])

    return {k: join(data[k], on_policy[k]) for k in on_policy}


def usable_prompts(dataset: PackedDataset, params: OnPolicyConfig, *, log: Callable[[str], None]) -> list[np.ndarray]:
    """The prompts of `dataset` (`prompts_of`) that leave room for `max_new_tokens` in a window of
    `seq_len + 1` tokens; a `ConfigError` when none does."""
    prompts = prompts_of(dataset)
    longest = dataset.seq_len + 1 - params.max_new_tokens
    usable = [p for p in prompts if len(p) <= longest]
    if not usable:
        raise ConfigError(f"config key 'distillation_params.on_policy.max_new_tokens' ({params.max_new_tokens}) "
                          f"leaves no room in training.seq_len + 1 = {dataset.seq_len + 1} tokens for any of the "
                          f"{len(prompts)} prompts of {dataset.name} (the shortest has {min(map(len, prompts))})")
    log(f"on-policy: {len(usable)} prompts" + (f" ({len(prompts) - len(usable)} longer than seq_len + 1 - "
                                               f"max_new_tokens = {longest} tokens left out)"
                                               if len(usable) < len(prompts) else ""))
    return usable


class OnPolicy:
    """A run's on-policy sampler: its prompts (`usable_prompts`) and settings; `sample` writes a step's
    completions."""

    def __init__(self, params: OnPolicyConfig, prompts: list[np.ndarray], *, rows: int, seq_len: int, seed: int,
                 eos: Sequence[int], pad: int, compute_dtype):
        self.prompts = prompts
        self.params, self.rows, self.seq_len, self.seed = params, rows, seq_len, seed
        self.eos, self.pad, self.compute_dtype = list(eos), pad, compute_dtype
        self.seconds, self.tokens = 0.0, 0  # generation time and tokens since `metrics` was last read

    def due(self, step: int) -> bool:
        return step % self.params.every == 0

    def sample(self, student: CausalLM, key, step: int) -> dict[str, np.ndarray]:
        """Step `step`'s on-policy rows (`Rollout` fields, host arrays), sampled from `student` with
        `fold_in(key, ROLLOUT)` (`key`: the step's key, `TrainState.rng(step)`)."""
        t0 = time.perf_counter()
        chosen = [self.prompts[i] for i in step_prompts(len(self.prompts), seed=self.seed, step=step,
                                                        rows=self.rows)]
        ids, mask = left_pad(chosen)
        p = self.params
        out = generate(cast_floating(student, self.compute_dtype), ids, mask, max_new_tokens=p.max_new_tokens,
                       temperature=p.temperature, top_p=p.top_p, eos_token_id=self.eos or None,
                       pad_token_id=self.pad, key=jax.random.fold_in(key, ROLLOUT))
        rows = rollout_rows(chosen, np.asarray(out)[:, ids.shape[1]:], self.eos, self.seq_len)
        self.seconds += time.perf_counter() - t0
        self.tokens += int((rows["length"] - rows["prompt_len"]).sum())
        return rows

    def metrics(self, rollout: dict[str, np.ndarray], *, seconds: float, batch_size: int) -> dict[str, float]:
        """The logged on-policy figures since the last call (the generation counters then reset): the on-policy
        share of the batch's rows, the rows' mean completion length, generation tokens/s and generation's share
        of the `seconds` of wall time."""
        gen_seconds, tokens = self.seconds, self.tokens
        self.seconds, self.tokens = 0.0, 0
        return {"on_policy/fraction": self.rows / batch_size,
                "on_policy/completion_len": float(np.mean(rollout["length"] - rollout["prompt_len"])),
                "on_policy/gen_tokens_per_sec": tokens / gen_seconds if gen_seconds > 0 else 0.0,
                "on_policy/gen_time_share": gen_seconds / seconds if seconds > 0 else 0.0}


def host_rollout(rollout: Rollout) -> dict[str, np.ndarray]:
    """The train state's `Rollout` as host arrays (a resumed run's rows in use)."""
    return {k: np.asarray(jax.device_get(getattr(rollout, k))) for k in ("tokens", "prompt_len", "length")}


def place_rollout(rows: dict[str, np.ndarray], shardings: Rollout) -> Rollout:
    """Host rollout fields as the train state's `Rollout`, placed by its shardings (every process holds the same
    rows: generation gathers them)."""
    return jax.tree.map(lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx]),
                        Rollout(**rows), shardings)


__all__ = ["ROLLOUT", "OnPolicy", "Rollout", "host_rollout", "initial_rollout", "merge", "place_rollout",
           "prompt_answers", "prompts_of", "rollout_batch", "rollout_rows", "step_prompts", "step_rows",
           "usable_prompts"]
