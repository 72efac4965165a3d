"""The MindSpore backend (`--backend mindspore`): the op contract on MindSpore tensors.

One lowering for both MindSpore targets. On the CPU build (the PyPI wheel) every op is a composition of
plain ops (`ascend.ms_kernels`); with device target Ascend each op goes through the SoC capability table
(`ascend.soc.select`, provider "mindspore") and uses the fused primitive where the table lists one and this
file implements it (RmsNorm, QuantBatchMatmul, MoeGatingTopKSoftmax, MoeInitRoutingV2 + GroupedMatmul +
MoeTokenUnpermute, FusedInferAttentionScore, MoeDistributeDispatch/Combine, AlltoAllV). `variants()` says
what each op ran as. The fused primitives import fine on CPU but have no CPU kernels, so the choice is made
by device target, never by import.

mindspore is imported lazily, on the first backend construction; process-wide MindSpore settings (device,
synchronous launch, kernel threads) are applied once then.

Index bookkeeping (attention visibility masks, MoE grouping by expert) runs on the host in NumPy, as in the
reference kernels; the arithmetic runs in MindSpore.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ops import BackendUnavailable
from ops import quant as Q
from ops.attention_kernels import AttentionKernels
from ops.contract import ExpertWeights
from ops.numpy_ref import ATTN_BLOCK, sample_numpy

from . import soc as socmod

INSTALL_HINT = "pip install -e .[mindspore]"
DEVICES = {"cpu": "CPU", "ascend": "Ascend"}
# jit-compiled kernels serve calls of at most this many rows (decode-sized batches); longer calls (prefill)
# run op by op, because a static graph recompiles for every new shape (0.3-1 s each on CPU)
JIT_MAX_TOKENS = 16

# (table op, kernel) pairs of provider "mindspore" that this backend implements (the `kernel_problem` of select);
# table rows of provider "mindspore" not listed here fall through to the composed variant
MS_KERNELS = {
    ("rms_norm", "RmsNorm"),
    ("linear_w8a8", "QuantBatchMatmul"),
    ("moe_gate", "MoeGatingTopKSoftmax"),
    ("moe_experts", "MoeInitRoutingV2+GroupedMatmul+MoeTokenUnpermute"),
    ("sparse_attention", "FusedInferAttentionScore"),
    ("moe_comm_dispatch_combine", "MoeDistributeDispatch+MoeDistributeCombine"),
    ("moe_comm_alltoall", "AlltoAllV"),
}
# contract op -> SoC-table op for the ops whose choice does not depend on the call
STATIC_OPS = {
    "rms_norm": "rms_norm", "rope": "rope", "grouped_linear": "grouped_linear", "hc_pre": "hc_pre",
    "hc_post": "hc_post", "compress": "compress", "indexer_topk": "indexer_topk",
    "sparse_attention": "sparse_attention", "moe_experts": "moe_experts", "swiglu_mlp": "swiglu", "sample": "sample",
}

_RUNTIME: dict[str, Any] = {}


def mindspore_backend(**kw: Any) -> MindSporeBackend:
    """`get_backend("mindspore")`: the backend, or BackendUnavailable saying how to install MindSpore."""
    if importlib.util.find_spec("mindspore") is None:
        raise BackendUnavailable(f"backend 'mindspore' needs MindSpore, which is not installed: {INSTALL_HINT}")
    return MindSporeBackend(**kw)


def _start_runtime(device: str, threads: int, sync_launch: bool) -> tuple[Any, Any]:
    """Import mindspore and apply the process-wide settings once; returns (mindspore, ascend.ms_kernels)."""
    if _RUNTIME:
        if _RUNTIME["device"] != device:
            raise RuntimeError(f"MindSpore already runs on {_RUNTIME['device']} in this process; "
                               f"one device target per process")
        return _RUNTIME["ms"], _RUNTIME["kernels"]
    # MindSpore's C++ logs warnings to stderr by default; stderr is the CLI's log channel
    os.environ.setdefault("GLOG_v", "3")
    try:
        import mindspore as ms
    except Exception as e:  # noqa: BLE001 - a broken install fails with ImportError, OSError, RuntimeError
        raise BackendUnavailable(f"mindspore failed to import ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if device != "cpu":
        # the Ascend primitives' signatures and limits (MC2 in the SoC table) were read from this release
        from . import versions

        if not versions.mindspore_supported(ms.__version__):
            raise BackendUnavailable(f"mindspore {ms.__version__} is not supported on Ascend (supported: "
                                     f"{', '.join(versions.MINDSPORE_SUPPORTED)}); {INSTALL_HINT}")
    ms.set_device(DEVICES[device])
    if device == "cpu":
        if sync_launch:
            # the asynchronous launch pipeline's worker threads fight the compute for cores: synchronous
            # launch measured ~6x faster per op on a 2-core machine (40 vs 250 us for a small add)
            ms.runtime.launch_blocking()
        # the default of 25 kernel threads thrashes on small decode-sized kernels (see bench_mindspore.py)
        ms.device_context.cpu.op_tuning.threads_num(threads)
    _absorb_numpy_abi_probe(ms)
    from . import ms_kernels

    _RUNTIME.update(device=device, ms=ms, kernels=ms_kernels)
    return ms, ms_kernels


def _absorb_numpy_abi_probe(ms: Any) -> None:
    """MindSpore 2.10's C++ is built against NumPy 1.x. Under NumPy 2 its first op fails once with SystemError
    (the NumPy C-API import is refused and the error is left set); afterwards Tensor <-> ndarray conversion
    works and only NumPy *scalars* are refused as op arguments (this backend passes Python scalars). Take
    that one failure here, with NumPy's long message muted, so no model op sees it."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            (ms.Tensor(np.ones(1, np.float32)) * 2.0).asnumpy()
        except SystemError:
            pass


def _ascend_soc(ms: Any) -> str:
    from mindspore._c_expression import MSContext

    version = str(MSContext.get_instance().get_ascend_soc_version()).lower()  # e.g. ascend910b, ascend910_93
    for key, soc in (("910_93", socmod.A3), ("910c", socmod.A3), ("910b", socmod.A2), ("950", socmod.A5),
                     ("910_95", socmod.A5)):
        if key in version:
            return soc
    raise RuntimeError(f"unknown Ascend SoC {version!r}; pass MindSporeBackend(soc=...), one of {list(socmod.SOCS)}")


class _W8A8:
    """A W8A8 weight on the device: integer values for the emulated GEMM (float32, or float64 when K > 1024)
    or int8 for QuantBatchMatmul, and the per-channel scale."""

    def __init__(self, w: Q.W8A8Weight, tensor: Callable[[np.ndarray], Any], as_int8: bool):
        N, K = w.shape
        self.shape = (N, K)
        q = w.qweight if as_int8 else w.qweight.astype(np.float32 if K * 2**14 <= 2**24 else np.float64)
        self.q = tensor(q)
        self.scale = tensor(w.scale)
        self.source = w


class _W4A8:
    """A W4A8 weight on the device: unpacked int4 values grouped [G, N, group] and the scales [G, N]."""

    def __init__(self, w: Q.W4A8Weight, tensor: Callable[[np.ndarray], Any]):
        N, K = w.shape
        gs = w.group_size
        self.shape = (N, K)
        vals = Q.unpack_int4(w.qweight).reshape(N, K // gs, gs).transpose(1, 0, 2)
        self.q = tensor(vals.astype(np.float32 if gs * 2**14 <= 2**24 else np.float64))
        self.scale = tensor(w.scale.T)
        self.source = w


class MindSporeBackend(AttentionKernels):
    """The op contract on MindSpore tensors (`device` "cpu" or "ascend").

    jit: compile the static-shape kernels of `ms_kernels.JITTABLE` with `mindspore.jit` for calls of at most
    `jit_max_tokens` rows. threads: CPU kernel threads. expert_parallel: join the msrun job's communication
    group and run MoE across ranks (Ascend only; see ascend/mindspore_comm.py).
    """

    name = "mindspore"

    def __init__(self, device: str = "cpu", jit: bool = True, jit_max_tokens: int = JIT_MAX_TOKENS,
                 threads: int = 1, sync_launch: bool = True, soc: str | None = None,
                 expert_parallel: bool = False):
        device = device.lower()
        if device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
        self.device = device
        self._ms, self._k = _start_runtime(device, threads, sync_launch)
        ms = self._ms
        self._dtypes = {"float32": ms.float32, "int64": ms.int64, "int32": ms.int32, "bool": ms.bool_,
                        "int8": ms.int8, "float16": ms.float16}
        self.soc = soc or (_ascend_soc(ms) if device == "ascend" else None)
        self.providers = (socmod.MINDSPORE, socmod.COMPOSED) if device == "ascend" else (socmod.COMPOSED,)
        self.jit = jit
        self.jit_max_tokens = jit_max_tokens
        self._jitted = {name: ms.jit(fn) for name, fn in self._k.JITTABLE.items()} if jit else {}
        self._variants: dict[str, str] = {}
        self._chosen: dict[str, socmod.Variant] = {}
        for op, table_op in STATIC_OPS.items():
            self._chosen[op] = self._select(op, table_op)
        # id(host object) -> (host object, device form); the host object is kept so the id stays unique
        self._device_forms: dict[int, tuple[Any, Any]] = {}
        self._dense_forms: dict[int, tuple[Any, Any]] = {}
        self._stacks: dict[int, tuple[Any, Any]] = {}
        self._ones: dict[int, Any] = {}
        self.ep = None
        if expert_parallel:
            if device != "ascend":
                raise ValueError("expert parallelism on MindSpore runs on Ascend (HCCL) only")
            from .mindspore_comm import MindSporeEP

            self.ep = MindSporeEP()

    # ---- variant selection ---------------------------------------------------------------------------------------
    def _select(self, op: str, table_op: str, call: dict | None = None) -> socmod.Variant:
        v = socmod.select(table_op, self.soc or socmod.A2, self.providers, call,
                          kernel_problem=lambda var: None if (table_op, var.kernel) in MS_KERNELS
                          else "not implemented by this backend")
        self._variants[op] = v.provider if v.provider == socmod.COMPOSED else f"{v.provider}:{v.kernel}"
        return v

    def variants(self) -> dict[str, str]:
        """Contract op -> the variant it ran as ("composed" or "mindspore:<primitive>"), plus `linear_w8a8`,
        `linear_w4a8`, `moe_gate` and `moe_comm` once such calls happened, and "jit" listing compiled kernels."""
        out = dict(self._variants)
        if self._jitted:
            out["jit"] = ",".join(sorted(self._jitted))
        return out

    def _fused(self, op: str) -> bool:
        return self._chosen[op].provider == socmod.MINDSPORE

    def _run(self, name: str, rows: int, *args: Any) -> Any:
        """A kernel of ms_kernels, jit-compiled when enabled and the call is decode-sized."""
        fn = self._jitted.get(name) if 0 < rows <= self.jit_max_tokens else None
        return (fn or getattr(self._k, name))(*args)

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _tensor(self, a: np.ndarray) -> Any:
        t = self._ms.Tensor.from_numpy(np.ascontiguousarray(a))  # zero-copy, like NumpyBackend.from_numpy
        return t.move_to("Ascend") if self.device == "ascend" else t

    def from_numpy(self, a: Any) -> Any:
        if isinstance(a, self._ms.Tensor):
            return a
        if isinstance(a, (Q.W8A8Weight, Q.W4A8Weight, Q.FP8BlockWeight, Q.FP4Weight)):
            return self._device_weight(a)
        a = np.asarray(a)
        if a.dtype.kind == "f" and a.dtype != np.float32:
            a = a.astype(np.float32)
        return self._tensor(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.asnumpy() if isinstance(x, self._ms.Tensor) else np.asarray(x)

    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> Any:
        return self._ms.ops.zeros(tuple(int(s) for s in shape), self._dtypes[dtype])

    def full(self, shape: tuple[int, ...], value: float, dtype: str = "float32") -> Any:
        v = bool(value) if dtype == "bool" else (float(value) if dtype == "float32" else int(value))
        return self._ms.ops.full(tuple(int(s) for s in shape), v, dtype=self._dtypes[dtype])

    def cat(self, xs: list[Any], axis: int = 0) -> Any:
        return xs[0] if len(xs) == 1 else self._ms.ops.cat(list(xs), axis)

    def arange(self, start: int, stop: int) -> Any:
        # from the host: ops.arange measured ~0.8 ms a call on CPU, a wrapped NumPy range ~10 us
        return self._tensor(np.arange(int(start), int(stop), dtype=np.int64))

    # ---- weights -------------------------------------------------------------------------------------------------
    def _device_weight(self, w: Any) -> Any:
        """The device form of a quantized host weight, converted once (cached by identity)."""
        hit = self._device_forms.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        if isinstance(w, Q.W8A8Weight):
            dev = _W8A8(w, self._tensor, as_int8=self._select_w8a8(w.shape[1]).provider == socmod.MINDSPORE)
        elif isinstance(w, Q.W4A8Weight):
            dev = _W4A8(w, self._tensor)
        else:  # release FP8 / FP4: weight-only formats, dequantized like the reference does
            dev = self._tensor(w.dequantize())
        self._device_forms[id(w)] = (w, dev)
        return dev

    def _select_w8a8(self, k: int) -> socmod.Variant:
        return self._select("linear_w8a8", "linear_w8a8", {"k": k})

    def _dense(self, w: Any) -> Any:
        """A float [N, K] tensor for any weight (quantized ones dequantized, as numpy_ref.dense does)."""
        if isinstance(w, self._ms.Tensor):
            return w
        if isinstance(w, (_W8A8, _W4A8)):
            w = w.source
        hit = self._dense_forms.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        dev = self._tensor(w.dequantize())
        self._dense_forms[id(w)] = (w, dev)
        return dev

    # ---- dense math ----------------------------------------------------------------------------------------------
    def embedding(self, ids: Any, table: Any) -> Any:
        return self._ms.ops.gather(table, ids, 0)

    def rms_norm(self, x: Any, weight: Any | None, eps: float) -> Any:
        if self._fused("rms_norm") and x.shape[0]:
            if weight is None:  # the primitive always takes a gamma
                d = int(x.shape[-1])
                weight = self._ones.setdefault(d, self._tensor(np.ones(d, np.float32)))
            # the primitive, whose (x, gamma) signature stays; ops.rms_norm's is announced to change
            return self._ms.ops.RmsNorm(float(eps))(x, weight)[0]
        return self._run("rms_norm", x.shape[0], x, weight, float(eps))

    def linear(self, x: Any, w: Any) -> Any:
        if isinstance(w, self._ms.Tensor):
            return self._k.matmul_t(x, w)
        if not isinstance(w, (_W8A8, _W4A8)):
            w = self._device_weight(w)
            if isinstance(w, self._ms.Tensor):
                return self._k.matmul_t(x, w)
        lead, K = tuple(x.shape[:-1]), int(x.shape[-1])
        x2 = x.reshape(-1, K)
        if isinstance(w, _W8A8):
            if self._select_w8a8(K).provider == socmod.MINDSPORE:
                y = self._quant_batch_matmul(x2, w)
            else:
                y = self._k.w8a8_matmul(x2, w.q, w.scale)
        else:
            self._variants["linear_w4a8"] = socmod.COMPOSED  # no W4A8 row in the SoC table
            y = self._k.w4a8_matmul(x2, w.q, w.scale)
        return y.reshape(*lead, w.shape[0])

    def _quant_batch_matmul(self, x2: Any, w: _W8A8) -> Any:
        """Ascend: per-token int8 activations (quantized with the reference's rule) x int8 weights, int32
        accumulation and both scales applied inside QuantBatchMatmul; bfloat16 out, as the kernel documents."""
        ms = self._ms
        xq, xs = self._k.act_quant(x2)
        qbmm = ms.ops.auto_generate.QuantBatchMatmul(transpose_x1=False, transpose_x2=True, dtype=ms.bfloat16)
        return qbmm(xq.astype(ms.int8), w.q, w.scale, None, None, xs.reshape(-1)).astype(ms.float32)

    def grouped_linear(self, x: Any, w: Any) -> Any:
        return self._k.grouped_linear(x, self._dense(w))

    def rope_freqs(self, positions: Any, inv_freq: Any) -> tuple[Any, Any]:
        return self._k.rope_freqs(positions, inv_freq)

    def rope(self, x: Any, cos: Any, sin: Any, inverse: bool = False) -> Any:
        return self._run("rope", x.shape[0], x, cos, sin, bool(inverse))

    # ---- mHC -----------------------------------------------------------------------------------------------------
    def hc_pre(self, x, fn, scale, base, iters, hc_eps, norm_eps):
        return self._run("hc_pre", x.shape[0], x, fn, scale, base, int(iters), float(hc_eps), float(norm_eps))

    def hc_post(self, y, x, post, comb):
        return self._run("hc_post", x.shape[0], y, x, post, comb)

    def hc_head(self, x, fn, scale, base, hc_eps, norm_eps):
        return self._run("hc_head", x.shape[0], x, fn, scale, base, float(hc_eps), float(norm_eps))

    # ---- compressed sparse attention -----------------------------------------------------------------------------
    def compress(self, kv: Any, score: Any) -> Any:
        return self._run("compress", kv.shape[0], kv, score)

    def indexer_topk(self, q, weights, keys, q_pos, ratio, topk, scale):
        ms = self._ms
        T, J = int(q.shape[0]), int(keys.shape[0])
        k = min(int(topk), J)
        if k == 0 or T == 0:
            return ms.ops.zeros((T, k), ms.int64)
        jidx = self.arange(0, J).reshape(1, J)
        outs = []
        for a in range(0, T, ATTN_BLOCK):
            b = min(T, a + ATTN_BLOCK)
            score = self._k.indexer_scores(q[a:b], weights[a:b], keys, float(scale))
            visible = (jidx + 1) * int(ratio) <= q_pos[a:b].reshape(-1, 1) + 1
            score = ms.mint.where(visible, score, float("-inf"))
            # ops.sort (descending) keeps equal scores in index order on CPU, the reference's tie rule
            # (checked against np.argsort(kind="stable") in the tests)
            sel = ms.ops.sort(score, axis=-1, descending=True)[1][:, :k].astype(ms.int64)
            ok = ms.ops.gather_elements(visible, 1, sel)
            outs.append(ms.mint.where(ok, sel, -1))
        return self.cat(outs)

    def _attention_masks(self, q_pos, kv_pos, window, n_comp, ratio, comp_sel):
        """Per query block: (a, b, raw key range lo:hi, visible compressed count, mask [rows, keys]) from the
        reference's visibility rules, computed on the host."""
        qp, kp_all = self.to_numpy(q_pos), self.to_numpy(kv_pos)
        sel_all = None if comp_sel is None else self.to_numpy(comp_sel)
        for a in range(0, len(qp), ATTN_BLOCK):
            b = min(len(qp), a + ATTN_BLOCK)
            qb = qp[a:b]
            lo = int(np.searchsorted(kp_all, qb.min() - window + 1, side="left"))
            hi = int(np.searchsorted(kp_all, qb.max(), side="right"))
            kp = kp_all[lo:hi]
            mask = (kp[None, :] <= qb[:, None]) & (kp[None, :] > qb[:, None] - window) & (kp[None, :] >= 0)
            nvis = min(n_comp, int((qb.max() + 1) // ratio)) if n_comp else 0
            if nvis:
                cmask = (np.arange(nvis)[None, :] + 1) * ratio <= qb[:, None] + 1
                if sel_all is not None:
                    picked = np.zeros((b - a, nvis + 1), dtype=bool)
                    sel = sel_all[a:b]
                    np.put_along_axis(picked, np.where((sel >= 0) & (sel < nvis), sel, nvis), True, axis=-1)
                    cmask &= picked[:, :nvis]
                mask = np.concatenate([mask, cmask], axis=1)
            yield a, b, lo, hi, nvis, mask

    def sparse_attention(self, q, q_pos, kv, kv_pos, window, comp, ratio, comp_sel, sinks, scale):
        ms = self._ms
        T = int(q.shape[0])
        if T == 0:
            return ms.ops.zeros(tuple(q.shape), ms.float32)
        n_comp = 0 if comp is None else int(comp.shape[0])
        fused = self._fused("sparse_attention")
        outs = []
        for a, b, lo, hi, nvis, mask in self._attention_masks(q_pos, kv_pos, int(window), n_comp, int(ratio),
                                                              comp_sel):
            keys = kv[lo:hi] if not nvis else ms.ops.cat([kv[lo:hi], comp[:nvis]])
            m = self._tensor(mask)
            if fused:
                outs.append(self._fia_block(q[a:b], keys, m, sinks, float(scale)))
            else:
                outs.append(self._k.attention_block(q[a:b], keys, m, sinks, float(scale)))
        return self.cat(outs)

    def _fia_block(self, q: Any, keys: Any, mask: Any, sinks: Any, scale: float) -> Any:
        """Ascend: FusedInferAttentionScore as MQA over the shared keys (one KV head, BSND, bfloat16), with the
        boolean mask (1 = masked out). FIA has no sink input: with lse = log sum_j exp(s_j) it returns
        o = sum_j e^{s_j} v_j / e^lse, and the sink only adds e^sink to the denominator, so
        o_sink = o * e^lse / (e^lse + e^sink) = o * sigmoid(lse - sink)."""
        ms = self._ms
        t, H, D = (int(s) for s in q.shape)
        S = int(keys.shape[0])
        fia = ms.ops.auto_generate.FusedInferAttentionScore(num_heads=H, scale_value=scale, input_layout="BSND",
                                                            num_key_value_heads=1, softmax_lse_flag=True)
        kv = keys.astype(ms.bfloat16).reshape(1, S, 1, D)
        out, lse = fia(q.astype(ms.bfloat16).reshape(1, t, H, D), [kv], [kv],
                       attn_mask=ms.mint.logical_not(mask).reshape(1, 1, t, S))[:2]
        lse = lse.astype(ms.float32).reshape(H, t).transpose(1, 0)  # [B=1, N, S_q, 1] -> [t, H]
        gate = self._k.sigmoid(lse - sinks.reshape(1, H))
        return out.astype(ms.float32).reshape(t, H, D) * gate.reshape(t, H, 1)

    # ---- mixture of experts --------------------------------------------------------------------------------------
    def moe_gate(self, x, weight, bias, tid2eid, ids, topk, score_func, route_scale, norm_topk_prob):
        ms, k = self._ms, int(topk)
        v = self._select("moe_gate", "moe_gate", {"topk": k, "score_func": score_func})
        if v.provider == socmod.MINDSPORE and bias is None and tid2eid is None and x.shape[0]:
            # MoeGatingTopKSoftmax: softmax over the router logits, then top-k (softmax routers take no bias)
            gating = ms.ops.auto_generate.MoeGatingTopKSoftmax()
            w, idx = gating(self._k.matmul_t(x, weight), None, k=k)[:2]
            return w * float(route_scale), idx.astype(ms.int64)
        if v.provider == socmod.MINDSPORE:
            self._variants["moe_gate"] = socmod.COMPOSED
        scores = self._k.gate_scores(x, weight, score_func)
        if tid2eid is not None:
            idx = ms.ops.gather(tid2eid, ids, 0).astype(ms.int64)
        else:
            choice = scores + bias if bias is not None else scores
            idx = ms.ops.topk(choice, k)[1].astype(ms.int64)  # ops.topk: mint.topk has no CPU kernel
        normalize = bool(norm_topk_prob) and score_func != "softmax"
        return self._k.gate_weights(scores, idx, normalize, float(route_scale)), idx

    def swiglu_mlp(self, x, w1, w3, w2, limit):
        if all(isinstance(w, self._ms.Tensor) for w in (w1, w3, w2)):
            return self._run("swiglu_mlp", x.shape[0], x, w1, w3, w2, float(limit))
        h = self._k.swiglu(self.linear(x, w1), self.linear(x, w3), float(limit))
        return self.linear(h, w2)

    def expert_rows(self, x: Any, w1: Any, w3: Any, w2: Any, wt: Any | None, limit: float) -> Any:
        """One expert's SwiGLU on its rows, times the routing weights wt [rows] (None = 1)."""
        ms = self._ms
        n = int(x.shape[0])
        if wt is None:
            wt = ms.ops.ones((n,), ms.float32)
        if all(isinstance(w, ms.Tensor) for w in (w1, w3, w2)):
            return self._run("expert_ffn", n, x, w1, w3, w2, wt, float(limit))
        h = self._k.swiglu(self.linear(x, w1), self.linear(x, w3), float(limit)) * wt.reshape(-1, 1)
        return self.linear(h, w2)

    def moe_experts(self, x: Any, weights: Any, ids: Any, experts: ExpertWeights, limit: float) -> Any:
        if self.ep is not None and self.ep.size > 1:
            return self.ep.moe(self, x, weights, ids, experts, float(limit))
        ms = self._ms
        T, k = (int(s) for s in ids.shape)
        D = int(x.shape[1])
        if T == 0:
            return ms.ops.zeros((0, D), ms.float32)
        if self._fused("moe_experts") and all(isinstance(w, ms.Tensor) for w in experts.w1):
            return self._moe_experts_fused(x, weights, ids, experts, float(limit))
        # init_routing on the host, as the reference: rows grouped by expert in a stable order
        flat = self.to_numpy(ids).reshape(-1)
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=experts.n_experts)
        # one gather of the permuted rows and weights, per-expert work on contiguous blocks, one gather back
        # (per-row setitem costs ~0.7 ms a call on CPU)
        xs = ms.ops.gather(x, self._tensor(order // k), 0)
        wts = ms.ops.gather(weights.reshape(-1), self._tensor(order), 0)
        outs, start = [], 0
        for e in np.nonzero(counts)[0]:
            n = int(counts[e])
            le = experts.local(int(e))
            if 0 <= le < experts.count:
                outs.append(self.expert_rows(xs[start:start + n], experts.w1[le], experts.w3[le], experts.w2[le],
                                             wts[start:start + n], float(limit)))
            else:  # held by another expert-parallel rank
                outs.append(ms.ops.zeros((n, D), ms.float32))
            start += n
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        ys = ms.ops.gather(self.cat(outs), self._tensor(inverse), 0)
        # finalize_routing: sum each token's k expert outputs
        return ys.reshape(T, k, D).sum(1)

    def _stacked(self, experts: ExpertWeights) -> tuple[Any, Any, Any]:
        """Ascend: the local experts' weights stacked [E, K, N] for GroupedMatmul, built once per layer."""
        key = id(experts)
        hit = self._stacks.get(key)
        if hit is not None and hit[0] is experts:
            return hit[1]
        ms = self._ms
        stacks = tuple(ms.ops.stack([w.transpose(1, 0) for w in ws]) for ws in (experts.w1, experts.w3, experts.w2))
        self._stacks[key] = (experts, stacks)
        return stacks

    def _moe_experts_fused(self, x, weights, ids, experts: ExpertWeights, limit: float) -> Any:
        """Ascend: MoeInitRoutingV2 (permute + per-expert counts) -> GroupedMatmul over the local experts'
        contiguous block of rows with the clamped SwiGLU between -> MoeTokenUnpermute (weighted un-permute).
        Rows of experts held by other ranks stay zero, so the result is the contract's partial sum."""
        ms = self._ms
        T, k = (int(s) for s in ids.shape)
        E = experts.n_experts
        expanded, row_idx, counts = ms.ops.auto_generate.MoeInitRoutingV2()(
            x, ids.astype(ms.int32), 0, 0, E, 0, 2, False)[:3]  # dropless, counts per expert
        c = self.to_numpy(counts).astype(np.int64)
        lo, hi = int(c[: experts.first].sum()), int(c[: experts.first + experts.count].sum())
        out = ms.ops.zeros((T * k, int(x.shape[1])), ms.float32)
        if hi > lo:
            w1, w3, w2 = self._stacked(experts)
            group_list = self._tensor(np.cumsum(c[experts.first: experts.first + experts.count]))
            gmm = ms.ops.auto_generate.GroupedMatmul(split_item=3, group_type=0)
            xs = expanded[lo:hi]
            h = self._k.swiglu(gmm([xs], [w1], None, None, None, None, None, group_list)[0],
                               gmm([xs], [w3], None, None, None, None, None, group_list)[0], limit)
            out[lo:hi] = gmm([h], [w2], None, None, None, None, None, group_list)[0]
        return ms.ops.auto_generate.MoeTokenUnpermute()(out, row_idx, weights)

    # ---- sampling ------------------------------------------------------------------------------------------------
    def sample(self, logits: Any, temperature: float, top_k: int, top_p: float, rng: Any) -> np.ndarray:
        # on the host with the reference's code: the same seed draws the same tokens as --backend cpu
        return sample_numpy(self.to_numpy(logits).astype(np.float32, copy=False), temperature, top_k, top_p, rng)
