"""XLA's persistent compilation cache for a run (`training.compilation_cache`).

A program at the flagship's size takes minutes to compile. With the cache on, each is compiled once: the compile
check's compiles (from abstract shapes, before any weight is read) are written to the cache and read back when the
run calls the same program on its arrays, and a resumed run reads back every program of the run before it. JAX's
cache is keyed on the program's HLO, the devices and the compile options; a cache entry is an executable, so the
directory must be one only you can write (JAX: "the compilation cache is considered trusted").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from vishwam.config.sections import RunConfig


def cache_dir(cfg: RunConfig, compile_check: bool) -> Path | None:
    """The cache's directory for `cfg` (`training.compilation_cache`), None when off; 'auto' is on when the run's
    compile check runs (`compile_check`)."""
    setting = cfg.training.compilation_cache
    if setting == "off" or (setting == "auto" and not compile_check):
        return None
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vishwam" / "xla"
    return Path(setting).expanduser()


@dataclasses.dataclass
class CacheUse:
    """Compiles that went through the cache while it was on: how many, how many were read back, seconds saved."""

    directory: Path
    requests: int = 0
    hits: int = 0
    seconds_saved: float = 0.0

    def summary(self) -> str:
        return (f"XLA compilation cache {self.directory}: {self.hits} of {self.requests} programs read back "
                f"({self.seconds_saved:.1f} s of compiling saved)")


_active: list[CacheUse] = []


def _on_event(event: str, **_) -> None:
    if _active and event == "/jax/compilation_cache/compile_requests_use_cache":
        _active[-1].requests += 1
    elif _active and event == "/jax/compilation_cache/cache_hits":
        _active[-1].hits += 1


def _on_duration(event: str, seconds: float, **_) -> None:
    if _active and event == "/jax/compilation_cache/compile_time_saved_sec":
        _active[-1].seconds_saved += seconds


_listening = False


@contextlib.contextmanager
def compilation_cache(directory: Path | None) -> Iterator[CacheUse | None]:
    """Within the block JAX compiles through the persistent cache in `directory` (created, private to this user);
    yields the `CacheUse` it counts into (None, and nothing changes, when `directory` is None). JAX's cache setting
    is process-wide: it is put back as it was when the block ends."""
    global _listening
    if directory is None:
        yield None
        return
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True
    previous = jax.config.jax_compilation_cache_dir
    use = CacheUse(directory)
    jax_cache.set_cache_dir(str(directory))
    jax_cache.reset_cache()  # JAX opens its cache once: from here on, this directory
    _active.append(use)
    try:
        yield use
    finally:
        _active.remove(use)
        jax_cache.set_cache_dir(previous)
        jax_cache.reset_cache()


__all__ = ["CacheUse", "cache_dir", "compilation_cache"]
