"""Memory-mapped safetensors reading (zero-copy numpy views) with validation.

Written here rather than using `safetensors.numpy`, because that API copies every tensor into memory
and has no float8 / e8m0 dtypes; the format itself is an 8-byte header length, a JSON header and a
flat byte buffer, so a map of the file is all that is needed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"key {k!r} appears twice in the header")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


Entry = tuple[str, tuple[int, ...], int, int]  # dtype, shape, begin, end (data bytes)


def parse_header(raw: bytes, data_len: int, where: str) -> tuple[dict[str, str], dict[str, Entry]]:
    """Validate a safetensors JSON header against a data buffer of `data_len` bytes; -> (metadata,
    name -> (dtype, shape, begin, end)). The layout rules are those of the reference implementation
    (huggingface/safetensors, safetensors/src/tensor.rs `Metadata::validate` and `read_metadata`): tensors
    sorted by offsets lie back to back from byte 0 (no overlap, no gap), each spans exactly
    prod(shape) * itemsize bytes, and the last ends at the end of the file. Every error names the tensor."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (a JSON {type(header).__name__}, expected an "
                              f"object of tensor entries)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: __metadata__ must be an object of strings")
    entries = []
    for name, h in header.items():
        t = f"{where}: tensor {name!r}"
        if not isinstance(h, dict) or set(h) - {"dtype", "shape", "data_offsets"} or len(h) != 3:
            raise CheckpointError(f"{t}: header entry must be an object with dtype, shape and data_offsets")
        dtype, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{t} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{t}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise CheckpointError(f"{t}: data_offsets {offs!r} is not a pair of integers")
        b, e = offs
        if b < 0 or e < b:
            raise CheckpointError(f"{t}: data_offsets [{b}, {e}] are not 0 <= begin <= end")
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if e - b != need:
            raise CheckpointError(f"{t} spans {e - b} bytes, its shape {shape} and dtype {dtype} need {need}")
        if e > data_len:
            raise CheckpointError(f"{where}: truncated: tensor {name!r} ends at data byte {e}, the file holds "
                                  f"{data_len} data bytes")
        entries.append((b, e, name, dtype, tuple(shape)))
    entries.sort(key=lambda x: (x[0], x[1]))
    pos, prev = 0, None
    for b, e, name, _, _ in entries:
        if b < pos:
            raise CheckpointError(f"{where}: tensor {name!r} (data bytes {b}..{e}) overlaps tensor {prev!r} "
                                  f"(ending at {pos})")
        if b > pos:
            raise CheckpointError(f"{where}: tensor {name!r} starts at data byte {b}, but "
                                  + (f"tensor {prev!r} ends at {pos}" if prev else "the data starts at 0")
                                  + " (tensors must lie back to back)")
        pos, prev = e, name
    if pos != data_len:
        raise CheckpointError(f"{where}: {data_len - pos} bytes after the last tensor"
                              + (f" ({prev!r})" if prev else "") + " are not described by the header")
    return meta, {name: (dtype, shape, b, e) for b, e, name, dtype, shape in entries}


class SafetensorsFile:
    """One .safetensors file, mapped read-only; `get` returns views into the map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            if self.path.exists() and not self.path.is_file():  # a FIFO or device would block or mislead
                raise CheckpointError(f"{self.path}: not a regular file")
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            self._fh.close()
            raise CheckpointError(f"{self.path}: truncated ({size} bytes, no safetensors header)")
        (hlen,) = struct.unpack("<Q", self._fh.read(8))
        if hlen > MAX_HEADER or 8 + hlen > size:
            self._fh.close()
            raise CheckpointError(f"{self.path}: truncated or not safetensors (header of {hlen} bytes, file of {size})")
        self.data_start = 8 + hlen
        try:
            self.metadata, entries = parse_header(self._fh.read(hlen), size - self.data_start, str(self.path))
        except CheckpointError:
            self._fh.close()
            raise
        self.tensors: dict[str, TensorInfo] = {
            name: TensorInfo(name, dtype, shape, b, e, self.path) for name, (dtype, shape, b, e) in entries.items()}
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        dt = DTYPES[info.dtype]
        count = math.prod(info.shape)
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
