"""The MindSpore backend on MindSpore's CPU runtime, op by op and end to end against the NumPy reference."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ascend.backends import get_backend
from common.generate import SamplingParams, generate
from common.model import Model
from common.presets import random_weights
from ops import BackendUnavailable, ExpertWeights
from ops import quant as Q
from ops.numpy_ref import ATTN_BLOCK, NumpyBackend

from .conftest import small_config

R = NumpyBackend()
F32 = np.float32
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def B():
    pytest.importorskip("mindspore")
    from ascend.mindspore_backend import MindSporeBackend

    return MindSporeBackend(jit=False)


@pytest.fixture(scope="module")
def BJ(B):
    from ascend.mindspore_backend import MindSporeBackend

    return MindSporeBackend(jit=True)


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)


# ---- plumbing ----------------------------------------------------------------------------------------------------
def test_plumbing_and_cache_writes(B):
    z = B.zeros((5, 3))
    assert B.to_numpy(z).dtype == F32 and z.shape == (5, 3)
    assert B.to_numpy(B.full((2, 2), float("-inf"))).tolist() == [[-np.inf] * 2] * 2
    assert B.to_numpy(B.zeros((2,), "int64")).dtype == np.int64
    assert B.to_numpy(B.arange(3, 7)).tolist() == [3, 4, 5, 6] and B.arange(4, 4).shape == (0,)
    rows = np.arange(6, dtype=F32).reshape(2, 3)
    z[1:3] = B.from_numpy(rows)  # slice assignment, as the caches are written
    z[B.from_numpy(np.array([4, 0]))] = B.from_numpy(rows)  # ring slots by index tensor
    want = np.zeros((5, 3), F32)
    want[1:3] = rows
    want[[4, 0]] = rows
    assert (B.to_numpy(z) == want).all()
    assert B.to_numpy(B.cat([B.from_numpy(rows), B.zeros((0, 3))])).tolist() == rows.tolist()
    assert B.to_numpy(B.from_numpy(np.arange(3))).dtype == np.int64
    assert B.to_numpy(B.from_numpy(np.ones(2, np.float64))).dtype == F32


def test_embedding_rms_norm_linear(B, rng):
    table, ids = rnd(rng, 20, 16), np.array([3, 0, 19, 3])
    close(B.embedding(B.from_numpy(ids), B.from_numpy(table)).asnumpy(), R.embedding(ids, table), 0, 0)
    x, w, W = rnd(rng, 7, 16), rnd(rng, 16), rnd(rng, 9, 16)
    for weight in (w, None):
        got = B.rms_norm(B.from_numpy(x), None if weight is None else B.from_numpy(weight), 1e-6)
        close(B.to_numpy(got), R.rms_norm(x, weight, 1e-6))
    close(B.to_numpy(B.linear(B.from_numpy(x.reshape(7, 1, 16)), B.from_numpy(W))), R.linear(x.reshape(7, 1, 16), W))
    xg, wg = rnd(rng, 5, 3, 8), rnd(rng, 3 * 4, 8)
    close(B.to_numpy(B.grouped_linear(B.from_numpy(xg), B.from_numpy(wg))), R.grouped_linear(xg, wg))
    w8 = Q.W8A8Weight.from_float(wg)  # grouped_linear takes quantized weights dequantized, like the reference
    close(B.to_numpy(B.grouped_linear(B.from_numpy(xg), B.from_numpy(w8))), R.grouped_linear(xg, w8))


def _tie_rows(K: int) -> np.ndarray:
    """Rows whose x / scale hits exact .5 ties (amax 127 -> scale 1), an all-zero row and a tiny row."""
    a = np.zeros((3, K), F32)
    a[0, :8] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]
    a[2, :3] = [1e-30, -3e-30, 2e-30]
    return a


@pytest.mark.parametrize("fmt,K", [("w8a8", 256), ("w8a8", 1280), ("w4a8", 256), ("w4a8", 1280)])
def test_quantized_linear_equals_numpy_integer_path(B, rng, fmt, K):
    """Bit-equal to ops.quant's int8 x int8 -> int32 arithmetic (float64 GEMM for K > 1024), rounding ties to even."""
    w = Q.quantize_weight(rnd(rng, 48, K), fmt)
    x = np.concatenate([rnd(rng, 9, K, scale=3.0), _tie_rows(K)])
    got = B.to_numpy(B.linear(B.from_numpy(x), B.from_numpy(w)))
    np.testing.assert_array_equal(got, w.matmul(x))
    x3 = x[:12].reshape(3, 4, K)  # leading dims, and a raw (unconverted) weight object
    np.testing.assert_array_equal(B.to_numpy(B.linear(B.from_numpy(x3), w)), w.matmul(x3))
    assert B.linear(B.zeros((0, K)), w).shape == (0, 48)
    assert B.variants()[f"linear_{fmt}"] == "composed"


def test_rope(B, rng):
    x = rnd(rng, 5, 3, 16)
    inv = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(F32)
    pos = np.array([0, 7, 100, 5000, 3])
    c, s = B.rope_freqs(B.from_numpy(pos), B.from_numpy(inv))
    rc, rs = R.rope_freqs(pos, inv)
    close(B.to_numpy(c), rc, 1e-6, 1e-6)
    for inverse in (False, True):
        close(B.to_numpy(B.rope(B.from_numpy(x), c, s, inverse)), R.rope(x, rc, rs, inverse))
    full = rnd(rng, 5, 8)  # rope over the whole row (kv without a nope part)
    close(B.to_numpy(B.rope(B.from_numpy(full), c, s)), R.rope(full, rc, rs))


def _hc_args(rng, T, n=4, d=8):
    return (rnd(rng, T, n, d), rnd(rng, (2 + n) * n, n * d), np.array([0.7, 1.3, 2.0], F32),
            rnd(rng, (2 + n) * n))


@pytest.mark.parametrize("T", [3, 0])
def test_mhc(B, rng, T):
    x, fn, scale, base = _hc_args(rng, T)
    got = B.hc_pre(*(B.from_numpy(a) for a in (x, fn, scale, base)), 20, 1e-6, 1e-6)
    want = R.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):  # 20 Sinkhorn passes amplify float32 rounding differences
        close(B.to_numpy(g), w, 1e-4, 1e-5)
    y = rnd(rng, T, 8)
    close(B.to_numpy(B.hc_post(B.from_numpy(y), B.from_numpy(x), got[1], got[2])), R.hc_post(y, x, *want[1:]), 1e-4)
    hfn, hbase = rnd(rng, 4, 32), rnd(rng, 4)
    got = B.hc_head(B.from_numpy(x), B.from_numpy(hfn), B.from_numpy(scale[:1]), B.from_numpy(hbase), 1e-6, 1e-6)
    close(B.to_numpy(got), R.hc_head(x, hfn, scale[:1], hbase, 1e-6, 1e-6))


def test_jit_kernels_match_eager(B, BJ, rng):
    x, fn, scale, base = (BJ.from_numpy(a) for a in _hc_args(rng, 2))
    eager = B.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    jitted = BJ.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for e, j in zip(eager, jitted, strict=True):
        close(BJ.to_numpy(j), B.to_numpy(e), 1e-6, 1e-6)
    assert "hc_pre" in BJ.variants()["jit"]


def test_compress_with_unfilled_previous_group(B, rng):
    kv, sc = rnd(rng, 3, 8, 16), rnd(rng, 3, 8, 16)
    sc[0, :4] = -np.inf  # the overlapping compressor's first group has no previous half yet
    close(B.to_numpy(B.compress(B.from_numpy(kv), B.from_numpy(sc))), R.compress(kv, sc))


def test_indexer_topk_random_and_ties(B, rng):
    T, H, d, J = 70, 4, 16, 40  # more rows than one block
    q, wts, keys = rnd(rng, T, H, d), rnd(rng, T, H), rnd(rng, J, d)
    pos = np.sort(rng.integers(0, 4 * J + 8, T))
    got = B.to_numpy(B.indexer_topk(*(B.from_numpy(a) for a in (q, wts, keys, pos)), 4, 6, 0.25))
    want = R.indexer_topk(q, wts, keys, pos, 4, 6, 0.25)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    # exact ties: every score 0 (all relu inputs negative) -> the lowest visible indices, in order
    qn = -np.abs(rnd(rng, 3, H, d))
    kp = np.abs(rnd(rng, J, d))
    pos = np.array([3, 20, 500])
    args = (qn, np.abs(wts[:3]), kp, pos)
    got = B.to_numpy(B.indexer_topk(*(B.from_numpy(a) for a in args), 4, 6, 1.0))
    np.testing.assert_array_equal(got, R.indexer_topk(*args, 4, 6, 1.0))
    assert got[0].tolist() == [0, -1, -1, -1, -1, -1] and got[2].tolist() == [0, 1, 2, 3, 4, 5]
    # duplicated keys: equal positive scores. Integer-valued inputs make every product and partial sum exact in
    # float32, so the ties are ties whatever order a BLAS adds the dot products in (random floats are not:
    # "equal" dot products of duplicated rows can differ in the last bit between BLAS kernels)
    qi = rng.integers(-3, 4, (2, H, d)).astype(np.float32)
    dup = np.repeat(rng.integers(-3, 4, (2, d)).astype(np.float32), 5, axis=0)
    args = (qi, rng.integers(1, 4, (2, H)).astype(np.float32), dup, np.array([100, 100]))
    got = B.to_numpy(B.indexer_topk(*(B.from_numpy(a) for a in args), 4, 7, 1.0))
    np.testing.assert_array_equal(got, R.indexer_topk(*args, 4, 7, 1.0))
    assert B.indexer_topk(*(B.from_numpy(a) for a in (q[:0], wts[:0], keys, pos[:0])), 4, 6, 1.0).shape == (0, 6)
    assert B.indexer_topk(*(B.from_numpy(a) for a in (q[:2], wts[:2], keys[:0], pos[:2])), 4, 6, 1.0).shape == (2, 0)


@pytest.mark.parametrize("with_comp,with_sel", [(False, False), (True, False), (True, True)])
def test_sparse_attention(B, rng, with_comp, with_sel):
    H, D, W, r = 4, 16, 8, 4
    T = ATTN_BLOCK + 10  # two query blocks: a prefill chunk at positions 20..93 after 20 cached tokens
    q, q_pos = rnd(rng, T, H, D), np.arange(20, 20 + T)
    kv, kv_pos = rnd(rng, T + W - 1, D), np.arange(20 - W + 1, 20 + T)  # ring entries, then the new rows
    comp = rnd(rng, 23, D) if with_comp else None
    sel = rng.integers(-1, 23, (T, 3)) if with_sel else None
    sinks = rnd(rng, H)

    def both(rows):
        qs, ps, ss = q[rows], q_pos[rows], None if sel is None else sel[rows]
        got = B.sparse_attention(B.from_numpy(qs), B.from_numpy(ps), B.from_numpy(kv), B.from_numpy(kv_pos), W,
                                 None if comp is None else B.from_numpy(comp), r,
                                 None if ss is None else B.from_numpy(ss), B.from_numpy(sinks), 0.25)
        return B.to_numpy(got), R.sparse_attention(qs, ps, kv, kv_pos, W, comp, r, ss, sinks, 0.25)

    close(*both(slice(None)))
    close(*both(slice(T - 1, T)))  # a decode step
    assert both(slice(0, 0))[0].shape == (0, H, D)


@pytest.mark.parametrize("score_func,hashed", [("sqrtsoftplus", False), ("sqrtsoftplus", True), ("softmax", False),
                                               ("sigmoid", False)])
def test_moe_gate(B, rng, score_func, hashed):
    T, d, E, k = 9, 16, 8, 3
    x, w, bias = rnd(rng, T, d), rnd(rng, E, d), rnd(rng, E, scale=2.0)
    tid = np.stack([rng.permutation(E)[:k] for _ in range(50)]).astype(np.int64) if hashed else None
    tok = rng.integers(0, 50, T)
    args = (x, w, None if hashed or score_func == "softmax" else bias, tid, tok, k, score_func, 1.5, True)
    dev = [B.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
    gw, gi = (B.to_numpy(t) for t in B.moe_gate(*dev))
    rw, ri = R.moe_gate(*args)
    assert gi.dtype == np.int64
    # the reference's argpartition leaves the k ids unordered: compare per-row (id, weight) sets
    og, orf = np.argsort(gi, axis=1), np.argsort(ri, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(gi, og, 1), np.take_along_axis(ri, orf, 1))
    close(np.take_along_axis(gw, og, 1), np.take_along_axis(rw, orf, 1))
    if hashed:
        np.testing.assert_array_equal(gi, tid[tok])
    zero = B.moe_gate(B.zeros((0, d)), *dev[1:4], B.zeros((0,), "int64"), *args[5:])
    assert zero[0].shape == (0, k) and zero[1].shape == (0, k)


def _experts(rng, E, d, I, fmt=None):
    ws = [[rnd(rng, *s, scale=0.3) for _ in range(E)] for s in ((I, d), (I, d), (d, I))]
    if fmt:
        ws = [[Q.quantize_weight(w, fmt) for w in col] for col in ws]
    return ws


@pytest.mark.parametrize("fmt", [None, "w8a8"])
def test_moe_experts_ragged_empty_and_expert_slice(B, rng, fmt):
    T, d, I, E, k = 11, 16, 8, 6, 2
    x, wts = rnd(rng, T, d), rng.random((T, k)).astype(F32)
    idx = np.array([[0, 1]] * 6 + [[1, 0], [5, 1], [0, 5], [1, 0], [5, 0]])  # experts 2-4 get nothing
    ws = _experts(rng, E, d, I, fmt)
    want = R.moe_experts(x, wts, idx, ExpertWeights(*ws, n_experts=E), 10.0)
    dws = [[B.from_numpy(w) for w in col] for col in ws]
    dx, dw, di = B.from_numpy(x), B.from_numpy(wts), B.from_numpy(idx)
    close(B.to_numpy(B.moe_experts(dx, dw, di, ExpertWeights(*dws, n_experts=E), 10.0)), want)
    # expert-parallel slices: a rank with experts [2, 4) adds nothing; [0, 3) + [3, 6) sum to the whole
    mid = ExpertWeights(*[c[2:4] for c in dws], n_experts=E, first=2, count=2)
    assert np.abs(B.to_numpy(B.moe_experts(dx, dw, di, mid, 10.0))).max() == 0
    parts = [B.to_numpy(B.moe_experts(dx, dw, di, ExpertWeights(*[c[a:a + 3] for c in dws], n_experts=E, first=a,
                                                                 count=3), 10.0)) for a in (0, 3)]
    close(parts[0] + parts[1], want)
    assert B.moe_experts(B.zeros((0, d)), B.zeros((0, k)), B.zeros((0, k), "int64"),
                         ExpertWeights(*dws, n_experts=E), 10.0).shape == (0, d)


@pytest.mark.parametrize("fmt", [None, "w8a8", "w4a8"])
def test_swiglu_mlp(B, rng, fmt):
    d, inter = 256, 128
    x = rnd(rng, 5, d)
    ws = [rnd(rng, inter, d, scale=0.1), rnd(rng, inter, d, scale=0.1), rnd(rng, d, inter, scale=0.1)]
    if fmt:
        ws = [Q.quantize_weight(w, fmt) for w in ws]
    got = B.swiglu_mlp(B.from_numpy(x), *(B.from_numpy(w) for w in ws), 10.0)
    close(B.to_numpy(got), R.swiglu_mlp(x, *ws, 10.0))


def test_sample_matches_reference(B, rng):
    logits = rnd(rng, 3, 50, scale=3.0)
    dl = B.from_numpy(logits)
    assert B.sample(dl, 0.0, 0, 1.0, None).tolist() == logits.argmax(-1).tolist()
    a = B.sample(dl, 0.8, 10, 0.9, np.random.default_rng(7))
    np.testing.assert_array_equal(a, R.sample(logits, 0.8, 10, 0.9, np.random.default_rng(7)))


def test_variants_cpu_composed_and_ascend_selection(B):
    from ascend import soc
    from ascend.mindspore_backend import MindSporeBackend

    v = B.variants()
    assert {v[op] for op in ("rms_norm", "sparse_attention", "moe_experts", "hc_pre", "rope")} == {"composed"}
    # the selection an Ascend device target makes: the table's MindSpore rows that this backend implements win
    A = MindSporeBackend(jit=False)
    A.providers, A.soc = (soc.MINDSPORE, soc.COMPOSED), soc.A3
    assert A._select("rms_norm", "rms_norm").kernel == "RmsNorm"
    assert A._select("linear_w8a8", "linear_w8a8", {"k": 7168}).kernel == "QuantBatchMatmul"
    assert A._select("moe_experts", "moe_experts").kernel.startswith("MoeInitRoutingV2")
    assert A._select("moe_gate", "moe_gate", {"score_func": "softmax", "topk": 8}).kernel == "MoeGatingTopKSoftmax"
    assert A._select("moe_gate", "moe_gate", {"score_func": "sqrtsoftplus", "topk": 6}).provider == soc.COMPOSED
    assert A._select("rope", "rope").provider == soc.COMPOSED  # ApplyRotaryPosEmb rotates halves, V4 pairs
    assert A._select("hc_pre", "hc_pre").provider == soc.COMPOSED
    assert A.variants()["rms_norm"] == "mindspore:RmsNorm"
    # MindSpore 2.10 moe_distribute_dispatch docstring: on 910_93 H must be 7168 (V4-Flash's 4096 is refused)
    assert soc.select_moe_comm(A.soc, A.providers, 8, 64, 7168, 8) == "dispatch_combine"
    assert soc.select_moe_comm(A.soc, A.providers, 8, 64, 4096, 8) == "alltoall"
    assert soc.select_moe_comm(A.soc, A.providers, 8, 4096, 7168, 8) == "alltoall"


def test_alltoall_expert_parallel_phases_over_simulated_ranks(B, rng):
    """The all-to-all EP path's phases for 2 ranks with different tokens, the exchanges done in NumPy:
    each rank's result equals the single-process MoE over all experts."""
    from ascend import mindspore_comm as ep

    W, E, d, I, k = 2, 8, 16, 8, 2
    ws = _experts(rng, E, d, I)
    dws = [[B.from_numpy(w) for w in col] for col in ws]
    xs = [rnd(rng, n, d) for n in (7, 3)]
    ids = [np.stack([rng.permutation(E)[:k] for _ in range(len(x))]) for x in xs]
    ids[1][:, 0] = 1  # rank 1 sends nothing to ranks' experts 4-7 in slot 0; experts 6, 7 may get nothing
    wts = [rng.random((len(x), k)).astype(F32) for x in xs]
    plans = [ep.a2a_plan(i, E, W) for i in ids]
    sends = [B.to_numpy(ep.a2a_send_rows(B, B.from_numpy(x), p, k)) for x, p in zip(xs, plans, strict=True)]

    def exchange(blocks, counts):  # blocks[src] split by counts[src][dst] -> per dst, concatenated over src
        split = [np.split(b, np.cumsum(c)[:-1]) for b, c in zip(blocks, counts, strict=True)]
        return [np.concatenate([split[s][dst] for s in range(W)]) for dst in range(W)]

    per = E // W
    recv_counts = [np.stack([p.expert_counts.reshape(W, per)[dst] for p in plans]) for dst in range(W)]
    recv = exchange(sends, [p.send_rows for p in plans])
    outs = []
    for rank in range(W):
        first, count = ep.expert_slice(E, W, rank)
        local = ExpertWeights(*[c[first:first + count] for c in dws], n_experts=E, first=first, count=count)
        outs.append(B.to_numpy(ep.a2a_compute(B, B.from_numpy(recv[rank]), recv_counts[rank], local, 10.0)))
    back = exchange(outs, [rc.sum(axis=1) for rc in recv_counts])
    for rank in range(W):
        got = ep.a2a_combine(B, B.from_numpy(back[rank]), plans[rank], B.from_numpy(wts[rank]), len(xs[rank]), k)
        want = R.moe_experts(xs[rank], wts[rank], ids[rank], ExpertWeights(*ws, n_experts=E), 10.0)
        close(B.to_numpy(got), want)


def test_alltoall_path_on_one_rank_loopback(B, rng):
    """moe_alltoall's wiring (count exchange, row exchange out and back) with a one-rank loopback group."""
    from ascend import mindspore_comm as ep

    class Loopback:
        rank, size = 0, 1

        def alltoallv(self, flat, send, recv, block=1):
            assert send == recv and int(flat.shape[0]) == sum(send) * block
            return flat

    E, d, I, k = 6, 16, 8, 2
    ws = _experts(rng, E, d, I)
    x, wts = rnd(rng, 9, d), rng.random((9, k)).astype(F32)
    idx = np.stack([rng.permutation(E)[:k] for _ in range(9)])
    dws = ExpertWeights(*[[B.from_numpy(w) for w in c] for c in ws], n_experts=E)
    got = ep.moe_alltoall(B, Loopback(), B.from_numpy(x), B.from_numpy(wts), B.from_numpy(idx), dws, 10.0)
    close(B.to_numpy(got), R.moe_experts(x, wts, idx, ExpertWeights(*ws, n_experts=E), 10.0))
    with pytest.raises(ValueError, match="even share"):
        ep.moe_alltoall(B, Loopback(), B.from_numpy(x), B.from_numpy(wts), B.from_numpy(idx),
                        ExpertWeights(*[c[:3] for c in (dws.w1, dws.w3, dws.w2)], n_experts=E, count=3), 10.0)


# ---- end to end --------------------------------------------------------------------------------------------------
CONFIGS = {
    "all-kinds": dict(compress_ratios=[0, 4, 16, 4]),  # SWA, CSA (indexer), HCA, CSA; hash + routed MoE
    "hc2-hca-first": dict(hc_mult=2, compress_ratios=[16, 0, 4, 0], rope_scaling=None, num_hash_layers=1),
}


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_matches_numpy_prefill_and_decode(B, name):
    cfg = small_config(**CONFIGS[name])
    w = random_weights(cfg, seed=11)
    ref, dev = Model(cfg, w, get_backend("cpu")), Model(cfg, w, B)
    prompt = np.random.default_rng(3).integers(2, cfg.vocab_size, 45).tolist()  # > window, several groups
    p = SamplingParams(max_new_tokens=24, stop_on_eos=False)
    a = generate(ref, [prompt], p, keep_prompt_logits=True)
    b = generate(dev, [prompt], p, keep_prompt_logits=True)
    assert _rel(b.prompt_logits[0], a.prompt_logits[0]) < 1e-4
    assert b.output_ids[0] == a.output_ids[0]


def test_chunked_prefill_decode_and_mtp_match_numpy(B):
    """Chunks across window and compression-group edges write the caches by slice assignment; MTP on top."""
    cfg = small_config(num_nextn_predict_layers=1, compress_ratios=[0, 4, 16, 4, 0])
    w = random_weights(cfg, seed=13)
    ref, dev = Model(cfg, w, get_backend("cpu")), Model(cfg, w, B)
    ids = np.random.default_rng(4).integers(2, cfg.vocab_size, 38).tolist()
    full = ref.forward([ref.new_cache()], [ids[:-1]], all_logits=True, keep_hidden=True)
    want_mtp = ref.mtp_forward([ref.new_cache()], full.hidden, [ids[1:]], all_logits=True)[0]
    cache, a, logits, mtp = dev.new_cache(), 0, [], []
    for n in (5, 1, 1, 1, 19, 3, 7):
        out = dev.forward([cache], [ids[a:a + n]], all_logits=True, keep_hidden=True)
        logits.append(B.to_numpy(out.logits[0]))
        mtp.append(B.to_numpy(dev.mtp_forward([cache], out.hidden, [ids[a + 1:a + n + 1]], all_logits=True)[0]))
        a += n
    assert _rel(np.concatenate(logits), full.logits[0]) < 1e-4
    assert _rel(np.concatenate(mtp), want_mtp) < 1e-4


def test_model_with_jit_matches_numpy(BJ):
    cfg = small_config()
    w = random_weights(cfg, seed=12)
    ref, dev = Model(cfg, w, get_backend("cpu")), Model(cfg, w, BJ)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]  # a batch: decode steps of two rows
    p = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    assert generate(dev, prompts, p).output_ids == generate(ref, prompts, p).output_ids


def test_model_zero_token_forward(B):
    cfg = small_config()
    m = Model(cfg, random_weights(cfg, seed=5), B)
    assert m.forward([], []).logits == []


def test_cli_generate_mindspore_equals_cpu(B):
    def run(backend):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.run([sys.executable, "-m", "tools.cli", "generate", "--backend", backend, "--model", "tiny",
                            "--prompt-ids", "0,5,6,7,8,9", "--max-new-tokens", "6", "--ignore-eos", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    ms, cpu = run("mindspore"), run("cpu")
    assert ms["backend"] == "mindspore"
    assert ms["output_ids"] == cpu["output_ids"] and len(ms["output_ids"]) == 6


def test_missing_mindspore_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mindspore" else real(n, *a))
    with pytest.raises(BackendUnavailable, match=r"pip install -e \.\[mindspore\]"):
        get_backend("mindspore")
    from tools.cli import main

    assert main(["generate", "--backend", "mindspore", "--model", "tiny", "--max-new-tokens", "1"]) != 0
    assert "pip install -e .[mindspore]" in capsys.readouterr().err
