"""FVT, Fast Vocabulary Transfer (Gee et al. 2022): a student vocabulary's embeddings from the teacher's.

Each student token's vector is the mean of the teacher's embedding rows of that token's string re-tokenized by
the teacher. A token whose bytes are not whole UTF-8 (a byte-fallback or byte-level piece of a character) is
re-tokenized byte by byte through the teacher's single-byte tokens; a special token takes the teacher's special
token of the same string, else (like any token the teacher cannot spell) the mean of all the teacher's rows.
Used by `init: from_teacher` when the vocabularies differ, for the input embedding and an untied LM head alike.

Imports `numpy`, `tokenizers` and `vishwam.data.cross.alignment`.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from vishwam.data.cross.alignment import token_bytes


def fvt_sources(student: Tokenizer, teacher: Tokenizer, student_vocab_size: int,
                teacher_vocab_size: int) -> list[list[int]]:
    """For each student id, the teacher ids whose rows are averaged (empty: the mean of all rows)."""
    t_tab = token_bytes(teacher)
    single = {b: i for i, b in enumerate(t_tab) if b is not None and len(b) == 1 and i < teacher_vocab_size}
    t_special = {t.content: i for i, t in teacher.get_added_tokens_decoder().items() if i < teacher_vocab_size}
    s_strings = {i: t.content for i, t in student.get_added_tokens_decoder().items()}
    out: list[list[int]] = []
    for i, b in enumerate(token_bytes(student)[:student_vocab_size]):
        if b is None:
            j = t_special.get(s_strings.get(i, ""))
            out.append([] if j is None else [j])
            continue
        try:
            ids = teacher.encode(b.decode("utf-8"), add_special_tokens=False).ids
        except UnicodeDecodeError:
            ids = [single.get(bytes([x]), -1) for x in b]
        out.append([] if not ids or min(ids) < 0 or max(ids) >= teacher_vocab_size else list(ids))
    out += [[] for _ in range(student_vocab_size - len(out))]
    return out


def fvt_embeddings(teacher_rows: np.ndarray, sources: list[list[int]]) -> np.ndarray:
    """`[len(sources), hidden]`: row `i` the mean of `teacher_rows[sources[i]]` (all rows' mean where empty)."""
    rows = np.asarray(teacher_rows, np.float32)
    fallback = rows.mean(0)
    return np.stack([rows[s].mean(0) if s else fallback for s in sources]).astype(teacher_rows.dtype)
