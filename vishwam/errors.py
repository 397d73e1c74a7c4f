"""User-facing errors.

A :class:`VishwamError` is a mistake in what the user gave us (a path, a shard, a config key, an architecture,
a layer mapping, data). `run.py` turns it into one line on stderr and exit status 2; the message must name the
culprit (file, key or tensor) on its own, without the traceback.
"""

from __future__ import annotations


class VishwamError(Exception):
    """A user error: bad input that the user can fix. The message names the file, key or tensor."""


class CheckpointError(VishwamError):
    """A checkpoint directory, index, shard or tensor is missing, truncated, corrupt or of the wrong shape."""


class ConfigError(VishwamError):
    """A config key is unknown, ill-typed, or describes an impossible architecture or mapping."""


class DataError(VishwamError):
    """A data file is missing, unreadable, or holds token ids the models cannot take."""
