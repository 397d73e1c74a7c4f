"""How many bytes one device holds, for checking a memory plan.

The `device_bytes` argument of `vishwam.plan.planner.plan` when given, else `$VISHWAM_DEVICE_MEMORY` (e.g. `80GiB`,
for planning a machine this is not), else the accelerator's `memory_stats()["bytes_limit"]`, else this host's
RAM divided by its local device count when the mesh fits on this host. Otherwise (planning an 8-device mesh on
a 1-CPU laptop) the capacity is unknown and the plan is printed, not checked.
"""

from __future__ import annotations

import os
import re

import jax

from vishwam.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"VISHWAM_DEVICE_MEMORY={text!r} is not a size such as 80GiB or 96GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def device_capacity(mesh_devices: int, device_count: int | None = None) -> tuple[int | None, str]:
    """`(bytes per device, where that came from)` for a mesh of `mesh_devices` devices (see module docstring)."""
    env = os.environ.get("VISHWAM_DEVICE_MEMORY")
    if env:
        return parse_bytes(env), "VISHWAM_DEVICE_MEMORY"
    devices = jax.local_devices()
    try:
        stats = devices[0].memory_stats()
    except Exception:  # backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{devices[0].device_kind} bytes_limit"
    count = device_count or len(devices)
    if mesh_devices > count:
        return None, f"the mesh needs {mesh_devices} devices, this host has {count} {devices[0].platform}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // count, f"host RAM / {count} local {devices[0].platform} device(s)"


__all__ = ["device_capacity", "parse_bytes"]
