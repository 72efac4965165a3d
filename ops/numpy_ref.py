"""NumPy reference kernels: the CPU backend and the golden semantics of the op contract.

Everything computes in float32, like the official reference (which upcasts activations to fp32 for
norms, mHC, compressor, gating and SwiGLU). Kernels stay readable; the few places that chunk or
sort do so to bound memory and to avoid per-token Python loops, not to change the math.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attention_kernels import AttentionKernels
from .contract import ExpertWeights

F32 = np.float32
_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_, "int8": np.int8,
           "float16": np.float16}

# query rows per attention block: bounds the [rows, heads, keys] score buffer on long prompts; a block
# scores rows + window - 1 raw keys, so blocks well under the window waste little work on masked keys
ATTN_BLOCK = 64


_GEMV_ROWS = 6  # up to this many rows, one matrix-vector product per row over cache-sized weight blocks
_CACHED_BYTES = 8 << 20  # a weight block that stays in the last-level cache while every row reads it
_COL_BLOCK = 1024  # output columns per block of a large weight's product over 7..16 rows
_MOE_RUN_ROWS = 1024  # routed rows per run of experts sharing one SwiGLU call (bounds its buffers on long prompts)


def _x_wt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T for a [out, in] weight, in the torch lowering's order (a weight-major product rounds differently,
    and through W8A8's per-token int8 quantization a last-bit difference flips quantized values).

    A decode batch gives few rows per weight (an expert's share of the batch, or 16 rows of the head), where one
    BLAS matrix product is far off the weight-read bound: it packs the whole weight first. So a few rows run as one
    matrix-vector product per row over blocks of the weight that stay cached for the next row, and up to 16 rows
    of a large weight run in blocks of output columns (the same products: bit-identical to one product here).
    `benchmarks/bench_batch_step.py --matmul` prints both against one product."""
    m = x.shape[0] if x.ndim == 2 else 0
    if w.ndim != 2 or m < 2 or m > 16:
        return x @ w.T
    out = np.empty((m, w.shape[0]), dtype=np.result_type(x, w))
    if m <= _GEMV_ROWS:
        step = max(1, _CACHED_BYTES // max(1, w.shape[1] * w.itemsize))
        for a in range(0, w.shape[0], step):
            wb = w[a:a + step]
            for i in range(m):
                np.dot(wb, x[i], out=out[i, a:a + step])
        return out
    if w.nbytes <= 2 * _CACHED_BYTES:
        return x @ w.T
    for a in range(0, w.shape[0], _COL_BLOCK):
        np.matmul(x, w[a:a + _COL_BLOCK].T, out=out[:, a:a + _COL_BLOCK])
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow for large |x|
    return (np.tanh(x * F32(0.5)) + F32(1.0)) * F32(0.5)


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(F32(0.0), x).astype(F32, copy=False)


def _rsqrt_mean_square(x: np.ndarray, eps: float) -> np.ndarray:
    """1 / sqrt(mean(x^2, last axis) + eps) as a [..., 1] column: np.mean's own steps (sum, then true_divide by
    the intp count) without its Python wrapper, in place on the column (this runs ~30 times a decode step)."""
    ms = np.add.reduce(np.square(x), axis=-1, keepdims=True)
    np.true_divide(ms, np.intp(x.shape[-1]), out=ms, casting="unsafe")
    ms += F32(eps)
    np.sqrt(ms, out=ms)
    return np.divide(F32(1.0), ms, out=ms)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _sink_softmax_values(s: np.ndarray, mask: np.ndarray, keys: np.ndarray | list[np.ndarray],
                         sinks: np.ndarray) -> np.ndarray:
    """Attention output from scaled scores s [R, H, S] over keys [S, D] (shared by the rows), or a list of
    per-row key blocks [R, S_i, D] that together make the S (K = V): softmax over the keys where mask [R, S],
    the per-head sink in the denominator only. s is overwritten."""
    R, H, S = s.shape
    # in place on the caller's score buffer (the values of np.where(mask, s, -inf) and np.exp(s - m))
    np.copyto(s, -np.inf, where=~mask[:, None, :])
    m = np.maximum(np.max(s, axis=-1), sinks[None, :])
    s -= m[..., None]
    p = np.exp(s, out=s)
    denom = np.sum(p, axis=-1) + np.exp(sinks[None, :] - m)
    if isinstance(keys, np.ndarray):
        o = (p.reshape(-1, S) @ keys).reshape(R, H, -1)
    else:
        o, c0 = None, 0
        for k in keys:
            part = np.matmul(p[..., c0:c0 + k.shape[1]], k)
            o = part if o is None else o + part
            c0 += k.shape[1]
    o /= denom[..., None]
    return o


def dense(w: Any) -> np.ndarray:
    """A float32 [N, K] view of a weight: plain arrays pass through, quantized weights dequantize."""
    if isinstance(w, np.ndarray):
        return w
    return w.dequantize()


class NumpyBackend(AttentionKernels):
    """The CPU reference backend (`--backend cpu`); the attention-side kernels (compressor, lightning indexer,
    sparse shared-KV attention and their metadata ops) come from `AttentionKernels` on these primitives."""

    name = "cpu"

    # ---- plumbing ----------------------------------------------------------------------------
    def from_numpy(self, a: Any) -> np.ndarray:
        if hasattr(a, "matmul") and hasattr(a, "dequantize"):
            return a  # a quantized weight object runs its own integer kernel
        a = np.asarray(a)
        if a.dtype.kind == "f" and a.dtype != F32:
            a = a.astype(F32)
        return a

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
        return np.zeros(shape, dtype=_DTYPES[dtype])

    def full(self, shape: tuple[int, ...], value: float, dtype: str = "float32") -> np.ndarray:
        return np.full(shape, value, dtype=_DTYPES[dtype])

    def cat(self, xs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=axis)

    def arange(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop, dtype=np.int64)

    # ---- dense math ----------------------------------------------------------------------------
    def embedding(self, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        return np.asarray(table[ids], dtype=F32)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
        y = x * _rsqrt_mean_square(x, eps)
        if weight is not None:
            y *= weight
        return y

    def linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        if not isinstance(w, np.ndarray):
            return w.matmul(x)  # quantized weights carry their own kernel (same arithmetic as the NPU)
        return _x_wt(x, w)

    def grouped_linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        T, G, K = x.shape
        wd = dense(w).reshape(G, -1, K)
        if T <= _GEMV_ROWS:  # decode rows: per-row matrix-vector products (see _x_wt)
            return np.stack([_x_wt(x[:, g], wd[g]) for g in range(G)], axis=1)
        # [G, T, K] @ [G, K, N] -> [G, T, N]
        y = np.matmul(x.transpose(1, 0, 2), wd.transpose(0, 2, 1))
        return y.transpose(1, 0, 2)

    def rope_freqs(self, positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ang = positions.astype(F32)[:, None] * inv_freq.astype(F32)[None, :]
        return np.cos(ang), np.sin(ang)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False) -> np.ndarray:
        half = cos.shape[-1]
        shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (half,)
        c, s = cos.reshape(shape), sin.reshape(shape)
        if inverse:
            s = -s
        y = x.copy()
        r = x[..., -2 * half:]
        x0, x1 = r[..., 0::2], r[..., 1::2]
        y[..., -2 * half::2] = x0 * c - x1 * s
        y[..., -2 * half + 1::2] = x0 * s + x1 * c
        return y

    # ---- mHC ---------------------------------------------------------------------------------
    def _hc_mixes(self, x: np.ndarray, fn: np.ndarray, norm_eps: float) -> np.ndarray:
        T, n, d = x.shape
        xf = x.reshape(T, n * d)
        return (xf @ fn.T) * _rsqrt_mean_square(xf, norm_eps)

    def hc_pre(self, x, fn, scale, base, iters, hc_eps, norm_eps):
        T, n, _ = x.shape
        m = self._hc_mixes(x, fn, norm_eps)
        eps = F32(hc_eps)
        # every mix's scale (pre, post, comb: the same elementwise products as per slice) and shift at once, one
        # sigmoid for pre and post
        z = m * np.repeat(scale, (n, n, n * n))
        z += base
        g = _sigmoid(z[:, :2 * n])
        pre = g[:, :n] + eps
        post = F32(2.0) * g[:, n:]
        comb = _softmax(z[:, 2 * n:].reshape(T, n, n), axis=-1) + eps
        # Sinkhorn: alternate column / row normalisation, in place on small buffers (the loop is ~120 calls on
        # [T, n, n]: call overhead, not arithmetic, is its cost); same operations and order as comb / (sum + eps)
        red = np.add.reduce
        rows, cols = np.empty((T, n, 1), dtype=comb.dtype), np.empty((T, 1, n), dtype=comb.dtype)
        red(comb, axis=-2, keepdims=True, out=cols)
        cols += eps
        comb /= cols
        for _ in range(iters - 1):
            red(comb, axis=-1, keepdims=True, out=rows)
            rows += eps
            comb /= rows
            red(comb, axis=-2, keepdims=True, out=cols)
            cols += eps
            comb /= cols
        y = np.einsum("tn,tnd->td", pre, x)
        return y, post, comb

    def hc_post(self, y, x, post, comb):
        out = np.matmul(comb.transpose(0, 2, 1), x)
        out += post[:, :, None] * y[:, None, :]  # a + b == b + a exactly: the old sum, without a temporary
        return out

    def hc_head(self, x, fn, scale, base, hc_eps, norm_eps):
        m = self._hc_mixes(x, fn, norm_eps)
        pre = _sigmoid(m * scale[0] + base) + F32(hc_eps)
        return np.einsum("tn,tnd->td", pre, x)

    # ---- compressed sparse attention ---------------------------------------------------------
    def compress(self, kv: np.ndarray, score: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            p = _softmax(score, axis=1)
        return np.sum(kv * p, axis=1)

    def indexer_topk(self, q, weights, keys, q_pos, ratio, topk, scale):
        T = q.shape[0]
        J = keys.shape[0]
        k = min(topk, J)
        if k == 0:
            return np.zeros((T, 0), dtype=np.int64)
        out = np.empty((T, k), dtype=np.int64)
        jidx = np.arange(J)
        # entry j is visible to a query at p iff (j + 1) * ratio <= p + 1, i.e. iff j < (p + 1) // ratio
        nvis = (np.asarray(q_pos, dtype=np.int64) + 1) // ratio
        for a in range(0, T, ATTN_BLOCK):
            b = min(T, a + ATTN_BLOCK)
            qb = q[a:b]
            s = np.matmul(qb.reshape(-1, qb.shape[-1]), keys.T).reshape(b - a, qb.shape[1], J)
            np.maximum(s, 0, out=s)
            score = np.einsum("thj,th->tj", s, weights[a:b])
            score *= F32(scale)
            nv = nvis[a:b, None]
            np.copyto(score, -np.inf, where=jidx[None, :] >= nv)
            # stable: equal scores (e.g. every head's relu at 0) resolve to the lower entry index
            np.negative(score, out=score)
            sel = np.argsort(score, axis=-1, kind="stable")[:, :k]
            out[a:b] = np.where(sel < nv, sel, -1)
        return out

    def sparse_attention(self, q, q_pos, kv, kv_pos, window, comp, ratio, comp_sel, sinks, scale):
        T, H, D = q.shape
        out = np.empty_like(q)
        n_comp = 0 if comp is None else comp.shape[0]
        sinks = sinks.astype(F32)
        for a in range(0, T, ATTN_BLOCK):
            b = min(T, a + ATTN_BLOCK)
            qp = q_pos[a:b]
            # raw keys that any query of this block can see (kv_pos is ascending)
            lo = int(np.searchsorted(kv_pos, qp.min() - window + 1, side="left"))
            hi = int(np.searchsorted(kv_pos, qp.max(), side="right"))
            keys = kv[lo:hi]
            kp = kv_pos[lo:hi]
            mask = (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - window) & (kp[None, :] >= 0)
            if n_comp:
                nvis = min(n_comp, int((qp.max() + 1) // ratio))
                if nvis:
                    cj = np.arange(nvis)
                    cmask = (cj[None, :] + 1) * ratio <= qp[:, None] + 1
                    if comp_sel is not None:
                        picked = np.zeros((b - a, nvis + 1), dtype=bool)
                        sel = comp_sel[a:b]
                        sel = np.where((sel >= 0) & (sel < nvis), sel, nvis)
                        np.put_along_axis(picked, sel, True, axis=-1)
                        cmask &= picked[:, :nvis]
                    keys = np.concatenate([keys, comp[:nvis]], axis=0)
                    mask = np.concatenate([mask, cmask], axis=1)
            qb = q[a:b].reshape(-1, D)
            s = (qb @ keys.T).reshape(b - a, H, -1) * F32(scale)
            out[a:b] = _sink_softmax_values(s, mask, keys, sinks)
        return out

    # sparse_attn_sharedkv attends all single-row requests of a call together (below)
    batched_decode = True

    def _sparse_attn_decode(self, q, ori_kv, win_ids, win_ok, cmp_kv, cmp_ids, cmp_ok, sinks, scale):
        """q [R, H, D]: row k attends the keys at the valid slot ids of its row (window keys, then compressed
        entries). Rows go in batched products over zero-padded key blocks; rows of similar key counts share a
        block, so that padding (masked, but multiplied) stays under ~1/4 of the work."""
        parts = [(ori_kv, win_ids, win_ok)] + ([] if cmp_ids is None else [(cmp_kv, cmp_ids, cmp_ok)])
        sinks = sinks.astype(F32)
        if len(q) == 1:  # one row: the plan already cut each part at its last valid column, so no blocks to form
            one = [(c.reshape(-1, c.shape[-1]), ids, ok) for c, ids, ok in parts]
            return self._attend_rows(q, one, sinks, scale).astype(F32, copy=False)
        # per row and part: columns up to the last valid one
        ends = [np.where(ok.any(axis=1), ok.shape[1] - np.argmax(ok[:, ::-1], axis=1), 0) if ok.shape[1]
                else np.zeros(len(ok), dtype=np.int64) for _, _, ok in parts]
        cost = sum(ends)
        order = np.argsort(-cost, kind="stable")
        # rows permuted once into cost order, so that each block of rows below is a slice (a view), not a gather;
        # the plan's padding ids are in-range slots (their keys are zeroed in _attend_rows)
        qs = q[order]
        parts = [(c.reshape(-1, c.shape[-1]), ids[order], ok[order]) for c, ids, ok in parts]
        cost, ends = cost[order], [e[order] for e in ends]
        out = np.empty(q.shape, dtype=F32)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and cost[j] * 4 >= cost[i] * 3:
                j += 1
            cols = [int(e[i:j].max()) for e in ends]
            out[order[i:j]] = self._attend_rows(qs[i:j], [(c, ids[i:j, :n], ok[i:j, :n]) for (c, ids, ok), n
                                                          in zip(parts, cols, strict=True)], sinks, scale)
            i = j
        return out

    @staticmethod
    def _attend_rows(q: np.ndarray, parts: list, sinks: np.ndarray, scale: float) -> np.ndarray:
        # parts: (cache rows [slots, D], slot ids, validity) per cache. One gather per cache, scored part by part
        # (no concatenated copy); masked keys are zeroed, so that a masked key (weight exactly 0) never meets
        # a non-finite value of a released block
        keys = []
        for rows, ids, ok in parts:
            k = np.take(rows, ids, axis=0)  # np.take: the same rows as rows[ids], copied faster
            k[~ok] = 0
            keys.append(k)
        s = np.concatenate([np.matmul(q, k.transpose(0, 2, 1)) for k in keys], axis=-1)
        s *= F32(scale)
        mask = np.concatenate([ok for _, _, ok in parts], axis=1)
        return _sink_softmax_values(s, mask, keys, sinks)

    # ---- MoE -----------------------------------------------------------------------------------
    def moe_gate(self, x, weight, bias, tid2eid, ids, topk, score_func, route_scale, norm_topk_prob):
        logits = _x_wt(x, weight)
        if score_func == "softmax":
            scores = _softmax(logits, axis=-1)
        elif score_func == "sigmoid":
            scores = _sigmoid(logits)
        else:
            scores = np.sqrt(_softplus(logits))
        if tid2eid is not None:
            idx = np.asarray(tid2eid[ids], dtype=np.int64)
        else:
            choice = scores + bias if bias is not None else scores
            idx = np.argpartition(-choice, topk - 1, axis=-1)[:, :topk].astype(np.int64)
        w = scores[np.arange(len(idx))[:, None], idx]  # take_along_axis's values, without its Python wrapper
        if norm_topk_prob and score_func != "softmax":
            w /= np.add.reduce(w, axis=-1, keepdims=True) + F32(1e-20)
        w *= F32(route_scale)
        return w.astype(F32, copy=False), idx

    @staticmethod
    def _swiglu(g: np.ndarray, u: np.ndarray, limit: float) -> np.ndarray:
        if limit > 0:
            g = np.minimum(g, F32(limit))
            u = np.clip(u, F32(-limit), F32(limit))
        return _silu(g) * u

    def swiglu_mlp(self, x, w1, w3, w2, limit):
        return self.linear(self._swiglu(self.linear(x, w1), self.linear(x, w3), limit), w2)

    def moe_experts(self, x: np.ndarray, weights: np.ndarray, ids: np.ndarray, experts: ExpertWeights,
                    limit: float) -> np.ndarray:
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind="stable")  # init_routing: rows grouped by expert
        counts = np.bincount(flat, minlength=experts.n_experts)
        first = np.cumsum(counts) - counts
        ys = np.zeros((T * k, x.shape[1]), dtype=F32)
        wflat = weights.reshape(-1)
        # experts held by this rank (the others belong to another expert-parallel rank), in id order
        held = [int(e) for e in np.nonzero(counts)[0] if 0 <= experts.local(int(e)) < experts.count]
        # runs of experts of up to _MOE_RUN_ROWS rows: each expert's gate and up products, then one SwiGLU and
        # routing-weight product over the run's rows (a decode batch spreads a few rows over many experts, where
        # per-expert elementwise calls cost more than their arithmetic; elementwise, so the same values)
        i = 0
        while i < len(held):
            j, n = i + 1, int(counts[held[i]])
            while j < len(held) and n + int(counts[held[j]]) <= _MOE_RUN_ROWS:
                n += int(counts[held[j]])
                j += 1
            run = held[i:j]
            rows = np.concatenate([order[first[e]:first[e] + counts[e]] for e in run])
            xt = x[rows // k]
            bounds = np.concatenate([[0], np.cumsum(counts[run])]).tolist()
            lin = [(experts.local(e), a, b) for e, a, b in zip(run, bounds[:-1], bounds[1:], strict=True)]
            g = self.cat([self.linear(xt[a:b], experts.w1[le]) for le, a, b in lin])
            u = self.cat([self.linear(xt[a:b], experts.w3[le]) for le, a, b in lin])
            h = self._swiglu(g, u, limit)
            h *= wflat[rows][:, None]
            ys[rows] = self.cat([self.linear(h[a:b], experts.w2[le]) for le, a, b in lin])
            i = j
        # finalize_routing: sum each token's k expert outputs
        return ys.reshape(T, k, x.shape[1]).sum(axis=1)

    def dynamic_quant(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row int8 over the last axis (npu_dynamic_quant): (int8 like x, float32 scale x.shape[:-1])."""
        from .quant import act_quant_per_token

        q, s = act_quant_per_token(x)
        return q, s[..., 0]

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, logits, temperature, top_k, top_p, rng):
        return sample_numpy(np.asarray(logits, dtype=F32), temperature, top_k, top_p, rng)


def sample_numpy(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Greedy when temperature <= 0; else temperature, then top-k, then nucleus (top-p) filtering."""
    if temperature <= 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if 0 < top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        ps = np.take_along_axis(p, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep_sorted = (np.cumsum(ps, axis=-1) - ps) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    u = rng.random(p.shape[0])
    return np.minimum((np.cumsum(p, axis=-1) < u[:, None]).sum(axis=-1), V - 1).astype(np.int64)
