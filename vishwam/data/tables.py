"""Tables as data: `.parquet` files and directories written by HF `datasets`' `save_to_disk`, read with `pyarrow`
(an optional dependency, the `[data]` extra: imported when a table is read, and a one-line `DataError` naming
the file and the extra when it is missing); and `hf:NAME[:split]` entries, a `datasets` hub id or a local dataset
directory read with `datasets.load_dataset(NAME, split=split, streaming=True)` (split default `train`), row by
row, into the token store (`vishwam.data.prepare`); offline or unknown, it is one line naming the dataset.

A `save_to_disk` directory holds `state.json` (its `_data_files` name the `.arrow` shards, in order) beside the
shards, in the Arrow IPC stream format `datasets` writes. A `DatasetDict`'s directory (`dataset_dict.json` and one
such directory per split) is named by one split's directory. Rows come back as dicts (`to_pylist`): a nested
field some rows lack is None in them, as `datasets` gives it.
"""

from __future__ import annotations

import json
import os

from vishwam.errors import DataError


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a directory written by `datasets.Dataset.save_to_disk` (a `state.json` beside it)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def is_table(path: str) -> bool:
    """Whether `path` is read as a table of rows by `table_records`: a `.parquet` file or a `save_to_disk`
    directory."""
    return path.lower().endswith(".parquet") or is_saved_dataset(path)


def _pyarrow(path: str):
    try:
        import pyarrow  # optional: the [data] extra
        import pyarrow.parquet  # noqa: F401  (the submodule, for read_table)
    except ImportError:
        raise DataError(f"{path}: reading .parquet files and save_to_disk datasets needs pyarrow "
                        f"(pip install 'vishwam[data]')") from None
    return pyarrow


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None


def _arrow_files(path: str) -> list[str]:
    """The `.arrow` files of a `save_to_disk` directory, in the order its `state.json` lists them."""
    where = os.path.join(path, "state.json")
    try:
        state = json.loads(_read_text(where))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{where}: not a datasets save_to_disk state (expected '_data_files' with file names)") from None
    files = [os.path.join(path, name) for name in names]
    for file in files:
        if not os.path.isfile(file):
            raise DataError(f"{where} lists {os.path.basename(file)}, which is not in {path}")
    return files


def _ipc_reader(pa, source):
    """A reader of an `.arrow` file: the IPC stream format `datasets` writes, else the IPC file format."""
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def read_table(path: str):
    """A `.parquet` file or a `save_to_disk` directory as one `pyarrow.Table` (a `DataError` names a file that
    pyarrow cannot read)."""
    pa = _pyarrow(path)
    if not is_saved_dataset(path):
        try:
            return pa.parquet.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(error).split())})") from None
    tables = []
    for file in _arrow_files(path):
        try:  # datasets writes the Arrow IPC stream format; the file format is read too
            with pa.memory_map(file) as source:
                tables.append(_ipc_reader(pa, source).read_all())
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{file}: not a readable Arrow file ({' '.join(str(error).split())})") from None
    if not tables:
        raise DataError(f"{path}: the saved dataset lists no .arrow files")
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: its .arrow files differ in columns ({' '.join(str(error).split())})") from None


def table_columns(path: str) -> list[str]:
    """The column names of a `.parquet` file or a `save_to_disk` directory, read from its schema alone."""
    pa = _pyarrow(path)
    try:
        if not is_saved_dataset(path):
            return list(pa.parquet.read_schema(path).names)
        files = _arrow_files(path)
        if not files:
            raise DataError(f"{path}: the saved dataset lists no .arrow files")
        with pa.memory_map(files[0]) as source:
            return list(_ipc_reader(pa, source).schema.names)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read its columns ({' '.join(str(error).split())})") from None


def table_records(path: str) -> list[tuple[str, object]]:
    """`(where, row as a dict)` of each row of a `.parquet` file or a `save_to_disk` directory; `where` is
    `path row i` (`i` counts from 0, as `dataset[i]` does)."""
    return [(f"{path} row {i}", record) for i, record in enumerate(read_table(path).to_pylist())]




__all__ = ["is_saved_dataset", "is_table", "read_table", "table_columns", "table_records"]


HF_PREFIX = "hf:"


def is_hf(path: str) -> bool:
    """Whether a data entry names a `datasets` dataset (`hf:NAME[:split]`)."""
    return str(path).startswith(HF_PREFIX)


def _hf_stream(path: str):
    name, _, split = path[len(HF_PREFIX):].partition(":")
    if not name:
        raise DataError(f"data entry {path!r}: name a dataset, hf:NAME[:split]")
    try:
        import datasets  # optional: the [data] extra
    except ImportError:
        raise DataError(f"{path}: reading datasets needs the datasets package (pip install 'vishwam[data]')") from None
    try:
        return iter(datasets.load_dataset(name, split=split or "train", streaming=True))
    except Exception as error:  # datasets raises many kinds (offline, unknown, a bad split): one line names it
        message = " ".join(str(error).split())[:300] or type(error).__name__
        raise DataError(f"data entry {path}: cannot load the dataset {name!r} (split {split or 'train'!r}): "
                        f"{message}") from None


def hf_columns(path: str) -> list[str]:
    """The fields of a dataset's first row."""
    first = next(_hf_stream(path), None)
    return list(first) if isinstance(first, dict) else []


def hf_records(path: str):
    """`(where, row as a dict)` of each row of the dataset `path` names, streamed (`where` is `path row i`)."""
    for i, record in enumerate(_hf_stream(path)):
        yield f"{path} row {i}", record

