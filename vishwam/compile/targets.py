"""The machine a dry run compiles for (`training.compile_target`), when it is not this one.

- `tpu:<generation>-<size>` (`tpu:v5p-16`, `tpu:v5e-16`, `tpu:v4-32`, `tpu:v6e-8`): the TPU slice's devices as
  libtpu describes its topology (`jax.experimental.topologies`), on any host, with nothing attached: XLA's TPU
  compiler then lays out every program for those chips and reports their HBM use (the way MaxText's
  `train_compile.py` does). `<size>` counts TensorCores for v4/v5p (two per chip) and chips for v5e/v6e, as the
  slice names do. Needs the `[tpu]` extra (libtpu), and the process set up for it by the entry point
  (`TPU_SKIP_MDS_QUERY=1`, `jax_platforms=cpu`: `configure_process`).
- `cpu:<N>`: N simulated host devices (`--xla_force_host_platform_device_count`, set by the entry point before
  JAX starts): XLA:CPU's figures, the estimate for GPU meshes (it upcasts bfloat16 work, so it runs high).
- None: this host's own devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

from vishwam.errors import ConfigError
from vishwam.plan.capacity import device_capacity

GiB = 2**30
#: HBM per chip, by generation (public specifications).
TPU_HBM = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": int(95.74 * GiB), "v6e": 32 * GiB}
#: Cores per chip in a slice's name (v4-8 and v5p-8 are 4 chips; v5e-8 and v6e-8 are 8).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: tuple
    capacity: int | None
    capacity_source: str
    compiler: str  # "XLA:TPU" | "XLA:CPU" | the local platform


def _grid(chips: int, dims: int) -> str:
    """A near-cubic (or square) torus shape holding `chips`, filled x, y, z in turn: 4 -> 2x2x1, 16 -> 4x2x2."""
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    if math.prod(shape) != chips:
        raise ConfigError(f"config key 'training.compile_target': {chips} chips do not form a TPU topology")
    return "x".join(map(str, shape))


def configure_process(target: str | None) -> None:
    """What the entry point must set before JAX starts its backends, for `target` (environment and the platform
    list; the library itself never does this)."""
    if target is None:
        return
    if target.startswith("tpu:"):
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        jax.config.update("jax_platforms", "cpu")
    elif target.startswith("cpu:"):
        n = int(target.split(":", 1)[1])
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        jax.config.update("jax_platforms", "cpu")


def resolve_target(target: str | None, mesh_devices: int) -> Target:
    """The devices and per-device capacity of `target` (see the module docstring)."""
    if target is None:
        capacity, source = device_capacity(mesh_devices)
        return Target("local", tuple(jax.devices()), capacity, source, f"XLA:{jax.devices()[0].platform.upper()}")
    key = "config key 'training.compile_target'"
    if m := re.fullmatch(r"cpu:(\d+)", target):
        n = int(m.group(1))
        devices = tuple(jax.devices("cpu"))
        if len(devices) < n:
            raise ConfigError(f"{key} is {target!r}, but this process has {len(devices)} CPU devices (run through "
                              "run.py, which sets them up)")
        env = os.environ.get("VISHWAM_DEVICE_MEMORY")
        capacity, source = device_capacity(mesh_devices) if env else (None, "unknown: set VISHWAM_DEVICE_MEMORY")
        return Target(target, devices[:n], capacity, source, "XLA:CPU")
    m = re.fullmatch(r"tpu:(v4|v5e|v5p|v6e)-(\d+)", target)
    if not m:
        raise ConfigError(f"{key} must be tpu:<v4|v5e|v5p|v6e>-<size> (e.g. tpu:v5p-16) or cpu:<N>, got {target!r}")
    generation, size = m.group(1), int(m.group(2))
    chips = max(1, size // _CORES_PER_CHIP[generation])
    try:  # libtpu (the [tpu] extra) describes chips that are not here
        topology = topologies.get_topology_desc(
            topology_name=f"{generation}:{_grid(chips, 3 if generation in ('v4', 'v5p') else 2)}",
            chip_config_name="megacore" if generation in ("v4", "v5p") else "default",
            chips_per_host_bounds=(2, 2, 1), num_slices=1, platform="tpu")
    except ConfigError:
        raise
    except Exception as e:  # libtpu missing or refusing the topology
        raise ConfigError(f"{key} {target!r}: libtpu cannot describe this TPU topology "
                          f"({' '.join(str(e).split())[:160]}); install the [tpu] extra") from None
    return Target(target, tuple(topology.devices), TPU_HBM[generation], f"{generation} HBM per chip", "XLA:TPU")


__all__ = ["TPU_HBM", "Target", "configure_process", "resolve_target"]
