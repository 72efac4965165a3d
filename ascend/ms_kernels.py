"""Plain-op MindSpore compositions of the contract ops: what runs on MindSpore's CPU build.

Every function takes MindSpore tensors plus Python scalars and uses only ops whose CPU kernels are
registered in the 2.10 wheel (many `mint.*` ones are not: TopkExt, SortExt, ArgMaxExt, CumsumExt,
FillScalar, ZerosLikeExt). Functions without host syncs or data-dependent Python control flow are
also valid `mindspore.jit` bodies; `JITTABLE` lists the ones the backend compiles.

The float op order follows `ops.numpy_ref` (1/sqrt rather than rsqrt, the same Sinkhorn sequence) so results
stay within float32 rounding of the reference.

This module imports mindspore at import time; only `ascend.mindspore_backend` imports it, lazily.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, mint, ops

F32 = ms.float32
I64 = ms.int64

_mm_tb = ops.MatMul(transpose_b=True)  # x @ w.T without materialising w.T (mint.matmul(x, w.T) copies w)
_bmm = ops.BatchMatMul()
_bmm_tb = ops.BatchMatMul(transpose_b=True)
_bmm_ta = ops.BatchMatMul(transpose_a=True)


# ---- elementwise helpers (numpy_ref's formulas) ----------------------------------------------------------
def sigmoid(x: Tensor) -> Tensor:
    # the native kernel, not the reference's tanh form: MindSpore's CPU tanh is a coarse approximation
    # (tanh(4.5) off by 4e-5, exactly +-1 beyond |x| ~ 10) while its sigmoid is within 8e-7 of the reference
    return ops.sigmoid(x)


def silu(x: Tensor) -> Tensor:
    return x * sigmoid(x)


def swiglu(g: Tensor, u: Tensor, limit: float) -> Tensor:
    if limit > 0:
        g = mint.clamp(g, max=limit)
        u = mint.clamp(u, -limit, limit)
    return silu(g) * u


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] @ w[N, K]^T for any leading shape."""
    if x.ndim == 2:
        return _mm_tb(x, w)
    lead = x.shape[:-1]
    return _mm_tb(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])


# ---- dense math -------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    y = x * (1.0 / mint.sqrt(mint.mean(x * x, -1, True) + eps))
    if weight is not None:
        y = y * weight
    return y


def rope_freqs(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    ang = positions.astype(F32).reshape(-1, 1) * inv_freq.astype(F32).reshape(1, -1)
    return mint.cos(ang), mint.sin(ang)


def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    half = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (half,)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    r = x[..., x.shape[-1] - 2 * half:]
    x0, x1 = r[..., 0::2], r[..., 1::2]
    rot = ops.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(r.shape)
    if x.shape[-1] == 2 * half:
        return rot
    return ops.cat([x[..., : x.shape[-1] - 2 * half], rot], axis=-1)


def grouped_linear(x: Tensor, w: Tensor) -> Tensor:
    T, G, K = x.shape
    wd = w.reshape(G, -1, K)
    # [G, T, K] @ [G, N, K]^T -> [G, T, N]
    return _bmm_tb(x.transpose(1, 0, 2), wd).transpose(1, 0, 2)


def swiglu_mlp(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, limit: float) -> Tensor:
    return matmul_t(swiglu(matmul_t(x, w1), matmul_t(x, w3), limit), w2)


# ---- mHC ----------------------------------------------------------------------------------------------------
def _hc_mixes(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    T, n, d = x.shape
    xf = x.reshape(T, n * d)
    r = 1.0 / mint.sqrt(mint.mean(xf * xf, -1, True) + norm_eps)
    return _mm_tb(xf, fn) * r


def _collapse(pre: Tensor, x: Tensor) -> Tensor:
    T, n, d = x.shape
    return _bmm(pre.reshape(T, 1, n), x).reshape(T, d)


def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    T, n, _ = x.shape
    m = _hc_mixes(x, fn, norm_eps)
    pre = sigmoid(m[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = (m[:, 2 * n:] * scale[2] + base[2 * n:]).reshape(T, n, n)
    comb = mint.softmax(comb, -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdims=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdims=True) + hc_eps)
    return _collapse(pre, x), post, comb


def hc_post(y: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    # x'_b = post_b * y + sum_a comb[a, b] x_a: comb transposed in the batched matmul
    return post.expand_dims(-1) * y.expand_dims(1) + _bmm_ta(comb, x)


def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float, norm_eps: float) -> Tensor:
    m = _hc_mixes(x, fn, norm_eps)
    return _collapse(sigmoid(m * scale[0] + base) + hc_eps, x)


# ---- compressed sparse attention -----------------------------------------------------------------------------
def compress(kv: Tensor, score: Tensor) -> Tensor:
    return (kv * mint.softmax(score, 1)).sum(1)


def indexer_scores(q: Tensor, weights: Tensor, keys: Tensor, scale: float) -> Tensor:
    """sum_h weights[t, h] * relu(q[t, h] . keys[j]) * scale -> [t, J]."""
    t, H, d = q.shape
    s = mint.nn.functional.relu(_mm_tb(q.reshape(t * H, d), keys)).reshape(t, H, -1)
    return _bmm(weights.reshape(t, 1, H), s).reshape(t, -1) * scale


def attention_block(q: Tensor, keys: Tensor, mask: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """q [t, H, D] against shared keys/values [S, D] under mask [t, S]; the sink joins the denominator."""
    t, H, D = q.shape
    s = _mm_tb(q.reshape(t * H, D), keys).reshape(t, H, -1) * scale
    s = mint.where(mask.expand_dims(1), s, float("-inf"))
    m = mint.maximum(mint.amax(s, -1), sinks.reshape(1, H))
    p = mint.exp(s - m.expand_dims(-1))
    denom = p.sum(-1) + mint.exp(sinks.reshape(1, H) - m)
    o = mint.matmul(p.reshape(t * H, -1), keys).reshape(t, H, D)
    return o / denom.expand_dims(-1)


# ---- MoE --------------------------------------------------------------------------------------------------------
def gate_scores(x: Tensor, weight: Tensor, score_func: str) -> Tensor:
    logits = _mm_tb(x, weight)
    if score_func == "softmax":
        return mint.softmax(logits, -1)
    if score_func == "sigmoid":
        return sigmoid(logits)
    return mint.sqrt(ops.logaddexp(ops.zeros_like(logits), logits))  # sqrt(softplus)


def gate_weights(scores: Tensor, idx: Tensor, normalize: bool, route_scale: float) -> Tensor:
    w = ops.gather_elements(scores, 1, idx)
    if normalize:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * route_scale


def expert_ffn(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, wt: Tensor, limit: float) -> Tensor:
    """One routed expert on its rows; the routing weight scales the hidden state (reference order)."""
    return matmul_t(swiglu(matmul_t(x, w1), matmul_t(x, w3), limit) * wt.reshape(-1, 1), w2)


# ---- integer GEMM emulation (ops/quant.py arithmetic) ------------------------------------------------------
def act_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token int8 of x [t, K] (ops.quant.act_quant_per_token): the int8 values as exact float32
    integers, and the float32 scale [t, 1]. ops.round is round-half-to-even, like np.rint."""
    amax = mint.amax(mint.abs(x), -1, True)
    s = mint.where(amax > 0, amax / 127.0, 1.0)
    return mint.clamp(ops.round(x / s), -127.0, 127.0), s


def int_gemm(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact integer GEMM on integer values: xq [..., t, K] @ wq [..., N, K]^T, as ops.quant.int_matmul does it:
    float32 when K * 2**14 <= 2**24 (every partial sum is then an exact float32 integer), float64 otherwise.
    The backend stores weights in that type already, so the casts are no-ops."""
    ft = F32 if xq.shape[-1] * 2**14 <= 2**24 else ms.float64
    xq, wq = xq.astype(ft), wq.astype(ft)
    return _mm_tb(xq, wq) if xq.ndim == 2 else _bmm_tb(xq, wq)


def w8a8_matmul(x: Tensor, wq: Tensor, scale: Tensor) -> Tensor:
    """y = (float32(acc) * x_scale) * w_scale, in that order (ops.quant.W8A8Weight.matmul)."""
    xq, xs = act_quant(x)
    return (int_gemm(xq, wq).astype(F32) * xs) * scale.reshape(1, -1)


def w4a8_matmul(x: Tensor, wg: Tensor, scale_g: Tensor) -> Tensor:
    """wg [G, N, gs] unpacked int4 values, scale_g [G, N]: per-group integer GEMM, groups summed in float32 in
    ascending order, then times the token scale (ops.quant.W4A8Weight.matmul)."""
    G, N, gs = wg.shape
    xq, xs = act_quant(x)
    acc = int_gemm(xq.reshape(-1, G, gs).transpose(1, 0, 2), wg).astype(F32)  # [G, t, N]
    part = acc[0] * scale_g[0:1]
    for g in range(1, G):
        part = part + acc[g] * scale_g[g:g + 1]
    return part * xs


# functions whose bodies are static-shape graphs (no host syncs): the backend may wrap them in mindspore.jit
JITTABLE = {
    "rms_norm": rms_norm,
    "rope": rope,
    "hc_pre": hc_pre,
    "hc_post": hc_post,
    "hc_head": hc_head,
    "swiglu_mlp": swiglu_mlp,
    "expert_ffn": expert_ffn,
    "compress": compress,
}
