"""Data: files to one token stream, packed into fixed windows, served in an order that is a function of the step.

Formats (by extension):

- `.jsonl`: one JSON object per line with a string field `text`; each line is a document (blank lines skipped).
- `.txt`: documents separated by blank lines (a line holding only whitespace); a document holding no blank line
  is one paragraph block, so put documents with inner blank lines in a `.jsonl` instead.
- `.npy`: a pre-tokenized 1-D integer token stream (`np.save(path, ids)`), used as one document.
- `.parquet`, and a directory written by HF `datasets`' `save_to_disk` (`state.json` beside its `.arrow` files):
  one row per document, a string column `text` (like `.jsonl`). These need `pyarrow` (`pip install
  'vishwam[data]'`); a `DatasetDict`'s directory names its splits, and one split's directory is read.

Text is tokenized with a `tokenizers` `tokenizer.json` without adding special tokens; documents (and `.npy`
streams) are joined with the EOS id between them. Nothing is cached on disk.

The stream is cut into non-overlapping windows of `seq_len + 1` tokens (`inputs = w[:-1]`, `labels = w[1:]`).
Chat data (`.jsonl` rows with `messages`, or `prompt` + `completion`) is read by `vishwam.data.chat_rows` instead:
rows packed into windows with segment ids and per-token targets (`PackedDataset.of_rows`).
The batch at a step is a pure function of `(seed, step)`, so resuming at step `k` needs no data-loader state.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from vishwam.data.tables import is_hf, is_saved_dataset, is_table, table_records
from vishwam.errors import DataError

_GLOB_CHARS = re.compile(r"[*?\[]")
BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------------------------------------------- files


def expand_paths(paths_or_globs: str | Sequence[str]) -> list[str]:
    """Files named by paths and globs, globs expanded in sorted order, and `save_to_disk` directories as they are;
    a miss is a `DataError` naming it."""
    patterns = [paths_or_globs] if isinstance(paths_or_globs, (str, os.PathLike)) else list(paths_or_globs)
    files: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if is_hf(pattern):  # a datasets dataset, read by the token store
            files.append(pattern)
        elif _GLOB_CHARS.search(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True)
                             if os.path.isfile(p) or is_saved_dataset(p))
            if not matches:
                raise DataError(f"data glob '{pattern}' matches no files")
            files.extend(matches)
        elif is_saved_dataset(pattern):
            files.append(pattern)
        elif os.path.isfile(os.path.join(pattern, "dataset_dict.json")):
            splits = sorted(n for n in os.listdir(pattern) if is_saved_dataset(os.path.join(pattern, n)))
            raise DataError(f"data path '{pattern}' is a saved DatasetDict with splits {', '.join(splits) or '(none)'}; "
                            f"name one split's directory, e.g. '{os.path.join(pattern, splits[0] if splits else 'train')}'")
        elif os.path.isdir(pattern):
            raise DataError(f"data path '{pattern}' is a directory; name the files or use a glob like "
                            f"'{os.path.join(pattern, '*.jsonl')}'")
        elif not os.path.isfile(pattern):
            raise DataError(f"data file not found: {pattern}")
        else:
            files.append(pattern)
    return files


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror or error}") from None


def jsonl_records(path: str) -> list[tuple[int, object]]:
    """`(line number, parsed JSON value)` of each non-blank line of a `.jsonl` file; a line that is not valid
    UTF-8 or JSON is a `DataError` naming `file:line`."""
    return list(parse_jsonl(path, _read_bytes(path), first_line=1))


def parse_jsonl(path: str, data: bytes, *, first_line: int) -> Iterator[tuple[int, object]]:
    """`jsonl_records` of `data`, the bytes of `path` from line `first_line` on (a part of a large file)."""
    for number, line in enumerate(data.split(b"\n"), start=first_line):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not valid UTF-8") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None


def records(path: str) -> list[tuple[str, object]]:
    """`(where, record)` of each row of a `.jsonl` file (`where` is `file:line`) or of a table (`table_records`)."""
    if is_table(path):
        return table_records(path)
    return [(f"{path}:{number}", record) for number, record in jsonl_records(path)]


def record_text(where: str, record, *, table: bool) -> str:
    """A text row's `text` (a `DataError` naming `where` when the row has none, or not a string)."""
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f"{where}: expected a {'row' if table else 'JSON object'} with a 'text' field")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    return text


def _documents(path: str) -> list[str]:
    """The `text` of each row of a `.jsonl` file or a table (empty documents skipped)."""
    texts = (record_text(where, record, table=is_table(path)) for where, record in records(path))
    return [text for text in texts if text]


def _txt_documents(path: str) -> list[str]:
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.start})") from None
    return [document.strip() for document in BLANK_LINES.split(text) if document.strip()]


def npy_tokens(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:  # object arrays need pickle; a bad header is a ValueError too
        raise DataError(f"{path}: not a plain numeric .npy array ({error})") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read .npy file ({error})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected a single .npy array, not an .npz archive")
    if array.ndim != 1:
        raise DataError(f"{path}: expected a 1-D token stream, got an array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: expected integer token ids, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > _INT32_MAX):
        raise DataError(f"{path}: token ids must lie in [0, {_INT32_MAX}], got [{array.min()}, {array.max()}]")
    return array.astype(np.int32)


def read_prompts(path: str) -> list[str]:
    """Prompts from a `.jsonl` file: a non-empty string field `prompt` (or `text`) per line, blank lines skipped;
    a bad line is a `DataError` naming `file:line`."""
    if not os.path.isfile(path):
        raise DataError(f"prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(_read_bytes(path).decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise DataError(f"{path}:{number}: a row needs a non-empty string field 'prompt' (or 'text')")
        prompts.append(text)
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts")
    return prompts


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a `tokenizer.json` file, or a directory holding one."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"tokenizer file not found: {file}")
    try:
        return Tokenizer.from_file(file)
    except Exception as error:  # the Rust side raises a bare Exception for a malformed file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot load tokenizer {file}: {message}") from None


def load_token_stream(
    paths_or_globs: str | Sequence[str], tokenizer_path: str | None, eos_id: int | None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """All the data named by `paths_or_globs` as one int32 token stream.

    **Arguments:**

    - `paths_or_globs`: files or globs (`.jsonl`, `.txt`, `.npy`, `.parquet`) and `save_to_disk` directories, in
      order; globs expand sorted.
    - `tokenizer_path`: a `tokenizer.json` (or its directory); needed only when some file holds text.
    - `eos_id`: the id put between documents; None joins them with nothing in between.
    - `vocab_size`: when given, every file's ids must fit a vocabulary of this size (`check_vocab`).

    **Returns:** a 1-D `int32` array. Raises `DataError` naming the file (and line) on bad data.
    """
    files = expand_paths(paths_or_globs)
    if not files:
        raise DataError("no data files given")
    tokenizer: Tokenizer | None = None
    pieces: list[np.ndarray] = []
    for path in files:
        extension = os.path.splitext(path)[1].lower()
        if extension == ".npy":
            pieces.append(npy_tokens(path))
            if vocab_size is not None:
                check_vocab(pieces[-1], vocab_size, path)
            continue
        if extension == ".jsonl" or is_table(path):
            documents = _documents(path)
        elif extension == ".txt":
            documents = _txt_documents(path)
        else:
            raise DataError(f"{path}: unsupported data file type '{extension}' (use .jsonl, .txt, .npy, .parquet or "
                            f"a datasets save_to_disk directory)")
        if tokenizer is None:
            if tokenizer_path is None:
                raise DataError(f"{path} holds text but no tokenizer is given (set data.tokenizer)")
            tokenizer = load_tokenizer(tokenizer_path)
        encodings = tokenizer.encode_batch(documents, add_special_tokens=False)
        ids = [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]
        if vocab_size is not None and ids:
            check_vocab(np.concatenate(ids), vocab_size, f"{path} (tokenized with {tokenizer_path})")
        pieces.extend(ids)
    pieces = [piece for piece in pieces if piece.size]
    if eos_id is not None and len(pieces) > 1:
        separator = np.asarray([eos_id], dtype=np.int32)
        pieces = [part for piece in pieces for part in (piece, separator)][:-1]
    if not pieces:
        return np.zeros((0,), dtype=np.int32)
    return np.concatenate(pieces).astype(np.int32, copy=False)


def check_vocab(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    """Raise `DataError` naming `what` (the file) when a token id does not fit a `vocab_size` vocabulary.

    Inside a jitted step an out-of-range id cannot raise, it would gather garbage: hence this check on the host
    when the data is loaded."""
    if tokens.size == 0:
        return
    largest, smallest = int(tokens.max()), int(tokens.min())
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        raise DataError(f"{what} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids "
                        f"(was it tokenized with another tokenizer?)")


def split_eval(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a stream into `(train, eval)`, eval being its last `fraction` of tokens (`data.eval_fraction`)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    num_eval = int(round(len(tokens) * fraction))
    if num_eval == 0 or num_eval == len(tokens):
        raise DataError(f"data.eval_fraction {fraction} of the {len(tokens)} training tokens leaves an empty "
                        f"{'eval' if num_eval == 0 else 'train'} split")
    return tokens[: len(tokens) - num_eval], tokens[len(tokens) - num_eval :]
