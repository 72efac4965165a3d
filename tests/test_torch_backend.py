"""The torch backend against the NumPy reference: every op on every simulated SoC and provider set (so the
torch_npu / custom-op stand-ins and the composed paths all run), the stand-ins' documented semantics, whole
models end to end, and `dsv4 doctor`."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ascend import soc as S  # noqa: E402
from ascend.backends import get_backend  # noqa: E402
from ascend.device import cann_version, detect  # noqa: E402
from ascend.standins import torch_npu as ns  # noqa: E402
from ascend.standins import vllm_ascend as cs  # noqa: E402
from ascend.torch_backend import LOWERINGS, TorchBackend, model_calls  # noqa: E402
from common.config import load_preset  # noqa: E402
from common.generate import SamplingParams, generate  # noqa: E402
from common.model import Model  # noqa: E402
from common.presets import random_weights  # noqa: E402
from ops import ExpertWeights  # noqa: E402
from ops.numpy_ref import NumpyBackend  # noqa: E402
from ops.quant import W4A8Weight, W8A8Weight, act_quant_per_token  # noqa: E402

from .conftest import small_config  # noqa: E402

R = NumpyBackend()
NPU = frozenset({S.TORCH_NPU, S.COMPOSED})
NPU_CUSTOM = frozenset({S.TORCH_NPU, S.CUSTOM, S.COMPOSED})
COMPOSED = frozenset({S.COMPOSED})
PROVIDER_SETS = {"npu": NPU, "npu+custom": NPU_CUSTOM, "composed": COMPOSED}
CONFIGS = [(soc, p) for soc in (S.A2, S.A3, S.A5) for p in PROVIDER_SETS]


@pytest.fixture(params=CONFIGS, ids=[f"{s}-{p}" for s, p in CONFIGS])
def tb(request) -> TorchBackend:
    soc, p = request.param
    return TorchBackend(soc=soc, providers=PROVIDER_SETS[p])


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def assert_close(got, want, rtol=1e-5):
    """Max error relative to the reference's scale (elementwise relative error is meaningless near 0)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x scale {scale:.3g}"


def run(B, name, *args):
    """Call op `name` on the torch backend with numpy arguments converted; results back to numpy."""
    conv = [B.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
    out = getattr(B, name)(*conv)
    if isinstance(out, tuple):
        return tuple(B.to_numpy(o) for o in out)
    return B.to_numpy(out)


# ---- dense math ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0, 7])
def test_dense_ops(tb, rng, T):
    x = f32(rng, T, 3, 64)
    w = f32(rng, 64, scale=0.1) + 1
    assert_close(run(tb, "rms_norm", x, w, 1e-6), R.rms_norm(x, w, 1e-6))
    assert_close(run(tb, "rms_norm", x, None, 1e-6), R.rms_norm(x, None, 1e-6))  # V4's weightless q norm
    W = f32(rng, 48, 64, scale=0.1)
    assert_close(run(tb, "linear", x, W), R.linear(x, W))
    table = f32(rng, 20, 64)
    ids = rng.integers(0, 20, T).astype(np.int64)
    np.testing.assert_array_equal(run(tb, "embedding", ids, table), R.embedding(ids, table))
    # grouped wo_a: K and N multiples of 16 so npu_transpose_batchmatmul takes it
    xg, wg = f32(rng, T, 2, 32), f32(rng, 2 * 16, 32)
    assert_close(run(tb, "grouped_linear", xg, wg), R.grouped_linear(xg, wg))
    xo, wo = f32(rng, T, 3, 24), f32(rng, 3 * 10, 24)  # not multiples of 16: the composed path
    assert_close(run(tb, "grouped_linear", xo, wo), R.grouped_linear(xo, wo))


@pytest.mark.parametrize("T", [0, 9])
def test_w8a8_and_w4a8_linear_are_bit_exact(tb, rng, T):
    x = f32(rng, T, 128)
    x[:1] = 0  # an all-zero token: scale 1, like ops.quant
    W = W8A8Weight.from_float(f32(rng, 40, 128))
    y = run(tb, "linear", x, W)
    np.testing.assert_array_equal(y, W.matmul(x))  # integer path and float order identical
    W4 = W4A8Weight.from_float(f32(rng, 24, 128), group_size=32)
    np.testing.assert_array_equal(run(tb, "linear", x, W4), W4.matmul(x))
    # a quantized wo_a goes through grouped_linear dequantized, like the reference
    xg = f32(rng, T, 2, 64)
    Wg = W8A8Weight.from_float(f32(rng, 32, 64))
    assert_close(run(tb, "grouped_linear", xg, Wg), R.grouped_linear(xg, Wg))


@pytest.mark.parametrize("rope_dim,T", [(8, 5), (64, 5), (64, 0)])
def test_rope_and_inverse(tb, rng, rope_dim, T):
    inv = (1.0 / 10000 ** (np.arange(0, rope_dim, 2) / rope_dim)).astype(np.float32)
    pos = rng.integers(0, 500, T).astype(np.int64)
    cos, sin = run(tb, "rope_freqs", pos, inv)
    rc, rs = R.rope_freqs(pos, inv)
    assert_close(cos, rc, 1e-6)
    assert_close(sin, rs, 1e-6)
    for shape in ((T, 3, rope_dim + 16), (T, rope_dim)):  # heads x (nope | rope), and rope only
        x = f32(rng, *shape)
        y = run(tb, "rope", x, rc, rs)
        assert_close(y, R.rope(x, rc, rs))
        assert_close(run(tb, "rope", y, rc, rs, True), x)


# ---- mHC ----------------------------------------------------------------------------------------------------------
def _hc_inputs(rng, T, n, D):
    x = f32(rng, T, n, D)
    fn = f32(rng, (2 + n) * n, n * D, scale=1 / np.sqrt(n * D))
    scale = np.array([0.7, 1.3, 2.0], np.float32)
    base = f32(rng, (2 + n) * n, scale=0.5)
    return x, fn, scale, base


@pytest.mark.parametrize("n,T", [(4, 6), (2, 6), (4, 0)])
def test_hc_pre_post_head(tb, rng, n, T):
    x, fn, scale, base = _hc_inputs(rng, T, n, 32)
    got = run(tb, "hc_pre", x, fn, scale, base, 20, 1e-6, 1e-6)
    want = R.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    y = f32(rng, T, 32)
    assert_close(run(tb, "hc_post", y, x, want[1], want[2]), R.hc_post(y, x, want[1], want[2]))
    hfn, hbase = f32(rng, n, n * 32, scale=0.1), f32(rng, n, scale=0.5)
    assert_close(run(tb, "hc_head", x, hfn, scale[:1], hbase, 1e-6, 1e-6),
                 R.hc_head(x, hfn, scale[:1], hbase, 1e-6, 1e-6))


# ---- compressed sparse attention -------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [0, 5])
def test_compress_with_masked_scores(tb, rng, G):
    kv, score = f32(rng, G, 8, 16), f32(rng, G, 8, 16)
    score[:, :4, :3] = -np.inf  # the overlap compressor's first window: half its candidates masked
    assert_close(run(tb, "compress", kv, score), R.compress(kv, score))


def test_indexer_topk_ties_and_visibility(tb, rng):
    # random scores: selection equals the reference exactly
    q, w, keys = f32(rng, 20, 4, 16), f32(rng, 20, 4), f32(rng, 9, 16)
    pos = np.arange(20, dtype=np.int64) * 2
    np.testing.assert_array_equal(run(tb, "indexer_topk", q, w, keys, pos, 4, 5, 0.25),
                                  R.indexer_topk(q, w, keys, pos, 4, 5, 0.25))
    # every score 0 (relu of negative products): ties resolve to the lowest entry index; invisible -> -1
    qn = -np.abs(f32(rng, 3, 2, 4))
    kp = np.abs(f32(rng, 6, 4))
    sel = run(tb, "indexer_topk", qn, np.ones((3, 2), np.float32), kp, np.array([3, 11, 40]), 4, 4, 1.0)
    np.testing.assert_array_equal(sel, [[0, -1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(sel, R.indexer_topk(qn, np.ones((3, 2), np.float32), kp, np.array([3, 11, 40]),
                                                      4, 4, 1.0))
    assert run(tb, "indexer_topk", q[:0], w[:0], keys, pos[:0], 4, 5, 0.25).shape == (0, 5)
    assert run(tb, "indexer_topk", q, w, keys[:0], pos, 4, 5, 0.25).shape == (20, 0)


@pytest.mark.parametrize("case", ["window", "compressed", "selected", "empty"])
def test_sparse_attention(tb, rng, case):
    H, D, W, r = 4, 16, 6, 4
    T = 0 if case == "empty" else 70  # more than one 64-row block
    pos0 = 30
    q = f32(rng, T, H, D)
    qpos = np.arange(pos0, pos0 + T, dtype=np.int64)
    kv_pos = np.arange(pos0 - W + 1, pos0 + T, dtype=np.int64)
    kv = f32(rng, len(kv_pos), D)
    sinks = f32(rng, H)
    comp = f32(rng, (pos0 + T) // r, D) if case in ("compressed", "selected") else None
    sel = None
    if case == "selected":
        sel = rng.integers(-1, comp.shape[0], (T, 3)).astype(np.int64)
    args = (q, qpos, kv, kv_pos, W, comp, r, sel, sinks, D ** -0.5)
    assert_close(run(tb, "sparse_attention", *args), R.sparse_attention(*args))


# ---- MoE ---------------------------------------------------------------------------------------------------------
def _sorted_routing(w, idx):
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(w, order, 1), np.take_along_axis(idx, order, 1)


@pytest.mark.parametrize("score_func,norm,hashed", [("sqrtsoftplus", True, False), ("sqrtsoftplus", True, True),
                                                    ("sigmoid", True, False), ("sigmoid", False, False),
                                                    ("softmax", False, False), ("sigmoid", True, True)])
def test_moe_gate(tb, rng, score_func, norm, hashed):
    T, D, E, k = 11, 32, 16, 4
    x, gw = f32(rng, T, D), f32(rng, E, D, scale=0.3)
    bias = None if hashed else f32(rng, E, scale=0.5)
    tid = np.argsort(rng.random((50, E)), axis=1)[:, :k].astype(np.int64) if hashed else None
    ids = rng.integers(0, 50, T).astype(np.int64)
    got = _sorted_routing(*run(tb, "moe_gate", x, gw, bias, tid, ids, k, score_func, 1.5, norm))
    want = _sorted_routing(*R.moe_gate(x, gw, bias, tid, ids, k, score_func, 1.5, norm))
    np.testing.assert_array_equal(got[1], want[1])
    assert_close(got[0], want[0])
    w0, i0 = run(tb, "moe_gate", x[:0], gw, bias, tid, ids[:0], k, score_func, 1.5, norm)
    assert w0.shape == i0.shape == (0, k) and i0.dtype == np.int64


def _experts(rng, E, D, I, quant=None):
    ws = [[f32(rng, *s, scale=1 / np.sqrt(s[1])) for _ in range(E)] for s in ((I, D), (I, D), (D, I))]
    if quant:
        ws = [[quant.from_float(w) for w in lst] for lst in ws]
    return ws


@pytest.mark.parametrize("quant", [None, W8A8Weight])
@pytest.mark.parametrize("T", [0, 13])
def test_moe_experts_ragged_empty_and_expert_slices(tb, rng, quant, T):
    E, D, I, k = 8, 32, 16, 3
    ws = _experts(rng, E, D, I, quant)
    x = f32(rng, T, D)
    # experts 0..4 only, ragged counts; 5, 6, 7 receive nothing
    ids = np.array([rng.permutation(5)[:k] for _ in range(T)], dtype=np.int64).reshape(T, k)
    wts = rng.random((T, k)).astype(np.float32)
    tol = 1e-5 if quant is None else 1e-4  # W8A8: activation rounding may flip on float-order differences
    for first, count in ((0, E), (2, 3), (5, 3)):  # all, a middle slice, a slice nobody routes to
        local = [lst[first:first + count] for lst in ws]
        want = R.moe_experts(x, wts, ids, ExpertWeights(*local, n_experts=E, first=first, count=count), 7.0)
        tex = ExpertWeights(*[[tb.from_numpy(w) for w in lst] for lst in local], n_experts=E, first=first,
                            count=count)
        got = tb.to_numpy(tb.moe_experts(tb.from_numpy(x), tb.from_numpy(wts), tb.from_numpy(ids), tex, 7.0))
        assert_close(got, want, tol)
        if first == 5:
            np.testing.assert_array_equal(got, 0)


def test_moe_experts_skips_minus_one_ids(tb, rng):
    """-1 marks "no expert" (e.g. padding rows of an expert-parallel exchange): the copy adds nothing."""
    E, D, I = 4, 32, 16
    ws = _experts(rng, E, D, I)
    x, wts = f32(rng, 5, D), rng.random((5, 2)).astype(np.float32)
    ids = np.array([[0, 1], [2, -1], [-1, -1], [3, 0], [1, -1]], dtype=np.int64)
    # the reference has no -1: the same routing with those copies sent to expert 0 at weight 0
    want = R.moe_experts(x, np.where(ids < 0, 0, wts), np.where(ids < 0, 0, ids), ExpertWeights(*ws, n_experts=E),
                         7.0)
    tex = ExpertWeights(*[[tb.from_numpy(w) for w in lst] for lst in ws], n_experts=E)
    got = tb.moe_experts(tb.from_numpy(x), tb.from_numpy(wts), tb.from_numpy(ids), tex, 7.0)
    assert_close(tb.to_numpy(got), want)


@pytest.mark.parametrize("quant", [None, W8A8Weight])
def test_swiglu_mlp(tb, rng, quant):
    w1, w3, w2 = (f32(rng, 24, 32, scale=0.3), f32(rng, 24, 32, scale=0.3), f32(rng, 32, 24, scale=0.3))
    if quant:
        w1, w3, w2 = (quant.from_float(w) for w in (w1, w3, w2))
    for T in (0, 6):
        x = f32(rng, T, 32, scale=3)  # large enough that the clamp at 2.0 bites
        for limit in (0.0, 2.0):
            assert_close(run(tb, "swiglu_mlp", x, w1, w3, w2, limit), R.swiglu_mlp(x, w1, w3, w2, limit),
                         1e-5 if quant is None else 1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.8, 5, 1.0), (1.0, 0, 0.7)])
def test_sample_matches_reference_draws(tb, rng, temperature, top_k, top_p):
    logits = f32(rng, 4, 50, scale=2)
    got = tb.sample(tb.from_numpy(logits), temperature, top_k, top_p, np.random.default_rng(7))
    want = R.sample(logits, temperature, top_k, top_p, np.random.default_rng(7))
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


# ---- which variant runs --------------------------------------------------------------------------------------------
def _exercise(B, rng):
    x = f32(rng, 5, 4, 64)
    B.rms_norm(B.from_numpy(x), None, 1e-6)
    B.linear(B.from_numpy(x[:, 0]), W8A8Weight.from_float(f32(rng, 32, 64)))
    B.grouped_linear(B.from_numpy(f32(rng, 5, 2, 32)), B.from_numpy(f32(rng, 32, 32)))
    c, s = B.rope_freqs(B.arange(0, 5), B.from_numpy(np.ones(32, np.float32)))
    B.rope(B.from_numpy(x), c, s)
    hx, fn, sc, base = _hc_inputs(rng, 5, 4, 32)
    _, post, comb = B.hc_pre(*[B.from_numpy(a) for a in (hx, fn, sc, base)], 20, 1e-6, 1e-6)
    B.hc_post(B.from_numpy(f32(rng, 5, 32)), B.from_numpy(hx), post, comb)
    for sf in ("sqrtsoftplus", "sigmoid"):
        B.moe_gate(B.from_numpy(f32(rng, 5, 32)), B.from_numpy(f32(rng, 8, 32)), B.from_numpy(f32(rng, 8)), None,
                   B.arange(0, 5), 2, sf, 1.0, True)
    ws = _experts(rng, 4, 32, 16)
    ex = ExpertWeights(*[[B.from_numpy(w) for w in lst] for lst in ws], n_experts=4)
    B.moe_experts(B.from_numpy(f32(rng, 5, 32)), B.from_numpy(np.ones((5, 2), np.float32)),
                  B.from_numpy(np.array([[0, 1]] * 5)), ex, 7.0)


@pytest.mark.parametrize("soc", [S.A2, S.A3, S.A5])
def test_variant_selection_per_soc_and_providers(rng, soc):
    npu = TorchBackend(soc=soc, providers=NPU)
    _exercise(npu, rng)
    v = npu.variants()
    assert v["rms_norm"] == "torch_npu:npu_rms_norm"
    assert v["linear_w8a8"] == "torch_npu:npu_quant_matmul"  # float32: npu_dynamic_quant takes fp16/bf16 only
    assert v["grouped_linear"] == "torch_npu:npu_transpose_batchmatmul"
    # npu_interleave_rope takes float32 on 950 only
    assert v["rope"] == ("torch_npu:npu_interleave_rope" if soc == S.A5 else "composed:")
    assert v["hc_pre"] == v["hc_post"] == "composed:"
    assert v["moe_gate"] == "composed: | torch_npu:npu_moe_gating_top_k"  # sqrtsoftplus is custom-only
    assert v["moe_experts"].startswith("torch_npu:npu_moe_init_routing_v2")
    assert v["swiglu"] == "torch_npu:npu_swiglu"
    custom = TorchBackend(soc=soc, providers=NPU_CUSTOM)
    _exercise(custom, rng)
    v = custom.variants()
    assert v["moe_gate"] == "custom:moe_gating_top_k_hash"
    assert v["hc_post"] == ("composed:" if soc == S.A5 else "custom:npu_hc_post")
    composed = TorchBackend(soc=soc, providers=COMPOSED)
    _exercise(composed, rng)
    assert all(s.startswith("composed:") for s in composed.variants().values())


@pytest.mark.parametrize("soc,providers,expect", [
    (S.A2, NPU, {"rope": "torch_npu:npu_interleave_rope", "linear_w8a8": "torch_npu:npu_dynamic_quant"}),
    (S.A2, NPU_CUSTOM, {"hc_pre": "custom:npu_hc_pre_v2", "hc_post": "custom:npu_hc_post"}),
    (S.A5, NPU, {"hc_pre": "torch_npu:npu_mhc_pre+npu_mhc_sinkhorn", "rope": "torch_npu:npu_interleave_rope"}),
])
def test_low_precision_kernels_match_reference_at_bf16(rng, soc, providers, expect):
    """The fp16/bf16-only kernels become selectable with dtype=bfloat16; they agree to bf16 precision."""
    B = TorchBackend(soc=soc, providers=providers, dtype="bfloat16")
    x = f32(rng, 6, 4, 64)
    inv = (1.0 / 10000 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    cos, sin = R.rope_freqs(np.arange(6), inv)
    assert_close(run(B, "rope", x, cos, sin), R.rope(x, cos, sin), 2e-2)
    W = W8A8Weight.from_float(f32(rng, 32, 64))
    assert_close(run(B, "linear", x[:, 0], W), W.matmul(x[:, 0]), 3e-2)
    hx, fn, sc, base = _hc_inputs(rng, 6, 4, 4096)  # npu_hc_pre_v2 takes D 4096 or 7168 only (torch_binding.cpp)
    for g, w in zip(run(B, "hc_pre", hx, fn, sc, base, 20, 1e-6, 1e-6), R.hc_pre(hx, fn, sc, base, 20, 1e-6, 1e-6),
                    strict=True):
        assert_close(g, w, 2e-2)
    _, post, comb = R.hc_pre(hx, fn, sc, base, 20, 1e-6, 1e-6)
    y = f32(rng, 6, 4096)
    assert_close(run(B, "hc_post", y, hx, post, comb), R.hc_post(y, hx, post, comb), 2e-2)
    v = B.variants()
    for op, prefix in expect.items():
        assert v[op].startswith(prefix), (op, v[op])


def test_plan_agrees_with_select():
    """doctor's plan and the backend's selection are one rule (soc.explain): the chosen row is select's."""
    cfg, _ = load_preset("v4-flash")
    for dtype in ("float32", "bfloat16"):
        calls = model_calls(cfg, dtype)
        for soc in S.SOCS:
            for providers in PROVIDER_SETS.values():
                B = TorchBackend(soc=soc, providers=providers)
                plan = B.plan(calls)
                for op in LOWERINGS:
                    chosen = [e["variant"] for e in plan[op] if e["status"] == "chosen"]
                    v = S.select(op, soc, providers, calls[op], lambda var, op=op, B=B: B.kernel_problem(op, var))
                    assert chosen == [f"{v.provider}:{v.kernel}"]


# ---- stand-in semantics ----------------------------------------------------------------------------------------
def test_grouped_matmul_group_list_forms_empty_groups_and_zero_rows(rng):
    G, K, N = 5, 16, 8
    counts = [3, 0, 4, 0, 2]  # empty groups included
    x = torch.from_numpy(f32(rng, sum(counts), K))
    w = torch.from_numpy(f32(rng, G, K, N))
    want = torch.cat([x[a:b] @ w[g] for g, (a, b) in enumerate(zip(np.cumsum([0] + counts[:-1]),
                                                                   np.cumsum(counts), strict=True))])
    by_count = ns.npu_grouped_matmul([x], [w], group_list=torch.tensor(counts), group_list_type=1, group_type=0,
                                     split_item=3)[0]
    by_cumsum = ns.npu_grouped_matmul([x], [w], group_list=torch.tensor(np.cumsum(counts)), group_list_type=0,
                                      group_type=0, split_item=3)[0]
    torch.testing.assert_close(by_count, want)
    torch.testing.assert_close(by_cumsum, by_count, rtol=0, atol=0)
    per = ns.npu_grouped_matmul([x.half()], [wi.half() for wi in w], group_list=torch.tensor(counts),
                                group_list_type=1, group_type=0, split_item=0)
    assert [p.shape[0] for p in per] == counts
    zero = ns.npu_grouped_matmul([x[:0]], [w], group_list=torch.zeros(G, dtype=torch.int64), group_list_type=1,
                                 group_type=0, split_item=3)[0]
    assert zero.shape == (0, N)
    # groups may cover fewer rows than x has (init_routing's padded output): the rest is undefined, zero here
    part = ns.npu_grouped_matmul([x], [w], group_list=torch.tensor([1] * G), group_list_type=1, group_type=0,
                                 split_item=3)[0]
    torch.testing.assert_close(part[:1], x[:1] @ w[0])
    assert not part[G:].any()
    with pytest.raises(RuntimeError, match="cover"):
        ns.npu_grouped_matmul([x], [w], group_list=torch.tensor([9] * G), group_list_type=1, group_type=0,
                              split_item=3)
    with pytest.raises(RuntimeError, match="Expected a value of type 'Optional\\[Tensor\\]'|group_list"):
        ns.npu_grouped_matmul([x], [w], group_list=counts, group_list_type=1, group_type=0, split_item=3)
    with pytest.raises(RuntimeError, match="float32"):  # fp32 only as single tensors on A2/A3
        ns.npu_grouped_matmul([x], list(w), group_list=torch.tensor(counts), group_list_type=1, group_type=0,
                              split_item=3)


def test_grouped_matmul_int8_dynamic_quant_formula(rng):
    x = torch.randint(-127, 128, (6, 32), dtype=torch.int8)
    w = torch.randint(-127, 128, (2, 32, 8), dtype=torch.int8)
    scale = torch.rand(2, 8) + 0.5
    pts = torch.rand(6) + 0.5
    y = ns.npu_grouped_matmul([x], [w], scale=[scale], per_token_scale=[pts], group_list=torch.tensor([4, 2]),
                              group_list_type=1, group_type=0, split_item=3, output_dtype=torch.bfloat16)[0]
    acc = torch.cat([x[:4].long() @ w[0].long(), x[4:].long() @ w[1].long()]).double()
    want = acc * torch.cat([scale[0].expand(4, 8), scale[1].expand(2, 8)]).double() * pts[:, None].double()
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=0)


def test_init_routing_v2_semantics_and_local_range(rng):
    """The torch-npu 2.14.0 doc: expanded_x is [T*k, H] with the active copies first; counts only as type 1 (or 2)
    with expert_tokens_num_flag=True; quant_mode -1 or 1."""
    T, k, H, E = 6, 3, 4, 8
    x = torch.from_numpy(f32(rng, T, H))
    idx = torch.from_numpy(np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32))
    kw = {"expert_num": E, "expert_tokens_num_type": 1, "expert_tokens_num_flag": True, "quant_mode": -1}
    ex, row_idx, counts, _ = ns.npu_moe_init_routing_v2(x, idx, **kw)
    flat = idx.reshape(-1).long()
    order = np.argsort(flat.numpy(), kind="stable")
    assert ex.shape == (T * k, H)
    torch.testing.assert_close(ex, x[torch.from_numpy(order) // k])
    # gather index: source copy t*k + j -> its expanded row
    torch.testing.assert_close(ex[row_idx.long()], x.repeat_interleave(k, 0))
    np.testing.assert_array_equal(counts.numpy(), np.bincount(flat.numpy(), minlength=E))
    for bad in ({"expert_tokens_num_type": 0}, {"expert_tokens_num_flag": False}, {"quant_mode": 0}):
        with pytest.raises(RuntimeError):
            ns.npu_moe_init_routing_v2(x, idx, **{**kw, **bad})
    # expert parallelism: only copies routed to experts [2, 5) are kept, in expert order, at the front
    exl, rl, cl, _ = ns.npu_moe_init_routing_v2(x, idx, active_expert_range=[2, 5], **kw)
    local = ((flat >= 2) & (flat < 5)).numpy()
    assert exl.shape == (T * k, H) and cl.tolist() == np.bincount(flat.numpy(), minlength=E)[2:5].tolist()
    assert (rl.numpy()[~local] == -1).all()
    torch.testing.assert_close(exl[rl.long()[torch.from_numpy(local)]], x.repeat_interleave(k, 0)[local])
    # scatter index (row_idx_type 1) lists the source copy of each expanded row
    _, scat, _, _ = ns.npu_moe_init_routing_v2(x, idx, row_idx_type=1, **kw)
    np.testing.assert_array_equal(scat.numpy(), order)


def test_finalize_routing_map_orders_and_remote_rows(rng):
    """The torch-npu 2.14.0 doc: drop_pad_mode only 0, the map column-major with values in [0, rows)."""
    T, k, H = 4, 2, 3
    rows = torch.from_numpy(f32(rng, 8, H))
    m_row = torch.tensor([0, 5, 6, 2, 3, 7, 1, 4], dtype=torch.int32)  # [i * k + j]
    scales = torch.from_numpy(rng.random((T, k)).astype(np.float32))
    skip = torch.from_numpy(f32(rng, T, H))
    want = skip.clone()
    for i in range(T):
        for j in range(k):
            want[i] += scales[i, j] * rows[int(m_row[i * k + j])]
    m_col = m_row.reshape(T, k).t().reshape(-1).contiguous()  # mode 0 takes the map column-major
    torch.testing.assert_close(ns.npu_moe_finalize_routing(rows, skip, None, None, scales, m_col, None), want)
    with pytest.raises(RuntimeError, match="drop_pad_mode"):
        ns.npu_moe_finalize_routing(rows, skip, None, None, scales, m_col, None, drop_pad_mode=2)
    with pytest.raises(RuntimeError, match="values must be in"):
        ns.npu_moe_finalize_routing(rows, skip, None, None, scales, torch.full_like(m_col, -1), None)
    with pytest.raises(RuntimeError, match="dtype"):  # scales in the rows' dtype
        ns.npu_moe_finalize_routing(rows, skip, None, None, scales.double(), m_col, None)


def test_quant_matmul_and_dynamic_quant_exactness(rng):
    a = torch.randint(-127, 128, (7, 300), dtype=torch.int8)
    b = torch.randint(-127, 128, (300, 9), dtype=torch.int8)
    scale = torch.rand(9) + 0.1
    acc = ns.npu_quant_matmul(a, b, scale, output_dtype=torch.int32)
    np.testing.assert_array_equal(acc.numpy(), a.numpy().astype(np.int64) @ b.numpy().astype(np.int64))
    big = torch.full((2, 4096), 127, dtype=torch.int8)  # K = 4096 needs the float64 path to stay exact
    np.testing.assert_array_equal(ns.npu_quant_matmul(big, big.t().contiguous(), scale[:1], output_dtype=torch.int32),
                                  np.full((2, 2), 127 * 127 * 4096))
    pts = torch.rand(7) + 0.1
    y = ns.npu_quant_matmul(a, b, scale, pertoken_scale=pts, output_dtype=torch.bfloat16)
    torch.testing.assert_close(y.float(), (acc.float() * pts[:, None]) * scale, rtol=1e-2, atol=0)
    # dynamic quant on bf16 input equals ops.quant on the same values; ties round half to even
    x = torch.from_numpy(f32(rng, 5, 64)).bfloat16()
    x[0, :3] = torch.tensor([127.0, 0.5, 1.5])  # scale 1: 0.5 -> 0, 1.5 -> 2
    q, s = ns.npu_dynamic_quant(x)
    rq, rs = act_quant_per_token(x.float().numpy())
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy(), rs[:, 0])
    assert q[0, :3].tolist() == [127, 0, 2] and s.shape == (5,)
    with pytest.raises(RuntimeError, match="dtype"):
        ns.npu_dynamic_quant(x.float())  # the documented input dtypes are fp16 / bf16


def test_interleave_rope_returns_rotate_half_layout(rng):
    x = torch.from_numpy(f32(rng, 2, 3, 1, 64))
    ang = torch.from_numpy(f32(rng, 2, 1, 1, 32))
    cos, sin = torch.cos(ang).repeat(1, 1, 1, 2), torch.sin(ang).repeat(1, 1, 1, 2)
    y = ns.npu_interleave_rope(x, cos, sin)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(y[..., :32], x0 * torch.cos(ang) - x1 * torch.sin(ang))
    torch.testing.assert_close(y[..., 32:], x1 * torch.cos(ang) + x0 * torch.sin(ang))
    with pytest.raises(RuntimeError, match="64"):
        ns.npu_interleave_rope(x[..., :32], cos[..., :32], sin[..., :32])


def test_gating_group_limited_topk_and_sqrtsoftplus(rng):
    x = torch.from_numpy(f32(rng, 5, 16))
    bias = torch.from_numpy(f32(rng, 16, scale=0.5))
    for mode in (0, 1):
        y, idx, _ = ns.npu_moe_gating_top_k(x, 3, bias=bias, k_group=2, group_count=4, group_select_mode=mode,
                                            norm_type=1, routed_scaling_factor=2.0)
        s = torch.sigmoid(x) + bias
        g = s.reshape(5, 4, 4)
        gs = g.amax(-1) if mode == 0 else g.topk(2, -1).values.sum(-1)
        keep = gs.topk(2, -1).indices
        masked = torch.full_like(g, -float("inf"))
        masked.scatter_(1, keep[..., None].expand(-1, -1, 4), g.gather(1, keep[..., None].expand(-1, -1, 4)))
        want = masked.reshape(5, 16).topk(3, -1).indices
        assert torch.equal(idx.long().sort(-1).values, want.sort(-1).values)
        sel = torch.sigmoid(x).gather(1, idx.long())
        torch.testing.assert_close(y, sel / sel.sum(-1, keepdim=True) * 2.0)
    yh, ih, norm = cs.moe_gating_top_k_hash(x, 2, tid2eid=torch.tensor([[3, 9], [1, 2]]),
                                            input_ids=torch.tensor([1, 0, 0, 1, 1]), norm_type=2, out_flag=True)
    assert ih.tolist() == [[1, 2], [3, 9], [3, 9], [1, 2], [1, 2]] and ih.dtype == torch.int32
    torch.testing.assert_close(norm, torch.sqrt(torch.nn.functional.softplus(x)))
    torch.testing.assert_close(yh.sum(-1), torch.ones(5))  # norm_type 2 renormalizes


def test_mhc_sinkhorn_is_doubly_stochastic(rng):
    c, _, _ = ns.npu_mhc_sinkhorn(torch.from_numpy(f32(rng, 3, 4, 4)), eps=1e-6, num_iters=20)
    torch.testing.assert_close(c.sum(-2), torch.ones(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.sum(-1), torch.ones(3, 4), atol=1e-3, rtol=0)


# ---- plumbing ----------------------------------------------------------------------------------------------------
def test_from_numpy_shares_memory_and_accepts_read_only_mmap(tmp_path):
    B = TorchBackend()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = B.from_numpy(a)
    assert np.shares_memory(t.numpy(), a)
    np.save(tmp_path / "w.npy", a)
    m = np.load(tmp_path / "w.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning is expected to be silenced
        tm = B.from_numpy(m)
    assert np.shares_memory(tm.numpy(), m)
    assert B.from_numpy(np.arange(3, dtype=np.float64)).dtype == torch.float32
    W = W8A8Weight.from_float(a)
    assert B.from_numpy(W) is W  # quantized weights pass through and convert on first use


def test_get_backend_and_missing_torch(monkeypatch):
    from ops import BackendUnavailable

    B = get_backend("torch", soc="950", providers=["composed"])
    assert isinstance(B, TorchBackend) and B.soc == "950" and B.providers == COMPOSED
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailable, match=r"pip install -e \.\[torch\]"):
        get_backend("torch")


def test_device_detection_without_npu(tmp_path):
    info = detect()
    assert info.torch_version == torch.__version__
    assert not info.has_npu and info.soc is None
    (tmp_path / "version.cfg").write_text("# toolkit\nversion=8.5.0.alpha001\n")
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path)}) == ("8.5.0.alpha001", str(tmp_path))
    with pytest.raises(Exception, match="torch_npu"):
        TorchBackend(device="npu")


# ---- end to end -----------------------------------------------------------------------------------------------
class _NumpyPassThrough(NumpyBackend):
    """The reference with quantized weight objects kept as objects (NumpyBackend.from_numpy wraps them in 0-d
    object arrays, which its linear cannot use)."""

    def from_numpy(self, a):
        return a if hasattr(a, "dequantize") and not isinstance(a, np.ndarray) else super().from_numpy(a)


def _w8a8_weights(cfg, seed):
    w = random_weights(cfg, seed=seed)
    dense = ("wq_a.weight", "wq_b.weight", "wkv.weight", "wo_a.weight", "wo_b.weight", "w1.weight", "w2.weight",
             "w3.weight")
    for name in list(w):
        if name.endswith(dense) or ".experts." in name:
            w[name] = W8A8Weight.from_float(w[name])
    return w


E2E = [
    # (config overrides, soc, providers, quantized)
    (dict(), S.A2, NPU_CUSTOM, False),  # SWA / CSA / HCA layers, hash layers, hc_mult 4, sqrtsoftplus
    (dict(hc_mult=2, compress_ratios=[4, 0, 4, 16]), S.A3, NPU, False),
    (dict(head_dim=64, qk_rope_head_dim=64, index_head_dim=64, scoring_func="sigmoid"), S.A5, NPU, False),
    (dict(scoring_func="softmax", num_hash_layers=1), S.A3, COMPOSED, False),
    (dict(), S.A2, NPU, True),
]


@pytest.mark.parametrize("over,soc,providers,quant", E2E, ids=["a2-custom", "a3-hc2", "950-rope64", "composed",
                                                                "a2-w8a8"])
def test_model_end_to_end_matches_reference(over, soc, providers, quant):
    cfg = small_config(**over)
    weights = _w8a8_weights(cfg, 11) if quant else random_weights(cfg, seed=11)
    ref = Model(cfg, weights, _NumpyPassThrough())
    B = TorchBackend(soc=soc, providers=providers)
    model = Model(cfg, weights, B)
    prompt = np.random.default_rng(3).integers(2, cfg.vocab_size, 21).tolist()
    params = SamplingParams(max_new_tokens=24, stop_on_eos=False)
    want = generate(ref, [prompt], params, keep_prompt_logits=True)
    got = generate(model, [prompt], params, keep_prompt_logits=True)
    assert_close(got.prompt_logits[0], want.prompt_logits[0], 1e-4)
    assert got.output_ids == want.output_ids and len(got.output_ids[0]) == 24
    used = B.variants()
    assert used["moe_experts"].startswith("torch_npu:" if providers != COMPOSED else "composed:")
    if quant:
        assert used["linear_w8a8"] == "torch_npu:npu_quant_matmul"
    if soc == S.A5 and cfg.rope_dim == 64:
        assert used["rope"] == "torch_npu:npu_interleave_rope"


def test_zero_token_forward_runs_every_layer():
    cfg = small_config()
    for B in (TorchBackend(providers=NPU_CUSTOM), TorchBackend(soc=S.A5, providers=NPU)):
        model = Model(cfg, random_weights(cfg, seed=2), B)
        out = model.forward([], [])
        assert out.logits == []
        assert {"hc_pre", "hc_post", "moe_gate", "moe_experts", "rms_norm"} <= set(B.variants())


def test_cli_generate_and_doctor(capsys):
    from tools.cli import main

    assert main(["generate", "--model", "tiny", "--backend", "torch", "--prompt-ids", "5,6,7", "--max-new-tokens",
                 "3", "--json"]) == 0
    torch_out = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", "tiny", "--backend", "cpu", "--prompt-ids", "5,6,7", "--max-new-tokens",
                 "3", "--json"]) == 0
    cpu_out = json.loads(capsys.readouterr().out)
    assert torch_out["backend"] == "torch" and torch_out["output_ids"] == cpu_out["output_ids"]
    assert set(torch_out) == set(cpu_out)
    assert main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    contract = ("embedding", "rms_norm", "linear", "grouped_linear", "rope_freqs", "rope", "hc_pre", "hc_post",
                "hc_head", "compress", "indexer_topk", "sparse_attention", "moe_gate", "moe_experts", "swiglu_mlp",
                "sample", "compressor", "compressor_metadata", "lightning_indexer", "sparse_attn_sharedkv",
                "scatter_update")
    assert set(rep["ops"]) == set(contract)
    assert rep["torch_npu"] is None and rep["soc"] == "A2"
    for entry in rep["ops"].values():
        for e in entry.values():
            assert e["chosen"]
    assert main(["doctor", "--soc", "950", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "950" in text and "npu_mhc_pre+npu_mhc_sinkhorn" in text
