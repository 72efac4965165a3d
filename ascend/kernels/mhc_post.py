"""mHC post: x'_b = post_b * y + sum_a comb[a, b] * x_a (ops.numpy_ref.NumpyBackend.hc_post); grid (T, D blocks)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hc_post_kernel(y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr,
                   D: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    b = tl.arange(0, NP)
    bm = b < N
    yv = tl.load(y_ptr + t * D + dd, mask=dm, other=0.0).to(tl.float32)
    pv = tl.load(post_ptr + t * N + b, mask=bm, other=0.0)
    acc = pv[:, None] * yv[None, :]
    for a in tl.static_range(N):
        xa = tl.load(x_ptr + (t * N + a) * D + dd, mask=dm, other=0.0).to(tl.float32)
        ca = tl.load(comb_ptr + t * N * N + a * N + b, mask=bm, other=0.0)  # comb used transposed
        acc += ca[:, None] * xa[None, :]
    tl.store(out_ptr + (t * N + b[:, None]) * D + dd[None, :], acc, mask=bm[:, None] & dm[None, :])


def launch(y, x, post, comb, tiles: dict | None = None):
    """y [T, D], x [T, n, D], post [T, n], comb [T, n, n] -> [T, n, D] float32."""
    import torch

    T, n, D = x.shape
    bd = (tiles or {}).get("BD", 512)
    out = torch.empty((T, n, D), dtype=torch.float32, device=x.device)
    if T:
        hc_post_kernel[(T, triton.cdiv(D, bd))](y.contiguous(), x.contiguous(), post.contiguous(), comb.contiguous(),
                                                out, D=D, N=n, NP=triton.next_power_of_2(n), BD=bd)
    return out


def compile_spec(shape: dict, tiles: dict) -> tuple:
    n = shape["hc"]
    sig = {"y_ptr": "*bf16", "x_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32", "out_ptr": "*fp32"}
    return hc_post_kernel, sig, {"D": shape["hidden"], "N": n, "NP": triton.next_power_of_2(n), "BD": tiles["BD"]}
