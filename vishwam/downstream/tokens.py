"""Requests to token ids as lm-eval's `hf` backend makes them, and the rows of one scored request.

`HarnessTokenizer` is the checkpoint's `tokenizer.json` (the `tokenizers` library, as `vishwam.data` reads it) with
the two ids lm-eval needs beside it, read from `tokenizer_config.json` (or `special_tokens_map.json`) as
transformers' `AutoTokenizer` reads them:

- `eot`: the EOS token (`tokenizer.eos_token_id`), which ends generations and is the stop text lm-eval adds;
- `prefix`: the BOS token, else the EOS token, which conditions a request with an empty context and the first
  window of a document scored whole (`HFLM.prefix_token_id`).

`encode(text)` adds the tokenizer's own special tokens (its post-processor, a BOS for Llama, nothing for Qwen)
unless the text already starts with the prefix token's text, as `HFLM.tok_encode` does.

`ScoredRequest` is one request as the scoring program sees it: lm-eval's `(context ids, continuation ids)`,
left-truncated to `max_length + 1` tokens and its last one dropped (`HFLM._loglikelihood_tokens`), so the input
is at most `max_length` tokens and the last `len(continuation)` positions predict the continuation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vishwam.data.text import load_tokenizer
from vishwam.errors import DataError


def _token_text(value) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string, or an `AddedToken` dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_tokens(directory: Path) -> dict[str, str]:
    """`bos_token` and `eos_token` of `tokenizer_config.json`, else of `special_tokens_map.json`."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read {file}: {error}") from None
        for key in ("bos_token", "eos_token"):
            text = _token_text(config.get(key)) if isinstance(config, dict) else None
            if text is not None:
                found.setdefault(key, text)
    return found


class HarnessTokenizer:
    """A checkpoint's tokenizer with the EOS and prefix ids lm-eval's `hf` backend uses (see the module docstring).

    **Arguments:**

    - `path`: a `tokenizer.json`, or the directory holding it (and `tokenizer_config.json`).
    - `fallback_eos`: the EOS id to use when the tokenizer's config names none (the checkpoint's `eos_token_id`).
    """

    def __init__(self, path: str | os.PathLike[str], *, fallback_eos: int | None = None):
        path = Path(path)
        self.tokenizer = load_tokenizer(str(path))
        directory = path if path.is_dir() else path.parent
        tokens = _special_tokens(directory)
        ids = {}
        for key, text in tokens.items():
            ids[key] = self.tokenizer.token_to_id(text)
            if ids[key] is None:
                raise DataError(f"{directory}: {key} {text!r} of its tokenizer config is not in tokenizer.json")
        eot = ids.get("eos_token", fallback_eos)
        if eot is None:
            raise DataError(f"{directory}: the tokenizer names no eos_token (tokenizer_config.json) and the "
                            "checkpoint no eos_token_id; lm-eval's requests need one")
        self.eot: int = eot
        self.prefix: int = ids.get("bos_token", eot)
        self.prefix_text = self.tokenizer.decode([self.prefix], skip_special_tokens=False)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """`text`'s ids; `None` adds the tokenizer's special tokens unless `text` starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = not text.startswith(self.prefix_text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens, as lm-eval decodes a generation."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class ScoredRequest:
    """One request's row: `tokens` (the input), `targets` (each position's next token) and `scored` (the last
    `scored` positions predict the continuation; the log-probability and the greedy match are over them)."""

    tokens: tuple[int, ...]
    targets: tuple[int, ...]
    scored: int
    truncated: bool = False
    """Whether the request was cut on the left to fit `max_length`."""

    @classmethod
    def of(cls, context: Sequence[int], continuation: Sequence[int], max_length: int) -> ScoredRequest:
        """`context + continuation`, its last `max_length + 1` tokens, as input and next-token targets. A
        continuation longer than the input has only the tokens the input predicts scored (lm-eval's `hf` backend
        asserts instead)."""
        if not continuation:
            raise DataError("a request has an empty continuation: nothing to score")
        whole = list(context) + list(continuation)
        kept = whole[-(max_length + 1):]
        if len(kept) < 2:
            raise DataError("a request has a single token in all: nothing conditions its continuation")
        return cls(tuple(kept[:-1]), tuple(kept[1:]), min(len(continuation), len(kept) - 1),
                   truncated=len(whole) > len(kept))

    def __len__(self) -> int:
        return len(self.tokens)


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """A document scored whole in windows of `max_length` predictions, each with as much context as fits
    (`lm_eval.utils.get_rolling_token_windows` with `context_len=1`, then `make_disjoint_window`): the first
    window is `prefix` then the first tokens; each later one predicts the next `max_length` tokens (fewer at the
    end) after the `max_length` tokens before its last one. **Returns:** `(context, continuation)` pairs whose
    continuations, joined, are `tokens`."""
    tokens = list(tokens)
    windows: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        start = max(end - max_length - 1, 0)
        windows.append((tokens[start:done], tokens[done:end]))
        done = end
    return windows


__all__ = ["HarnessTokenizer", "ScoredRequest", "rolling_windows"]
