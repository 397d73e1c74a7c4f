"""`distillation.student_model.tokenizer`: the student's own tokenizer, checked before anything is read.

Unset, or the same tokenizer as the teacher's (same vocabulary, model, normalizer and pre-tokenizer): today's
same-tokenizer run. Set and different: a cross-tokenizer run. Its parts exist (`vishwam.data.alignment`,
`vishwam.data.cross_windows`, `vishwam.data.vocab_transfer`, `distill.cross_tokenizer`,
`vishwam.train.cross_step`) but `run.py` does not drive them yet, so such a config stops here with one line
rather than silently training on the teacher's tokenization.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from distill.config import config_error
from vishwam.config.sections import RunConfig
from vishwam.data.splits import tokenizer_path
from vishwam.data.text import load_tokenizer
from vishwam.errors import DataError

KEY = "distillation.student_model.tokenizer"


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers cut every text into the same ids."""
    fields = ("model", "normalizer", "pre_tokenizer", "added_tokens")
    ja, jb = json.loads(a.to_str()), json.loads(b.to_str())
    return all(ja.get(f) == jb.get(f) for f in fields)


def check_student_tokenizer(cfg: RunConfig, teacher_dir: Path) -> None:
    """Raise the one-line `ConfigError` for an unreadable or (not yet supported) different student tokenizer."""
    path = cfg.distillation.student_model.tokenizer
    if path is None:
        return
    try:
        student = load_tokenizer(path)
    except DataError as error:
        raise config_error(KEY, f"cannot be read: {error}") from None
    teacher_path = tokenizer_path(cfg.data, teacher_dir)
    if teacher_path is None:
        raise config_error(KEY, f"is set, but the teacher ({teacher_dir}) has no tokenizer.json to compare it with")
    if same_tokenizer(student, load_tokenizer(teacher_path)):
        return
    if cfg.distillation.teacher_model.loading == "cached":
        raise config_error(KEY, f"names a tokenizer other than the teacher's ({path}), and a 'cached' teacher holds "
                                "no per-token log-probabilities for cross-tokenizer distillation; use 'resident'")
    raise config_error(KEY, f"names a tokenizer other than the teacher's ({path}): cross-tokenizer distillation "
                            "is not yet driven by run.py (issue 29; its parts are in distill.cross_tokenizer and "
                            "vishwam.train.cross_step); leave it unset to distil with the teacher's tokenizer")
