"""A token store unit's two streams for a cross-tokenizer run (the shard's arrays `vishwam.data.prepare` writes):
text documents (`vishwam.data.cross.windows.align_documents`) or chat rows (`vishwam.data.cross.chat`), in
batches, both sides' ids checked against their vocabularies.

Imports `numpy`, `tokenizers` and vishwam's data modules.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer

from vishwam.data.chat import ChatTemplate
from vishwam.data.cross.alignment import string_keys, token_bytes
from vishwam.data.cross.chat import align_chat_records
from vishwam.data.cross.windows import align_documents
from vishwam.data.text import check_vocab

_KEYS: dict[tuple, tuple] = {}
BYTE_FILES = ("one", "targets", "ttargets")
"""The shard's files of one byte an item (the rest: uint32)."""


def _keys(student: Tokenizer, teacher: Tokenizer, recipe) -> tuple[np.ndarray, np.ndarray]:
    """Both tokenizers' per-id string keys, made once per pair of tokenizers in a worker."""
    key = (recipe.student_tokenizer_path, recipe.tokenizer_path)
    if key not in _KEYS:
        _KEYS[key] = string_keys(token_bytes(student), token_bytes(teacher))
    return _KEYS[key]


def _check_sides(s: np.ndarray, t: np.ndarray, recipe, path: str) -> None:
    if recipe.student_vocab_size is not None:
        check_vocab(s, recipe.student_vocab_size, f"{path} (tokenized with {recipe.student_tokenizer_path})")
    if recipe.vocab_size is not None:
        check_vocab(t, recipe.vocab_size, f"{path} (tokenized with {recipe.tokenizer_path})")


def _shard(parts: list[dict[str, np.ndarray]], names: tuple[str, ...], docs: int, recipe, path: str) -> dict:
    """The batches' arrays (`parts`, by file name) joined into the shard's, both sides' ids checked against their
    vocabularies; each empty when there were none."""
    if not parts:
        return {name: np.zeros((0,), "u1" if name in BYTE_FILES else "<u4") for name in names}
    out = {name: np.concatenate([part[name] for part in parts]) for name in names}
    _check_sides(out["ids"], out["tids"], recipe, path)
    return {**out, "docs": docs}


def text_streams(batches: Iterable[list[str]], student: Tokenizer, teacher: Tokenizer, recipe,
                 path: str) -> dict[str, np.ndarray]:
    """Documents (in batches) tokenized by both sides and aligned: the shard's arrays, chunk ids from 0.
    `recipe`: a `vishwam.data.prepare.Recipe` of kind `cross`."""
    parts, first, base = [], 0, 0
    for docs in batches:
        s, sc, t, tc, one = align_documents(docs, student, teacher, student_eos=recipe.student_eos_id,
                                            teacher_eos=recipe.eos_id, keys=_keys(student, teacher, recipe),
                                            name=path, first=first)
        parts.append({"ids": s.astype("<u4"), "tids": t.astype("<u4"), "schunk": (sc + base).astype("<u4"),
                      "tchunk": (tc + base).astype("<u4"), "one": one.astype("u1")})
        first, base = first + len(docs), base + len(one)
    return _shard(parts, ("ids", "tids", "schunk", "tchunk", "one"), first, recipe, path)


def chat_streams(batches: Iterable[list[tuple[str, object]]], student: Tokenizer, teacher: Tokenizer, recipe,
                 path: str) -> dict[str, np.ndarray]:
    """Chat rows `(where, record)` (in batches) rendered by each side's template and aligned on their contents:
    the shard's arrays, with each side's targets (`targets`, `ttargets`) and a flag byte per chunk (`one`)."""
    templates = [None if t is None else ChatTemplate(*t) for t in (recipe.student_template, recipe.template)]
    parts, rows, base = [], 0, 0
    for batch in batches:
        s, sc, st, t, tc, tt, flags = align_chat_records(
            batch, student, teacher, student_template=templates[0], teacher_template=templates[1],
            loss_on=recipe.loss_on, student_eos=recipe.student_eos_id, teacher_eos=recipe.eos_id,
            keys=_keys(student, teacher, recipe))
        parts.append({"ids": s.astype("<u4"), "tids": t.astype("<u4"), "schunk": (sc + base).astype("<u4"),
                      "tchunk": (tc + base).astype("<u4"), "one": flags.astype("u1"), "targets": st.astype("u1"),
                      "ttargets": tt.astype("u1")})
        rows, base = rows + len(batch), base + len(flags)
    return _shard(parts, ("ids", "tids", "schunk", "tchunk", "one", "targets", "ttargets"), rows, recipe, path)


__all__ = ["chat_streams", "text_streams"]
