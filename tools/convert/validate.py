"""Step 1: read and validate the source from its headers alone, before anything is written."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import names
from common.checkpoint import Checkpoint, lookup, resolve_names
from common.config import ModelConfig
from common.safetensors_io import DTYPES, CheckpointError
from ops import quant

from .files import FLOAT_TAGS, INT_TAGS


@dataclass(frozen=True)
class Loc:
    """Where a stored array lives: absolute byte offset in a file."""

    file: Path
    offset: int
    nbytes: int
    tag: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Source:
    name: str  # official name
    shape: tuple[int, ...]  # logical shape
    kind: str  # 'f' / 'i'
    weight: Loc
    scale: Loc | None
    fmt: str | None  # quant format of (weight, scale), None for a plain tensor
    fmt_kw: tuple[tuple[str, Any], ...]
    stored_as: str  # for messages: checkpoint name

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.scale.nbytes if self.scale else 0)


def _loc(ckpt: Checkpoint, cname: str) -> Loc:
    info = ckpt.info(cname)
    f = ckpt.files[ckpt.where[cname]]
    return Loc(info.file, f.data_start + info.begin, info.nbytes, info.dtype, info.shape)


def scan_source(cfg: ModelConfig, ckpt: Checkpoint) -> tuple[list[Source], list[str]]:
    """Every tensor the model reads, validated from headers alone (the loader's rules); plus unused names."""
    resolved = resolve_names(ckpt)
    with_mtp = cfg.n_mtp_layers > 0 and any(n.startswith("mtp.") for n in resolved)
    out: list[Source] = []
    used: set[str] = set()
    for name, shape, kind in names.expected_tensors(cfg, with_mtp=with_mtp):
        cname, sel = lookup(ckpt, resolved, name)
        used.add(cname)
        info = ckpt.info(cname)
        shown = name if cname == name else f"{name} (stored as {cname})"
        if sel is not None:  # one expert's slice of a fused transformers tensor [E, 2I, d] / [E, d, I]
            e, which = sel
            I, d, E = cfg.moe_inter_dim, cfg.dim, cfg.n_routed_experts
            want = (E, 2 * I, d) if which in ("w1", "w3") else (E, d, I)
            if info.shape != want:
                raise CheckpointError(f"{info.file}: tensor {cname!r} has shape {list(info.shape)}, "
                                      f"expected {list(want)}")
            if info.dtype not in FLOAT_TAGS:
                raise CheckpointError(f"{info.file}: tensor {cname!r} is stored as {info.dtype}, not a float type")
            base = _loc(ckpt, cname)
            isz = DTYPES[info.dtype].itemsize
            row0 = e * want[1] + (I if which == "w3" else 0)
            n = shape[0] * shape[1]
            loc = Loc(base.file, base.offset + row0 * want[2] * isz, n * isz, info.dtype, shape)
            out.append(Source(name, shape, kind, loc, None, None, (), shown))
            continue
        sname = names.scale_name(name)
        if sname in resolved and kind == "f":
            scname = resolved[sname][0]
            used.add(scname)
            sinfo = ckpt.info(scname)
            try:
                fmt, kw = quant.detect_format(info.dtype, info.shape, sinfo.dtype, sinfo.shape, shape)
            except ValueError as e:
                raise CheckpointError(f"{info.file}: tensor {name!r}: {e}") from None
            out.append(Source(name, shape, kind, _loc(ckpt, cname), _loc(ckpt, scname), fmt,
                              tuple(sorted(kw.items())), shown))
            continue
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {shown} has shape {list(info.shape)}, expected {list(shape)}")
        ok = FLOAT_TAGS if kind == "f" else INT_TAGS
        if info.dtype not in ok:
            what = f"without a scale tensor {sname!r}" if kind == "f" else "(an integer table is expected)"
            raise CheckpointError(f"{info.file}: tensor {shown} is stored as {info.dtype} {what}")
        out.append(Source(name, shape, kind, _loc(ckpt, cname), None, None, (), shown))
    unused = [c for c in ckpt if c not in used]
    return out, unused


class SourceReader:
    """Reads stored arrays with positional reads into fresh buffers (thread-safe; see module docstring)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
            return self._fds[path]

    def read(self, loc: Loc, what: str) -> np.ndarray:
        fd = self._fd(loc.file)
        buf = np.empty(loc.nbytes, dtype=np.uint8)
        done = 0
        while done < loc.nbytes:
            try:
                n = os.preadv(fd, [memoryview(buf)[done:]], loc.offset + done)
            except OSError as e:
                raise CheckpointError(f"{loc.file}: cannot read tensor {what!r} ({e.strerror})") from None
            if n == 0:
                raise CheckpointError(f"{loc.file}: truncated while reading tensor {what!r} "
                                      f"(file ends before byte {loc.offset + loc.nbytes})")
            done += n
        return buf.view(DTYPES[loc.tag]).reshape(loc.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
