"""A run's train and eval data, from token stores: prepared on first use, reused on every later start.

`load_splits(d, ...)` finds each split's store (`data.store_dir/train` and `/eval` when `data.store_dir` is set,
else a directory named by the sources' fingerprint under `~/.cache/vishwam/data`), builds it when it is missing
(`vishwam.data.prepare.build_store`, the same code `python -m vishwam.data` runs), and opens it: the manifest read,
the shards' sizes checked, nothing else. A store whose fingerprint no longer matches its sources is never read:
under the default root it is another directory (the fingerprint names it), so the data is prepared anew with a
log line; at an explicit `data.store_dir` it is one error line. `data.train` (and `data.eval`) may also name a
prepared store directly.

Chat rows are packed by a plan per `seq_len` and row range (`vishwam.data.windows.pack_plan`), stored in the
store's `plans/`: a new `seq_len` re-plans from the stored row lengths, without tokenizing again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models import ModelConfig
from vishwam.config import specs
from vishwam.config.sections import DataConfig, RunConfig
from vishwam.data import windows
from vishwam.data.chat import ChatTemplate, find_template, special_tokens
from vishwam.data.chat_rows import is_chat
from vishwam.data.cross.windows import CrossDataset
from vishwam.data.prepare import Recipe, build_store
from vishwam.data.store import (
    MANIFEST,
    CrossStreams,
    TokenStore,
    describe_change,
    fingerprint_key,
    is_store,
    source_fingerprint,
)
from vishwam.data.text import expand_paths
from vishwam.data.windows import PackedDataset, pack_plan
from vishwam.errors import DataError
from vishwam.io.files import atomic_write

DEFAULT_ROOT = Path("~/.cache/vishwam/data")
ALIGNMENT_VERSION = 1
"""Bumped when `vishwam.data.cross.alignment` cuts chunks differently: a cross store of another version is re-made."""


def tokenizer_path(d: DataConfig, teacher_dir: Path) -> str | None:
    """The run's tokenizer: `data.tokenizer`, else the teacher's `tokenizer.json` (None when it has none)."""
    own = Path(teacher_dir) / "tokenizer.json"
    return d.tokenizer or (str(own) if own.is_file() else None)


def split_args(cfg: RunConfig, teacher_dir: Path, teacher: ModelConfig, student: ModelConfig) -> dict:
    """`load_splits`'s tokenizer arguments for a run: the teacher's side (`data.tokenizer` or the teacher's own, its
    first EOS id) and, for a cross-tokenizer run (`specs.cross_tokenizer`), the student's (`cross`)."""
    eos = teacher.eos_ids[0] if teacher.eos_ids else None
    path = tokenizer_path(cfg.data, teacher_dir)
    if not specs.cross_tokenizer(cfg):
        return dict(tokenizer_path=path, eos_id=eos, vocab_size=min(student.vocab_size, teacher.vocab_size))
    if eos is None:
        raise DataError(f"{Path(teacher_dir) / 'config.json'} has no eos_token_id: a cross-tokenizer run ends each "
                        "document with both sides' EOS")
    cross = CrossSides(cfg.distillation.student_model.tokenizer, student.eos_ids[0], student.vocab_size,
                       specs.teacher_seq_len(cfg))
    return dict(tokenizer_path=path, eos_id=eos, vocab_size=teacher.vocab_size, cross=cross)


def _tokenizer_files(tokenizer_path: str | None) -> list[str]:
    if tokenizer_path is None:
        return []
    directory = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path) or "."
    main = os.path.join(tokenizer_path, "tokenizer.json") if os.path.isdir(tokenizer_path) else tokenizer_path
    extra = os.path.join(directory, "tokenizer_config.json")
    return [f for f in (main, extra) if os.path.isfile(f)]


@dataclasses.dataclass(frozen=True)
class CrossSides:
    """A cross-tokenizer run's student side of the data (the teacher's is `tokenizer_path`/`eos_id`/`vocab_size`),
    and its windows' teacher tokens (`vishwam.data.cross.windows`)."""

    tokenizer_path: str
    eos_id: int
    vocab_size: int
    teacher_seq_len: int


def _directory(tokenizer_path: str) -> Path:
    return Path(tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path) or ".")


def run_template(d: DataConfig, tokenizer_path: str) -> ChatTemplate | None:
    """The run's chat template: `data.chat_template`, else the one beside the run's tokenizer (`find_template`)."""
    return find_template(d.chat_template, _directory(tokenizer_path))


def cross_templates(d: DataConfig, teacher_tokenizer: str, student_tokenizer: str) -> tuple[tuple | None, tuple | None]:
    """`(student's, teacher's)` chat templates of a cross-tokenizer run on chat rows, each `(source, text,
    variables)`: the teacher's is the run's (`data.chat_template`, else beside its tokenizer); the student's is the
    one beside the student's tokenizer, else the teacher's rendered with the student's special tokens."""
    teacher = run_template(d, teacher_tokenizer)
    directory = _directory(student_tokenizer)
    student = find_template(None, directory)
    if student is None and teacher is not None:
        variables = tuple(sorted(special_tokens(directory).items()))
        student = ChatTemplate(teacher.source, teacher.text, variables)
    return tuple(None if t is None else (t.source, t.text, t.variables) for t in (student, teacher))


def recipe_of(d: DataConfig, files: list[str], *, tokenizer_path: str | None, eos_id: int | None,
              vocab_size: int | None, cross: CrossSides | None = None) -> tuple[Recipe, dict]:
    """How `files` become tokens, and their fingerprint (`vishwam.data.store.source_fingerprint`)."""
    if cross is not None:
        if tokenizer_path is None:
            raise DataError("a cross-tokenizer run needs the teacher's tokenizer: set data.tokenizer or give the "
                            "teacher a tokenizer.json")
        chat = is_chat(files)
        templates = cross_templates(d, tokenizer_path, cross.tokenizer_path) if chat else (None, None)
        recipe = Recipe("cross", tokenizer_path, eos_id, vocab_size, templates[1], d.loss_on,
                        student_tokenizer_path=cross.tokenizer_path, student_eos_id=cross.eos_id,
                        student_vocab_size=cross.vocab_size, student_template=templates[0], chat=chat)
        fingerprint = source_fingerprint(files, kind="cross", tokenizer_files=_tokenizer_files(tokenizer_path),
                                         eos_id=eos_id)
        student = source_fingerprint([], kind="cross", tokenizer_files=_tokenizer_files(cross.tokenizer_path),
                                     eos_id=cross.eos_id)
        fingerprint.update(student_tokenizer=student["tokenizer"], student_eos_id=cross.eos_id,
                           teacher_eos_id=eos_id, alignment=ALIGNMENT_VERSION)
        if chat:
            fingerprint.update(chat=True, loss_on=d.loss_on,
                               chat_templates=[None if t is None else t[1] for t in templates])
        return recipe, fingerprint
    kind = "chat" if is_chat(files) else "text"
    template = None
    if kind == "chat":
        if tokenizer_path is None:
            raise DataError(f"{files[0]} holds chat rows but no tokenizer is given (set data.tokenizer)")
        found = run_template(d, tokenizer_path)
        template = None if found is None else (found.source, found.text, found.variables)
    recipe = Recipe(kind, tokenizer_path, eos_id, vocab_size, template, d.loss_on)
    needs_tokenizer = kind == "chat" or any(not f.lower().endswith(".npy") for f in files)
    fingerprint = source_fingerprint(files, kind=kind, tokenizer_files=_tokenizer_files(tokenizer_path)
                                     if needs_tokenizer else [], eos_id=eos_id,
                                     chat_template=None if template is None else template[1], loss_on=d.loss_on)
    return recipe, fingerprint


def store_for(paths: tuple[str, ...], d: DataConfig, split: str, *, tokenizer_path: str | None, eos_id: int | None,
              vocab_size: int | None, log: Callable[[str], None], workers: int = 0, process_index: int = 0,
              process_count: int = 1, barrier: Callable[[str], None] | None = None,
              cross: CrossSides | None = None) -> TokenStore:
    """The token store of one split's `paths`: opened when prepared and current, else built (see the module
    docstring)."""
    if len(paths) == 1 and is_store(paths[0]):
        store = TokenStore(paths[0])
        _check_prepared(store, paths[0], eos_id=eos_id, vocab_size=vocab_size, cross=cross)
        return store
    files = expand_paths(paths)
    if not files:
        raise DataError("no data files given")
    recipe, fingerprint = recipe_of(d, files, tokenizer_path=tokenizer_path, eos_id=eos_id, vocab_size=vocab_size,
                                    cross=cross)
    key = fingerprint_key(fingerprint)
    explicit = d.store_dir is not None
    directory = (Path(d.store_dir) / split) if explicit else DEFAULT_ROOT.expanduser() / f"{recipe.kind}-{key[:20]}"
    if (directory / MANIFEST).is_file():
        store = TokenStore(directory)
        if store.fingerprint == fingerprint:
            _check_prepared(store, str(directory), eos_id=eos_id, vocab_size=vocab_size, cross=cross)
            if process_count == 1:
                return store
            # Several processes go through build_store's barriers together (each finds every unit finished), so
            # none waits for another that returned early.
        elif explicit:
            raise DataError(f"token store {directory} was prepared from other data than data.{split} "
                            f"({describe_change(store.fingerprint, fingerprint)}): remove it, or set data.store_dir "
                            f"to another directory")
        else:
            log(f"token store {directory} is stale ({describe_change(store.fingerprint, fingerprint)}): preparing "
                f"it again")
            (directory / MANIFEST).unlink(missing_ok=True)
    elif explicit and directory.exists() and any(directory.iterdir()) and not (directory / "shards").is_dir():
        raise DataError(f"data.store_dir: {directory} exists and is not a token store; name an empty or new directory")
    store = build_store(files, recipe, fingerprint, directory, workers=workers or (os.cpu_count() or 1), log=log,
                        process_index=process_index, process_count=process_count, barrier=barrier)
    _check_prepared(store, str(directory), eos_id=eos_id, vocab_size=vocab_size, cross=cross)
    return store


def _kind(paths: tuple[str, ...]) -> str:
    if len(paths) == 1 and is_store(paths[0]):
        return TokenStore(paths[0]).kind
    return "chat" if is_chat(paths) else "text"


def _check_prepared(store: TokenStore, where: str, *, eos_id: int | None, vocab_size: int | None,
                    cross: CrossSides | None = None) -> None:
    if (store.kind == "cross") != (cross is not None):
        raise DataError(f"token store {where} holds {store.kind} data, and this run "
                        f"{'distils across tokenizers' if cross else 'has one tokenizer'}: prepare the store with "
                        "this run's config")
    if cross is not None:
        f = store.fingerprint
        if f.get("student_eos_id") != cross.eos_id or f.get("teacher_eos_id") != eos_id:
            raise DataError(f"token store {where} ends documents with EOS ids {f.get('student_eos_id')} (student) "
                            f"and {f.get('teacher_eos_id')} (teacher), the run's are {cross.eos_id} and {eos_id}: "
                            "prepare the store with this run's config")
        for what, top, size in (("student", store.max_id, cross.vocab_size), ("teacher", store.teacher_max_id,
                                                                             vocab_size)):
            if size is not None and top >= size:
                raise DataError(f"token store {where} holds {what} token id {top}, outside the {what}'s vocabulary "
                                f"of {size} ids (was it tokenized with another tokenizer?)")
        return
    if store.kind == "text" and store.eos_id != eos_id:
        raise DataError(f"token store {where} joins documents with EOS id {store.eos_id}, the run's teacher uses "
                        f"{eos_id}: prepare the store with this run's config")
    if vocab_size is not None and store.max_id >= vocab_size:
        raise DataError(f"token store {where} holds token id {store.max_id}, outside the model's vocabulary of "
                        f"{vocab_size} ids (was it tokenized with another tokenizer?)")


def _split_range(total: int, fraction: float, what: str) -> int:
    """Where the held-out tail of `total` items (tokens or rows) starts."""
    n = int(round(total * fraction))
    if n == 0 or n == total:
        raise DataError(f"data.eval_fraction {fraction} of the {total} training {what} leaves an empty "
                        f"{'eval' if n == 0 else 'train'} split")
    return total - n


def plan(store: TokenStore, rows: tuple[int, int], seq_len: int, *, name: str, log: Callable[[str], None]):
    """The packing plan of `store`'s rows `rows` into windows of `seq_len + 1` (stored in `plans/`, made once)."""
    lo, hi = rows
    directory = store.directory / "plans" / f"seq{seq_len}-rows{lo}-{hi}-block{windows.PLAN_BLOCK_ROWS}"
    names = ("rows", "starts", "sizes", "window_starts")
    try:
        meta = json.loads((directory / "plan.json").read_text())
        arrays = tuple(np.load(directory / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names)
    except (OSError, ValueError):
        lengths, firsts = store.row_lengths(lo, hi)
        row_ids, starts, sizes, window_starts, truncated = pack_plan(lengths, firsts, seq_len + 1)
        arrays = (row_ids + lo, starts, sizes, window_starts)
        for n, a in zip(names, arrays):
            atomic_write(directory / f"{n}.npy", lambda f, a=a: np.save(f, np.asarray(a, np.int64), allow_pickle=False))
        meta = {"kept": int(len(row_ids)), "rows": hi - lo, "truncated": truncated, "windows": len(window_starts) - 1}
        atomic_write(directory / "plan.json", json.dumps(meta) + "\n")
    if meta["kept"] == 0:
        raise DataError(f"{name}: none of its {meta['rows']} rows has a target token to train on")
    log(f"{name}: {meta['kept']} rows packed into {meta['windows']} windows ({meta['truncated']} truncated, "
        f"{meta['rows'] - meta['kept']} dropped)")
    return arrays


def datasets(store: TokenStore, seq_len: int, *, name: str, part: tuple[float, float] | None = None,
             log: Callable[[str], None], cross: CrossSides | None = None) -> PackedDataset | CrossDataset:
    """`store`'s windows (all of it, or the `(from, to)` items of `part` given as item counts) as a dataset."""
    if store.kind == "cross":
        lo, hi = part if part is not None else (0, store.num_tokens)
        data = CrossDataset(CrossStreams(store), int(lo), int(hi), seq_len, cross.teacher_seq_len, name=name,
                            identity={"store": store.key, "tokens": [int(lo), int(hi)], "seq_len": seq_len,
                                      "teacher_seq_len": cross.teacher_seq_len})
        log(f"{name}: {hi - lo:,} student tokens, {data.num_windows:,} windows ({cross.teacher_seq_len} teacher "
            f"tokens each), cross-tokenizer token store {store.directory}")
        return data
    if store.kind == "text":
        lo, hi = part if part is not None else (0, store.num_tokens)
        data = PackedDataset.from_store(store, int(lo), int(hi), seq_len, name=name)
        log(f"{name}: {hi - lo:,} tokens, {data.num_windows:,} windows, token store {store.directory}")
        return data
    lo, hi = part if part is not None else (0, store.num_rows)
    rows = (int(lo), int(hi))
    data = PackedDataset.from_plan(store, plan(store, rows, seq_len, name=name, log=log), seq_len, name=name,
                                   rows=rows)
    log(f"{name}: token store {store.directory}")
    return data


def load_splits(d: DataConfig, *, seq_len: int, tokenizer_path: str | None, eos_id: int | None,
                vocab_size: int | None, log: Callable[[str], None], **build) -> tuple[PackedDataset,
                                                                                     PackedDataset | None]:
    """The run's train and eval datasets (see the module docstring); `build`: `store_for`'s build arguments."""
    common = dict(tokenizer_path=tokenizer_path, eos_id=eos_id, vocab_size=vocab_size, log=log, **build)
    cross = build.get("cross")
    if d.eval and _kind(d.train) != _kind(d.eval):  # before anything is tokenized
        holds = {"chat": "chat rows", "text": "text", "cross": "a cross-tokenizer token store"}
        raise DataError(f"data.train holds {holds[_kind(d.train)]} but data.eval ({d.eval[0]}) holds "
                        f"{holds[_kind(d.eval)]}; give one kind")
    train_store = store_for(d.train, d, "train", **common)
    if d.eval:
        eval_store = store_for(d.eval, d, "eval", **common)
        return (datasets(train_store, seq_len, name="data.train", log=log, cross=cross),
                datasets(eval_store, seq_len, name="data.eval", log=log, cross=cross))
    if d.eval_fraction > 0:
        rows = train_store.kind == "chat"
        total = train_store.num_rows if rows else train_store.num_tokens
        cut = _split_range(total, d.eval_fraction, "rows" if rows else "tokens")
        return (datasets(train_store, seq_len, name="data.train", part=(0, cut), log=log, cross=cross),
                datasets(train_store, seq_len, name="data.eval", part=(cut, total), log=log, cross=cross))
    return datasets(train_store, seq_len, name="data.train", log=log, cross=cross), None


__all__ = ["ALIGNMENT_VERSION", "CrossSides", "DEFAULT_ROOT", "datasets", "load_splits", "plan", "recipe_of", "split_args", "store_for",
           "tokenizer_path"]
