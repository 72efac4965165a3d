"""Quantization codecs: the one definition of every weight format the project reads, writes or runs.

Formats (see `FORMATS`):

* ``fp8`` / ``fp8-f32`` -- DeepSeek release FP8: e4m3fn weights [N, K], one scale per 128x128 block,
  scale [ceil(N/128), ceil(K/128)] stored as ue8m0 (float8_e8m0fnu, a power of two) or float32 ("Base"
  checkpoints). W[i, j] = w8[i, j] * scale[i // 128, j // 128].
* ``fp4`` -- DeepSeek release MXFP4-like experts: int8 [N, K/2], two e2m1 codes per byte (LOW nibble =
  element 2k, HIGH nibble = element 2k+1, bit 3 = sign), one ue8m0 scale per 32 inputs: scale [N, K/32].
* ``w8a8`` -- Ascend dynamic W8A8 (npu_dynamic_quant + npu_quant_matmul): int8 weight [N, K] with a
  float32 per-output-channel scale [N]; activations int8 per token at run time; int32 accumulation.
* ``w4a8`` -- Ascend W4A8 experts: symmetric int4 in [-7, 7], packed two per byte along K (low nibble =
  even element, two's complement), float32 scale per (row, group of `group_size` inputs) [N, K/group];
  activations int8 per token; int32 accumulation per group, groups combined in float32.

Rounding rules (the torch / NPU backends must mirror these to stay bit-identical):

* FP8 e4m3fn and FP4 e2m1 casts round to nearest, ties to even (IEEE; for e2m1 this means ties go to the
  even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); values are clipped
  to +-448 / +-6 first (e4m3fn has no inf and casts overflow to NaN).
* ue8m0 scales are pow2_ceil(amax / qmax) (DeepSeek's round-up rule) so |w / scale| <= qmax always; an
  all-zero block gets scale 1.0 and decodes to exactly 0.
* Integer formats: scale = amax / qmax in float32 (amax == 0 -> scale 1, as the CANN golden does),
  q = clip(np.rint(x / scale), -qmax, qmax). np.rint is round half to even, which is what the CANN
  dynamic_quant golden uses (np.round / torch.round); note it is NOT half-away-from-zero.
* W8A8 output: y[t, n] = (float32(acc[t, n]) * x_scale[t]) * w_scale[n], float32, in that order.
  W4A8 output: y[t, n] = (sum_g float32(acc_g[t, n]) * w_scale[n, g]) * x_scale[t], the group sum in
  float32 in ascending group order.

Every integer GEMM goes through `int_matmul`, which is exact integer arithmetic (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

F32 = np.float32
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)

FP8_MAX = 448.0  # largest finite e4m3fn
FP4_MAX = 6.0  # largest e2m1
INT8_MAX = 127  # symmetric: -128 is never produced
INT4_MAX = 7  # symmetric [-7, 7]: -8 is never produced

FP8_BLOCK = 128
FP4_BLOCK = 32
W4A8_GROUP = 128

# e2m1 code -> value; bit 3 is the sign
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=F32)
# midpoints between consecutive non-negative e2m1 magnitudes (codes 0..7)
_E2M1_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=F32)

# the NPU accumulates in int32: K * 128 * 128 must stay below 2**31
_INT32_MAX_K = 2 ** (31 - 14) - 1
# result elements per int_matmul call in the weight objects (bounds float64 temporaries to ~128 MiB)
_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class QuantFormat:
    """Plain description of a stored weight format, for `dsv4 inspect` / `dsv4 convert`."""

    name: str
    weight_dtype: str  # safetensors dtype tag of the stored weight tensor
    scale_dtype: str  # safetensors dtype tag of the scale tensor
    scale_shape: str  # scale shape in terms of the logical weight shape [N, K]
    block: tuple[int, int]  # (rows, cols) of the logical weight covered by one scale; -1 = whole row
    values_per_element: int  # logical weights per stored element (2 when packed)
    activations: str  # how the GEMM treats activations
    doc: str


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat("fp8", "F8_E4M3", "F8_E8M0", "[ceil(N/128), ceil(K/128)]", (128, 128), 1,
                       "float (dequantized weight)", "DeepSeek FP8 e4m3fn, ue8m0 power-of-two block scales"),
    "fp8-f32": QuantFormat("fp8-f32", "F8_E4M3", "F32", "[ceil(N/128), ceil(K/128)]", (128, 128), 1,
                           "float (dequantized weight)", "DeepSeek FP8 e4m3fn, float32 block scales (Base)"),
    "fp4": QuantFormat("fp4", "I8", "F8_E8M0", "[N, K/32]", (1, 32), 2,
                       "float (dequantized weight)",
                       "DeepSeek packed e2m1 experts: low nibble = even element, ue8m0 scale per 32 inputs"),
    "w8a8": QuantFormat("w8a8", "I8", "F32", "[N]", (1, -1), 1,
                        "int8 per token, int32 accumulate",
                        "Ascend dynamic W8A8: symmetric int8 per output channel"),
    "w4a8": QuantFormat("w4a8", "I8", "F32", "[N, K/group_size]", (1, W4A8_GROUP), 2,
                        "int8 per token, int32 accumulate per group",
                        "Ascend W4A8: symmetric int4 [-7, 7] packed low-nibble-first, group scales "
                        "(block[1] is the default group_size)"),
}


# ---- shared helpers ---------------------------------------------------------------------------------
def _as_dtype(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    """Accept raw 1-byte storage (uint8/int8 as read from disk) for an 8-bit float dtype."""
    a = np.asarray(a)
    if a.dtype == dt:
        return a
    if a.dtype.itemsize == 1 and a.dtype.kind in "iu":
        return a.view(dt)
    raise TypeError(f"expected {dt} (or raw 1-byte storage), got {a.dtype}")


def _scale_f32(scale: np.ndarray) -> np.ndarray:
    """Scales come as float32 or e8m0 (raw uint8 storage means e8m0 bits)."""
    scale = np.asarray(scale)
    if scale.dtype.itemsize == 1:
        scale = _as_dtype(scale, E8M0)
    return scale.astype(F32)


def pow2_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest power of two >= x (float32), the ue8m0 scale rule; x == 0 -> 1.

    Clamped to [2**-127, 2**127], the exact range of float8_e8m0fnu, so the result always casts to
    e8m0 losslessly. Uses frexp rather than log2 so exact powers of two never round the wrong way.
    """
    x = np.asarray(x, dtype=F32)
    m, e = np.frexp(x)
    e = np.where(m == F32(0.5), e - 1, e)  # x is already a power of two
    e = np.clip(e, -127, 127)
    return np.where(x > 0, np.ldexp(F32(1.0), e).astype(F32), F32(1.0)).astype(F32)


def _check_2d(w: np.ndarray, name: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {w.shape}")


# ---- FP8 e4m3fn, 128x128 block scales -------------------------------------------------------------------
def _expand_block_scale(scale: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    N, K = shape
    nb, kb = -(-N // block), -(-K // block)
    if scale.shape != (nb, kb):
        raise ValueError(f"block scale for weight {list(shape)} with block {block} must be [{nb}, {kb}], "
                         f"got {list(scale.shape)}")
    return np.repeat(np.repeat(_scale_f32(scale), block, axis=0)[:N], block, axis=1)[:, :K]


def dequant_fp8_block(w8: np.ndarray, scale: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """e4m3fn [N, K] with block scales [ceil(N/block), ceil(K/block)] (e8m0 or float32) -> float32 [N, K]."""
    w8 = _as_dtype(w8, E4M3)
    _check_2d(w8, "w8")
    return w8.astype(F32) * _expand_block_scale(np.asarray(scale), w8.shape, block)


def quant_fp8_block(w: np.ndarray, block: int = FP8_BLOCK,
                    scale_fmt: str = "ue8m0") -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (e4m3fn [N, K], scale [ceil(N/block), ceil(K/block)] e8m0 or float32).

    scale = amax / 448 per block (rounded up to a power of two for ue8m0); ragged edge blocks only see
    their real elements (the padding is zeros, which never raise amax).
    """
    if scale_fmt not in ("ue8m0", "float32"):
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'float32', got {scale_fmt!r}")
    w = np.asarray(w, dtype=F32)
    _check_2d(w, "w")
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wp = w
    if (nb * block, kb * block) != (N, K):
        wp = np.zeros((nb * block, kb * block), dtype=F32)
        wp[:N, :K] = w
    blocks = wp.reshape(nb, block, kb, block)
    amax = np.max(np.abs(blocks), axis=(1, 3))
    if scale_fmt == "ue8m0":
        s = pow2_ceil(amax / F32(FP8_MAX))
    else:
        s = np.where(amax > 0, amax / F32(FP8_MAX), F32(1.0)).astype(F32)
    q = blocks / s[:, None, :, None]
    # float32 amax/448 can round so |q| is a hair above 448 (that still casts to 448); the clip is a guard
    # because e4m3fn has no inf and any real overflow would cast to NaN
    np.clip(q, -FP8_MAX, FP8_MAX, out=q)
    w8 = q.reshape(nb * block, kb * block)[:N, :K].astype(E4M3)
    return w8, (s.astype(E8M0) if scale_fmt == "ue8m0" else s)


# ---- FP4 e2m1, packed, ue8m0 scale per 32 inputs ---------------------------------------------------------
def unpack_fp4_codes(packed: np.ndarray) -> np.ndarray:
    """int8 [..., K/2] -> uint8 e2m1 codes [..., K]; low nibble is element 2k, high nibble 2k+1."""
    p = np.asarray(packed)
    if p.dtype.itemsize != 1 or p.dtype.kind not in "iu":
        raise TypeError(f"packed FP4 must be int8/uint8, got {p.dtype}")
    p = p.view(np.uint8)
    codes = np.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=np.uint8)
    codes[..., 0::2] = p & 0x0F
    codes[..., 1::2] = p >> 4
    return codes


def pack_fp4_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 e2m1 codes [..., K] (K even) -> int8 [..., K/2]; inverse of `unpack_fp4_codes`."""
    c = np.asarray(codes, dtype=np.uint8)
    if c.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {c.shape}")
    return ((c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)).astype(np.uint8).view(np.int8)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """int8 [..., K/2] -> float32 e2m1 values [..., K] (unscaled)."""
    return E2M1_VALUES[unpack_fp4_codes(packed)]


def encode_e2m1(r: np.ndarray) -> np.ndarray:
    """float -> e2m1 codes (uint8): nearest value, ties to the even code (IEEE RNE); |r| clipped to 6.

    Negative inputs (including ones that round to zero, and -0.0) get the sign bit, like an IEEE cast.
    """
    r = np.asarray(r, dtype=F32)
    a = np.minimum(np.abs(r), F32(FP4_MAX))
    # lo = #midpoints below a, hi = #midpoints <= a; they differ only on an exact tie, where the even
    # one wins. Seven comparisons beat np.searchsorted ~8x on large arrays.
    lo = np.zeros(a.shape, dtype=np.uint8)
    hi = np.zeros(a.shape, dtype=np.uint8)
    for m in _E2M1_MIDPOINTS:
        lo += a > m
        hi += a >= m
    code = np.where(lo % 2 == 0, lo, hi)
    return code | (np.signbit(r).astype(np.uint8) << 3)


def _check_fp4_scale(scale: np.ndarray, n: int, k: int, block: int) -> None:
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the FP4 block {block}")
    if scale.shape != (n, k // block):
        raise ValueError(f"FP4 scale for weight [{n}, {k}] with block {block} must be [{n}, {k // block}], "
                         f"got {list(scale.shape)}")


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, block: int = FP4_BLOCK) -> np.ndarray:
    """int8 [N, K/2] packed e2m1 + scale [N, K/block] (e8m0 or float32) -> float32 [N, K]."""
    v = unpack_fp4(packed)
    _check_2d(v, "packed")
    N, K = v.shape
    scale = np.asarray(scale)
    _check_fp4_scale(scale, N, K, block)
    return (v.reshape(N, K // block, block) * _scale_f32(scale)[:, :, None]).reshape(N, K)


def quant_fp4(w: np.ndarray, block: int = FP4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (packed int8 [N, K/2], e8m0 scale [N, K/block]); scale = pow2_ceil(amax / 6)."""
    w = np.asarray(w, dtype=F32)
    _check_2d(w, "w")
    N, K = w.shape
    if K % block or block % 2:
        raise ValueError(f"K={K} must be a multiple of an even FP4 block, got block {block}")
    g = w.reshape(N, K // block, block)
    s = pow2_ceil(np.max(np.abs(g), axis=-1) / F32(FP4_MAX))
    codes = encode_e2m1(g / s[:, :, None]).reshape(N, K)
    return pack_fp4_codes(codes), s.astype(E8M0)


# ---- integer GEMM and per-token activation quantization ------------------------------------------------
def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int8 GEMM with int32 result: a [..., M, K] int8 @ b [..., K, N] int8 -> int32 [..., M, N].

    NumPy's integer matmul has no BLAS path (~15x slower here), so this runs float BLAS on the int8
    values. That is exact integer arithmetic, not an approximation: every product is an integer of
    magnitude <= 128 * 128 = 2**14 and every partial sum an integer of magnitude <= K * 2**14. For
    K <= 1024 (e.g. W4A8 groups of 128) that is <= 2**24 and float32 holds every partial sum exactly;
    otherwise float64 does (< 2**53 for any allowed K). Either way each addition is exact whatever order
    or FMA the BLAS uses. K is limited to what the NPU's int32 accumulator holds without overflow.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.int8 or b.dtype != np.int8:
        raise TypeError(f"int_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    K = a.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(f"inner dimensions differ: {a.shape} @ {b.shape}")
    if K > _INT32_MAX_K:
        raise ValueError(f"K={K} could overflow an int32 accumulator (max {_INT32_MAX_K})")
    # a static bound (no data pass: reductions over strided weight views are slow)
    ft = np.float32 if K * 2**14 <= 2**24 else np.float64
    # astype keeps the strides' order, so transposed views stay BLAS-able without a copy
    return np.matmul(a.astype(ft), b.astype(ft)).astype(np.int32)


def _sym_quant(x: np.ndarray, qmax: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int quantization along `axis`: scale = amax / qmax (0 -> 1), q = clip(rint(x / s))."""
    amax = np.max(np.abs(x), axis=axis, keepdims=True)
    s = np.where(amax > 0, amax / F32(qmax), F32(1.0)).astype(F32)
    q = np.clip(np.rint(x / s), -qmax, qmax).astype(np.int8)
    return q, s


def act_quant_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-token int8 (npu_dynamic_quant): x [..., K] -> (int8 [..., K], float32 scale [..., 1])."""
    return _sym_quant(np.asarray(x, dtype=F32), INT8_MAX, axis=-1)


def _row_chunks(T: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for t0 in range(0, T, step):
        yield slice(t0, min(T, t0 + step))


# ---- int4 packing (W4A8) -----------------------------------------------------------------------------------
def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., K] (K even) -> int8 [..., K/2]; low nibble = even element."""
    q = np.asarray(q, dtype=np.int8)
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape}")
    u = q.view(np.uint8)
    return ((u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """int8 [..., K/2] -> int8 [..., K] in [-8, 7]; two's complement nibbles, low nibble first."""
    u = np.asarray(packed).view(np.uint8)
    out = np.empty(u.shape[:-1] + (2 * u.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = u & 0x0F
    out[..., 1::2] = u >> 4
    # sign-extend 4 -> 8 bits: (n ^ 8) - 8 maps 0..7 -> 0..7 and 8..15 -> -8..-1
    return ((out.astype(np.int16) ^ 8) - 8).astype(np.int8)


# ---- weight objects (what `Backend.linear` receives) ---------------------------------------------------
class W8A8Weight:
    """Ascend dynamic W8A8 linear weight: int8 [N, K] + float32 per-output-channel scale [N]."""

    fmt = "w8a8"

    def __init__(self, qweight: np.ndarray, scale: np.ndarray):
        qweight, scale = np.asarray(qweight), np.asarray(scale, dtype=F32)
        _check_2d(qweight, "qweight")
        if qweight.dtype != np.int8:
            raise TypeError(f"qweight must be int8, got {qweight.dtype}")
        if scale.shape != (qweight.shape[0],):
            raise ValueError(f"scale must be [{qweight.shape[0]}], got {list(scale.shape)}")
        self.qweight, self.scale = qweight, scale

    @classmethod
    def from_float(cls, w: np.ndarray) -> W8A8Weight:
        w = np.asarray(w, dtype=F32)
        _check_2d(w, "w")
        q, s = _sym_quant(w, INT8_MAX, axis=1)
        return cls(q, s[:, 0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        return self.qweight.astype(F32) * self.scale[:, None]

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [..., K] float -> [..., N] float32, with the NPU's arithmetic (int8 x int8 -> int32)."""
        x = np.asarray(x, dtype=F32)
        N, K = self.shape
        lead = x.shape[:-1]
        xq, xs = act_quant_per_token(x.reshape(-1, K))
        wt = self.qweight.T
        y = np.empty((xq.shape[0], N), dtype=F32)
        for sl in _row_chunks(xq.shape[0], N):
            acc = int_matmul(xq[sl], wt)
            y[sl] = acc.astype(F32) * xs[sl] * self.scale[None, :]
        return y.reshape(lead + (N,))

    def __repr__(self) -> str:
        return f"W8A8Weight(shape={self.shape})"


class W4A8Weight:
    """Ascend W4A8 weight: int4 [-7, 7] packed int8 [N, K/2] + float32 group scales [N, K/group_size]."""

    fmt = "w4a8"

    def __init__(self, qweight: np.ndarray, scale: np.ndarray, group_size: int = W4A8_GROUP):
        qweight, scale = np.asarray(qweight), np.asarray(scale, dtype=F32)
        _check_2d(qweight, "qweight")
        if qweight.dtype != np.int8:
            raise TypeError(f"qweight must be packed int8, got {qweight.dtype}")
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        if group_size <= 0 or K % group_size:
            raise ValueError(f"group_size {group_size} must divide K={K}")
        if scale.shape != (N, K // group_size):
            raise ValueError(f"scale must be [{N}, {K // group_size}], got {list(scale.shape)}")
        self.qweight, self.scale, self.group_size = qweight, scale, group_size

    @classmethod
    def from_float(cls, w: np.ndarray, group_size: int = W4A8_GROUP) -> W4A8Weight:
        w = np.asarray(w, dtype=F32)
        _check_2d(w, "w")
        N, K = w.shape
        if group_size <= 0 or K % group_size or K % 2:
            raise ValueError(f"group_size {group_size} must divide K={K} (K even)")
        q, s = _sym_quant(w.reshape(N, K // group_size, group_size), INT4_MAX, axis=-1)
        return cls(pack_int4(q.reshape(N, K)), s[..., 0], group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], 2 * self.qweight.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        N, K = self.shape
        q = unpack_int4(self.qweight).reshape(N, K // self.group_size, self.group_size)
        return (q.astype(F32) * self.scale[:, :, None]).reshape(N, K)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [..., K] float -> [..., N] float32: per-group int32 GEMM, scaled and summed in float32."""
        x = np.asarray(x, dtype=F32)
        N, K = self.shape
        gs = self.group_size
        G = K // gs
        lead = x.shape[:-1]
        xq, xs = act_quant_per_token(x.reshape(-1, K))
        T = xq.shape[0]
        # [G, gs, N] as a strided view of the [N, K] unpacked weight (BLAS reads it transposed, no copy)
        wg = unpack_int4(self.qweight).reshape(N, G, gs).transpose(1, 2, 0)
        sg = self.scale.T  # [G, N]
        y = np.empty((T, N), dtype=F32)
        for sl in _row_chunks(T, G * N):
            xg = xq[sl].reshape(-1, G, gs).transpose(1, 0, 2)  # [G, t, gs]
            acc = int_matmul(xg, wg)  # [G, t, N] int32, one accumulator per group
            part = np.zeros((acc.shape[1], N), dtype=F32)
            for g in range(G):  # ascending float32 group sum (G is small: K / group_size)
                part += acc[g].astype(F32) * sg[g][None, :]
            y[sl] = part * xs[sl]
        return y.reshape(lead + (N,))

    def __repr__(self) -> str:
        return f"W4A8Weight(shape={self.shape}, group_size={self.group_size})"


class FP8BlockWeight:
    """DeepSeek FP8 checkpoint weight: e4m3fn [N, K] + 128x128 block scales (e8m0 or float32).

    `matmul` is weight-only dequantization (x stays float32): REF's FP8 activation block quantization
    is a separate choice of the model code, not part of the stored format.
    """

    fmt = "fp8"

    def __init__(self, w8: np.ndarray, scale: np.ndarray, block: int = FP8_BLOCK):
        self.w8 = _as_dtype(w8, E4M3)
        _check_2d(self.w8, "w8")
        scale = np.asarray(scale)
        self.scale = _as_dtype(scale, E8M0) if scale.dtype.itemsize == 1 else scale.astype(F32, copy=False)
        self.block = block
        N, K = self.w8.shape
        if self.scale.shape != (-(-N // block), -(-K // block)):
            raise ValueError(f"block scale {list(self.scale.shape)} does not fit weight [{N}, {K}] "
                             f"with block {block}")

    @classmethod
    def from_float(cls, w: np.ndarray, block: int = FP8_BLOCK, scale_fmt: str = "ue8m0") -> FP8BlockWeight:
        return cls(*quant_fp8_block(w, block, scale_fmt), block=block)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w8.shape)

    @property
    def nbytes(self) -> int:
        return int(self.w8.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        return dequant_fp8_block(self.w8, self.scale, self.block)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=F32) @ self.dequantize().T

    def __repr__(self) -> str:
        return f"FP8BlockWeight(shape={self.shape}, scale={self.scale.dtype})"


class FP4Weight:
    """DeepSeek packed FP4 expert weight: int8 [N, K/2] + ue8m0 scale per 32 inputs [N, K/32].

    `matmul` is weight-only dequantization, like `FP8BlockWeight`.
    """

    fmt = "fp4"

    def __init__(self, packed: np.ndarray, scale: np.ndarray, block: int = FP4_BLOCK):
        packed = np.asarray(packed)
        if packed.dtype.itemsize != 1 or packed.dtype.kind not in "iu":
            raise TypeError(f"packed FP4 must be int8/uint8, got {packed.dtype}")
        self.packed = packed.view(np.int8)
        _check_2d(self.packed, "packed")
        scale = np.asarray(scale)
        self.scale = _as_dtype(scale, E8M0) if scale.dtype.itemsize == 1 else scale.astype(F32, copy=False)
        self.block = block
        _check_fp4_scale(self.scale, self.packed.shape[0], 2 * self.packed.shape[1], block)

    @classmethod
    def from_float(cls, w: np.ndarray, block: int = FP4_BLOCK) -> FP4Weight:
        return cls(*quant_fp4(w, block), block=block)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], 2 * self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        return dequant_fp4(self.packed, self.scale, self.block)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=F32) @ self.dequantize().T

    def __repr__(self) -> str:
        return f"FP4Weight(shape={self.shape})"


def quantize_weight(w: np.ndarray, fmt: str, **kw) -> FP8BlockWeight | FP4Weight | W8A8Weight | W4A8Weight:
    """Quantize a float [N, K] weight into the weight object of a `FORMATS` name."""
    if fmt == "fp8":
        return FP8BlockWeight.from_float(w, **kw)
    if fmt == "fp8-f32":
        return FP8BlockWeight.from_float(w, scale_fmt="float32", **kw)
    if fmt == "fp4":
        return FP4Weight.from_float(w, **kw)
    if fmt == "w8a8":
        return W8A8Weight.from_float(w)
    if fmt == "w4a8":
        return W4A8Weight.from_float(w, **kw)
    raise ValueError(f"unknown quant format {fmt!r}; known: {', '.join(FORMATS)}")


def detect_format(weight_tag: str, weight_shape: tuple[int, ...], scale_tag: str, scale_shape: tuple[int, ...],
                  logical_shape: tuple[int, int]) -> tuple[str, dict]:
    """Which `FORMATS` entry a stored (weight, scale) pair is, from dtype tags and shapes alone.

    Returns (format name, constructor kwargs). ValueError says what does not fit, for the caller to
    prefix with the file and tensor name.
    """
    N, K = logical_shape
    ws, ss = tuple(weight_shape), tuple(scale_shape)
    if weight_tag == "F8_E4M3":
        want = (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
        if ws != (N, K):
            raise ValueError(f"FP8 weight has shape {list(ws)}, expected {[N, K]}")
        if ss != want:
            raise ValueError(f"scale shape {list(ss)} does not match the FP8 weight {[N, K]} "
                             f"(expected {list(want)} for {FP8_BLOCK}x{FP8_BLOCK} blocks)")
        if scale_tag not in ("F8_E8M0", "F32"):
            raise ValueError(f"FP8 block scale has dtype {scale_tag}, expected F8_E8M0 or F32")
        return ("fp8" if scale_tag == "F8_E8M0" else "fp8-f32"), {}
    if weight_tag in ("I8", "U8"):
        if ws == (N, K):
            if scale_tag != "F32" or ss not in ((N,), (N, 1)):
                raise ValueError(f"int8 weight {list(ws)} needs a float32 per-channel scale [{N}], "
                                 f"got {scale_tag} {list(ss)}")
            return "w8a8", {}
        if K % 2 == 0 and ws == (N, K // 2):
            if scale_tag == "F8_E8M0":
                if ss != (N, K // FP4_BLOCK):
                    raise ValueError(f"scale shape {list(ss)} does not match the packed FP4 weight {list(ws)} "
                                     f"(expected {[N, K // FP4_BLOCK]}, one per {FP4_BLOCK} inputs)")
                return "fp4", {}
            if scale_tag == "F32" and len(ss) == 2 and ss[0] == N and ss[1] > 0 and K % ss[1] == 0 \
                    and (K // ss[1]) % 2 == 0:
                return "w4a8", {"group_size": K // ss[1]}
            raise ValueError(f"packed 4-bit weight {list(ws)} has scale {scale_tag} {list(ss)}: neither FP4 "
                             f"(F8_E8M0 [{N}, {K // FP4_BLOCK}]) nor W4A8 (F32 [{N}, K/group])")
        raise ValueError(f"int8 weight has shape {list(ws)}, expected {[N, K]} (w8a8) or {[N, K // 2]} (packed 4-bit)")
    raise ValueError(f"weight dtype {weight_tag} with a scale tensor is not a known quantized format")


def from_storage(fmt: str, weight: np.ndarray, scale: np.ndarray, **kw):
    """The weight object for stored arrays of a detected format."""
    if fmt in ("fp8", "fp8-f32"):
        return FP8BlockWeight(weight, scale)
    if fmt == "fp4":
        return FP4Weight(weight, scale)
    if fmt == "w8a8":
        return W8A8Weight(weight.view(np.int8), np.asarray(scale, dtype=F32).reshape(-1))
    if fmt == "w4a8":
        return W4A8Weight(weight.view(np.int8), np.asarray(scale, dtype=F32), **kw)
    raise ValueError(f"unknown quant format {fmt!r}")


# formats DeepSeek ships, which the loader dequantizes; the others run with their integer arithmetic
RELEASE_FORMATS = ("fp8", "fp8-f32", "fp4")


__all__ = [
    "E2M1_VALUES", "FORMATS", "RELEASE_FORMATS", "detect_format", "from_storage",
    "FP4Weight", "FP8BlockWeight", "QuantFormat", "W4A8Weight", "W8A8Weight",
    "act_quant_per_token", "dequant_fp4", "dequant_fp8_block", "encode_e2m1", "int_matmul", "pack_fp4_codes",
    "pack_int4", "pow2_ceil", "quant_fp4", "quant_fp8_block", "quantize_weight", "unpack_fp4",
    "unpack_fp4_codes", "unpack_int4",
]
