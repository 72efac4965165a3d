"""Step 3: read, dequantize and re-encode one row range of one tensor (runs in a worker thread)."""

from __future__ import annotations

import numpy as np

from common import names
from common.recipes import SCHEMES
from common.safetensors_io import DTYPES, CheckpointError
from ops import quant

from . import files
from .files import F32
from .plan import Job, OutTensor, _block_rows
from .validate import Loc, Source, SourceReader


def _rows(loc: Loc, a: int, b: int) -> Loc:
    """Rows [a, b) of a stored C-contiguous array (contiguous bytes)."""
    row = loc.nbytes // loc.shape[0]
    return Loc(loc.file, loc.offset + a * row, (b - a) * row, loc.tag, (b - a,) + loc.shape[1:])


def _dequant_rows(s: Source, raw: np.ndarray, sraw: np.ndarray | None, r0: int, r1: int) -> np.ndarray:
    """float32 rows [r0, r1) of read source rows (r0 on a block-row boundary); ops.quant decodes storage."""
    if s.fmt is None:
        return raw[r0:r1].astype(F32)
    br = _block_rows(s)
    try:
        obj = quant.from_storage(s.fmt, raw[r0:r1], sraw[r0 // br: -(-r1 // br)], **dict(s.fmt_kw))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{s.weight.file}: tensor {s.name!r}: {e}") from None
    return obj.dequantize()


def convert_job(job: Job, reader: SourceReader, group: int | None) -> tuple[list[tuple[OutTensor, int, np.ndarray]],
                                                                            str]:
    """Read, dequantize and re-encode rows [r0, r1) of one tensor. Returns (file tensor, first row, rows) pieces
    and the rows' exactness: 'exact' (bf16/f32 equal to the source values), 'rounded' (bf16 rounding
    happened), 'quantized' (w8a8/w4a8) or 'kept' (integer tables)."""
    t = job.tensor
    s = t.src
    br = _block_rows(s)
    a0 = job.r0 // br * br  # read from the block boundary (TP slice starts need not be on one)
    raw = reader.read(_rows(s.weight, a0, job.r1), s.stored_as)
    if t.scheme == "keep":
        pieces = [raw[job.r0 - a0:]]
        status = "kept"
    else:
        sraw = reader.read(_rows(s.scale, a0 // br, -(-job.r1 // br)), names.scale_name(s.name)) if s.scale else None
        scheme = SCHEMES[t.scheme]
        n = job.r1 - a0
        bufs = [np.empty((n,) + shp[1:], dtype=DTYPES[tag]) for _, tag, shp in t.specs]
        exact = True
        # cache-sized row chunks, multiples of the block rows
        step = max(br, files.CHUNK_ELEMS // max(1, int(np.prod(s.shape[1:], dtype=np.int64))) // br * br)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            x = _dequant_rows(s, raw, sraw, c0, c1)
            finite = np.isfinite(x)
            if not finite.all():  # w8a8 would turn NaN into zeros with scale 1: refuse, never encode garbage
                raise CheckpointError(f"{s.weight.file}: tensor {s.name!r}: {x.size - int(np.count_nonzero(finite))} "
                                      f"non-finite values (NaN/Inf) in rows [{a0 + c0}, {a0 + c1}); not converted")
            del finite
            enc = scheme.encode(x, group or 0)
            for buf, a in zip(bufs, enc, strict=True):
                buf[c0:c1] = a
            if t.scheme == "bf16" and exact:
                # bf16 is float32's upper half (same exponent range): exact iff the low 16 bits are zero.
                # ~13x cheaper than casting back and comparing, which cost more than the dequantization.
                exact = not np.any(x.view(np.uint32) & np.uint32(0xFFFF))
            del x, enc
        pieces = [b[job.r0 - a0:] for b in bufs]
        status = "quantized" if scheme.linear_only else ("exact" if exact else "rounded")
        if status == "rounded" and s.fmt in ("fp8", "fp4"):
            # ue8m0 scales are powers of two: e4m3 / e2m1 times them always fits bf16 unless a scale is
            # outside bf16's exponent range, which no real release has; refuse rather than round silently
            raise CheckpointError(f"{s.weight.file}: tensor {s.name!r}: {s.fmt} values times its ue8m0 scales are "
                                  f"not exactly representable in bf16 (scale out of range)")
    if t.split is None:
        return [(o, job.r0, p) for o, p in zip(job.outputs, pieces, strict=True)], status
    axis, _ = t.split
    tp = len(t.outputs) // len(t.specs)
    if axis == 0:  # these rows lie in one slice
        off = job.r0 - job.tp_slice * (s.shape[0] // tp)
        return [(o, off, p) for o, p in zip(job.outputs, pieces, strict=True)], status
    outs = []
    for ti in range(tp):  # split along the input columns
        for k, p in enumerate(pieces):
            o = job.outputs[ti * len(t.specs) + k]
            if p.ndim > axis:  # else a per-output-channel scale of a row-parallel weight: replicated
                w = p.shape[axis] // tp
                p = np.ascontiguousarray(p[:, ti * w:(ti + 1) * w])
            outs.append((o, job.r0, p))
    return outs, status
