"""User-facing errors, defined at the lowest layer that raises them.

A :class:`VishwamError` is a mistake in what the user gave us (a path, a shard, a config key, an architecture,
a layer mapping, data). The message must name the culprit (file, key or tensor) on its own, without the
traceback: `run.py` turns any `VishwamError` into one line on stderr and exit status 2.

`models` raises :class:`ConfigError` (an impossible architecture); `distill` adds :class:`DataError`
(`distill.errors`), `vishwam` adds :class:`CheckpointError` (`vishwam.errors`, which re-exports all of them).
"""

from __future__ import annotations


class VishwamError(Exception):
    """A user error: bad input that the user can fix. The message names the file, key or tensor."""


class ConfigError(VishwamError):
    """A config key is unknown, ill-typed, or describes an impossible architecture or mapping."""
