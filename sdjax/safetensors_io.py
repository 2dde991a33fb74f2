"""Streaming safetensors reader and writer.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page touched stays in
the process's resident set until the kernel evicts it, so loading a 3.4 GB UNet and
converting it costs up to twice its size in RSS. Reading each tensor with a plain
``readinto`` keeps the peak at the final params plus one tensor. The format is a u64
header length, a JSON header, then raw little-endian tensor bytes.
The writer likewise streams tensor by tensor instead of building the file in memory.
"""
from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from .files import atomic_write

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read (names the file and the problem)."""


def _is_count(v):
    """A non-negative integer from JSON (bools and floats are not)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Reader:
    """Open a safetensors file, validate its header against its size, read tensors one at a time."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        try:
            self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _parse_header(self):
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{self.path}: corrupt or truncated safetensors file "
                                   f"(header says {n} bytes, file has {size})")
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                   "expected an object of tensor entries)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (__metadata__ must map strings "
                                   "to strings)")
        self._base = 8 + n
        self.entries = {}
        for key, e in header.items():
            try:
                dtype = np.dtype(DTYPES[e["dtype"]])
                shape = tuple(e["shape"])
                start, end = e["data_offsets"]
                if not all(_is_count(v) for v in (*shape, start, end)) or start > end:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: corrupt header entry for {key!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - start != nbytes:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has {end - start} bytes for "
                                       f"shape {shape} {e['dtype']}")
            if self._base + end > size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {key!r} ends at byte "
                                       f"{self._base + end}, file has {size}")
            self.entries[key] = (dtype, shape, start)

    def keys(self):
        return list(self.entries)

    def shape(self, key):
        return self.entries[key][1]

    def dtype(self, key):
        return self.entries[key][0]

    def get(self, key) -> np.ndarray:
        dtype, shape, start = self.entries[key]
        out = np.empty(shape, dtype)
        self._f.seek(self._base + start)
        if self._f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise SafetensorsError(f"{self.path}: truncated while reading {key!r}")
        return out

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Lazy:
    """A tensor known by shape and dtype whose values ``fn()`` makes when written."""

    def __init__(self, shape, dtype, fn):
        self.shape, self.dtype, self.fn = tuple(shape), np.dtype(dtype), fn

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.fn())


def write(path, tensors, metadata=None):
    """Write ``tensors`` ({name: array}, or (name, array) pairs; arrays may be ``Lazy``) to ``path``.

    Tensors are pulled to host one at a time, so a ``Lazy`` conversion costs one tensor of
    memory. The file appears under its final name only once complete.
    """
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header, offset = {}, 0
    for name, a in items:
        dt = np.dtype(a.dtype)
        if dt not in NAMES:
            raise SafetensorsError(f"{path}: cannot store dtype {dt} of {name!r}")
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align tensor data to 8 bytes
    def write_all(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, a in items:
            f.write(np.ascontiguousarray(np.asarray(a)).tobytes())
    atomic_write(path, write_all)
