"""mHC pre: mixes, RMS scale, sigmoid pre/post, Sinkhorn on n x n, weighted collapse (one program per token).

Math of ops.numpy_ref.NumpyBackend.hc_pre. The n x n mixing matrix is kept flat ([NP*NP]); row and column
sums use a [NP*NP, NP*NP] same-row / same-column mask instead of a reshape, so the kernel stays inside the
subset triton-ascend's interpreter and its linalg lowering both accept.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segsum(c, same):
    # sum of c over the elements sharing a row (or column) with each element
    return tl.sum(tl.where(same, c[None, :], 0.0), axis=1)


@triton.jit
def hc_pre_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                  iters, hc_eps, norm_eps,
                  D: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                  BK: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, NP)
    row_ok = i < N
    e = tl.arange(0, NP * NP)
    ci = e // NP
    cj = e % NP
    comb_ok = (ci < N) & (cj < N)
    comb_row = 2 * N + ci * N + cj
    kk = tl.arange(0, BK)
    acc_pre = tl.zeros([NP], dtype=tl.float32)
    acc_post = tl.zeros([NP], dtype=tl.float32)
    acc_comb = tl.zeros([NP * NP], dtype=tl.float32)
    ss = tl.zeros([BK], dtype=tl.float32)
    xrow = x_ptr + t * K
    # mixes = (x_flat @ fn^T), and sum of squares for the RMS scale, in one pass over n*D
    for k0 in range(0, K, BK):
        km = (k0 + kk) < K
        xv = tl.load(xrow + k0 + kk, mask=km, other=0.0).to(tl.float32)
        ss += xv * xv
        f = tl.load(fn_ptr + i[:, None] * K + k0 + kk[None, :], mask=row_ok[:, None] & km[None, :], other=0.0)
        acc_pre += tl.sum(f.to(tl.float32) * xv[None, :], axis=1)
        f = tl.load(fn_ptr + (N + i[:, None]) * K + k0 + kk[None, :], mask=row_ok[:, None] & km[None, :], other=0.0)
        acc_post += tl.sum(f.to(tl.float32) * xv[None, :], axis=1)
        f = tl.load(fn_ptr + comb_row[:, None] * K + k0 + kk[None, :], mask=comb_ok[:, None] & km[None, :],
                    other=0.0)
        acc_comb += tl.sum(f.to(tl.float32) * xv[None, :], axis=1)
    r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + norm_eps)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(acc_pre * r * s0 + tl.load(base_ptr + i, mask=row_ok, other=0.0)) + hc_eps
    post = 2.0 * tl.sigmoid(acc_post * r * s1 + tl.load(base_ptr + N + i, mask=row_ok, other=0.0))
    tl.store(post_ptr + t * N + i, post, mask=row_ok)
    # Sinkhorn: row softmax + eps, column normalise, then iters-1 (row, column) passes
    logit = acc_comb * r * s2 + tl.load(base_ptr + comb_row, mask=comb_ok, other=0.0)
    logit = tl.where(comb_ok, logit, float("-inf"))
    same_row = (ci[:, None] == ci[None, :]) & comb_ok[None, :]
    same_col = (cj[:, None] == cj[None, :]) & comb_ok[None, :]
    mx = tl.max(tl.where(same_row, logit[None, :], float("-inf")), axis=1)
    mx = tl.where(comb_ok, mx, 0.0)
    ex = tl.where(comb_ok, tl.exp(logit - mx), 0.0)
    den = tl.where(comb_ok, _segsum(ex, same_row), 1.0)
    c = tl.where(comb_ok, ex / den + hc_eps, 0.0)
    c = c / (_segsum(c, same_col) + hc_eps)
    for _ in range(iters - 1):
        c = c / (_segsum(c, same_row) + hc_eps)
        c = c / (_segsum(c, same_col) + hc_eps)
    tl.store(comb_ptr + t * N * N + ci * N + cj, c, mask=comb_ok)
    # weighted collapse y = sum_i pre_i * x_i
    dd = tl.arange(0, BD)
    for d0 in range(0, D, BD):
        dm = (d0 + dd) < D
        xv = tl.load(xrow + i[:, None] * D + d0 + dd[None, :], mask=row_ok[:, None] & dm[None, :], other=0.0)
        y = tl.sum(pre[:, None] * xv.to(tl.float32), axis=0)
        tl.store(y_ptr + t * D + d0 + dd, y, mask=dm)


def launch(x, fn, scale, base, iters: int, hc_eps: float, norm_eps: float, tiles: dict | None = None):
    """x [T, n, D] -> (y [T, D], post [T, n], comb [T, n, n]), float32 (torch tensors)."""
    import torch

    T, n, D = x.shape
    t = tiles or {}
    y = torch.empty((T, D), dtype=torch.float32, device=x.device)
    post = torch.empty((T, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((T, n, n), dtype=torch.float32, device=x.device)
    if T:
        hc_pre_kernel[(T,)](x.contiguous(), fn.contiguous(), scale.contiguous(), base.contiguous(), y, post, comb,
                            iters, hc_eps, norm_eps, D=D, K=n * D, N=n, NP=triton.next_power_of_2(n),
                            BK=t.get("BK", 256), BD=t.get("BD", 512))
    return y, post, comb


def compile_spec(shape: dict, tiles: dict) -> tuple:
    """(kernel, signature, constants) for the compile check."""
    n = shape["hc"]
    sig = {"x_ptr": "*bf16", "fn_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32", "y_ptr": "*fp32",
           "post_ptr": "*fp32", "comb_ptr": "*fp32", "iters": "i32", "hc_eps": "fp32", "norm_eps": "fp32"}
    consts = {"D": shape["hidden"], "K": n * shape["hidden"], "N": n,
              "NP": triton.next_power_of_2(n), "BK": tiles["BK"], "BD": tiles["BD"]}
    return hc_pre_kernel, sig, consts
