"""Atomic file writes: the one way this project writes a file that a reader, or a crash, may catch half-done
(and `sha256_file`, the one file checksum; `blocking_file` and `require_directory`, a file where a directory
is expected).

The content goes to a temporary file with a unique name (`mkstemp`: unique across processes and threads) in the
destination's directory and is renamed over the destination, so readers see the old file or the new one, never
a mix, and two writers never share a temporary file. The result gets the mode an ordinary `open(path, "w")`
would give it (0666 less the umask), not `mkstemp`'s 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vishwam.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write `content` (text, bytes, or a function that writes to a binary file) to `path` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def blocking_file(path: str | os.PathLike[str]) -> Path | None:
    """What stops `path` from being used, or created, as a directory: `path` itself or its nearest existing
    ancestor when that is not a directory (a file where a directory is expected); None when nothing does."""
    path = Path(path).expanduser()
    for existing in (path, *path.parents):
        if existing.exists() or existing.is_symlink():
            return None if existing.is_dir() else existing
    return None


def require_directory(path: str | os.PathLike[str], what: str) -> None:
    """Raise a one-line `ConfigError` when `blocking_file(path)` finds something; `what` names where `path` came
    from (a config key, a flag)."""
    found = blocking_file(path)
    if found is not None:
        kind = "a file" if found.is_file() else "not a directory"
        raise ConfigError(f"{what} ({os.fspath(path)}) must be a directory, and {found} is {kind}"
                          + ("" if kind == "not a directory" else ", not a directory"))


__all__ = ["atomic_write", "blocking_file", "require_directory", "sha256_file"]
