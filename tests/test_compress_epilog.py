"""The 950 compress epilogs: NumPy golden (ops/compress_epilog.py) and stand-in (ascend/standins/v4_attention.py)
held to the owners' CPU goldens and pass criteria, re-implemented here from hicann/cann-recipes-infer@fbc225d:

* ops/ascendc/examples/test_npu_kv_compress_epilog.py: calc_kv_compress_layout, golden_mxfp8_row,
  golden_group_fp8_row, kv_compress_epilog_layout1_golden, compare_kv_compress_layout1 and the assertion
  "match_rate >= 0.99 and avg_cos >= 0.999"; the cases of KV_COMPRESS_LAYOUT1_CASES (x ~ U(-10, 10) bf16).
* ops/ascendc/examples/test_npu_indexer_compress_epilog.py: dynamic_block_quant (1 x 128 blocks, scale =
  amax / fp8 max) and requantize_compare (int8 bit patterns differing by > 1 on at most 0.1% of the elements) +
  np.allclose(scale, rtol=1e-5, atol=1e-5). That test drives cann's `indexer_compress_epilog` (separate scale
  tensor, e5m2); vllm-ascend's v2 packs values and scales into one uint8 paged cache and writes e4m3fn, so the
  formula is applied with the e4m3fn maximum and compared in the v2 layout.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from ops import compress_epilog as E

torch = pytest.importorskip("torch")
from ascend.standins import schema  # noqa: E402
from ascend.standins import v4_attention as V  # noqa: E402

BF = torch.bfloat16
T8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
N8 = {"float8_e4m3fn": E.E4M3, "float8_e5m2": E.E5M2}
FMAX = {"float8_e4m3fn": np.float32(448.0), "float8_e5m2": np.float32(57344.0)}


# ---- the owners' goldens and criteria, written out row by row as they are ---------------------------------------
def cann_kv_layout1(x_bf16: np.ndarray, slots: np.ndarray, mode: int, group: int, dt: str) -> np.ndarray:
    """cann kv_compress_epilog_layout1_golden: uint8 [max slot + 1, kv_cache_col]."""
    d = x_bf16.shape[1]
    qc = d - 64
    scale_col = math.ceil(qc / 64) if mode == 2 else math.ceil(qc / group)
    width = math.ceil((qc + 128 + scale_col * (1 if mode == 2 else 4)) / 128) * 128
    valid = slots[slots >= 0]
    out = np.zeros((int(valid.max()) + 1 if valid.size else 1, width), np.uint8)
    xf = x_bf16.astype(np.float32)
    for i, s in enumerate(slots):
        if s < 0:
            continue
        rope = np.ascontiguousarray(x_bf16[i, qc:]).view(np.uint8)
        fp8, scales = np.zeros(qc, np.uint8), []
        gs = 64 if mode == 2 else group
        for start in range(0, qc, gs):
            end = min(start + gs, qc)
            g = xf[i, start:end]
            if mode == 2:
                amax = np.float32(max(np.max(np.abs(g)), 1e-4))
                sc = np.float32(amax * (np.float32(1.0) / FMAX[dt]))
                u = int(np.array([sc], np.float32).view(np.uint32)[0])
                e = ((u >> 23) & 0xFF) + (1 if u & 0x7FFFFF else 0)
                sc = np.array([e << 23], np.uint32).view(np.float32)[0]
                fp8[start:end] = np.clip(g / sc, -FMAX[dt], FMAX[dt]).astype(N8[dt]).view(np.uint8)
                scales.append(np.array([e & 0xFF], np.uint8))
            else:
                amax = np.float32(np.max(np.where(np.isnan(g), 0, np.abs(g))))
                sc = np.float32(np.inf) if amax == 0 else np.float32(amax / FMAX[dt])
                y = g / sc
                fp8[start:end] = np.where(np.isnan(y), 0, y).astype(N8[dt]).view(np.uint8)
                scales.append(np.array([sc], "<f4").view(np.uint8))
        sb = np.concatenate(scales)
        row = [rope, fp8, sb] if mode == 2 else [fp8, rope, sb]
        cat = np.concatenate(row)
        out[s, :cat.size] = cat
    return out


def cann_kv_compare(golden: np.ndarray, actual: np.ndarray, slots: np.ndarray, d: int, mode: int, group: int,
                    dt: str) -> tuple[float, float]:
    """compare_kv_compress_layout1: byte match rate over quant + rope + scale bytes, mean cosine of the fp8."""
    lay = E.kv_compress_layout(d, mode, group)
    qc, rb = lay["quant_col"], lay["rope_bytes"]
    n_sc = lay["scale_col"] * lay["scale_bytes"]
    match = total = 0
    cos = []
    for s in slots[slots >= 0]:
        g, a = golden[s], actual[s]
        q = slice(rb, rb + qc) if mode == 2 else slice(0, qc)
        match += int(np.sum(g[:qc + rb + n_sc] == a[:qc + rb + n_sc]))
        total += qc + rb + n_sc
        gf, af = (v[q].view(N8[dt]).astype(np.float64) for v in (g, a))
        den = np.linalg.norm(gf) * np.linalg.norm(af)
        cos.append(1.0 if den == 0 and not gf.any() and not af.any() else float(gf @ af / den) if den else 0.0)
    return match / total, float(np.mean(cos))


def cann_indexer_quant(x: np.ndarray, dt: str = "float8_e4m3fn", mx: bool = False,
                       round_scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """dynamic_block_quant (mx False: float32 scales [T, ceil(d/128)]) or act_quant (mx True: e8m0 scale bytes,
    scale rounded up to a power of two by fast_round_scale); fp8 bytes [T, d]."""
    t, d = x.shape
    fin = np.isfinite(x)
    xc = np.where(fin, x, 0).astype(np.float32)
    nb = math.ceil(d / 128)
    pad = np.zeros((t, nb * 128), np.float32)
    pad[:, :d] = np.abs(xc)
    scale = (pad.reshape(t, nb, 128).max(-1).astype(np.float32) / FMAX[dt]).astype(np.float32)
    if mx and round_scale:
        for i, v in np.ndenumerate(scale):  # fast_log2_ceil + fast_pow2
            u = int(np.array([v], np.float32).view(np.uint32)[0])
            e = ((u >> 23) & 0xFF) - 127 + (1 if u & 0x7FFFFF else 0)
            scale[i] = np.array([(e + 127) << 23], np.int32).view(np.float32)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = xc / np.repeat(scale, 128, axis=1)[:, :d]
    out[~fin] = x[~fin]
    out = np.nan_to_num(np.clip(out, -FMAX[dt], FMAX[dt]), nan=0.0)
    y = np.round(out, 8).astype(N8[dt]).view(np.uint8)
    return y, ((scale.view(np.uint32) >> 23).astype(np.uint8) if mx else scale)


def cann_requantize_ok(golden: np.ndarray, actual: np.ndarray, dt: str = "float8_e4m3fn") -> bool:
    """requantize_compare: |int8(golden) - int8(actual)| > 1 (both-NaN excluded) on at most 0.1%."""
    gi, ai = golden.view(np.int8).astype(np.int32).ravel(), actual.view(np.int8).astype(np.int32).ravel()
    gf, af = golden.view(N8[dt]).astype(np.float32).ravel(), actual.view(N8[dt]).astype(np.float32).ravel()
    bad = (np.abs(gi - ai) > 1) & ~(np.isnan(gf) & np.isnan(af))
    return bad.sum() / gi.size <= 0.001


# ---- the owners' cases ----------------------------------------------------------------------------------------
# (name, tokens, head_dim, quant_mode, group, dtype, slot mode, slot dtype): KV_COMPRESS_LAYOUT1_CASES
KV_CASES = [
    ("group_e5m2_bs1_d512", 1, 512, 1, 128, "float8_e5m2", "seq", "int32"),
    ("group_e5m2_bs64_d512", 64, 512, 1, 128, "float8_e5m2", "seq", "int32"),
    ("group_e4m3_bs64_d512", 64, 512, 1, 128, "float8_e4m3fn", "seq", "int32"),
    ("group_e5m2_bs32_d192", 32, 192, 1, 128, "float8_e5m2", "seq", "int32"),
    ("group_e4m3_bs32_d384", 32, 384, 1, 128, "float8_e4m3fn", "seq", "int32"),
    ("group_e5m2_shuffled", 64, 512, 1, 128, "float8_e5m2", "shuffled", "int32"),
    ("group_e5m2_with_skip", 64, 512, 1, 128, "float8_e5m2", "with_skip", "int32"),
    ("group_e5m2_sparse", 32, 512, 1, 128, "float8_e5m2", "sparse", "int32"),
    ("group_e5m2_int64_slots", 64, 512, 1, 128, "float8_e5m2", "seq", "int64"),
    ("mx_e4m3_bs64_d512", 64, 512, 2, 64, "float8_e4m3fn", "seq", "int32"),
    ("mx_e5m2_bs64_d512", 64, 512, 2, 64, "float8_e5m2", "seq", "int32"),
    ("mx_e4m3_bs32_d256", 32, 256, 2, 64, "float8_e4m3fn", "seq", "int32"),
    ("mx_e4m3_bs32_d768", 32, 768, 2, 64, "float8_e4m3fn", "seq", "int32"),
    ("mx_e4m3_with_skip", 64, 512, 2, 64, "float8_e4m3fn", "with_skip", "int32"),
]


def _slots(rng, n: int, mode: str) -> np.ndarray:
    if mode == "shuffled":
        return rng.permutation(n).astype(np.int64)
    s = np.arange(n, dtype=np.int64)
    if mode == "with_skip":
        s[rng.random(n) < 0.2] = -1
    return s * 2 if mode == "sparse" else s


def _kv_inputs(seed: int, n: int, d: int, slot_mode: str):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-10, 10, (n, d)).astype(np.float32).astype(ml_dtypes.bfloat16)
    return x, _slots(rng, n, slot_mode)


def _run_kv(which: str, x, slots, mode, group, dt, slot_dtype, rows, width, cache_dims=3):
    shape = (rows, 1, width) if cache_dims == 3 else (rows, width)
    if which == "golden":
        cache = np.zeros(shape, N8[dt])
        E.kv_compress_epilog(cache, x, slots, group, mode, True, 1)
        return cache.reshape(rows, width).view(np.uint8)
    cache = torch.zeros(shape, dtype=T8[dt])
    sm = torch.from_numpy(slots).to(torch.int64 if slot_dtype == "int64" else torch.int32)
    xt = torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).astype(np.int16)).view(BF)
    V.kv_compress_epilog(cache, xt, sm, group, mode, True, 1)
    return cache.view(torch.uint8).reshape(rows, width).numpy()


@pytest.mark.parametrize("which", ["golden", "standin"])
@pytest.mark.parametrize("name,n,d,mode,group,dt,slot_mode,slot_dtype", KV_CASES, ids=[c[0] for c in KV_CASES])
def test_kv_compress_epilog_meets_the_cann_golden(which, name, n, d, mode, group, dt, slot_mode, slot_dtype):
    x, slots = _kv_inputs(sum(name.encode()), n, d, slot_mode)
    gold = cann_kv_layout1(x, slots, mode, group, dt)
    rows, width = gold.shape
    assert width == E.kv_compress_layout(d, mode, group)["kv_cache_col"]
    got = _run_kv(which, x, slots, mode, group, dt, slot_dtype, rows, width)
    match, cos = cann_kv_compare(gold, got, slots, d, mode, group, dt)
    assert match >= 0.99 and cos >= 0.999, (match, cos)  # test_npu_kv_compress_epilog.py run_layout1_case
    assert match == 1.0  # measured: the formulas agree byte for byte


def test_kv_golden_and_standin_agree_bytewise_and_decode_within_fp8_bounds():
    for mode, group, dt in [(2, 64, "float8_e4m3fn"), (1, 128, "float8_e4m3fn"), (2, 64, "float8_e5m2")]:
        x, slots = _kv_inputs(7, 40, 512, "with_skip")
        x[3, :128] = 0  # all-zero groups: MXFP8 clamps amax to 1e-4, group fp8 stores an infinite scale
        lay = E.kv_compress_layout(512, mode, group)
        rows, width = 48, lay["kv_cache_col"]
        a = _run_kv("golden", x, slots, mode, group, dt, "int32", rows, width)
        b = _run_kv("standin", x, slots, mode, group, dt, "int32", rows, width)
        np.testing.assert_array_equal(a, b)
        ok = slots >= 0
        assert not a[np.setdiff1d(np.arange(rows), slots[ok])].any()  # untouched rows stay zero
        assert not a[slots[ok], lay["concat_col"]:].any()  # row padding is zero
        cache = a.view(N8[dt]).reshape(rows, 1, width)
        dec = E.kv_compress_decode(cache, slots[ok], 512, mode, group)
        xf = x.astype(np.float32)[ok]
        np.testing.assert_array_equal(dec[:, 448:], xf[:, 448:])  # rope kept bf16, exact
        # fp8 error per group <= half an ulp at the top of the format, times the scale
        half_ulp = {"float8_e4m3fn": 16.0, "float8_e5m2": 4096.0}[dt]
        g = 64 if mode == 2 else 128
        pad = (-448) % g
        err = np.pad(np.abs(dec[:, :448] - xf[:, :448]), ((0, 0), (0, pad))).reshape(ok.sum(), -1, g).max(-1)
        amax = np.pad(np.abs(xf[:, :448]), ((0, 0), (0, pad))).reshape(ok.sum(), -1, g).max(-1)
        bound = half_ulp * amax / float(FMAX[dt]) * (2.0 if mode == 2 else 1.0) * 1.0001
        assert (err <= bound + 1e-30).all()


def test_kv_paged_cache_view_as_vllm_ascend_calls_it():
    """device_op.py:1473-1481: cache.view(-1, 1, W), flat slots, quant_group_size 64, mode 2, round, layout 1."""
    x, slots = _kv_inputs(3, 10, 512, "shuffled")
    pages = np.zeros((4, 8, 1, 640), E.E4M3)  # [blocks, block_size, 1, W]
    E.kv_compress_epilog(pages.reshape(-1, 1, 640), x, slots + 5, 64, 2, True, 1)
    gold = cann_kv_layout1(x, slots + 5, 2, 64, "float8_e4m3fn")
    np.testing.assert_array_equal(pages.reshape(32, 640)[:gold.shape[0]].view(np.uint8), gold)


# ---- indexer_compress_epilog_v2 -------------------------------------------------------------------------------
def _idx_case(seed: int, n: int, d: int, xdt, bs: int = 16):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, d)).astype(np.float32)
    x[1, :128] = 0.0  # an all-zero block: scale 0, values 0
    x = x.astype(xdt)
    nblk = -(-n // bs) + 1
    slots = rng.permutation(nblk * bs)[:n].astype(np.int32)
    slots[2] = -1
    width = d + 4 * math.ceil(d / 128)
    return x, slots, (nblk, bs, 1, width)


def _run_idx(which: str, x, slots, shape):
    if which == "golden":
        cache = np.full(shape, 0xA5, np.uint8)
        E.indexer_compress_epilog_v2(cache, x, slots, 2)
        return cache
    cache = torch.full(shape, 0xA5, dtype=torch.uint8)
    xt = torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).astype(np.int16)).view(
        BF if x.dtype == ml_dtypes.bfloat16 else torch.float16)
    V.indexer_compress_epilog_v2(cache, xt, torch.from_numpy(slots), 2)
    return cache.numpy()


@pytest.mark.parametrize("which", ["golden", "standin"])
@pytest.mark.parametrize("n,d,xdt", [(64, 128, np.float16), (33, 128, ml_dtypes.bfloat16), (16, 4096, np.float16),
                                     (8, 200, ml_dtypes.bfloat16)])
def test_indexer_compress_epilog_v2_meets_the_cann_golden(which, n, d, xdt):
    x, slots, shape = _idx_case(n + d, n, d, xdt)
    cache = _run_idx(which, x, slots, shape)
    ok = slots >= 0
    y, sc = E.indexer_compress_read(cache, slots[ok], d)
    gy, gsc = cann_indexer_quant(x.astype(np.float32)[ok])
    assert cann_requantize_ok(gy, y)  # test_npu_indexer_compress_epilog.py requantize_compare
    assert np.allclose(gsc.ravel(), sc.ravel(), rtol=1e-5, atol=1e-5, equal_nan=True)
    # bytes outside the written rows keep their previous contents
    bs, stride = shape[1], shape[1] * shape[3]
    written = np.zeros(cache.size, bool)
    for s in slots[ok]:
        b, o = divmod(int(s), bs)
        written[b * stride + o * d:b * stride + (o + 1) * d] = True
        sb = 4 * math.ceil(d / 128)
        written[b * stride + bs * d + o * sb:b * stride + bs * d + (o + 1) * sb] = True
    assert (cache.reshape(-1)[~written] == 0xA5).all()


def test_indexer_golden_and_standin_agree_bytewise():
    for n, d, xdt in [(40, 128, np.float16), (12, 4096, ml_dtypes.bfloat16)]:
        x, slots, shape = _idx_case(5, n, d, xdt)
        np.testing.assert_array_equal(_run_idx("golden", x, slots, shape), _run_idx("standin", x, slots, shape))
        ok = slots >= 0
        y, sc = E.indexer_compress_read(_run_idx("golden", x, slots, shape), slots[ok], d)
        zero_row = int(np.nonzero(np.nonzero(ok)[0] == 1)[0][0])
        assert sc[zero_row, 0] == 0 and not y[zero_row, :128].any()  # all-zero block: scale 0, zeros
        deq = y.view(E.E4M3).astype(np.float32) * np.repeat(sc, 128, axis=1)[:, :d]
        xf = x.astype(np.float32)[ok]
        assert np.abs(deq - xf).max() <= 16.0 * np.abs(xf).max() / 448.0 * 1.0001


# ---- schema binding and host-check refusals -------------------------------------------------------------------
def _kv_ok(**kw):
    a = {"kv_compress_cache": torch.zeros(8, 1, 640, dtype=torch.float8_e4m3fn),
         "x": torch.zeros(4, 512, dtype=BF), "slot_mapping": torch.arange(4, dtype=torch.int32),
         "quant_group_size": 64, "quant_mode": 2, "round_scale_flag": True, "layout": 1}
    a.update(kw)
    return a


def _idx_ok(**kw):
    a = {"indexer_compress_cache": torch.zeros(2, 4, 1, 132, dtype=torch.uint8),
         "x": torch.zeros(3, 128, dtype=torch.float16), "slot_mapping": torch.arange(3, dtype=torch.int32),
         "layout": 2}
    a.update(kw)
    return a


# (op, keyword arguments, message fragment); the numpy golden refuses the same calls with EpilogArgError
REJECTED = [
    ("kv", _kv_ok(x=torch.zeros(4, 1, 512, dtype=BF)), "2D"),  # torch_binding.cpp:1443
    ("kv", _kv_ok(slot_mapping=torch.arange(3, dtype=torch.int32)), "slot_mapping"),  # :1448
    ("kv", _kv_ok(kv_compress_cache=torch.zeros(2, 4, 2, 640, dtype=torch.float8_e4m3fn)), "dim 2"),  # :1452
    ("kv", _kv_ok(x=torch.zeros(4, 512)), "BF16"),  # :1456
    ("kv", _kv_ok(kv_compress_cache=torch.zeros(8, 1, 640, dtype=BF)), "FP8"),  # :1459
    ("kv", _kv_ok(quant_group_size=32), "64 or 128"),  # tiling_arch35.cpp:199
    ("kv", _kv_ok(kv_compress_cache=torch.zeros(8, 1, 512, dtype=torch.float8_e4m3fn)), "row width"),  # :253
    ("kv", _kv_ok(layout=2), "layout"),  # not modelled
    ("kv", _kv_ok(slot_mapping=torch.tensor([0, 1, 2, 8], dtype=torch.int32)), "outside the cache"),
    ("idx", _idx_ok(indexer_compress_cache=torch.zeros(8, 1, 132, dtype=torch.uint8)), "4"),  # tiling.cpp:100
    ("idx", _idx_ok(indexer_compress_cache=torch.zeros(2, 4, 2, 132, dtype=torch.uint8)), "third dim"),  # :105
    ("idx", _idx_ok(layout=1), "layout only support 2"),  # :139
    ("idx", _idx_ok(x=torch.zeros(3, 128)), "FLOAT16"),  # def.cpp:30
    ("idx", _idx_ok(indexer_compress_cache=torch.zeros(2, 4, 1, 132, dtype=BF)), "UINT8"),  # def.cpp:24
    ("idx", _idx_ok(indexer_compress_cache=torch.zeros(2, 4, 1, 128, dtype=torch.uint8)), "block"),
    ("idx", _idx_ok(slot_mapping=torch.tensor([0, 1, 8], dtype=torch.int32)), "outside the cache"),
]


def _to_numpy(v):
    if not isinstance(v, torch.Tensor):
        return v
    if v.dtype == BF:
        return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return v.view(torch.uint8).numpy().view(N8["float8_e4m3fn" if v.dtype == torch.float8_e4m3fn
                                                   else "float8_e5m2"])
    return v.numpy()


@pytest.mark.parametrize("op,kw,msg", REJECTED, ids=[f"{r[0]}-{r[2]}-{i}" for i, r in enumerate(REJECTED)])
def test_both_refuse_what_the_kernel_refuses(op, kw, msg):
    standin = V.kv_compress_epilog if op == "kv" else V.indexer_compress_epilog_v2
    golden = E.kv_compress_epilog if op == "kv" else E.indexer_compress_epilog_v2
    with pytest.raises(RuntimeError, match=msg):
        standin(**kw)
    with pytest.raises(E.EpilogArgError):
        golden(**{k: _to_numpy(v) for k, v in kw.items()})


def test_the_calls_bind_to_the_kept_schemas():
    assert schema.binds("vllm_ascend", "kv_compress_epilog", (), _kv_ok()) is None
    assert schema.binds("vllm_ascend", "indexer_compress_epilog_v2", (), _idx_ok()) is None
    kw = _kv_ok()
    kw.pop("layout")  # no default in the binding's schema (torch_binding.cpp:2396-2404)
    assert schema.binds("vllm_ascend", "kv_compress_epilog", (), kw) is not None
    assert "scale" in schema.binds("vllm_ascend", "kv_compress_epilog", (), _kv_ok(scale=1.0))  # cann's kwarg
    idx = _idx_ok()
    idx.pop("layout")
    assert schema.binds("vllm_ascend", "indexer_compress_epilog_v2", (), idx) is None  # layout=2 default
    with pytest.raises(RuntimeError):
        V.kv_compress_epilog(**_kv_ok(quant_scale=1))


# ---- cann-recipes' own bindings of the same kernels (custom.kv_compress_epilog / indexer_compress_epilog) ------
@pytest.mark.parametrize("mode,group,dt", [(1, 128, "float8_e5m2"), (2, 64, "float8_e4m3fn")])
def test_cann_kv_compress_epilog_call_form(mode, group, dt):
    """The call of run_layout1_case: keyword quant arguments, no layout."""
    from ascend.standins import cann_recipes as cr

    x, slots = _kv_inputs(11, 64, 512, "shuffled")
    gold = cann_kv_layout1(x, slots, mode, group, dt)
    cache = torch.zeros(gold.shape, dtype=T8[dt])
    xt = torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).astype(np.int16)).view(BF)
    cr.kv_compress_epilog(cache, xt, torch.from_numpy(slots).to(torch.int32), quant_group_size=group,
                          quant_mode=mode, round_scale_flag=True)
    match, cos = cann_kv_compare(gold, cache.view(torch.uint8).numpy(), slots, 512, mode, group, dt)
    assert match >= 0.99 and cos >= 0.999 and match == 1.0
    with pytest.raises(RuntimeError, match="hifloat8"):
        cr.kv_compress_epilog(cache, xt, torch.from_numpy(slots), quant_mode=3, scale=0.5)


@pytest.mark.parametrize("quant_mode,dt", [(1, "float8_e5m2"), (1, "float8_e4m3fn"), (0, "float8_e5m2"),
                                           (0, "float8_e4m3fn")])
def test_cann_indexer_compress_epilog_meets_its_golden(quant_mode, dt):
    """test_indexer_compress_epilog_normal_quant (mode 1) / _mx_fp8_quant (mode 0), smaller: shuffled slots into
    a pre-filled cache, fp16 x ~ U(-2, 2), d 4096; criteria requantize_compare + allclose(scale, 1e-5)."""
    from ascend.standins import cann_recipes as cr

    rng = np.random.default_rng(42 + quant_mode)
    n, d = 256, 4096
    x = rng.uniform(-2, 2, (n, d)).astype(np.float16)
    x[5, :128] = 0  # a zero block
    slots = rng.permutation(n).astype(np.int32)
    cache = torch.from_numpy(rng.uniform(-2, 2, (n, d)).astype(np.float32)).to(T8[dt])
    sdt = torch.float32 if quant_mode == 1 else torch.float8_e8m0fnu
    scale = torch.zeros(n, d // 128, dtype=sdt)
    gy, gs = cann_indexer_quant(x.astype(np.float32), dt, mx=quant_mode == 0)
    want = cache.view(torch.uint8).numpy().copy()
    want[slots] = gy
    cr.indexer_compress_epilog(cache, scale, torch.from_numpy(x), torch.from_numpy(slots), quant_mode=quant_mode,
                               round_scale=True)
    assert cann_requantize_ok(want, cache.view(torch.uint8).numpy(), dt)
    got_s = scale.numpy() if quant_mode == 1 else scale.view(torch.uint8).numpy()
    assert np.allclose(gs, got_s[slots], rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(cache.view(torch.uint8).numpy(), want)  # measured: byte for byte


def test_the_criteria_have_teeth():
    """Unrounded MX scales, the group-fp8 row order, or e5m2 for the v2 indexer's e4m3: each fails the criteria."""
    x, slots = _kv_inputs(1, 64, 512, "seq")
    gold = cann_kv_layout1(x, slots, 2, 64, "float8_e4m3fn")
    cache = np.zeros((gold.shape[0], 1, 640), E.E4M3)
    E.kv_compress_epilog(cache, x, slots, 64, 2, False, 1)
    match, cos = cann_kv_compare(gold, cache.reshape(-1, 640).view(np.uint8), slots, 512, 2, 64, "float8_e4m3fn")
    assert not (match >= 0.99 and cos >= 0.999)
    other = cann_kv_layout1(x, slots, 1, 128, "float8_e4m3fn")
    match, cos = cann_kv_compare(gold, other, slots, 512, 2, 64, "float8_e4m3fn")
    assert not (match >= 0.99 and cos >= 0.999)
    xi, sl, shape = _idx_case(3, 64, 128, np.float16)
    ok = sl >= 0
    y, s = E.indexer_compress_read(_run_idx("golden", xi, sl, shape), sl[ok], 128)
    gy, gs = cann_indexer_quant(xi.astype(np.float32)[ok], "float8_e5m2")
    assert not cann_requantize_ok(gy, y) and not np.allclose(gs, s, rtol=1e-5, atol=1e-5)
