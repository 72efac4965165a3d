"""Quantization codecs (ops/quant.py): bit layouts, scale rules, round trips and integer GEMM semantics."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ops import quant as Q
from ops.numpy_ref import NumpyBackend, dense

F32 = np.float32


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _bf16_exact(a: np.ndarray) -> bool:
    return bool(np.array_equal(a.astype(ml_dtypes.bfloat16).astype(F32), a))


def _is_pow2(s: np.ndarray) -> bool:
    m, _ = np.frexp(s.astype(F32))
    return bool(np.all(m == 0.5))


# ---- scale rule -------------------------------------------------------------------------------------------
def test_pow2_ceil():
    x = np.array([0.0, 1.0, 1.0000001, 0.75, 3.0, 4.0, 2.0 ** -130, 1e-45, 2.0 ** 100 * 1.5], dtype=F32)
    want = np.array([1.0, 1.0, 2.0, 1.0, 4.0, 4.0, 2.0 ** -127, 2.0 ** -127, 2.0 ** 101], dtype=F32)
    np.testing.assert_array_equal(Q.pow2_ceil(x), want)
    # every result casts to e8m0 losslessly
    np.testing.assert_array_equal(Q.pow2_ceil(x).astype(Q.E8M0).astype(F32), want)


# ---- FP8 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float32"])
def test_fp8_roundtrip_ragged(scale_fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((200, 300)).astype(F32)
    w[150:, 260:] *= 100.0  # a loud corner block: its scale must not leak into neighbours
    w8, s = Q.quant_fp8_block(w, scale_fmt=scale_fmt)
    assert w8.dtype == Q.E4M3 and w8.shape == (200, 300)
    assert s.shape == (2, 3)
    assert s.dtype == (Q.E8M0 if scale_fmt == "ue8m0" else np.float32)
    d = Q.dequant_fp8_block(w8, s)
    assert d.dtype == F32 and d.shape == w.shape
    # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values; per block, error vs its amax
    for bi in range(2):
        for bj in range(3):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            amax = np.abs(w[blk]).max()
            assert np.abs(d[blk] - w[blk]).max() <= amax * 2.0 ** -4
    assert _cos(d, w) > 0.999
    if scale_fmt == "ue8m0":
        assert _is_pow2(s)
        assert _bf16_exact(d)
    else:
        # float32 scale = amax / 448 exactly, so each block's amax element survives the trip
        np.testing.assert_allclose(s.astype(F32)[1, 2], np.abs(w[128:, 256:]).max() / F32(448), rtol=0)


def test_fp8_block_mapping_hand_built():
    # every element 1.0, distinct power-of-two scale per block: dequant must pick scale[i//128, j//128]
    w8 = np.ones((200, 300), dtype=F32).astype(Q.E4M3)
    sv = np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 0.5]], dtype=F32)
    for s in (sv, sv.astype(Q.E8M0), sv.astype(Q.E8M0).view(np.uint8)):
        d = Q.dequant_fp8_block(w8, s)
        i, j = np.meshgrid(np.arange(200), np.arange(300), indexing="ij")
        np.testing.assert_array_equal(d, sv[i // 128, j // 128])
    assert d[127, 127] == 1.0 and d[128, 127] == 8.0 and d[127, 128] == 2.0 and d[199, 299] == 0.5
    with pytest.raises(ValueError):
        Q.dequant_fp8_block(w8, sv[:, :2])


def test_fp8_zero_block_and_edges():
    w = np.zeros((130, 256), dtype=F32)
    w[128:, :128] = 448.0 * 4  # amax/448 is a power of two: both scale formats reproduce it exactly
    w[129, 5] = -1792.0
    # float32 amax / 448 rounds down here, so amax / scale lands a hair above 448 (clipped, not NaN)
    a = F32(616.38513)
    assert a / (a / F32(448)) > 448
    w[128:, 128:] = a
    for fmt in ("ue8m0", "float32"):
        w8, s = Q.quant_fp8_block(w, scale_fmt=fmt)
        d = Q.dequant_fp8_block(w8, s)
        assert s.astype(F32)[0, 0] == 1.0 and s.astype(F32)[0, 1] == 1.0  # all-zero blocks
        assert np.all(d[:128] == 0.0)
        assert np.all(np.isfinite(d))
        np.testing.assert_array_equal(d[128:, :128], w[128:, :128])
        np.testing.assert_allclose(d[128:, 128:], a, rtol=2.0 ** -4)


# ---- FP4 ------------------------------------------------------------------------------------------------------
def test_fp4_hand_built_bytes():
    # 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1
    # 0xF8: low nibble 8 (-0), high nibble 15 (-6); 0x9E: low 14 (-4), high 9 (-0.5); 0x70: 0, 6
    packed = np.array([[0x21, 0xF8, 0x9E, 0x70]], dtype=np.uint8).view(np.int8)
    v = Q.unpack_fp4(packed)
    np.testing.assert_array_equal(v, [[0.5, 1.0, -0.0, -6.0, -4.0, -0.5, 0.0, 6.0]])
    assert np.signbit(v[0, 2]) and not np.signbit(v[0, 6])
    np.testing.assert_array_equal(Q.pack_fp4_codes(Q.unpack_fp4_codes(packed)), packed)


def test_fp4_table_matches_ml_dtypes():
    # our code table and the IEEE e2m1 bit layout (ml_dtypes) agree on all 16 codes
    codes = np.arange(16, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float4_e2m1fn).astype(F32)
    np.testing.assert_array_equal(Q.E2M1_VALUES, ref)
    np.testing.assert_array_equal(np.signbit(Q.E2M1_VALUES), np.signbit(ref))


def test_e2m1_rounding_ties_to_even():
    r = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 0.24, 2.51, 4.99, 7.0, -0.25, -2.5, -5.0, -9.0],
                 dtype=F32)
    got = Q.E2M1_VALUES[Q.encode_e2m1(r)]
    want = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 0.0, 3.0, 4.0, 6.0, -0.0, -2.0, -4.0, -6.0],
                    dtype=F32)
    np.testing.assert_array_equal(got, want)
    # agrees with ml_dtypes' IEEE round-to-nearest-even cast on a dense sweep (inside the clip range)
    sweep = np.linspace(-6, 6, 48001, dtype=F32)
    np.testing.assert_array_equal(Q.E2M1_VALUES[Q.encode_e2m1(sweep)],
                                  sweep.astype(ml_dtypes.float4_e2m1fn).astype(F32))


def test_fp4_roundtrip_and_scales():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 256)) * 0.02).astype(F32)
    w[3, 32:64] = 0.0  # an all-zero block
    packed, s = Q.quant_fp4(w)
    assert packed.dtype == np.int8 and packed.shape == (64, 128)
    assert s.dtype == Q.E8M0 and s.shape == (64, 8)
    assert _is_pow2(s)
    d = Q.dequant_fp4(packed, s)
    assert np.all(d[3, 32:64] == 0.0)
    assert _bf16_exact(d)
    # each value lands on the nearest grid point of its block: error <= half the widest step (2 * scale / 2)
    sf = np.repeat(s.astype(F32), 32, axis=1)
    assert np.all(np.abs(d - w) <= sf * 1.0)
    # e2m1 is coarse: cosine ~0.99 on Gaussian data
    assert _cos(d, w) > 0.98
    # quantizing the dequantized tensor is a fixed point
    p2, s2 = Q.quant_fp4(d)
    np.testing.assert_array_equal(Q.dequant_fp4(p2, s2), d)


def test_fp4_nibble_order_from_quantizer():
    w = np.zeros((1, 32), dtype=F32)
    w[0, 0], w[0, 1] = 3.0, -6.0  # amax 6 -> scale 1; codes 5 (low) and 15 (high)
    packed, s = Q.quant_fp4(w)
    assert s.astype(F32)[0, 0] == 1.0
    assert packed.view(np.uint8)[0, 0] == 0xF5
    assert np.all(packed[0, 1:] == 0)


# ---- int8 per token and integer GEMM ------------------------------------------------------------------------
def test_act_quant_per_token():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 64)).astype(F32)
    x[1, 2] = 0.0
    q, s = Q.act_quant_per_token(x)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert s.dtype == np.float32 and s.shape == (3, 5, 1)
    assert s[1, 2, 0] == 1.0 and np.all(q[1, 2] == 0)
    # the per-token max maps to +-127, and everything is within half a step
    assert np.all(np.abs(q).max(-1)[np.abs(x).max(-1) > 0] == 127)
    assert np.all(np.abs(q * s - x) <= s * 0.5 * (1 + 1e-6))
    # round half to even (np.rint): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    q2, s2 = Q.act_quant_per_token(np.array([[127.0, 0.5, 1.5, 2.5, -2.5]], dtype=F32))
    assert s2[0, 0] == 1.0
    np.testing.assert_array_equal(q2, [[127, 0, 2, 2, -2]])


def test_int_matmul_is_exact_integer():
    rng = np.random.default_rng(3)
    a = rng.integers(-127, 128, (4, 8192), dtype=np.int8)
    b = rng.integers(-127, 128, (8192, 6), dtype=np.int8)
    # large same-sign sums: row 0 . column 0 is ~1.2e8 > 2**24, where float32 drops low bits
    a[0] = 127
    b[:, 0] = rng.integers(100, 128, 8192, dtype=np.int8)
    got = Q.int_matmul(a, b)
    assert got.dtype == np.int32
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert exact[0, 0] > 2**24
    np.testing.assert_array_equal(got, exact)
    # a float32 GEMM is not exact on these operands, so the comparison above has teeth
    assert not np.array_equal((a.astype(F32) @ b.astype(F32)).astype(np.int64), exact)
    with pytest.raises(TypeError):
        Q.int_matmul(a.astype(np.int32), b)


def test_int_matmul_extremes_small_k():
    # K = 1024 with -128 * -128 everywhere: sums reach exactly 2**24, the float32 path's limit
    rng = np.random.default_rng(10)
    a = rng.choice(np.array([-128, 127, -127, 1], dtype=np.int8), (3, 1024))
    a[0] = -128
    b = np.full((1024, 5), -128, dtype=np.int8)
    b[:, 1:] = rng.integers(-128, 128, (1024, 4), dtype=np.int8)
    got = Q.int_matmul(a, b)
    assert got[0, 0] == 2**24
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))
    # batched, with a transposed (strided) right operand, as W4A8 uses it
    w = rng.integers(-7, 8, (6, 4, 32), dtype=np.int8)  # [N, G, gs]
    x = rng.integers(-127, 128, (4, 3, 32), dtype=np.int8)  # [G, T, gs]
    got = Q.int_matmul(x, w.transpose(1, 2, 0))
    np.testing.assert_array_equal(got, np.einsum("gtk,ngk->gtn", x.astype(np.int64), w.astype(np.int64)))


# ---- W8A8 ----------------------------------------------------------------------------------------------------
def test_w8a8():
    rng = np.random.default_rng(4)
    N, K = 96, 320
    w = rng.standard_normal((N, K)).astype(F32)
    w[7] = 0.0
    x = rng.standard_normal((2, 3, K)).astype(F32)
    W = Q.W8A8Weight.from_float(w)
    assert W.qweight.dtype == np.int8 and W.scale.dtype == np.float32 and W.scale.shape == (N,)
    assert W.shape == (N, K) and W.nbytes == N * K + 4 * N
    assert np.abs(W.qweight).max() == 127 and W.scale[7] == 1.0
    amax = np.abs(w).max(1)
    np.testing.assert_array_equal(W.scale, np.where(amax > 0, amax / F32(127), F32(1)))
    dq = W.dequantize()
    assert np.abs(dq - w).max() <= W.scale.max() * 0.5 * (1 + 1e-6)

    y = W.matmul(x)
    assert y.shape == (2, 3, N) and y.dtype == F32
    # the same integer arithmetic in float64: dequantized int8 activations times dequantized weights
    xq, xs = Q.act_quant_per_token(x)
    ref = (xq.astype(np.float64) * xs) @ (W.qweight.astype(np.float64) * W.scale[:, None]).T
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert np.all(y[..., 7] == 0.0)
    assert _cos(y, x @ w.T) > 0.999
    # the backend routes to it, and dense() dequantizes it
    np.testing.assert_array_equal(NumpyBackend().linear(x, W), y)
    np.testing.assert_array_equal(dense(W), dq)


def test_w8a8_matmul_uses_per_token_scales():
    # token 0 is 1000x larger than token 1: a per-tensor activation scale would zero token 1
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64)).astype(F32)
    x = rng.standard_normal((2, 64)).astype(F32)
    x[0] *= 1000.0
    y = Q.W8A8Weight.from_float(w).matmul(x)
    assert _cos(y[1], x[1] @ w.T) > 0.999


# ---- W4A8 ----------------------------------------------------------------------------------------------------
def test_int4_pack_roundtrip_and_layout():
    q = np.array([[1, -1, -7, 7, 0, -8]], dtype=np.int8)
    p = Q.pack_int4(q)
    np.testing.assert_array_equal(p.view(np.uint8), [[0xF1, 0x79, 0x80]])
    np.testing.assert_array_equal(Q.unpack_int4(p), q)
    rng = np.random.default_rng(6)
    r = rng.integers(-8, 8, (5, 64), dtype=np.int8)
    np.testing.assert_array_equal(Q.unpack_int4(Q.pack_int4(r)), r)


@pytest.mark.parametrize("group_size", [32, 128])
def test_w4a8(group_size):
    rng = np.random.default_rng(7)
    N, K = 48, 256
    G = K // group_size
    w = rng.standard_normal((N, K)).astype(F32)
    w[5, :group_size] = 0.0
    x = rng.standard_normal((7, K)).astype(F32)
    W = Q.W4A8Weight.from_float(w, group_size=group_size)
    assert W.qweight.dtype == np.int8 and W.qweight.shape == (N, K // 2)
    assert W.scale.dtype == np.float32 and W.scale.shape == (N, G)
    assert W.shape == (N, K) and W.nbytes == N * K // 2 + 4 * N * G
    q = Q.unpack_int4(W.qweight)
    assert q.min() >= -7 and q.max() <= 7 and np.abs(q).max() == 7
    assert W.scale[5, 0] == 1.0
    dq = W.dequantize()
    assert np.all(dq[5, :group_size] == 0.0)
    sfull = np.repeat(W.scale, group_size, axis=1)
    assert np.all(np.abs(dq - w) <= sfull * 0.5 * (1 + 1e-6))

    y = W.matmul(x)
    assert y.shape == (7, N) and y.dtype == F32
    xq, xs = Q.act_quant_per_token(x)
    ref = (xq.astype(np.float64) * xs) @ dq.astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert _cos(y, x @ w.T) > 0.99
    np.testing.assert_array_equal(NumpyBackend().linear(x, W), y)


def test_w4a8_groups_are_scaled_separately():
    # two groups with 100x different magnitudes: a per-row scale would flatten the small group to zero
    w = np.zeros((1, 64), dtype=F32)
    w[0, :32] = 100.0
    w[0, 32:] = 1.0
    W = Q.W4A8Weight.from_float(w, group_size=32)
    x = np.zeros((1, 64), dtype=F32)
    x[0, 32:] = 1.0
    np.testing.assert_allclose(W.matmul(x), [[32.0]], rtol=1e-6)
    with pytest.raises(ValueError):
        Q.W4A8Weight.from_float(w, group_size=48)


# ---- FP8 / FP4 weight objects and the registry -------------------------------------------------------------
def test_fp8_fp4_weight_objects():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((200, 256)).astype(F32)
    x = rng.standard_normal((3, 256)).astype(F32)
    for W in (Q.FP8BlockWeight.from_float(w), Q.FP4Weight.from_float(w)):
        d = W.dequantize()
        assert W.shape == (200, 256) and d.shape == (200, 256)
        np.testing.assert_allclose(NumpyBackend().linear(x, W), x @ d.T, rtol=1e-5, atol=1e-5)
    assert Q.FP8BlockWeight.from_float(w).nbytes == 200 * 256 + 2 * 2
    assert Q.FP4Weight.from_float(w).nbytes == 200 * 128 + 200 * 8


def test_formats_registry():
    assert set(Q.FORMATS) >= {"fp8", "fp8-f32", "fp4", "w8a8", "w4a8"}
    assert Q.FORMATS["fp8"].block == (128, 128) and Q.FORMATS["fp8"].scale_dtype == "F8_E8M0"
    assert Q.FORMATS["fp4"].block == (1, 32) and Q.FORMATS["fp4"].values_per_element == 2
    w = np.random.default_rng(9).standard_normal((64, 128)).astype(F32)
    for name in Q.FORMATS:
        W = Q.quantize_weight(w, name)
        assert W.shape == (64, 128)
        assert _cos(W.dequantize(), w) > 0.98
