"""Reading and writing the safetensors format, slice by slice, with every byte range checked.

Why our own reader: `safetensors.safe_open(framework="numpy")` has no bfloat16 (and Qwen2.5 ships bf16), while
`framework="flax"` materialises each tensor on the default device, not on the device that needs the slice. The
format is simple (an 8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw
little-endian data), and reading it with `os.pread` lets a device read only the rows it owns. Reads do not mmap
the file, so a full load does not also count the file's pages in the process's resident memory.
Safetensors is data only: nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from vishwam.errors import CheckpointError
from vishwam.io.files import atomic_write

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo:
    """Where one tensor lives in a file."""

    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One safetensors file opened for slice reads. The header is validated on open: a truncated file, a
    header that is not JSON, an unknown dtype or inconsistent offsets raise `CheckpointError` naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint shard not found: {self.path}") from None
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint shard {self.path}: {e.strerror}") from None
        try:
            self.tensors, self.metadata, self._data_start = self._parse_header()
        except Exception:
            # Through `close`, which marks the descriptor closed: a bare `os.close` left `__del__` to close the same
            # number again later, by then possibly another file's.
            self.close()
            raise

    def _parse_header(self):
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise CheckpointError(f"{self.path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path} is corrupt or truncated: header length {n} exceeds the file")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path} is corrupt: its safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupt: its safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        data_size = size - data_start
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(o) for o in entry["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a bad header entry ({e})") from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            if end - start != math.prod(shape) * dtype.itemsize or start < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent byte offsets")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes up to {end} of the data section, "
                    f"the file holds {data_size}"
                )
            tensors[name] = TensorInfo(name, dtype, shape, start, end)
        return tensors, metadata, data_start

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in {self.path}") from None

    def _pread(self, offset: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read `nbytes` at `offset` of the data section into `out` (or a fresh aligned uint8 buffer)."""
        buf = aligned_empty((nbytes,), np.uint8) if out is None else out
        view = memoryview(buf).cast("B")
        got = 0
        while got < nbytes:
            n = os.preadv(self._fd, [view[got:]], self._data_start + offset + got)
            if n == 0:
                raise CheckpointError(f"{self.path} is truncated: short read at byte {offset + got}")
            got += n
        return buf

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Read tensor `name`, or only `index` of it (a tuple of slices; steps must be 1). Only the contiguous
        block of leading-axis rows the slice touches is read from disk."""
        info = self.info(name)
        shape = info.shape
        index = normalize_index(index, shape)
        if not shape:
            return self._pread(info.start, info.nbytes).view(info.dtype).reshape(())
        item = info.dtype.itemsize
        row = math.prod(shape[1:]) * item
        r0, r1 = index[0].start, index[0].stop
        full_tail = all(s.start == 0 and s.stop == n for s, n in zip(index[2:], shape[2:]))
        if len(shape) >= 2 and full_tail and (index[1].start, index[1].stop) != (0, shape[1]):
            # A column slice (a row-parallel shard): read just its segment of every row.
            inner = math.prod(shape[2:]) * item
            c0, c1 = index[1].start, index[1].stop
            seg = (c1 - c0) * inner
            out = aligned_empty((r1 - r0, seg), np.uint8)
            for i, r in enumerate(range(r0, r1)):
                self._pread(info.start + r * row + c0 * inner, seg, out[i])
            return out.view(info.dtype).reshape((r1 - r0, c1 - c0) + shape[2:])
        raw = self._pread(info.start + r0 * row, (r1 - r0) * row)
        block = raw.view(info.dtype).reshape((r1 - r0,) + shape[1:])
        rest = block[(slice(None),) + tuple(index[1:])]
        if rest.flags.c_contiguous:
            return rest
        out = aligned_empty(rest.shape, info.dtype)
        out[...] = rest
        return out


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is `align`-byte aligned. JAX's CPU client adopts such a
    buffer without copying it, so a loaded tensor occupies host memory once, not twice."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def normalize_index(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Expand `index` to one unit-step slice per dimension with explicit bounds."""
    index = tuple(index or ())
    if len(index) > len(shape):
        raise ValueError(f"index {index} has more dimensions than shape {shape}")
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("only unit-step slices are supported")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write `tensors` (name → numpy array, bfloat16 included) as one safetensors file, atomically
    (a temporary file renamed into place)."""
    path = os.fspath(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))

    atomic_write(path, write)


def dtype_name(dtype: np.dtype) -> str:
    return _NAMES[np.dtype(dtype)]


def open_all(paths: Iterable[str]) -> dict[str, SafetensorsFile]:
    return {p: SafetensorsFile(p) for p in paths}
