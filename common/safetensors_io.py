"""Memory-mapped safetensors reading (zero-copy numpy views) with validation.

Written here rather than using `safetensors.numpy`, because that API copies every tensor into memory
and has no float8 / e8m0 dtypes; the format itself is an 8-byte header length, a JSON header and a
flat byte buffer, so a map of the file is all that is needed.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype tag -> numpy dtype (the one table for it)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
TAGS = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, malformed or holds the wrong tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file, mapped read-only; `get` returns views into the map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated ({size} bytes, no safetensors header)")
        (hlen,) = struct.unpack("<Q", self._fh.read(8))
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise CheckpointError(f"{self.path}: truncated or not safetensors (header of {hlen} bytes, file of {size})")
        try:
            header = json.loads(self._fh.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        data_len = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            try:
                dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            need = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if e - b != need:
                raise CheckpointError(f"{self.path}: tensor {name!r} spans {e - b} bytes, its shape {list(shape)} "
                                      f"and dtype {dtype} need {need}")
            if e > data_len:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {self.data_start + e}, "
                                      f"file has {size}")
            self.tensors[name] = TensorInfo(name, dtype, shape, b, e, self.path)
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        dt = DTYPES[info.dtype]
        count = int(np.prod(info.shape, dtype=np.int64))
        arr = np.frombuffer(self._map, dtype=dt, count=count, offset=self.data_start + info.begin)
        return arr.reshape(info.shape)

    def close(self) -> None:
        # views may still reference the map; let the GC close it with them
        self._fh.close()


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays (any dtype in DTYPES, float8 included) to `path` via a temp file and rename."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in TAGS:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {a.dtype} with no safetensors tag")
        header[name] = {"dtype": TAGS[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        arrays.append(a)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in arrays:
            f.write(a.tobytes() if a.ndim == 0 else memoryview(a.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
