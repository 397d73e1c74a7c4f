"""Chat and instruction data: rows to token ids with per-token targets, packed into windows with segment ids.

A `.jsonl` file, a `.parquet` file or a `datasets` `save_to_disk` directory (`vishwam.data.text.records`; the last two
need `pyarrow`) is chat data when its rows hold, instead of `text`:

- `messages`: a list of `{"role", "content"}` (roles system, user, assistant, and tool when the template renders
  it; other keys, e.g. `tool_calls`, go to the template as they are), rendered with the chat template
  (`vishwam.data.chat`) and tokenized with no special tokens added, as transformers' `apply_chat_template` does. The
  targets are the assistant turns' tokens (`data.loss_on: assistant`) or every token (`all`).
- `prompt` + `completion` (strings): plain text, never templated (as TRL's "standard" prompt-completion format):
  the prompt's tokens, then the completion's and the EOS id; the targets are the completion and EOS. A pair
  meant for the chat template is a `messages` row with a user and an assistant turn.

Prompt and completion are tokenized apart, so the completion's tokens are the ones a model generating after the
prompt would produce. Rows are packed into windows of `seq_len + 1` tokens, greedy first-fit in file order (each
row goes into the first window with room for it); a row longer than a window is truncated to it, and a row left
with no target token (a row's first token never is one: nothing before it in its row predicts it) is dropped.
Every file of a run must be of one kind: a chat file beside a text file is a `DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jinja2
import numpy as np
from tokenizers import Tokenizer

from vishwam.config.sections import DataConfig
from vishwam.data.chat import ChatTemplate, find_template, token_mask
from vishwam.data.tables import hf_columns, is_hf, is_table, table_columns
from vishwam.data.text import check_vocab, expand_paths, load_tokenizer, records
from vishwam.data.windows import PackedDataset, pack_plan
from vishwam.errors import DataError

Row = tuple[np.ndarray, np.ndarray]  # token ids int32 [n], targets bool [n]


def row_kind(keys) -> str:
    """`chat` for a row with `messages`, or `prompt` and `completion`, among `keys`; else `text`."""
    return "chat" if "messages" in keys or ("prompt" in keys and "completion" in keys) else "text"


def record_keys(record) -> tuple:
    """A record's keys (none for a record that is not an object)."""
    return tuple(record) if isinstance(record, dict) else ()


_NO_ROWS = object()


def _first_record(path: str):
    """The first non-blank line of a `.jsonl` file, parsed (None when it is not valid JSON: the loader that reads
    the whole file names the bad line; `_NO_ROWS` when the file has no non-blank line)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    return json.loads(line.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return _NO_ROWS


def _file_kind(path: str) -> str:
    if is_hf(path):
        return row_kind(hf_columns(path))
    if is_table(path):
        return row_kind(table_columns(path))
    if path.lower().endswith(".jsonl"):
        record = _first_record(path)
        if record is _NO_ROWS:  # neither kind: say so here, before another file's rows are blamed for it
            raise DataError(f"{path}: the file holds no rows")
        return row_kind(record_keys(record))
    return "text"


def is_chat(paths_or_globs: str | Sequence[str]) -> bool:
    """Whether the files hold chat rows (a `.jsonl` file is judged by its first row, a table by its columns;
    `.txt`, `.npy` are text); a `DataError` names a chat file and a text file when they are mixed, or a `.jsonl`
    file with no rows."""
    kinds: dict[str, str] = {}
    for path in expand_paths(paths_or_globs):
        kinds.setdefault(_file_kind(path), path)
    if len(kinds) > 1:
        raise DataError(f"the data mixes chat rows ({kinds['chat']}) and text ({kinds['text']}); give one kind")
    return "chat" in kinds


def checked_messages(where: str, value, template: ChatTemplate) -> list[dict]:
    """A row's `messages`, checked against what `template` renders (a bad one is a `DataError` naming `where`)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: message {i} must be an object with a string 'role'")
        if message["role"] not in template.roles:
            raise DataError(f"{where}: message {i} has role {message['role']!r}; the chat template "
                            f"{template.source} renders roles {', '.join(template.roles)}")
        if not isinstance(message.get("content"), str) and message.get("content") is not None:
            raise DataError(f"{where}: message {i}: 'content' must be a string")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    return value


def render_row(where: str, messages: list[dict], template: ChatTemplate, loss_on: str):
    """`(text, assistant spans)` of a conversation (spans None with `loss_on: all`); a template that fails to render
    it, or is not prefix-stable, is a `DataError` naming `where`."""
    try:
        if loss_on == "all":
            return template.render(messages), None
        return template.assistant_spans(messages)
    except jinja2.TemplateError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"{where}: the chat template {template.source} fails to render the row: {message}") from None
    except ValueError as error:
        raise DataError(f"{where}: the chat template {template.source} is not prefix-stable ({error}), so its "
                        f"assistant tokens cannot be found: use data.loss_on 'all' or another "
                        f"data.chat_template") from None


def row_parts(where: str, record, template: ChatTemplate | None, *,
              tokenizer: str = "the tokenizer") -> tuple[str, list[dict] | tuple[str, str]]:
    """A chat row's parts: `("messages", its messages checked against template)` or `("plain", (prompt,
    completion))`. A row of another kind, a `messages` row with no template (`tokenizer` names where the template
    is looked for) or a prompt or completion that is not a string is a `DataError` naming `where`."""
    if row_kind(record_keys(record)) != "chat":
        raise DataError(f"{where}: expected a chat row ('messages', or 'prompt' and 'completion') like the "
                        f"file's first")
    if "messages" in record and (record["messages"] is not None or "prompt" not in record):
        if template is None:
            raise DataError(f"{where}: a 'messages' row needs a chat template, and none is given: set "
                            f"data.chat_template, or put chat_template.jinja beside {tokenizer}")
        return "messages", checked_messages(where, record["messages"], template)
    prompt, completion = record["prompt"], record["completion"]
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        raise DataError(f"{where}: 'prompt' and 'completion' must be strings (a conversation goes in 'messages')")
    return "plain", (prompt, completion)


def encode_rows(path: str, tokenizer: Tokenizer, template: ChatTemplate | None, *, loss_on: str,
                eos_id: int | None) -> list[Row]:
    """Every row of the chat file or table `path` as `(token ids, targets)` (see the module docstring); a bad row
    is a `DataError` naming `file:line` (a table's: `path row i`)."""
    return encode_records(records(path), tokenizer, template, loss_on=loss_on, eos_id=eos_id)


def encode_records(items: Iterable[tuple[str, object]], tokenizer: Tokenizer, template: ChatTemplate | None, *,
                   loss_on: str, eos_id: int | None) -> list[Row]:
    """`encode_rows` of `(where, record)` pairs (the token store feeds them a batch at a time)."""
    rendered: list[tuple[int, str, list | None]] = []  # (row, text, assistant spans)
    plain: list[tuple[int, str, str]] = []  # (row, prompt, completion)
    rows: list[Row | None] = []
    for where, record in items:
        kind, parts = row_parts(where, record, template)
        if kind == "messages":
            text, spans = render_row(where, parts, template, loss_on)
            rendered.append((len(rows), text, spans))
        else:
            plain.append((len(rows), *parts))
        rows.append(None)
    encodings = tokenizer.encode_batch([text for _, text, _ in rendered], add_special_tokens=False)
    for (i, _, spans), encoding in zip(rendered, encodings):
        ids = np.asarray(encoding.ids, np.int32)
        rows[i] = (ids, np.ones(len(ids), bool) if spans is None else token_mask(encoding, spans))
    pieces = tokenizer.encode_batch([text for _, p, c in plain for text in (p, c)], add_special_tokens=False)
    eos = np.asarray([] if eos_id is None else [eos_id], np.int32)
    for k, (i, _, _) in enumerate(plain):
        prompt, completion = (np.asarray(e.ids, np.int32) for e in pieces[2 * k: 2 * k + 2])
        ids = np.concatenate([prompt, completion, eos])
        rows[i] = (ids, np.arange(len(ids)) >= (0 if loss_on == "all" else len(prompt)))
    return rows


def first_targets(rows: Sequence[Row]) -> np.ndarray:
    """Each row's first target position after its first token (its length when it has none)."""
    return np.asarray([1 + int(np.argmax(t[1:])) if t[1:].any() else len(t) for _, t in rows], np.int64)


def pack_rows(rows: Sequence[Row], seq_len: int, *, name: str, log: Callable[[str], None]) -> PackedDataset:
    """Rows packed into windows of `seq_len + 1` tokens, greedy first-fit in order (`vishwam.data.windows.pack_plan`,
    the plan a token store's rows are packed by); logs how many rows were packed into how many windows,
    truncated and dropped."""
    width = seq_len + 1
    row_ids, starts, sizes, window_starts, truncated = pack_plan([len(ids) for ids, _ in rows], first_targets(rows),
                                                                 width)
    if not len(row_ids):
        raise DataError(f"{name}: none of its {len(rows)} rows has a target token to train on")
    num_windows = len(window_starts) - 1
    windows = np.zeros((num_windows, width), np.int32)
    segments = np.zeros((num_windows, width), np.int32)
    targets = np.zeros((num_windows, width), bool)
    for w in range(num_windows):
        for segment, k in enumerate(range(window_starts[w], window_starts[w + 1]), start=1):
            (ids, target), at, n = rows[row_ids[k]], starts[k], sizes[k]
            windows[w, at:at + n], segments[w, at:at + n] = ids[:n], segment
            targets[w, at + 1:at + n] = target[1:n]
    log(f"{name}: {len(row_ids)} rows packed into {num_windows} windows ({truncated} truncated, "
        f"{len(rows) - len(row_ids)} dropped)")
    return PackedDataset.of_rows(windows, segments, targets, name=name)


def load_chat_splits(d: DataConfig, *, seq_len: int, tokenizer_path: str | None, eos_id: int | None,
                     vocab_size: int | None, log: Callable[[str], None]) -> tuple[PackedDataset, PackedDataset | None]:
    """The train and eval splits of chat data (`data.eval`, else the last `data.eval_fraction` of the train
    rows, else no eval), tokenized with the run's tokenizer and its chat template (`vishwam.data.chat.find_template`
    in the tokenizer's directory)."""
    if tokenizer_path is None:
        raise DataError(f"{d.train[0]} holds chat rows but no tokenizer is given (set data.tokenizer)")
    tokenizer = load_tokenizer(tokenizer_path)
    directory = Path(tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path) or ".")
    template = find_template(d.chat_template, directory)

    def rows_of(paths) -> list[Row]:
        rows = []
        for path in expand_paths(paths):
            if not (path.lower().endswith(".jsonl") or is_table(path)):
                raise DataError(f"{path}: chat data must be .jsonl or .parquet files or save_to_disk datasets")
            encoded = encode_rows(path, tokenizer, template, loss_on=d.loss_on, eos_id=eos_id)
            if vocab_size is not None and encoded:
                check_vocab(np.concatenate([ids for ids, _ in encoded]), vocab_size,
                            f"{path} (tokenized with {tokenizer_path})")
            rows.extend(encoded)
        return rows

    train = rows_of(d.train)
    evaluation = None
    if d.eval:
        if not is_chat(d.eval):
            raise DataError(f"data.train holds chat rows but data.eval ({d.eval[0]}) holds text; give one kind")
        evaluation = rows_of(d.eval)
    elif d.eval_fraction > 0:
        n = int(round(len(train) * d.eval_fraction))
        if n == 0 or n == len(train):
            raise DataError(f"data.eval_fraction {d.eval_fraction} of the {len(train)} training rows leaves an empty "
                            f"{'eval' if n == 0 else 'train'} split")
        train, evaluation = train[: len(train) - n], train[len(train) - n:]
    packed = pack_rows(train, seq_len, name="data.train", log=log)
    return packed, None if evaluation is None else pack_rows(evaluation, seq_len, name="data.eval", log=log)


__all__ = ["checked_messages", "encode_records", "encode_rows", "first_targets", "is_chat", "load_chat_splits",
           "pack_rows", "record_keys", "render_row", "row_kind", "row_parts"]
