"""Top-k of the lightning-indexer scores, in the reference's order: descending score, ties to the lower entry
index (ops.numpy_ref `indexer_topk`: a stable argsort of -score); entries at -inf (not visible) come out as -1.

triton-ascend 3.2's interpreter has no tl.sort / tl.topk, so this is a radix select, one program per token:
(1) scores map to order-preserving unsigned keys (-0.0 folded into +0.0, which the reference treats as equal);
(2) 32 counting passes over the row fix the k-th largest key bit by bit; (3) one pass compacts the winners (all
keys above it, then the lowest-index ties) into a scratch row; (4) each winner's output slot is its rank among
the k winners (pairwise, BK x BK at a time). O(32 J + k^2) per token instead of a selection loop's O(k J).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF_KEY = tl.constexpr(8388607)  # the key of -inf: bits 0xFF800000 ^ 0x7FFFFFFF as signed int32, + 2**31


@triton.jit
def _keys(s_ptr, row, j, jm):
    s = tl.load(s_ptr + row + j, mask=jm, other=float("-inf")) + 0.0  # -0.0 + 0.0 = +0.0
    bits = s.to(tl.int32, bitcast=True)
    okey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order = float order
    return okey.to(tl.int64) + 2147483648


@triton.jit
def indexer_topk_kernel(s_ptr, out_ptr, key_ptr, idx_ptr, J, K, BJ: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0)
    row = t.to(tl.int64) * J
    orow = t.to(tl.int64) * K
    jj = tl.arange(0, BJ)
    # (2) the k-th largest key: the largest thr with #(key >= thr) >= K, one bit at a time from the top
    thr = tl.zeros([], tl.int64)
    for b in range(0, 32):
        cand = thr + (tl.full([], 1, tl.int64) << (31 - b))
        cnt = tl.zeros([], tl.int32)
        for j0 in range(0, J, BJ):
            j = j0 + jj
            jm = j < J
            key = _keys(s_ptr, row, j, jm)
            cnt += tl.sum((jm & (key >= cand)).to(tl.int32), axis=0)
        thr = tl.where(cnt >= K, cand, thr)
    # (3) compact the winners: every key above thr, then the lowest-index ties at thr
    n_gt = tl.zeros([], tl.int32)
    for j0 in range(0, J, BJ):
        j = j0 + jj
        jm = j < J
        n_gt += tl.sum((jm & (_keys(s_ptr, row, j, jm) > thr)).to(tl.int32), axis=0)
    need_eq = K - n_gt
    seen_eq = tl.zeros([], tl.int32)
    seen = tl.zeros([], tl.int32)
    for j0 in range(0, J, BJ):
        j = j0 + jj
        jm = j < J
        key = _keys(s_ptr, row, j, jm)
        eq = (jm & (key == thr)).to(tl.int32)
        take = (jm & (key > thr)) | ((eq > 0) & ((seen_eq + tl.cumsum(eq, axis=0) - eq) < need_eq))
        ti = take.to(tl.int32)
        slot = seen + tl.cumsum(ti, axis=0) - ti
        tl.store(key_ptr + orow + slot, key, mask=take)
        tl.store(idx_ptr + orow + slot, j.to(tl.int64), mask=take)
        seen += tl.sum(ti, axis=0)
        seen_eq += tl.sum(eq, axis=0)
    tl.debug_barrier()
    # (4) output slot = rank among the winners in (key desc, index asc) order
    kk = tl.arange(0, BK)
    for a0 in range(0, K, BK):
        a = a0 + kk
        am = a < K
        ka = tl.load(key_ptr + orow + a, mask=am)
        ia = tl.load(idx_ptr + orow + a, mask=am)
        rank = tl.zeros([BK], tl.int32)
        for b0 in range(0, K, BK):
            bb = b0 + kk
            bm = bb < K
            kb = tl.load(key_ptr + orow + bb, mask=bm)
            ib = tl.load(idx_ptr + orow + bb, mask=bm)
            before = bm[None, :] & ((kb[None, :] > ka[:, None]) | ((kb[None, :] == ka[:, None]) &
                                                                  (ib[None, :] < ia[:, None])))
            rank += tl.sum(before.to(tl.int32), axis=1)
        val = tl.where(ka == NEG_INF_KEY, -1, ia).to(tl.int64)
        tl.store(out_ptr + orow + rank, val, mask=am)


def launch(scores, k: int, tiles: dict | None = None):
    """scores [T, J] -> indices [T, min(k, J)] int64, -1 padded."""
    import torch

    T, J = scores.shape
    k = min(k, J)
    out = torch.empty((T, k), dtype=torch.int64, device=scores.device)
    if T and k:
        t = tiles or {}
        keys = torch.empty((T, k), dtype=torch.int64, device=scores.device)
        idx = torch.empty((T, k), dtype=torch.int64, device=scores.device)
        bj = min(t.get("BJ", 1024), triton.next_power_of_2(J))
        bk = min(t.get("BK", 64), triton.next_power_of_2(k))
        indexer_topk_kernel[(T,)](scores.contiguous(), out, keys, idx, J, k, BJ=bj, BK=bk)
    return out


def compile_spec(shape: dict, tiles: dict) -> tuple:
    sig = {"s_ptr": "*fp32", "out_ptr": "*i64", "key_ptr": "*i64", "idx_ptr": "*i64", "J": "i32", "K": "i32"}
    return indexer_topk_kernel, sig, {"BJ": tiles["BJ"], "BK": tiles["BK"]}
