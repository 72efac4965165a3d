"""NumPy reference kernels against direct float64 re-statements of the V4 math, and sampling rules."""

from __future__ import annotations

import numpy as np
import pytest

from ops import ExpertWeights
from ops.numpy_ref import NumpyBackend, sample_numpy

B = NumpyBackend()


def test_sinkhorn_runs_exact_iterations_and_comb_is_transposed(rng):
    T, n, d = 3, 4, 8
    x = rng.standard_normal((T, n, d)).astype(np.float32)
    fn = rng.standard_normal(((2 + n) * n, n * d)).astype(np.float32)
    scale = np.array([0.7, 1.3, 2.0], np.float32)
    base = rng.standard_normal((2 + n) * n).astype(np.float32)
    y, post, comb = B.hc_pre(x, fn, scale, base, iters=20, hc_eps=1e-6, norm_eps=1e-6)
    # float64 restatement
    xf = x.reshape(T, -1).astype(np.float64)
    m = xf @ fn.T.astype(np.float64) / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-6)
    pre = 1 / (1 + np.exp(-(m[:, :n] * 0.7 + base[:n]))) + 1e-6
    c = (m[:, 2 * n:] * 2.0 + base[2 * n:]).reshape(T, n, n)
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + 1e-6
    c = c / (c.sum(-2, keepdims=True) + 1e-6)
    for _ in range(19):
        c = c / (c.sum(-1, keepdims=True) + 1e-6)
        c = c / (c.sum(-2, keepdims=True) + 1e-6)
    np.testing.assert_allclose(comb, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, np.einsum("tn,tnd->td", pre, x), rtol=1e-5, atol=1e-5)
    # columns sum to ~1 after the final column step; the matrix is not symmetric, so transposition matters
    np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-4)
    assert np.abs(comb - comb.transpose(0, 2, 1)).max() > 1e-3
    out = rng.standard_normal((T, d)).astype(np.float32)
    new = B.hc_post(out, x, post, comb)
    want = post[:, :, None] * out[:, None, :] + np.einsum("tab,tad->tbd", comb, x)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-5)


def test_rope_interleaved_on_last_dims_and_inverse(rng):
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    cos, sin = B.rope_freqs(np.arange(5), inv)
    y = B.rope(x, cos, sin)
    np.testing.assert_array_equal(y[..., :8], x[..., :8])  # nope part untouched
    z = x[..., 8:].reshape(5, 3, 4, 2)
    cz = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * np.outer(np.arange(5), inv))[:, None, :]
    np.testing.assert_allclose(y[..., 8::2], cz.real, atol=1e-5)
    np.testing.assert_allclose(y[..., 9::2], cz.imag, atol=1e-5)
    np.testing.assert_allclose(B.rope(y, cos, sin, inverse=True), x, atol=1e-5)


def test_sparse_attention_sink_only_in_denominator(rng):
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    kv = rng.standard_normal((3, 4)).astype(np.float32)
    sinks = np.array([0.5, -1.0], np.float32)
    o = B.sparse_attention(q, np.array([2]), kv, np.arange(3), 128, None, 0, None, sinks, 0.5)
    s = np.einsum("hd,jd->hj", q[0], kv) * 0.5
    p = np.exp(s) / (np.exp(s).sum(-1, keepdims=True) + np.exp(sinks)[:, None])
    np.testing.assert_allclose(o[0], p @ kv, rtol=1e-5)


def test_sparse_attention_visibility_window_and_groups(rng):
    D, W, r = 4, 3, 2
    kv = rng.standard_normal((6, D)).astype(np.float32)
    comp = rng.standard_normal((3, D)).astype(np.float32)
    q = rng.standard_normal((6, 1, D)).astype(np.float32)
    pos = np.arange(6)
    o = B.sparse_attention(q, pos, kv, pos, W, comp, r, None, np.array([-50.0], np.float32), 1.0)
    for t in range(6):
        keys = [kv[j] for j in range(6) if t - W < j <= t] + [comp[j] for j in range(3) if (j + 1) * r <= t + 1]
        k = np.stack(keys)
        p = np.exp(k @ q[t, 0] - (k @ q[t, 0]).max())
        np.testing.assert_allclose(o[t, 0], (p / p.sum()) @ k, rtol=1e-4, atol=1e-5)


def test_indexer_topk_masks_future_and_pads():
    q = np.ones((3, 1, 2), np.float32)
    keys = np.array([[1, 0], [3, 0], [2, 0], [9, 0]], np.float32)
    sel = B.indexer_topk(q, np.ones((3, 1), np.float32), keys, np.array([3, 7, 15]), 4, 2, 1.0)
    assert sel.shape == (3, 2)
    assert sel[0].tolist() == [0, -1]          # only entry 0 is closed at position 3
    assert sorted(sel[1].tolist()) == [0, 1]   # entries 0, 1 visible
    assert sorted(sel[2].tolist()) == [1, 3]   # best two of all four


def test_moe_gate_bias_only_steers_choice_and_hash_routing():
    x = np.eye(3, dtype=np.float32)
    w = np.array([[2, 0, 0], [0, 2, 0], [0, 0, 2], [1, 1, 1]], np.float32)
    bias = np.array([0, 0, 0, 10], np.float32)
    wts, idx = B.moe_gate(x, w, bias, None, None, 2, "sqrtsoftplus", 1.5, True)
    assert (idx == 3).any(axis=1).all()  # the bias forces expert 3 into every token's choice
    s = np.sqrt(np.log1p(np.exp(x @ w.T)))
    want = np.take_along_axis(s, idx, 1)
    np.testing.assert_allclose(wts, want / want.sum(1, keepdims=True) * 1.5, rtol=1e-6)
    tid = np.array([[1, 2], [0, 3], [2, 3]])
    _, idx = B.moe_gate(x, w, None, tid, np.array([2, 0, 1]), 2, "sqrtsoftplus", 1.5, True)
    assert idx.tolist() == [[2, 3], [1, 2], [0, 3]]


def test_moe_experts_ragged_and_empty_experts(rng):
    T, d, I, E = 7, 6, 5, 4
    x = rng.standard_normal((T, d)).astype(np.float32)
    ws = [[rng.standard_normal(s).astype(np.float32) for _ in range(E)] for s in ((I, d), (I, d), (d, I))]
    idx = np.array([[0, 1]] * 5 + [[1, 0], [0, 1]])  # experts 2 and 3 receive nothing
    wts = rng.random((T, 2)).astype(np.float32)
    y = B.moe_experts(x, wts, idx, ExpertWeights(*ws, n_experts=E), limit=1.0)

    def expert(e, v):
        g, u = ws[0][e] @ v, ws[1][e] @ v
        g, u = np.minimum(g, 1.0), np.clip(u, -1.0, 1.0)
        return ws[2][e] @ (g / (1 + np.exp(-g)) * u)

    want = np.stack([sum(wts[t, k] * expert(idx[t, k], x[t]) for k in range(2)) for t in range(T)])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # expert-parallel slice: a rank holding experts [2, 4) contributes nothing here
    part = B.moe_experts(x, wts, idx, ExpertWeights(*[w[2:] for w in ws], n_experts=E, first=2), limit=1.0)
    np.testing.assert_array_equal(part, 0)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5)])
def test_sampling_filters(top_k, top_p):
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.05, 0.05]], np.float32))
    rng = np.random.default_rng(0)
    draws = {int(sample_numpy(logits, 1.0, top_k, top_p, rng)[0]) for _ in range(400)}
    assert draws == ({0, 1, 2} if top_k == 3 else {0, 1})
    assert sample_numpy(logits, 0.0, 0, 1.0, rng).tolist() == [0]


@pytest.mark.parametrize("rows", [1, 2, 4, 6, 7, 16, 40])
@pytest.mark.parametrize("shape", [(512, 1024), (1024, 512), (4608, 1024)])
def test_linear_small_row_strategies_match_the_matrix_product(rows, shape):
    """_x_wt picks per-row matrix-vector products (few rows, cached weight), column blocks (few rows, large
    weight) or one product; each equals x @ w.T to float32 rounding, and per-row results ignore the other rows."""
    from ops import numpy_ref

    rng = np.random.default_rng(rows)
    w = rng.standard_normal(shape, dtype=np.float32)
    x = rng.standard_normal((rows, shape[1]), dtype=np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    got = numpy_ref._x_wt(x, w)
    assert got.dtype == np.float32 and got.shape == (rows, shape[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    if 2 <= rows <= numpy_ref._GEMV_ROWS:
        # per-row products: a row's result does not depend on the other rows of the batch
        other = rng.standard_normal((1, shape[1]), dtype=np.float32)
        for i in range(rows):
            assert np.array_equal(got[i], numpy_ref._x_wt(np.concatenate([other, x[i:i + 1]]), w)[1])


def test_linear_blocks_of_a_large_weight(monkeypatch):
    """A weight larger than the cache runs in row blocks (2..6 rows) or output-column blocks (7..16 rows), the last
    block partial; the result is the full product, and per-row results still ignore the other rows."""
    from ops import numpy_ref

    monkeypatch.setattr(numpy_ref, "_CACHED_BYTES", 1 << 20)  # 256-row blocks; a 4.5 MiB weight is "large"
    rng = np.random.default_rng(7)
    w = rng.standard_normal((1152, 1024), dtype=np.float32)  # not a multiple of either block
    x0 = rng.standard_normal((1, 1024), dtype=np.float32)
    for rows in (2, 5, 9, 16):
        x = rng.standard_normal((rows, 1024), dtype=np.float32)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        got = numpy_ref._x_wt(x, w)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        if rows <= numpy_ref._GEMV_ROWS:
            assert np.array_equal(got[1], numpy_ref._x_wt(np.concatenate([x0, x[1:2]]), w)[1])
