"""The errors `distill` raises: the model layer's, plus :class:`DataError` for token ids a model cannot take."""

from __future__ import annotations

from models.errors import ConfigError, VishwamError


class DataError(VishwamError):
    """A data file is missing, unreadable, or holds token ids the models cannot take."""


__all__ = ["ConfigError", "DataError", "VishwamError"]
