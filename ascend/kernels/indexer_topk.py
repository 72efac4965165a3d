"""Top-k of the lightning-indexer scores, in the reference's order: descending score, ties to the lower entry
index (ops.numpy_ref `indexer_topk`: a stable argsort of -score); entries at -inf (not visible) come out as -1.

triton-ascend 3.2's interpreter has no tl.sort / tl.topk, so this is a selection loop that needs no scratch
writes: step i takes the largest (score, -index) pair strictly below the pair chosen at step i - 1, scanning
the row BJ entries at a time. O(k * J) per token: right for decode-sized rows; a radix select is the follow-up
for long prefill rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def indexer_topk_kernel(s_ptr, out_ptr, J, K, BJ: tl.constexpr):
    t = tl.program_id(0)
    jj = tl.arange(0, BJ)
    big = 2147483647
    last_s = float("inf")
    last_j = -1
    for i in range(0, K):
        best_s = float("-inf")
        best_j = big
        for j0 in range(0, J, BJ):
            j = j0 + jj
            jm = j < J
            s = tl.load(s_ptr + t * J + j, mask=jm, other=float("-inf"))
            # candidates come after the previous pick in (score desc, index asc) order
            after = jm & ((s < last_s) | ((s == last_s) & (j > last_j)))
            cs = tl.where(after, s, float("-inf"))
            bm = tl.max(cs, axis=0)
            bj = tl.min(tl.where(after & (cs == bm), j, big), axis=0)
            better = (bm > best_s) | ((bm == best_s) & (bj < best_j))
            best_s = tl.where(better, bm, best_s)
            best_j = tl.where(better, bj, best_j)
        ok = (best_s > float("-inf")) & (best_j < big)
        tl.store(out_ptr + t * K + i, tl.where(ok, best_j, -1).to(tl.int64))
        last_s = best_s
        last_j = best_j


def launch(scores, k: int, tiles: dict | None = None):
    """scores [T, J] -> indices [T, min(k, J)] int64, -1 padded."""
    import torch

    T, J = scores.shape
    k = min(k, J)
    out = torch.empty((T, k), dtype=torch.int64, device=scores.device)
    if T and k:
        bj = min((tiles or {}).get("BJ", 1024), triton.next_power_of_2(J))
        indexer_topk_kernel[(T,)](scores.contiguous(), out, J, k, BJ=bj)
    return out


def compile_spec(shape: dict, tiles: dict) -> tuple:
    sig = {"s_ptr": "*fp32", "out_ptr": "*i64", "J": "i32", "K": "i32"}
    return indexer_topk_kernel, sig, {"BJ": tiles["BJ"]}
