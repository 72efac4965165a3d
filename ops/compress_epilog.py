"""NumPy goldens of the 950 (A5) compress epilogs: fp8 quantisation + scatter of compressed KV / indexer keys.

The two kernels vllm-ascend's A5 path calls instead of a plain scatter (vllm_ascend/device/device_op.py:1469-1523 at
182b75e), with their own signatures (csrc/torch_binding.cpp ops.def 2395, 2484) and byte layouts:

* ``kv_compress_epilog(kv_compress_cache!, x, slot_mapping, quant_group_size, quant_mode, round_scale_flag,
  layout)``: x [T, D] bf16, the last 64 columns being the rope part. Layout 1 writes one cache row per slot (row
  stride = the cache's stride(0), torch_binding.cpp:1480) of ``kv_cache_col`` bytes = roundup(concat, 128):
  quant_mode 2 (MXFP8, what vllm-ascend calls): [rope bf16 bytes 128][fp8 D-64][e8m0 scale per 64]; quant_mode 1
  (group fp8): [fp8 D-64][rope bf16 bytes 128][float32 scale per group]; zero padding after. The formulas are
  those of hicann/cann-recipes-infer@fbc225d ops/ascendc/examples/test_npu_kv_compress_epilog.py
  (calc_kv_compress_layout, golden_mxfp8_row, golden_group_fp8_row); the byte widths agree with vllm-ascend's
  tiling (csrc/attention/kv_compress_epilog/op_host/kv_compress_epilog_tiling_arch35.cpp:198-213).
* ``indexer_compress_epilog_v2(indexer_compress_cache!, x, slot_mapping, layout=2)``: x [T, d] fp16/bf16, cache
  uint8 [blocks, bs, 1, W]; fp8 e4m3fn per 128-column block with a float32 scale; per block of the cache the bs
  value rows (d bytes each) come first, then the bs scale rows (4 * ceil(d/128) bytes each), the block being
  stride(0) bytes long (op_kernel/indexer_compress_epilog_v2_single_row.h:83-87). scale = amax(finite |x|) *
  float32(1/448) (op_kernel/indexer_compress_epilog_v2_base.h:37-38, 190-206: multiplied by the inverse, not
  divided); an element whose x/scale is not finite keeps x (base.h:209-212), so an all-zero block gives scale 0
  and zeros.

Slots < 0 are skipped (padding rows). Caches are ml_dtypes fp8 (kv) or uint8 (indexer) arrays, written in place.
What the kernels do not check and would write out of bounds (a slot past the cache) is refused here.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from .quant import E4M3, E8M0, F32, FP8_MAX, pow2_ceil

E5M2 = np.dtype(ml_dtypes.float8_e5m2)
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_MAXES = {E4M3: F32(FP8_MAX), E5M2: F32(57344.0)}
ROPE_COLS = 64  # SLICE_SIZE: the trailing rope columns of x, kept bf16 (tiling_arch35.cpp / test SLICE_SIZE)
ROW_ALIGN = 128  # kv_cache_col = roundup(concat, 128) (DEFAULT_QUANT_GROUP_SIZE)
MX_GROUP = 64  # the cann golden's MXFP8 group (golden_mxfp8_row group_size = 64)
GROUP_FP8 = 128  # group fp8 scales are sized by PER_BLOCK_FP16 = 128 in the tiling
MX_MIN_AMAX = F32(1e-4)  # golden_mxfp8_row: max(amax, 1e-4)
INDEXER_BLOCK = 128  # PER_BLOCK_FP16 of indexer_compress_epilog_v2_tiling.cpp:49
INV_E4M3_MAX = np.array([0x3B124925], dtype=np.uint32).view(F32)[0]  # base.h:38, float32(1/448)
QUANT_GROUP, QUANT_MX = 1, 2


class EpilogArgError(ValueError):
    """A call the kernel refuses, or one whose layout this golden does not model (the message says which)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise EpilogArgError(msg)


def kv_compress_layout(head_dim: int, quant_mode: int, quant_group_size: int) -> dict[str, int]:
    """Byte widths of one layout-1 cache row (cann-recipes calc_kv_compress_layout)."""
    quant_col = head_dim - ROPE_COLS
    group = MX_GROUP if quant_mode == QUANT_MX else quant_group_size
    scale_col = math.ceil(quant_col / group)
    scale_bytes = 1 if quant_mode == QUANT_MX else 4
    rope_bytes = ROPE_COLS * 2
    concat = quant_col + rope_bytes + scale_col * scale_bytes
    return {"quant_col": quant_col, "scale_col": scale_col, "scale_bytes": scale_bytes, "rope_bytes": rope_bytes,
            "concat_col": concat, "kv_cache_col": -(-concat // ROW_ALIGN) * ROW_ALIGN}


def _mx_rows(v: np.ndarray, dt: np.dtype, round_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """MXFP8 over groups of 64: fp8 bytes [T, C] and e8m0 bytes [T, C/64] (golden_mxfp8_row)."""
    t, c = v.shape
    g = v.reshape(t, c // MX_GROUP, MX_GROUP)
    fmax = FP8_MAXES[dt]
    scale = np.maximum(np.abs(g).max(axis=-1), MX_MIN_AMAX).astype(F32) * (F32(1.0) / fmax)
    if round_scale:
        scale = pow2_ceil(scale)  # exponent + 1 when the mantissa is non-zero = the smallest power of two >= scale
        scale_u8 = scale.astype(E8M0).view(np.uint8)
    else:  # the golden divides by the unrounded scale and stores its truncated exponent
        scale_u8 = ((scale.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)
    y = np.clip(g / scale[..., None], -fmax, fmax).astype(F32)
    return y.astype(dt).view(np.uint8).reshape(t, c), scale_u8


def _group_rows(v: np.ndarray, dt: np.dtype, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Group fp8 with float32 scales: fp8 bytes [T, C] and scale bytes [T, 4 * groups] (golden_group_fp8_row)."""
    t, c = v.shape
    n = math.ceil(c / group)
    pad = np.zeros((t, n * group), F32)
    pad[:, :c] = v
    g = pad.reshape(t, n, group)
    amax = np.where(np.isnan(g), F32(0), np.abs(g)).max(axis=-1).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(amax == 0, F32(np.inf), amax / FP8_MAXES[dt]).astype(F32)
        y = (g / scale[..., None]).astype(F32)
    y = np.where(np.isnan(y), F32(0), y).reshape(t, n * group)[:, :c]
    return y.astype(dt).view(np.uint8), scale.astype("<f4").view(np.uint8).reshape(t, 4 * n)


def _flat_bytes(cache: np.ndarray) -> np.ndarray:
    _need(cache.flags.c_contiguous, "cache must be contiguous (it is written through its byte view)")
    return cache.reshape(-1).view(np.uint8)


def kv_compress_epilog(kv_compress_cache: np.ndarray, x: Any, slot_mapping: Any, quant_group_size: int,
                       quant_mode: int, round_scale_flag: bool, layout: int) -> None:
    """Quantise x [T, D] (bf16) to the cache's fp8 dtype and write row i at slot_mapping[i] (layout 1)."""
    cache = kv_compress_cache
    x = np.asarray(x)
    sm = np.asarray(slot_mapping).astype(np.int64)
    _need(x.ndim == 2 and x.shape[0] > 0 and x.shape[1] > 0, f"x must be a non-empty 2D tensor, got {x.shape}")
    _need(sm.ndim == 1 and sm.shape[0] == x.shape[0], "slot_mapping must be [T] with T = x.shape[0]")
    _need(x.dtype == BF16, f"x must be bfloat16, got {x.dtype}")
    _need(cache.dtype in FP8_MAXES, f"kv_compress_cache must be float8_e4m3fn or float8_e5m2, got {cache.dtype}")
    _need(cache.ndim != 4 or cache.shape[2] == 1, "kv_compress_cache 4D requires dim 2 == 1")
    _need(layout == 1, f"layout {layout}: only layout 1 (what vllm-ascend calls) is modelled")
    _need(quant_mode in (QUANT_GROUP, QUANT_MX), f"quant_mode {quant_mode}: only 1 (group fp8) and 2 (MXFP8) "
          "are modelled (3 is hifloat8, which the binding's fp8-only cache check excludes)")
    if quant_mode == QUANT_MX:
        _need(quant_group_size in (64, 128), f"MXFP8 quant_group_size must be 64 or 128, got {quant_group_size}")
        _need(quant_group_size == MX_GROUP, "MXFP8 with groups of 128 is not modelled (the golden groups by 64)")
    else:
        _need(quant_group_size == GROUP_FP8, "group fp8 is modelled for quant_group_size 128 only (the tiling "
              "sizes its scales by 128, the cann golden by quant_group_size)")
    lay = kv_compress_layout(x.shape[1], quant_mode, quant_group_size)
    _need(lay["quant_col"] > 0 and lay["quant_col"] % (MX_GROUP if quant_mode == QUANT_MX else 1) == 0,
          f"head dim {x.shape[1]}: D - 64 must be positive (and a multiple of 64 for MXFP8)")
    view = cache[:, :, 0] if cache.ndim == 4 else cache
    stride = view.strides[0]  # bytes between slot rows: the binding passes cache.stride(0)
    _need(stride >= lay["kv_cache_col"], f"cache row stride {stride} < layout-1 row width {lay['kv_cache_col']}")
    flat = _flat_bytes(cache)
    ok = sm >= 0
    if not ok.any():
        return
    slots = sm[ok]
    _need(int(slots.max()) * stride + lay["kv_cache_col"] <= flat.size,
          f"slot {int(slots.max())} lies outside the cache ({flat.size} bytes; the kernel does not check)")
    xv = x[ok].astype(F32)
    qc = lay["quant_col"]
    rope = np.ascontiguousarray(x[ok][:, qc:]).view(np.uint8)
    if quant_mode == QUANT_MX:
        y, s = _mx_rows(xv[:, :qc], cache.dtype, bool(round_scale_flag))
        parts = [rope, y, s]
    else:
        y, s = _group_rows(xv[:, :qc], cache.dtype, quant_group_size)
        parts = [y, rope, s]
    row = np.zeros((slots.size, lay["kv_cache_col"]), np.uint8)
    row[:, :lay["concat_col"]] = np.concatenate(parts, axis=1)
    flat[(slots * stride)[:, None] + np.arange(lay["kv_cache_col"])] = row


def kv_compress_decode(kv_compress_cache: np.ndarray, slots: Any, head_dim: int, quant_mode: int = QUANT_MX,
                       quant_group_size: int = MX_GROUP) -> np.ndarray:
    """The float32 rows [n, D] a layout-1 cache holds at `slots` (nope dequantised, rope exact)."""
    lay = kv_compress_layout(head_dim, quant_mode, quant_group_size)
    view = kv_compress_cache[:, :, 0] if kv_compress_cache.ndim == 4 else kv_compress_cache
    stride, qc, rb = view.strides[0], lay["quant_col"], lay["rope_bytes"]
    flat = _flat_bytes(kv_compress_cache)
    rows = flat[(np.asarray(slots, np.int64) * stride)[:, None] + np.arange(lay["kv_cache_col"])]
    dt = kv_compress_cache.dtype
    if quant_mode == QUANT_MX:
        rope, q, s = rows[:, :rb], rows[:, rb:rb + qc], rows[:, rb + qc:rb + qc + lay["scale_col"]]
        sc = np.repeat(s.view(E8M0).astype(F32), MX_GROUP, axis=1)
    else:
        q, rope = rows[:, :qc], rows[:, qc:qc + rb]
        s = np.ascontiguousarray(rows[:, qc + rb:qc + rb + 4 * lay["scale_col"]]).view("<f4")
        sc = np.repeat(s, quant_group_size, axis=1)[:, :qc]
    qf = q.view(dt).astype(F32)
    with np.errstate(invalid="ignore"):  # an all-zero group of group fp8 has an infinite scale
        nope = np.where(qf == 0, F32(0), qf * sc)
    return np.concatenate([nope, np.ascontiguousarray(rope).view(BF16).astype(F32)], axis=1)


def indexer_quant_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp8 e4m3fn bytes [T, d] and float32 scales [T, ceil(d/128)] of indexer_compress_epilog_v2."""
    t, d = x.shape
    n = -(-d // INDEXER_BLOCK)
    g = np.zeros((t, n * INDEXER_BLOCK), F32)
    g[:, :d] = x.astype(F32)
    g = g.reshape(t, n, INDEXER_BLOCK)
    amax = np.where(np.isfinite(g), np.abs(g), F32(0)).max(axis=-1).astype(F32)
    scale = (amax * INV_E4M3_MAX).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = (g / scale[..., None]).astype(F32)
    y = np.where(np.isfinite(y), y, g).reshape(t, n * INDEXER_BLOCK)[:, :d]
    y = np.clip(y, -FP8_MAX, FP8_MAX)  # NaN stays NaN
    return y.astype(E4M3).view(np.uint8), scale


def indexer_compress_epilog_v2(indexer_compress_cache: np.ndarray, x: Any, slot_mapping: Any,
                               layout: int = 2) -> None:
    """Quantise rows of x [..., d] to fp8 e4m3fn + float32 block scales into the paged uint8 cache (layout 2)."""
    cache = indexer_compress_cache
    x = np.asarray(x)
    sm = np.asarray(slot_mapping).astype(np.int64).reshape(-1)
    _need(cache.dtype == np.uint8, f"indexer_compress_cache must be uint8, got {cache.dtype}")
    _need(x.dtype in (np.dtype(np.float16), BF16), f"x must be float16 or bfloat16, got {x.dtype}")
    _need(cache.ndim == 4, f"the dim of indexer_compress_cache only support 4, got {cache.ndim}")
    _need(cache.shape[2] == 1, "the third dim of indexer_compress_cache must be 1")
    _need(layout == 2, f"layout only support 2, got {layout}")
    d = int(x.shape[-1])
    _need(x.size == sm.size * d, f"x holds {x.size // max(d, 1)} rows of {d}, slot_mapping {sm.size}")
    bs, stride = int(cache.shape[1]), cache.strides[0]
    sc_bytes = 4 * -(-d // INDEXER_BLOCK)
    _need(bs * (d + sc_bytes) <= stride, f"a cache block ({stride} bytes) cannot hold {bs} rows of {d} fp8 "
          f"values + {sc_bytes} scale bytes (the kernel does not check; it would write into the next block)")
    flat = _flat_bytes(cache)
    ok = sm >= 0
    if not ok.any():
        return
    slots = sm[ok]
    _need(int(slots.max()) // bs < cache.shape[0], f"slot {int(slots.max())} lies outside the cache")
    y, scale = indexer_quant_rows(x.reshape(-1, d)[ok])
    blk, off = slots // bs, slots % bs
    flat[(blk * stride + off * d)[:, None] + np.arange(d)] = y
    flat[(blk * stride + bs * d + off * sc_bytes)[:, None] + np.arange(sc_bytes)] = \
        scale.astype("<f4").view(np.uint8).reshape(-1, sc_bytes)


def indexer_compress_read(indexer_compress_cache: np.ndarray, slots: Any, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The fp8 bytes [n, d] and float32 scales [n, ceil(d/128)] a layout-2 cache holds at `slots`."""
    cache = indexer_compress_cache
    bs, stride = int(cache.shape[1]), cache.strides[0]
    sc_bytes = 4 * -(-d // INDEXER_BLOCK)
    flat = _flat_bytes(cache)
    s = np.asarray(slots, np.int64)
    blk, off = s // bs, s % bs
    y = flat[(blk * stride + off * d)[:, None] + np.arange(d)]
    sc = flat[(blk * stride + bs * d + off * sc_bytes)[:, None] + np.arange(sc_bytes)]
    return y, np.ascontiguousarray(sc).view("<f4")
