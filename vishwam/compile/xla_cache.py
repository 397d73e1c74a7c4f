"""XLA's persistent compilation cache for a run (`training.compilation_cache`).

A program at the flagship's size takes minutes to compile. With the cache on, each is compiled once: the compile
check's compiles (from abstract shapes, before any weight is read) are written to the cache and read back when the
run calls the same program on its arrays, and a resumed run reads back every program of the run before it. JAX's
cache is keyed on the program's HLO, the devices and the compile options; a cache entry is an executable, so the
directory must be one only you can write (JAX: "the compilation cache is considered trusted"): a directory made
here is private to this user whatever the umask (its missing parents too), and an existing one owned by another
user, or that the group or others may write to, is refused with one line naming it. Every program goes through
the cache, however short its compile (JAX's `jax_persistent_cache_min_compile_time_secs` is 0 within the block).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from vishwam.config.sections import RunConfig
from vishwam.errors import ConfigError


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


def private_directory(directory: Path) -> None:
    """Make `directory` and its missing parents, each readable, writable and searchable by this user alone
    (`mkdir`'s mode is cut by the umask, which may also leave bits off: each is set to 0700 after); raise a
    one-line `ConfigError` when the directory is not one, is another user's, or the group or others may write
    to it."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process: checked below like any existing one
            continue
        except OSError as error:
            raise ConfigError(f"{_WHAT}: cannot create {path} ({error.strerror or error})") from None
        os.chmod(path, 0o700)
    try:
        info = directory.stat()
    except OSError as error:
        raise ConfigError(f"{_WHAT}: cannot use {directory} ({error.strerror or error})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{_WHAT}: {directory} is not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{_WHAT}: {directory} belongs to user id {info.st_uid}, not to this user "
                          f"({os.getuid()}); its entries are executables: use a directory of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for w, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                           if info.st_mode & bit)
        raise ConfigError(f"{_WHAT}: {directory} may be written by {who} (mode {stat.S_IMODE(info.st_mode):o}); "
                          f"its entries are executables: chmod go-w {directory}, or use another directory")


_WHAT = "the XLA compilation cache (training.compilation_cache)"


@contextlib.contextmanager
def compilation_cache(directory: Path | None) -> Iterator[CacheUse | None]:
    """Within the block JAX compiles every program, however short its compile, through the persistent cache in
    `directory` (see `private_directory`); yields the `CacheUse` it counts into (None, and nothing changes, when
    `directory` is None). JAX's cache settings are process-wide: they are put back as they were when the block
    ends."""
    global _listening
    if directory is None:
        yield None
        return
    private_directory(directory)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True
    previous = jax.config.jax_compilation_cache_dir
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    use = CacheUse(directory)
    jax_cache.set_cache_dir(str(directory))
    # JAX stores only programs that took a second or more to compile: each program compiled once means all of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax_cache.reset_cache()  # JAX opens its cache once: from here on, this directory
    _active.append(use)
    try:
        yield use
    finally:
        _active.remove(use)
        jax_cache.set_cache_dir(previous)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
        jax_cache.reset_cache()


__all__ = ["CacheUse", "cache_dir", "compilation_cache", "private_directory"]
