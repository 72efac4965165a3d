"""The kernel-granularity attention ops of the NumPy reference (ops.attention_kernels) against goldens:
vllm-ascend's own compressor_metadata cases, and dense formulas written out here from the kernels' READMEs."""

from __future__ import annotations

import numpy as np
import pytest

from ops.attention_kernels import SLOT_BLOCK_OFFSET, SLOT_FLAT, KernelArgError
from ops.numpy_ref import NumpyBackend
from ops.quant import act_quant_per_token

R = NumpyBackend()
BS = 128  # KV_BLOCK_SIZE of the owners' test


# ---- compressor_metadata: cases and expected slots of vllm-ascend
# tests/e2e/nightly/single_node/ops/singlecard_ops/test_compressor_metadata.py (commit 182b75e) ----------------
def _pad(n):
    return [(-1, BS - 1)] * n


OWNER_CASES = [
    # (ratio, query_start_loc, start_pos, block_table, expected slots (block-offset format))
    (4, (0, 131), (0,), ((1, 0, 0, 0, 0, 0),), [(1, o) for o in range(32)] + _pad(1)),
    (4, (0, 131, 262), (0, 0), ((1, 0, 0, 0, 0, 0), (3, 0, 0, 0, 0, 0)),
     [(1, o) for o in range(32)] + [(3, o) for o in range(32)] + _pad(3)),
    (4, (0, 2, 4), (130, 133), ((5, 0, 0, 0, 0, 0), (6, 0, 0, 0, 0, 0)), [(5, 32)] + _pad(2)),
    (128, (0, 131), (0,), ((2,),), [(2, 0)] + _pad(1)),
    (128, (0, 2, 4), (254, 257), ((7,), (8,)), [(7, 1)] + _pad(1)),
    (4, (0, 8), (508,), ((10, 11),), [(10, 127), (11, 0)]),
    (128, (0, 256), (16256,), ((20, 21),), [(20, 127), (21, 0)]),
]


def _rope_table(rows):
    v = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64)
    return v, v * np.float32(0.25)


@pytest.mark.parametrize("ratio,qsl,start,table,want", OWNER_CASES)
def test_compressor_metadata_owner_cases(ratio, qsl, start, table, want):
    rows = max(2048, max(s + qsl[i + 1] - qsl[i] for i, s in enumerate(start)) + 1)
    cos_t, sin_t = _rope_table(rows)
    args = (np.array(qsl, np.int32), np.array(start, np.int32), np.array(table, np.int32), BS)
    cos, sin, slot = R.compressor_metadata(cos_t, sin_t, *args, SLOT_BLOCK_OFFSET, ratio, len(want), len(start))
    assert [tuple(r) for r in slot.tolist()] == want
    _, _, flat = R.compressor_metadata(cos_t, sin_t, *args, SLOT_FLAT, ratio, len(want), len(start))
    assert flat.tolist() == [b * BS + o if b >= 0 else -1 for b, o in want]
    for row, (b, _) in enumerate(want):
        if b < 0:
            assert (cos[row] == 1).all() and (sin[row] == 0).all()
    # the first valid row's RoPE row is its entry's first token: entry (start // ratio) at start // ratio * ratio
    e0 = start[0] // ratio
    if want[0][0] >= 0:
        np.testing.assert_array_equal(cos[0, 0, 0], cos_t[e0 * ratio])


# ---- compressor: the README formula, written densely over whole sequences ----------------------------------
def _dense_compressor(x, wkv, wgate, ape, norm_w, ratio, coff, eps, inv_freq):
    kv, sc = x @ wkv.T, x @ wgate.T
    T, cD = kv.shape
    D = cD // coff
    G = T // ratio
    out = []
    for g in range(G):
        cur = slice(g * ratio, (g + 1) * ratio)
        s = sc[cur] + ape
        if coff == 2:
            prev_kv = kv[cur.start - ratio:cur.start, :D] if g else np.zeros((ratio, D), np.float32)
            prev_s = (sc[cur.start - ratio:cur.start] + ape)[:, :D] if g else np.full((ratio, D), -np.inf, np.float32)
            ck, cs = np.concatenate([prev_kv, kv[cur, D:]]), np.concatenate([prev_s, s[:, D:]])
        else:
            ck, cs = kv[cur], s
        p = np.exp(cs - cs.max(0))
        e = (ck * p / p.sum(0)).sum(0)
        e = e / np.sqrt(np.mean(e * e) + eps) * norm_w
        ang = np.float32(g * ratio) * inv_freq
        c, sn = np.cos(ang), np.sin(ang)
        rr = e[-2 * len(inv_freq):].copy()
        x0, x1 = rr[0::2].copy(), rr[1::2].copy()
        e[-2 * len(inv_freq)::2] = x0 * c - x1 * sn
        e[-2 * len(inv_freq) + 1::2] = x0 * sn + x1 * c
        out.append(e)
    return np.array(out, np.float32).reshape(G, D)


@pytest.mark.parametrize("ratio,coff", [(4, 2), (8, 1)])
def test_compressor_chunked_over_paged_state_equals_dense(ratio, coff):
    rng = np.random.default_rng(0)
    H, D, Rd, bs = 24, 16, 8, 16
    T = 45
    x = rng.standard_normal((T, H), dtype=np.float32)
    wkv, wgate = (rng.standard_normal((coff * D, H), dtype=np.float32) * 0.3 for _ in range(2))
    ape = rng.standard_normal((ratio, coff * D), dtype=np.float32)
    norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, Rd, 2, dtype=np.float32) / Rd)).astype(np.float32)
    want = _dense_compressor(x, wkv, wgate, ape, norm_w, ratio, coff, 1e-6, inv)
    ang = np.arange(64, dtype=np.float32)[:, None] * inv
    cos_t = np.concatenate([np.cos(ang)] * 2, 1)
    sin_t = np.concatenate([np.sin(ang)] * 2, 1)
    state = np.zeros((8, bs, 2 * coff * D), np.float32)
    st_table = np.array([[3, 1, 6, 2]], np.int32)  # a scattered table: pages need not be in order
    got, pos = [], 0
    for n in (3, 1, 9, 20, 12):
        cu, sp = np.array([0, n], np.int32), np.array([pos], np.int32)
        rows = min(n, n // ratio + 1)
        cos, sin, _ = R.compressor_metadata(cos_t, sin_t, cu, sp, np.array([[1]], np.int32), bs, SLOT_FLAT, ratio,
                                            rows, 1)
        out = R.compressor(x[pos:pos + n], wkv, wgate, state, ape, norm_w, sin, cos, st_table, cu, None, sp, Rd,
                           ratio, coff, 1e-6, 2, 1)
        k = (pos + n) // ratio - pos // ratio
        assert out.shape == (rows, D) and not out[k:].any()  # closed entries first, then zero padding
        got.append(out[:k])
        pos += n
    np.testing.assert_allclose(np.concatenate(got), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(KernelArgError, match="rotary_mode"):
        R.compressor(x[:4], wkv, wgate, state, ape, norm_w, sin, cos, st_table, cu, None, sp, Rd, ratio, coff,
                     1e-6, 1, 1)


# ---- paged caches for the indexer and attention --------------------------------------------------------------
def _paged(rows_per_seq, width, bs, rng, dtype=np.float32):
    """Scatter each sequence's rows into a shuffled paged cache; -> cache, block table."""
    n_blocks = [-(-len(r) // bs) for r in rows_per_seq]
    ids = rng.permutation(np.arange(1, 1 + sum(n_blocks)))
    cache = np.zeros((1 + sum(n_blocks), bs, 1, width), dtype)
    table = np.zeros((len(rows_per_seq), max(n_blocks)), np.int32)
    k = 0
    for b, r in enumerate(rows_per_seq):
        for lb in range(n_blocks[b]):
            table[b, lb] = ids[k]
            chunk = r[lb * bs:(lb + 1) * bs]
            cache[ids[k], : len(chunk), 0] = chunk
            k += 1
    return cache, table


def sparse_attn_case(rng, with_sel: bool, H=4, D=16, ratio=4, bs=16, K=5, lens=(40, 7, 23), nq=(6, 7, 1)) -> dict:
    """Inputs of sparse_attn_sharedkv over shuffled paged caches: three requests (prefill chunks and one decode
    row), raw and compressed keys, and with `with_sel` top-k picks of compressed entries per query row, some not
    yet visible (the kernel's causal mask drops them). Also used by tests/test_kernels.py."""
    raw = [rng.standard_normal((L, D)).astype(np.float32) for L in lens]
    comp = [rng.standard_normal((L // ratio, D)).astype(np.float32) for L in lens]
    ori, obt = _paged(raw, D, bs, rng)
    cmp, cbt = _paged([c if len(c) else np.zeros((1, D), np.float32) for c in comp], D, bs, rng)
    q = rng.standard_normal((sum(nq), H, D)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    sel = None
    if with_sel:
        sel = np.full((sum(nq), 1, K), -1, np.int32)
        for t in range(sum(nq)):
            b = int(np.searchsorted(cu, t, side="right") - 1)
            pick = rng.permutation(len(comp[b]))[:K]
            sel[t, 0, : len(pick)] = pick
    return dict(q=q, ori_kv=ori, cmp_kv=cmp, cmp_sparse_indices=sel, ori_block_table=obt, cmp_block_table=cbt,
                cu_seqlens_q=cu, seqused_kv=np.array(lens, np.int32), sinks=sinks, raw=raw, comp=comp)


def _dense_indexer(q, w, keys, qpos, ratio, k):
    s = np.einsum("thd,jd->thj", q, keys)
    score = np.einsum("thj,th->tj", np.maximum(s, 0), w)
    vis = (np.arange(len(keys))[None] + 1) * ratio <= qpos[:, None] + 1
    score = np.where(vis, score, -np.inf)
    out = np.full((len(q), k), -1)
    for t in range(len(q)):
        order = [j for j in np.argsort(-score[t], kind="stable") if vis[t, j]][:k]
        out[t, : len(order)] = order
    return out


def test_lightning_indexer_float_and_int8_against_dense():
    rng = np.random.default_rng(1)
    N, D, ratio, K, bs = 8, 32, 4, 6, 16
    lens, nq = [70, 9, 33], [5, 9, 1]  # raw tokens after the call, queries in the call (right-aligned)
    keys = [rng.standard_normal((L // ratio, D)).astype(np.float32) for L in lens]
    cache, table = _paged(keys, D, bs, rng)
    q = rng.standard_normal((sum(nq), N, D)).astype(np.float32)
    w = rng.standard_normal((sum(nq), N)).astype(np.float32)
    ends = np.cumsum(nq).astype(np.int32)
    sel, _ = R.lightning_indexer(q, cache, w, None, None, 0, 0, ends, np.array(lens, np.int32), table, None, "TND",
                                 "PA_BSND", K, 3, cmp_ratio=ratio)
    assert sel.shape == (sum(nq), 1, K) and sel.dtype == np.int32
    a = 0
    for b, L in enumerate(lens):
        qpos = np.arange(L - nq[b], L)
        np.testing.assert_array_equal(sel[a:a + nq[b], 0], _dense_indexer(q[a:a + nq[b]], w[a:a + nq[b]], keys[b],
                                                                           qpos, ratio, K))
        a += nq[b]
    # int8 keys + scales (per key) and int8 queries + scales (per token-head): the same choice as float on
    # the dequantized values (ties aside), with the dequantization folded as the kernel's formula does
    kq = [act_quant_per_token(k) for k in keys]
    kcache, ktable = _paged([k for k, _ in kq], D, bs, np.random.default_rng(1), np.int8)
    scache, _ = _paged([s.reshape(-1, 1) for _, s in kq], 1, bs, np.random.default_rng(1))
    qq, qs = act_quant_per_token(q.reshape(-1, D))
    sel8, _ = R.lightning_indexer(qq.reshape(q.shape), kcache, w, qs.reshape(-1, N), scache[..., 0], 0, 0, ends,
                                  np.array(lens, np.int32), ktable, None, "TND", "PA_BSND", K, 3, cmp_ratio=ratio)
    a = 0
    for b, L in enumerate(lens):
        dq = (qq.astype(np.float32) * qs).reshape(q.shape)[a:a + nq[b]]
        dk = kq[b][0].astype(np.float32) * kq[b][1]
        want = _dense_indexer(dq, w[a:a + nq[b]], dk, np.arange(L - nq[b], L), ratio, K)
        np.testing.assert_array_equal(sel8[a:a + nq[b], 0], want)
        a += nq[b]
    with pytest.raises(KernelArgError, match="both dequant scales"):
        R.lightning_indexer(qq.reshape(q.shape), kcache, w, qs.reshape(-1, N), None, 0, 0, ends,
                            np.array(lens, np.int32), ktable, None, "TND", "PA_BSND", K, 3, cmp_ratio=ratio)


def _dense_attention(q, qpos, raw, comp, ratio, sel, window, sinks, scale):
    out = np.zeros_like(q)
    for t in range(len(q)):
        p = qpos[t]
        ks = [raw[j] for j in range(max(0, p - window + 1), p + 1)]
        for j in range(len(comp)):
            if (j + 1) * ratio <= p + 1 and (sel is None or j in set(sel[t].tolist())):
                ks.append(comp[j])
        K = np.array(ks)
        s = q[t] @ K.T * scale  # [H, n]
        m = np.maximum(s.max(-1), sinks)
        e = np.exp(s - m[:, None])
        out[t] = (e @ K) / (e.sum(-1) + np.exp(sinks - m))[:, None]
    return out


@pytest.mark.parametrize("with_sel", [False, True])
def test_sparse_attn_sharedkv_against_dense(with_sel):
    H, D, W, ratio, lens, nq = 4, 16, 8, 4, [40, 7, 23], [6, 7, 1]
    c = sparse_attn_case(np.random.default_rng(2), with_sel)
    q, sel, sinks, cu = c["q"], c["cmp_sparse_indices"], c["sinks"], c["cu_seqlens_q"]
    ori, obt = c["ori_kv"], c["ori_block_table"]
    meta = R.sparse_attn_sharedkv_metadata(num_heads_q=H, num_heads_kv=1, head_dim=D, batch_size=len(lens))
    out, _ = R.sparse_attn_sharedkv(q, ori_kv=ori, cmp_kv=c["cmp_kv"], cmp_sparse_indices=sel, ori_block_table=obt,
                                    cmp_block_table=c["cmp_block_table"], cu_seqlens_q=cu,
                                    seqused_kv=c["seqused_kv"], sinks=sinks, metadata=meta, softmax_scale=0.3,
                                    cmp_ratio=ratio, ori_win_left=W - 1, layout_q="TND", layout_kv="PA_ND")
    for b, L in enumerate(lens):
        a, e = cu[b], cu[b + 1]
        want = _dense_attention(q[a:e], np.arange(L - nq[b], L), c["raw"][b], c["comp"][b], ratio,
                                None if sel is None else sel[a:e, 0], W, sinks, 0.3)
        np.testing.assert_allclose(out[a:e], want, rtol=1e-5, atol=1e-5)
    bad = R.sparse_attn_sharedkv_metadata(num_heads_q=H, num_heads_kv=1, head_dim=D, batch_size=2)
    with pytest.raises(KernelArgError, match="batch 2"):
        R.sparse_attn_sharedkv(q, ori_kv=ori, ori_block_table=obt, cu_seqlens_q=cu,
                               seqused_kv=np.array(lens, np.int32), sinks=sinks, metadata=bad, softmax_scale=0.3,
                               cmp_ratio=ratio, ori_win_left=W - 1, layout_q="TND")


@pytest.mark.parametrize("mode", ["sel", "all", "none"])
def test_sparse_attn_sharedkv_batched_decode_equals_per_request(mode):
    """The decode rows of a mixed call (single-row requests next to prefill chunks and an empty request) go
    through one batched product; each request's output equals that request run alone on the per-request path
    (mode sel: selected compressed entries with repeats, -1 and not-yet-visible picks; all: every visible
    compressed entry (HCA); none: window only)."""
    rng = np.random.default_rng(3)
    H, D, W, ratio, bs, K = 4, 16, 8, 4, 16, 7
    lens, nq = [40, 7, 23, 3, 9, 1, 30], [1, 7, 1, 1, 0, 1, 5]  # decode rows: L 40 (> W), 23, 3 (< W), 1
    raw = [rng.standard_normal((L, D)).astype(np.float32) for L in lens]
    comp = [rng.standard_normal((max(L // ratio, 1), D)).astype(np.float32) for L in lens]
    ori, obt = _paged(raw, D, bs, rng)
    cmp, cbt = _paged(comp, D, bs, rng)
    T = sum(nq)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    sel = None
    if mode == "sel":
        sel = np.full((T, 1, K), -1, np.int32)
        for t in range(T):
            b = int(np.searchsorted(cu, t, side="right") - 1)
            pick = rng.integers(0, len(comp[b]) + 2, K - 2)  # some past the visible entries
            sel[t, 0, : K - 2] = pick
            sel[t, 0, K - 2] = pick[0]  # a repeated index counts once
    kw = dict(ori_kv=ori, cmp_kv=None if mode == "none" else cmp, ori_block_table=obt,
              cmp_block_table=None if mode == "none" else cbt, sinks=sinks, softmax_scale=0.3, cmp_ratio=ratio,
              ori_win_left=W - 1, layout_q="TND", layout_kv="PA_ND")
    batched = NumpyBackend()
    seen = []
    inner = batched._sparse_attn_decode

    def spy(qr, *args):
        seen.append(int(qr.shape[0]))
        return inner(qr, *args)

    batched._sparse_attn_decode = spy
    out, _ = batched.sparse_attn_sharedkv(q, cmp_sparse_indices=sel, cu_seqlens_q=cu,
                                          seqused_kv=np.array(lens, np.int32), **kw)
    assert seen == [sum(n == 1 for n in nq)]  # one batched call over all four decode rows
    assert out.shape == q.shape
    alone = NumpyBackend()
    alone.batched_decode = False
    whole, _ = alone.sparse_attn_sharedkv(q, cmp_sparse_indices=sel, cu_seqlens_q=cu,
                                          seqused_kv=np.array(lens, np.int32), **kw)
    np.testing.assert_allclose(out, whole, rtol=1e-6, atol=1e-6)
    for b, L in enumerate(lens):
        a, e = int(cu[b]), int(cu[b + 1])
        if e == a:
            continue
        cbt_b = None if mode == "none" else cbt[b:b + 1]
        one, _ = alone.sparse_attn_sharedkv(q[a:e], cmp_sparse_indices=None if sel is None else sel[a:e],
                                            cu_seqlens_q=np.array([0, e - a], np.int32),
                                            seqused_kv=np.array([L], np.int32),
                                            **{**kw, "ori_block_table": obt[b:b + 1], "cmp_block_table": cbt_b})
        np.testing.assert_allclose(out[a:e], one, rtol=1e-6, atol=1e-6)
        want = _dense_attention(q[a:e], np.arange(L - nq[b], L), raw[b], comp[b][:L // ratio] if cbt_b is not None
                                else [], ratio, None if sel is None else sel[a:e, 0], W, sinks, 0.3)
        np.testing.assert_allclose(out[a:e], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sel", "all", "none"])
@pytest.mark.parametrize("L", [3, 40])
def test_sparse_attn_sharedkv_single_decode_row_equals_dense(mode, L):
    """A call with one decode row (batch 1 decode: the batched path's one-row shortcut) attends exactly the keys
    the dense reference gives that row: window (shorter than W at L 3), selected or all visible compressed
    entries."""
    rng = np.random.default_rng(L)
    H, D, W, ratio, bs, K = 4, 16, 8, 4, 16, 7
    raw = rng.standard_normal((L, D)).astype(np.float32)
    comp = rng.standard_normal((max(L // ratio, 1), D)).astype(np.float32)
    ori, obt = _paged([raw], D, bs, rng)
    cmp, cbt = _paged([comp], D, bs, rng)
    q = rng.standard_normal((1, H, D)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    sel = None
    if mode == "sel":
        sel = np.full((1, 1, K), -1, np.int32)
        sel[0, 0, :4] = [len(comp) - 1, 0, len(comp) + 1, 0]  # a repeat, and one past the visible entries
    out, _ = NumpyBackend().sparse_attn_sharedkv(
        q, ori_kv=ori, cmp_kv=None if mode == "none" else cmp, cmp_sparse_indices=sel, ori_block_table=obt,
        cmp_block_table=None if mode == "none" else cbt, cu_seqlens_q=np.array([0, 1], np.int32),
        seqused_kv=np.array([L], np.int32), sinks=sinks, softmax_scale=0.3, cmp_ratio=ratio, ori_win_left=W - 1,
        layout_q="TND", layout_kv="PA_ND")
    want = _dense_attention(q, np.array([L - 1]), raw, comp[:L // ratio] if mode != "none" else [], ratio,
                            None if sel is None else sel[:, 0], W, sinks, 0.3)
    assert out.dtype == np.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,coff", [(4, 2), (8, 1)])
def test_compressor_requests_together_equal_each_alone(ratio, coff):
    """One compressor call over several requests (all written and pooled at once: a prefill chunk from 0,
    decode rows that close a group and that do not, a chunk in the middle, an empty request) gives each
    request's entries, in request order, and state rows exactly as calling it alone."""
    rng = np.random.default_rng(4)
    H, D, Rd, bs = 24, 16, 8, 16
    start, n = [0, 3, 2 * ratio - 1, 5, 10, ratio - 1], [2 * ratio + 1, 1, 1, 0, 7, 1]
    T = sum(n)
    # small integers and eighths: the projections are exact whatever rows a product covers, so the rest
    # (per-row writes, per-group pooling) must agree bit for bit
    x = rng.integers(-3, 4, (T, H)).astype(np.float32)
    wkv, wgate = (rng.integers(-4, 5, (coff * D, H)).astype(np.float32) / 8 for _ in range(2))
    ape = rng.standard_normal((ratio, coff * D), dtype=np.float32)
    norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, Rd, 2, dtype=np.float32) / Rd)).astype(np.float32)
    ang = np.arange(64, dtype=np.float32)[:, None] * inv
    cos_t, sin_t = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)
    B = len(n)
    table = 1 + rng.permutation(3 * B).reshape(B, 3).astype(np.int32)  # 3 state pages per request
    kv_table = np.arange(B, dtype=np.int32)[:, None]
    state0 = rng.standard_normal((1 + 3 * B, bs, 2 * coff * D)).astype(np.float32)  # earlier rows: history

    def call(state, rows, b_ids, cu, sp):
        N = min(len(rows), len(rows) // ratio + len(b_ids))
        cos, sin, _ = R.compressor_metadata(cos_t, sin_t, cu, sp, kv_table[b_ids], bs, SLOT_FLAT, ratio, N,
                                            len(b_ids))
        return R.compressor(x[rows], wkv, wgate, state, ape, norm_w, sin, cos, table[b_ids], cu, None, sp, Rd,
                            ratio, coff, 1e-6, 2, 1)

    cu = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    together = state0.copy()
    out = call(together, np.arange(T), np.arange(B), cu, np.array(start, np.int32))
    alone, want = state0.copy(), []
    for b in range(B):
        o = call(alone, np.arange(cu[b], cu[b + 1]), np.array([b]), np.array([0, n[b]], np.int32),
                 np.array([start[b]], np.int32))
        want.append(o[: (start[b] + n[b]) // ratio - start[b] // ratio])
    want = np.concatenate(want)
    assert len(want) >= 4 and out.shape[0] > len(want)  # several entries close, then padding rows
    np.testing.assert_array_equal(out[: len(want)], want)
    assert not out[len(want):].any()
    np.testing.assert_array_equal(together, alone)
