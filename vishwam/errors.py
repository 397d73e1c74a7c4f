"""User-facing errors: every one the project raises, in one namespace.

`ConfigError` and the base `VishwamError` are defined in `models.errors`, `DataError` in `distill.errors` (the
lowest layer that raises each); this module adds `CheckpointError` and re-exports them all. `run.py` turns any
`VishwamError` into one line on stderr and exit status 2; the message must name the culprit (file, key or
tensor) on its own, without the traceback.
"""

from __future__ import annotations

from distill.errors import DataError
from models.errors import ConfigError, VishwamError


class CheckpointError(VishwamError):
    """A checkpoint directory, index, shard or tensor is missing, truncated, corrupt or of the wrong shape."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "VishwamError"]
