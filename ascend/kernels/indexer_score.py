"""Lightning-indexer score: I[t, j] = scale * sum_h w[t, h] * relu(q[t, h] . k[j]) over the compressed entries a
query may see ((j + 1) * ratio <= pos + 1), -inf elsewhere (ops.numpy_ref `indexer_topk`, before the top-k).

One program per (token, block of BJ entries); q [H, Dk] stays in the unified buffer, the product runs on the
cube unit (tl.dot), heads in blocks of BH.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def indexer_score_kernel(q_ptr, w_ptr, k_ptr, pos_ptr, out_ptr, J, ratio, scale,
                         H: tl.constexpr, DK: tl.constexpr, BH: tl.constexpr, BJ: tl.constexpr):
    t = tl.program_id(0)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    jm = j < J
    d = tl.arange(0, DK)
    keys = tl.load(k_ptr + j[:, None] * DK + d[None, :], mask=jm[:, None], other=0.0)
    acc = tl.zeros([BJ], tl.float32)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        hm = h < H
        q = tl.load(q_ptr + (t * H + h[:, None]) * DK + d[None, :], mask=hm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(keys))  # [BH, BJ]
        w = tl.load(w_ptr + t * H + h, mask=hm, other=0.0).to(tl.float32)
        acc += tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
    pos = tl.load(pos_ptr + t)
    visible = jm & ((j + 1) * ratio <= pos + 1)
    tl.store(out_ptr + t * J + j, tl.where(visible, acc * scale, float("-inf")), mask=jm)


def launch(q, weights, keys, q_pos, ratio: int, scale: float, tiles: dict | None = None):
    """q [T, H, Dk], weights [T, H], keys [J, Dk], q_pos [T] -> scores [T, J] float32 (-inf = not visible)."""
    import torch

    T, H, DK = q.shape
    J = keys.shape[0]
    t = tiles or {}
    dp = max(16, triton.next_power_of_2(DK))  # tl.arange needs a power of two, tl.dot K >= 16: zero-pad
    if dp != DK:
        q = torch.nn.functional.pad(q, (0, dp - DK))
        keys = torch.nn.functional.pad(keys, (0, dp - DK))
    out = torch.empty((T, J), dtype=torch.float32, device=q.device)
    if T and J:
        bj = min(t.get("BJ", 128), max(16, triton.next_power_of_2(J)))
        bh = min(t.get("BH", 64), max(16, triton.next_power_of_2(H)))
        indexer_score_kernel[(T, triton.cdiv(J, bj))](q.contiguous(), weights.contiguous(), keys.contiguous(),
                                                      q_pos.contiguous(), out, J, ratio, scale,
                                                      H=H, DK=dp, BH=bh, BJ=bj)
    return out


def compile_spec(shape: dict, tiles: dict) -> tuple:
    sig = {"q_ptr": "*bf16", "w_ptr": "*fp32", "k_ptr": "*bf16", "pos_ptr": "*i64", "out_ptr": "*fp32", "J": "i32",
           "ratio": "i32", "scale": "fp32"}
    consts = {"H": shape["index_heads"], "DK": shape["index_head_dim"], "BH": tiles["BH"], "BJ": tiles["BJ"]}
    return indexer_score_kernel, sig, consts
