"""The torch backend of the op contract, lowered the way it runs on Ascend (`--backend torch`).

Every contract op picks its lowering variant once per (op, call-shape class) from the SoC capability table
(`ascend.soc.select`) and dispatches to the method that implements that variant: a torch_npu kernel
(`self.npu.*`), a CANN custom-op kernel (`self.custom.*`), or a composition of plain torch ops. On an NPU
`self.npu` is the real torch_npu and `self.custom` the installed custom-op package; on CPU the stand-ins
(`ascend.standins.torch_npu`, `ascend.standins.vllm_ascend`) are torch.library ops defined from the real
schemas with the bindings' host-side checks, so this exact lowering code runs, and is held to the real call
signatures, and is checked against the NumPy reference on any machine.

`dtype` is the activation dtype: the tensors between ops and the one handed to the kernels (float32 by
default, the CPU golden; bfloat16 / float16 as deployed, which makes the low-precision-only kernels
selectable; the table's `dtype_in` limits keep each kernel to the dtypes its documentation allows). Weights
stay in the form the loader hands over (`common.checkpoint.load_weights(float_dtype=...)`): bf16 / fp16,
int8 + scales, packed int4 + scales, float32 for the roles the release keeps in float32. float32 is used
inside an op only where the official model computes in float32 (the public ops below): mHC mixes and Sinkhorn,
router scores, RoPE angles and rotation, RMSNorm, compressor pooling, indexer scores, attention softmax and
accumulators with sinks. No float64 anywhere on this path (the NPU has no float64 matmul).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ops.attention_kernels import AttentionKernels
from ops.contract import ExpertWeights
from ops.numpy_ref import ATTN_BLOCK, sample_numpy

from . import soc as S
from . import versions
from .standins import torch_npu as npu_standin
from .standins import vllm_ascend as custom_standin

F32 = torch.float32
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool, "int8": torch.int8}
_KERNEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP_BF16 = np.dtype(ml_dtypes.bfloat16)

# Lowerings this backend implements: table op -> {"provider:kernel": method}. A table variant without an
# entry here is reported as "kernel missing" and skipped (see REASONS for why).
LOWERINGS: dict[str, dict[str, str]] = {
    "rms_norm": {"torch_npu:npu_rms_norm": "_rms_norm_npu", "composed:": "_rms_norm_composed"},
    "rope": {"torch_npu:npu_interleave_rope": "_rope_npu", "composed:": "_rope_composed"},
    "linear_w8a8": {"torch_npu:npu_dynamic_quant+npu_quant_matmul": "_w8a8_dynamic_quant",
                    "torch_npu:npu_quant_matmul": "_w8a8_quant_matmul", "composed:": "_w8a8_composed"},
    "grouped_linear": {"torch_npu:npu_transpose_batchmatmul": "_grouped_linear_npu",
                       "composed:": "_grouped_linear_composed"},
    "hc_pre": {"torch_npu:npu_mhc_pre+npu_mhc_sinkhorn": "_hc_pre_mhc", "custom:npu_hc_pre_v2": "_hc_pre_custom",
               "composed:": "_hc_pre_composed"},
    "hc_post": {"custom:npu_hc_post": "_hc_post_custom", "composed:": "_hc_post_composed"},
    "compress": {"composed:": "_compress_composed"},
    "indexer_topk": {"composed:": "_indexer_topk_composed"},
    "sparse_attention": {"composed:": "_sparse_attention_composed"},
    "compressor": {"custom:compressor": "_compressor_custom", "composed:": "_compressor_composed"},
    "compressor_metadata": {"custom:compressor_metadata": "_compressor_metadata_custom",
                            "composed:": "_compressor_metadata_composed"},
    "lightning_indexer": {"custom:npu_vllm_quant_lightning_indexer": "_lightning_indexer_custom",
                          "composed:": "_lightning_indexer_composed"},
    "sparse_attn_sharedkv": {"custom:npu_sparse_attn_sharedkv": "_sparse_attn_custom",
                             "composed:": "_sparse_attn_composed"},
    "kv_scatter": {"custom:npu_scatter_nd_update_v2": "_kv_scatter_custom", "composed:": "_kv_scatter_composed"},
    "moe_gate": {"custom:moe_gating_top_k_hash": "_moe_gate_custom", "torch_npu:npu_moe_gating_top_k": "_moe_gate_npu",
                 "composed:": "_moe_gate_composed"},
    "moe_experts": {"torch_npu:npu_moe_init_routing_v2+npu_grouped_matmul+npu_moe_finalize_routing": "_moe_experts_npu",
                    "composed:": "_moe_experts_composed"},
    "swiglu": {"torch_npu:npu_swiglu": "_swiglu_npu", "composed:": "_swiglu_composed"},
    "sample": {"composed:": "_sample_composed"},
}
# why a table kernel has no lowering here (shown by `dsv4 doctor`)
REASONS = {
    "custom:inplace_partial_rotary_mul": "not lowered: npu_interleave_rope covers the partial interleaved rope",
    "torch_npu:npu_mhc_post": "not lowered: its doc gives the formula only as an image, so whether h_res is "
                              "applied transposed (V4 uses comb^T) cannot be pinned",
    "torch_npu:npu_lightning_indexer": "not lowered: no cmp_ratio argument (decode only); the int8 _C_ascend "
                                       "kernel covers prefill and decode",
    "custom:npu_kv_quant_sparse_attn_sharedkv": "not lowered: the fp8 KV rows it reads have a golden "
                                                "(ops/compress_epilog.py) but the kernel itself (in-kernel "
                                                "dequant, tile_size 64) has neither golden nor stand-in yet",
    # goldens + stand-ins exist (ops/compress_epilog.py, ascend/standins/v4_attention.py); what is missing is a reader
    "custom:kv_compress_epilog": "not lowered: its fp8 rows (rope bf16 | e4m3 | e8m0 per 64, 640 B for D 512) are "
                                 "read only by npu_kv_quant_sparse_attn_sharedkv, which is not lowered; the paged "
                                 "caches hold act-dtype entries, so it would replace no scatter",
    "custom:indexer_compress_epilog_v2": "not lowered: its uint8 pages (e4m3 keys then float32 scales per block) "
                                         "are read only by the 950 fp8-key npu_vllm_quant_lightning_indexer, which "
                                         "is never selected: the paged cache's index keys are int8 + scale or "
                                         "float (index_key_dtype)",
    "torch_npu:npu_fused_infer_attention_score_v2": "not lowered yet: mask / sink layout of FIA v2 not pinned",
    "torch_npu:npu_top_k_top_p": "not lowered: sampling stays on the host numpy Generator for reproducibility",
}
# contract ops without a table entry: what they run as
UNTABLED = {
    "embedding": "composed:embedding",
    "linear": "composed:matmul",
    "linear_w4a8": "composed:int4 exact emulation",
    "rope_freqs": "composed:cos/sin",
    "hc_head": "composed:",
}
# contract op -> the table ops it goes through
CONTRACT_OPS: dict[str, tuple[str, ...]] = {
    "embedding": ("embedding",), "rms_norm": ("rms_norm",), "linear": ("linear", "linear_w8a8", "linear_w4a8"),
    "grouped_linear": ("grouped_linear",), "rope_freqs": ("rope_freqs",), "rope": ("rope",),
    "hc_pre": ("hc_pre",), "hc_post": ("hc_post",), "hc_head": ("hc_head",), "compress": ("compress",),
    "indexer_topk": ("indexer_topk",), "sparse_attention": ("sparse_attention",), "moe_gate": ("moe_gate",),
    "compressor": ("compressor",), "compressor_metadata": ("compressor_metadata",),
    "lightning_indexer": ("lightning_indexer",), "sparse_attn_sharedkv": ("sparse_attn_sharedkv",),
    "scatter_update": ("kv_scatter",),
    "moe_experts": ("moe_experts", "swiglu"), "swiglu_mlp": ("swiglu",), "sample": ("sample",),
}


def _key(v: S.Variant) -> str:
    return f"{v.provider}:{v.kernel}"


def index_call(cfg: Any, dtype: str, key_dtype: str | None = None) -> dict[str, Any]:
    """The indexer kernel's call quantities for a model (key_dtype: how the index cache holds keys; None = the
    device form for `dtype`: int8 where the activations are fp16 / bf16, as vllm-ascend quantizes them)."""
    if key_dtype is None:
        key_dtype = "int8" if dtype in ("bfloat16", "float16") else dtype
    return {"key_dtype": key_dtype, "heads": cfg.index_n_heads, "head_dim": cfg.index_head_dim,
            "topk": cfg.index_topk, "ratio": 4}


def model_calls(cfg: Any, dtype: str = "float32") -> dict[str, dict[str, Any]]:
    """The call-shape quantities each table op sees when running `cfg` (for `dsv4 doctor`)."""
    return {
        "rms_norm": {"dtype": dtype},
        "rope": {"rope_dim": cfg.rope_dim, "dtype": dtype},
        "linear_w8a8": {"k": cfg.dim, "n": cfg.q_lora_rank, "dtype": dtype},
        "grouped_linear": {"k": cfg.n_heads * cfg.head_dim // cfg.o_groups, "n": cfg.o_lora_rank},
        "hc_pre": {"hc_mult": cfg.hc_mult, "hidden": cfg.dim, "mix": (2 + cfg.hc_mult) * cfg.hc_mult, "dtype": dtype},
        "hc_post": {"hc_mult": cfg.hc_mult, "dtype": dtype},
        "compress": {},
        "indexer_topk": {},
        "sparse_attention": {},
        "compressor": {"ratio": max([r for r in cfg.compress_ratios if r] or [0]), "head_dim": cfg.head_dim,
                       "hidden": cfg.dim, "rope_dim": cfg.rope_dim, "dtype": dtype},
        "compressor_metadata": {},
        "lightning_indexer": index_call(cfg, dtype),
        "sparse_attn_sharedkv": {"heads": cfg.n_heads, "topk": cfg.index_topk, "dtype": dtype},
        "kv_scatter": {},
        "moe_gate": {"topk": cfg.n_activated_experts, "experts": cfg.n_routed_experts, "score_func": cfg.score_func,
                     "hash": any(cfg.hash_layers)},
        "moe_experts": {"hidden": cfg.dim, "topk": cfg.n_activated_experts},
        "swiglu": {"dtype": dtype},
        "sample": {},
    }


@dataclass
class _W8A8:
    wT: torch.Tensor  # int8 [K, N]: the transposed view npu_quant_matmul takes as x2
    scale: torch.Tensor  # float32 [N]


@dataclass
class _W4A8:
    packed: torch.Tensor  # int8 [N, K/2]: two int4 per byte, low nibble first (ops.quant.pack_int4), as stored
    scale: torch.Tensor  # float32 [N, G]
    group_size: int


def _block_view(parts: list[list[torch.Tensor]]) -> torch.Tensor | None:
    """[E, R, K] with expert e = parts[0][e] rows, then parts[1][e] rows, ...: a view when the tensors already sit
    that way in one buffer, else None."""
    first = parts[0][0]
    E, K = len(parts[0]), first.shape[-1]
    rows = [p[0].shape[0] for p in parts]
    R = sum(rows)
    try:
        big = first.as_strided((E, R, K), (R * K, K, 1), first.storage_offset())
    except RuntimeError:  # the buffer does not extend that far
        return None
    for e in range(E):
        r0 = 0
        for p, r in zip(parts, rows, strict=True):
            t = p[e]
            if (t.dtype != first.dtype or t.shape != (r, K) or not t.is_contiguous()
                    or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                    or t.storage_offset() != first.storage_offset() + (e * R + r0) * K):
                return None
            r0 += r
    return big


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """int8 [..., K/2] packed nibbles -> int8 [..., K] in [-8, 7] (ops.quant.unpack_int4 in torch)."""
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)  # arithmetic shift sign-extends
    hi = torch.bitwise_right_shift(p, 4)
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def _is_weight_object(a: Any) -> bool:
    return hasattr(a, "dequantize") and hasattr(a, "fmt") and not isinstance(a, (np.ndarray, torch.Tensor))


INT_GEMM_K = 1024  # K slice whose float32 partial sums are exact: 1024 * 127 * 128 < 2**24 (ops.quant.int_matmul)


def _int_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [K, N] -> int32, npu_quant_matmul's arithmetic from ops an NPU has: float32
    matmuls over K slices of <= INT_GEMM_K (every partial sum an exact float32 integer), summed in int32."""
    K = a.shape[-1]
    acc = None
    for k0 in range(0, max(K, 1), INT_GEMM_K):
        part = torch.matmul(a[..., k0:k0 + INT_GEMM_K].to(F32), b[..., k0:k0 + INT_GEMM_K, :].to(F32)).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def _n_chunks(N: int, n_max: int, align: int = 16) -> list[tuple[int, int]]:
    """[a, b) column ranges of at most n_max (equal, `align`-multiple widths) covering N."""
    if N <= n_max:
        return [(0, N)]
    parts = -(-N // n_max)
    width = -(-N // parts)
    width = min(n_max // align * align, -(-width // align) * align)
    return [(a, min(N, a + width)) for a in range(0, N, width)]


def _act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 exactly as ops.quant.act_quant_per_token: scale = amax/127 (0 -> 1), round half even."""
    amax = x.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else torch.zeros((*x.shape[:-1], 1), device=x.device)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(x / s), -127, 127).to(torch.int8), s


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x * 0.5) + 1.0) * 0.5  # the reference's tanh form


class TorchBackend(AttentionKernels):
    """The op contract on torch tensors, lowered through torch_npu / CANN custom ops / composed torch."""

    name = "torch"

    def __init__(self, device: str = "cpu", soc: str | None = None, providers: Iterable[str] | None = None,
                 dtype: str = "float32", torch_npu_version: str | None = None, kernels: str | None = None):
        """device "cpu" runs the stand-ins (soc simulated, default A2; torch_npu_version the schema version
        simulated, default the primary one of ascend/versions.py); "npu" needs a supported torch_npu with a
        visible NPU and detects the SoC and version. providers defaults to torch_npu + composed, plus custom when
        a custom-op package is installed; kernels="triton" (or "triton" in providers) adds our Triton-Ascend
        kernels (ascend/kernels)."""
        from . import device as devmod

        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_KERNEL_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.kdtype = _KERNEL_DTYPES[dtype]
        self.act = self.kdtype  # activations between ops
        self.act_dtype = dtype  # its name: common.paged_cache holds window keys and compressed entries in it
        self.info = devmod.detect() if device == "npu" else None
        self._stale: set[str] = set()  # torch_npu kernels whose installed schema differs from the kept one
        real_custom = None
        if device == "npu":
            from ops import BackendUnavailable

            npu = devmod.require_torch_npu(BackendUnavailable)
            if not self.info.has_npu:
                raise BackendUnavailable(f"--device npu needs a visible NPU ({self.info.torch_npu_error or 'none'})")
            self.npu: Any = npu
            self.torch_npu_version = versions.supported_torch_npu(getattr(npu, "__version__", None))
            self._stale = {m.split(":", 1)[0] for m in self.info.torch_npu_schema_mismatches}
            self.device = torch.device("npu")
            detected = self.info.soc
            if soc is None and detected is None:
                raise ValueError(f"unknown Ascend chip {self.info.chip!r}; pass soc= explicitly")
            self.soc = soc or detected
            if self.info.custom_kernels:
                real_custom = devmod.RealCustomOps(self.info) or None
        elif device == "cpu":
            self.npu = npu_standin
            if torch_npu_version is not None and versions.supported_torch_npu(torch_npu_version) is None:
                raise ValueError(f"torch_npu_version {torch_npu_version!r}: schemas are kept for "
                                 f"{', '.join(sorted(versions.TORCH_NPU_CANN))}")
            self.torch_npu_version = versions.release(torch_npu_version) or versions.TORCH_NPU_PRIMARY
            self.device = torch.device("cpu")
            self.soc = soc or S.A2
        else:
            raise ValueError(f"device must be 'cpu' or 'npu', got {device!r}")
        if self.soc not in S.SOCS:
            raise ValueError(f"unknown SoC {self.soc!r}; known: {', '.join(S.SOCS)}")
        self.custom: Any = real_custom if real_custom is not None else custom_standin
        if providers is None:
            providers = {S.TORCH_NPU, S.COMPOSED} | ({S.CUSTOM} if real_custom is not None else set())
        providers = frozenset(providers)
        self.providers = providers | _triton_provider("triton" if S.TRITON in providers else kernels, device, self.soc)
        unknown = self.providers - {S.TORCH_NPU, S.CUSTOM, S.COMPOSED, S.TRITON}
        if unknown:
            raise ValueError(f"the torch backend has no provider {sorted(unknown)}")
        self._chosen: dict[tuple[str, tuple], S.Variant] = {}
        self._used: dict[str, list[str]] = {}
        # converted weight objects, keyed weakly by the object: integer forms and dequantized forms
        self._qcache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._dcache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._ecache: dict[int, tuple[ExpertWeights, Any]] = {}
        self._bases: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        self._ones: dict[int, torch.Tensor] = {}

    # ---- variant selection -------------------------------------------------------------------------
    def kernel_problem(self, op: str, v: S.Variant) -> str | None:
        """Why this backend cannot run variant `v` of `op` (None: it can): no lowering here, the provider module
        lacks a kernel, or the provider's schema at its version lacks an op or argument the variant needs."""
        if _key(v) not in LOWERINGS.get(op, {}):
            return REASONS.get(_key(v), "kernel missing")
        if v.provider == S.TRITON:
            from .kernels import available

            return None if available() else "triton-ascend is not installed (pip install -e .[kernels])"
        mod = self.npu if v.provider == S.TORCH_NPU else self.custom
        missing = [k for k in v.kernel.split("+") if not hasattr(mod, k)]
        if missing:
            return f"kernel missing: {', '.join(missing)}"
        stale = [k for k in v.kernel.split("+") if v.provider == S.TORCH_NPU and k in self._stale]
        if stale:
            return f"installed schema of {', '.join(stale)} differs from the checked one (dsv4 doctor)"
        if v.provider == S.TORCH_NPU:
            return versions.kernel_problem(v.kernel, v.requires, self.torch_npu_version)
        return None

    def has_kernel(self, op: str, v: S.Variant) -> bool:
        return self.kernel_problem(op, v) is None

    def _pick(self, op: str, call: Mapping[str, Any]) -> Callable:
        key = (op, tuple(sorted(call.items())))
        v = self._chosen.get(key)
        if v is None:
            v = S.select(op, self.soc, self.providers, call, lambda var: self.kernel_problem(op, var))
            self._chosen[key] = v
        self._note(op, _key(v))
        return getattr(self, LOWERINGS[op][_key(v)])

    def _note(self, op: str, variant: str) -> None:
        used = self._used.setdefault(op, [])
        if variant not in used:
            used.append(variant)

    def variants(self) -> dict[str, str]:
        """op -> "provider:kernel" actually used so far (several call-shape classes: joined with " | ")."""
        return {op: " | ".join(vs) for op, vs in self._used.items()}

    def selections(self) -> dict[tuple[str, tuple], str]:
        """(op, call-shape class) -> "provider:kernel", one entry per class seen."""
        return {k: _key(v) for k, v in self._chosen.items()}

    def plan(self, calls: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, str]]]:
        """For each table op, every variant with chosen / skipped and why, for the given call quantities."""
        return {op: [{k: e[k] for k in ("variant", "status", "reason", "note")}
                     for e in S.explain(op, self.soc, self.providers, calls.get(op, {}),
                                        lambda v, op=op: self.kernel_problem(op, v))] for op in LOWERINGS}

    # ---- plumbing -------------------------------------------------------------------------------------
    def from_numpy(self, a: Any) -> Any:
        """A torch view of a numpy array in its own dtype (no copy on CPU for float32 / bfloat16 / float16 /
        integer arrays; the loader decides each weight's dtype, `names.device_dtype`). float64 becomes float32.
        Quantized weight objects pass through unchanged; they are converted once, on first use."""
        if _is_weight_object(a):
            return a
        if isinstance(a, torch.Tensor):
            return a.to(self.device)
        a = np.asarray(a)
        shared = self._view_of_shared_base(a)
        if shared is not None:
            return shared
        bf16 = a.dtype == _NP_BF16
        if bf16:
            a = a.view(np.int16)  # torch.from_numpy has no ml_dtypes bfloat16: share the bits
        elif a.dtype.kind == "f" and a.dtype not in (np.float32, np.float16) or a.dtype.kind == "V":
            a = a.astype(np.float32)
        if any(s < 0 for s in a.strides):
            a = np.ascontiguousarray(a)
        with warnings.catch_warnings():
            # mmap'd checkpoints are read-only; weights are never written, so sharing the buffer is safe
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(a)
        if bf16:
            t = t.view(torch.bfloat16)
        return t if self.device.type == "cpu" else t.to(self.device)

    def _view_of_shared_base(self, a: np.ndarray) -> torch.Tensor | None:
        """Views into one larger array (e.g. the experts of a layer in one block) become views of ONE tensor made
        from that array, once: they stay one buffer on the device, so grouped kernels can take them stacked
        without a copy (`_stacked`)."""
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        if (root is a or root.dtype != a.dtype or root.nbytes <= a.nbytes or not root.flags.c_contiguous
                or a.dtype.kind not in "fiV" or any(st < 0 for st in a.strides)):
            return None
        hit = self._bases.get(id(root))
        if hit is None or hit[0] is not root:
            hit = self._bases[id(root)] = (root, self.from_numpy(root.reshape(-1)))  # holding root pins its id
        item = a.dtype.itemsize
        offset = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return hit[1].as_strided(a.shape, [st // item for st in a.strides], offset // item)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).cpu().numpy()
        return np.asarray(x)

    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> torch.Tensor:
        return torch.zeros(shape, dtype=_DTYPES[dtype], device=self.device)

    def full(self, shape: tuple[int, ...], value: float, dtype: str = "float32") -> torch.Tensor:
        return torch.full(shape, value, dtype=_DTYPES[dtype], device=self.device)

    def cat(self, xs: list[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=axis)

    def arange(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, dtype=torch.int64, device=self.device)

    def _k(self, x: torch.Tensor) -> torch.Tensor:
        """An activation as the kernels take it (the backend's kernel dtype, contiguous)."""
        return x.to(self.kdtype).contiguous()

    # ---- weights ----------------------------------------------------------------------------------
    def _dense(self, w: Any) -> torch.Tensor:
        """A floating [N, K] tensor for any weight: tensors as loaded; quantized objects dequantize once (cached)
        into the activation dtype, so release FP8 sits on the device as bf16, never widened to float32."""
        if isinstance(w, torch.Tensor):
            return w
        c = self._dcache.get(w)
        if c is None:
            c = self._dcache[w] = self.from_numpy(w.dequantize()).to(self.act)
        return c

    def _w8a8(self, w: Any) -> _W8A8:
        c = self._qcache.get(w)
        if c is None:
            q = self.from_numpy(w.qweight)
            c = self._qcache[w] = _W8A8(q.t(), self.from_numpy(w.scale))
        return c

    def _w4a8(self, w: Any) -> _W4A8:
        c = self._qcache.get(w)
        if c is None:
            c = self._qcache[w] = _W4A8(self.from_numpy(w.qweight), self.from_numpy(w.scale), w.group_size)
        return c

    def _ones_like_last(self, d: int) -> torch.Tensor:
        if d not in self._ones:
            self._ones[d] = torch.ones(d, dtype=F32, device=self.device)
        return self._ones[d]

    # ---- dense math ---------------------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        self._note("embedding", UNTABLED["embedding"])
        return torch.nn.functional.embedding(ids, self._dense(table)).to(self.act)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        # the official RMSNorm computes in float32 and casts back
        return self._pick("rms_norm", {"dtype": self.dtype})(x.to(F32), weight, eps).to(self.act)

    def _rms_norm_npu(self, x, weight, eps):
        if x.numel() == 0:
            return torch.empty_like(x)
        gamma = weight if weight is not None else self._ones_like_last(x.shape[-1])  # V4's weightless q norm
        y, _ = self.npu.npu_rms_norm(self._k(x), gamma.to(self.kdtype), eps)
        return y.to(F32)

    def _rms_norm_composed(self, x, weight, eps):
        y = x * (1.0 / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps))
        return y * weight if weight is not None else y

    def linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            self._note("linear", UNTABLED["linear"])
            return torch.nn.functional.linear(x.to(w.dtype), w).to(self.act)
        fmt = getattr(w, "fmt", None)
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        if fmt == "w8a8":
            y = self._w8a8_linear(x2.to(F32), self._w8a8(w))
        elif fmt == "w4a8":
            self._note("linear_w4a8", UNTABLED["linear_w4a8"])
            y = self._w4a8_composed(x2.to(F32), self._w4a8(w))
        else:  # release FP8/FP4 objects run weight-only: dequantized once
            self._note("linear", UNTABLED["linear"])
            wd = self._dense(w)
            y = torch.nn.functional.linear(x2.to(wd.dtype), wd)
        return y.to(self.act).reshape(*lead, y.shape[-1])

    def _w8a8_linear(self, x: torch.Tensor, q: _W8A8) -> torch.Tensor:
        """W8A8 through the SoC table, N split into slices the integer GEMM takes (npu_quant_matmul: n <= 65535,
        so V4-Pro's wq_b, N = 65536, runs as two slices): per-token activation scales make the slices
        independent, so the result equals one GEMM."""
        K, N = q.wT.shape
        n_max = min((v.limits.get("n_max", N) for v in S.TABLE["linear_w8a8"] if v.provider == S.TORCH_NPU),
                    default=N)
        parts = []
        for a, b in _n_chunks(N, n_max):
            part = q if (a, b) == (0, N) else _W8A8(q.wT[:, a:b], q.scale[a:b])
            parts.append(self._pick("linear_w8a8", {"k": K, "n": b - a, "dtype": self.dtype})(x, part))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _w8a8_quant_matmul(self, x, q: _W8A8):
        if x.shape[0] == 0:
            return torch.zeros((0, q.wT.shape[1]), dtype=F32, device=self.device)
        # npu_dynamic_quant takes fp16/bf16 only, so float32 activations quantize with plain ops (bit-exact
        # with ops.quant); the int32 accumulator comes back and dequantizes in ops.quant's float order
        xq, xs = _act_quant(x)
        acc = self.npu.npu_quant_matmul(xq, q.wT, q.scale, output_dtype=torch.int32)
        return acc.to(F32) * xs * q.scale

    def _w8a8_dynamic_quant(self, x, q: _W8A8):
        if x.shape[0] == 0:
            return torch.zeros((0, q.wT.shape[1]), dtype=F32, device=self.device)
        xq, xs = self.npu.npu_dynamic_quant(self._k(x))
        y = self.npu.npu_quant_matmul(xq, q.wT, q.scale, pertoken_scale=xs, output_dtype=self.kdtype)
        return y.to(F32)

    def _w8a8_composed(self, x, q: _W8A8):
        xq, xs = _act_quant(x)
        return _int_gemm(xq, q.wT).to(F32) * xs * q.scale

    def _w4a8_composed(self, x, q: _W4A8):
        """ops.quant W4A8 arithmetic: int32 accumulator per K group, groups summed in float32 in ascending
        order, then the per-token scale."""
        N, K = q.packed.shape[0], 2 * q.packed.shape[1]
        gs = q.group_size
        xq, xs = _act_quant(x)
        part = torch.zeros((x.shape[0], N), dtype=F32, device=self.device)
        for g in range(K // gs):
            # the weight stays packed on the device; one group is unpacked at a time
            wg = _unpack_int4(q.packed[:, g * gs // 2:(g + 1) * gs // 2])
            acc = _int_gemm(xq[:, g * gs:(g + 1) * gs], wg.t())
            part += acc.to(F32) * q.scale[:, g]
        return part * xs

    def grouped_linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        T, G, K = x.shape
        wd = self._dense(w)
        N = wd.shape[0] // G
        y = self._pick("grouped_linear", {"k": K, "n": N})(x.to(wd.dtype), wd.reshape(G, N, K).transpose(1, 2))
        return y.to(self.act)

    def _grouped_linear_npu(self, x, wt):
        if x.shape[0] == 0:
            return torch.zeros((0, wt.shape[0], wt.shape[2]), dtype=F32, device=self.device)
        # input [M=T, B=G, K] is batch-transposed by perm_x1, output [B, M, N] transposed back by perm_y
        y = self.npu.npu_transpose_batchmatmul(self._k(x), wt.to(self.kdtype), perm_x1=[1, 0, 2], perm_x2=[0, 1, 2],
                                               perm_y=[1, 0, 2])
        return y.to(F32)

    def _grouped_linear_composed(self, x, wt):
        return torch.matmul(x.transpose(0, 1), wt).transpose(0, 1)

    def rope_freqs(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._note("rope_freqs", UNTABLED["rope_freqs"])
        ang = positions.to(F32)[:, None] * inv_freq.to(F32)[None, :]
        return torch.cos(ang), torch.sin(ang)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        # angles and rotation in float32 (official: x.float() rotated, cast back)
        impl = self._pick("rope", {"rope_dim": 2 * cos.shape[-1], "dtype": self.dtype})
        return impl(x.to(F32), cos, sin, inverse).to(self.act)

    def _rope_npu(self, x, cos, sin, inverse):
        if x.shape[0] == 0:
            return x.clone()
        T, half = x.shape[0], cos.shape[-1]
        R, mid = 2 * half, x.shape[1:-1]
        N = math.prod(mid)
        xr = x[..., -R:].reshape(T, N, 1, R)
        # cos/sin per rotate-half position: the pair angle repeated for both halves; [T, 1, 1, R]
        c = torch.cat([cos, cos], dim=-1).reshape(T, 1, 1, R)
        s = torch.cat([sin, sin], dim=-1).reshape(T, 1, 1, R)
        if inverse:
            s = -s
        yh = self.npu.npu_interleave_rope(self._k(xr), self._k(c), self._k(s)).to(F32)
        # the kernel returns the rotate-half layout; back to interleaved pairs
        y = yh.reshape(T, N, 2, half).transpose(-1, -2).reshape(T, *mid, R)
        return torch.cat([x[..., :-R], y], dim=-1) if R < x.shape[-1] else y

    def _rope_composed(self, x, cos, sin, inverse):
        half = cos.shape[-1]
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
        c, s = cos.reshape(shape), sin.reshape(shape)
        if inverse:
            s = -s
        y = x.clone()
        r = x[..., -2 * half:]
        x0, x1 = r[..., 0::2], r[..., 1::2]
        y[..., -2 * half::2] = x0 * c - x1 * s
        y[..., -2 * half + 1::2] = x0 * s + x1 * c
        return y

    # ---- mHC -------------------------------------------------------------------------------------------
    def hc_pre(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
               hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, n, D = x.shape
        call = {"hc_mult": n, "hidden": D, "mix": fn.shape[0], "dtype": self.dtype}
        # mixes, Sinkhorn and the weighted stream sum in float32; y is cast back, post / comb stay float32
        y, post, comb = self._pick("hc_pre", call)(x.to(F32), fn, scale, base, iters, hc_eps, norm_eps)
        return y.to(self.act), post.to(F32), comb.to(F32)

    def _hc_empty(self, x):
        T, n, D = x.shape
        z = torch.zeros
        return (z((0, D), dtype=F32, device=self.device), z((0, n), dtype=F32, device=self.device),
                z((0, n, n), dtype=F32, device=self.device))

    def _hc_pre_mhc(self, x, fn, scale, base, iters, hc_eps, norm_eps):
        if x.shape[0] == 0:
            return self._hc_empty(x)
        h_in, h_post, h_res, *_ = self.npu.npu_mhc_pre(self._k(x), fn, scale, base, norm_eps=norm_eps, hc_eps=hc_eps)
        comb, _, _ = self.npu.npu_mhc_sinkhorn(h_res, eps=hc_eps, num_iters=iters)
        return h_in.to(F32), h_post, comb

    def _hc_pre_custom(self, x, fn, scale, base, iters, hc_eps, norm_eps):
        if x.shape[0] == 0:
            return self._hc_empty(x)
        y, post, comb = self.custom.npu_hc_pre_v2(self._k(x), fn, scale, base, x.shape[1], iters, norm_eps, hc_eps)
        return y.to(F32), post, comb

    def _hc_mixes(self, x, fn, norm_eps):
        T, n, d = x.shape
        xf = x.reshape(T, n * d)
        r = 1.0 / torch.sqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + norm_eps)
        return (xf @ fn.t()) * r

    def _hc_pre_composed(self, x, fn, scale, base, iters, hc_eps, norm_eps):
        T, n, _ = x.shape
        m = self._hc_mixes(x, fn, norm_eps)
        pre = _sigmoid(m[:, :n] * scale[0] + base[:n]) + hc_eps
        post = 2.0 * _sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n])
        comb = (m[:, 2 * n:] * scale[2] + base[2 * n:]).reshape(T, n, n)
        comb = self._softmax(comb, -1) + hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
        return torch.einsum("tn,tnd->td", pre, x), post, comb

    def hc_post(self, y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        impl = self._pick("hc_post", {"hc_mult": x.shape[1], "dtype": self.dtype})
        return impl(y.to(F32), x.to(F32), post, comb).to(self.act)

    def _hc_post_custom(self, y, x, post, comb):
        if x.shape[0] == 0:
            return torch.empty_like(x)
        # the binding takes x [b, s, d], residual [b, s, hc, d], post [b, s, hc], comb [b, s, hc, hc]
        # (vllm-ascend csrc/torch_binding.cpp check_hc_post_shape_and_dtype); the T tokens are one batch row
        out = self.custom.npu_hc_post(self._k(y)[None], self._k(x)[None], post[None], comb[None])
        return out[0].to(F32)

    def _hc_post_composed(self, y, x, post, comb):
        return post[:, :, None] * y[:, None, :] + torch.matmul(comb.transpose(1, 2), x)

    def hc_head(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float,
                norm_eps: float) -> torch.Tensor:
        self._note("hc_head", UNTABLED["hc_head"])
        x = x.to(F32)
        m = self._hc_mixes(x, fn, norm_eps)
        pre = _sigmoid(m * scale[0] + base) + hc_eps
        return torch.einsum("tn,tnd->td", pre, x).to(self.act)

    # ---- compressed sparse attention ------------------------------------------------------------------
    @staticmethod
    def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
        e = torch.exp(x - torch.amax(x, dim=dim, keepdim=True))
        return e / torch.sum(e, dim=dim, keepdim=True)

    def compress(self, kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return self._pick("compress", {})(kv.to(F32), score.to(F32)).to(self.act)  # pooling in float32

    def _compress_composed(self, kv, score):
        if kv.shape[0] == 0:
            return torch.zeros((0, kv.shape[2]), dtype=F32, device=self.device)
        return torch.sum(kv * self._softmax(score, 1), dim=1)

    def indexer_topk(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor,
                     ratio: int, topk: int, scale: float) -> torch.Tensor:
        impl = self._pick("indexer_topk", {"topk": topk})
        return impl(q.to(F32), weights.to(F32), keys.to(F32), q_pos, ratio, topk, scale)  # scores in float32

    def _indexer_topk_composed(self, q, weights, keys, q_pos, ratio, topk, scale):
        T, J = q.shape[0], keys.shape[0]
        k = min(topk, J)
        out = torch.empty((T, k), dtype=torch.int64, device=self.device)
        if k == 0 or T == 0:
            return out
        jidx = torch.arange(J, device=self.device)
        for a in range(0, T, ATTN_BLOCK):
            b = min(T, a + ATTN_BLOCK)
            qb = q[a:b]
            s = torch.relu(torch.matmul(qb.reshape(-1, qb.shape[-1]), keys.t()).reshape(b - a, qb.shape[1], J))
            score = torch.einsum("thj,th->tj", s, weights[a:b]) * scale
            visible = (jidx[None, :] + 1) * ratio <= q_pos[a:b, None] + 1
            score = torch.where(visible, score, float("-inf"))
            # stable: equal scores resolve to the lower entry index, as the reference
            sel = torch.sort(-score, dim=-1, stable=True).indices[:, :k]
            ok = torch.gather(visible, 1, sel)
            out[a:b] = torch.where(ok, sel, -1)
        return out

    def sparse_attention(self, q: torch.Tensor, q_pos: torch.Tensor, kv: torch.Tensor, kv_pos: torch.Tensor,
                         window: int, comp: torch.Tensor | None, ratio: int, comp_sel: torch.Tensor | None,
                         sinks: torch.Tensor, scale: float) -> torch.Tensor:
        call = {"heads": q.shape[1], "topk": 0 if comp_sel is None else comp_sel.shape[1]}
        # scores, softmax with sinks and the accumulator in float32; the output is cast back
        out = self._pick("sparse_attention", call)(q.to(F32), q_pos, kv.to(F32), kv_pos, window,
                                                    None if comp is None else comp.to(F32), ratio, comp_sel,
                                                    sinks.to(F32), scale)
        return out.to(self.act)

    def _sparse_attention_composed(self, q, q_pos, kv, kv_pos, window, comp, ratio, comp_sel, sinks, scale):
        T, H, D = q.shape
        out = torch.empty_like(q)
        n_comp = 0 if comp is None else comp.shape[0]
        sinks = sinks.to(F32)
        for a in range(0, T, ATTN_BLOCK):
            b = min(T, a + ATTN_BLOCK)
            qp = q_pos[a:b]
            qmin, qmax = int(qp.min()), int(qp.max())
            # raw keys any query of this block can see (kv_pos is ascending)
            lo = int(torch.searchsorted(kv_pos, torch.tensor(qmin - window + 1, device=kv_pos.device)))
            hi = int(torch.searchsorted(kv_pos, torch.tensor(qmax, device=kv_pos.device), right=True))
            keys, kp = kv[lo:hi], kv_pos[lo:hi]
            mask = (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - window) & (kp[None, :] >= 0)
            if n_comp:
                nvis = min(n_comp, (qmax + 1) // ratio)
                if nvis:
                    cj = torch.arange(nvis, device=self.device)
                    cmask = (cj[None, :] + 1) * ratio <= qp[:, None] + 1
                    if comp_sel is not None:
                        picked = torch.zeros((b - a, nvis + 1), dtype=torch.bool, device=self.device)
                        sel = comp_sel[a:b]
                        sel = torch.where((sel >= 0) & (sel < nvis), sel, nvis)
                        picked.scatter_(1, sel, True)
                        cmask = cmask & picked[:, :nvis]
                    keys = torch.cat([keys, comp[:nvis]], dim=0)
                    mask = torch.cat([mask, cmask], dim=1)
            qb = q[a:b].reshape(-1, D)
            s = torch.matmul(qb, keys.t()).reshape(b - a, H, -1) * scale
            s = torch.where(mask[:, None, :], s, float("-inf"))
            smax = s.amax(dim=-1) if s.shape[-1] else torch.full((b - a, H), float("-inf"), device=self.device)
            m = torch.maximum(smax, sinks[None, :])
            p = torch.exp(s - m[..., None])
            denom = torch.sum(p, dim=-1) + torch.exp(sinks[None, :] - m)
            o = torch.matmul(p.reshape(-1, keys.shape[0]), keys).reshape(b - a, H, D)
            out[a:b] = o / denom[..., None]
        return out

    # ---- the V4 attention-side kernels (ops/attention_kernels.py argument lists) -------------------------
    def _variant(self, op: str, call: Mapping[str, Any]) -> S.Variant:
        key = (op, tuple(sorted(call.items())))
        v = self._chosen.get(key)
        if v is None:
            v = S.select(op, self.soc, self.providers, call, lambda var: self.kernel_problem(op, var))
            self._chosen[key] = v
        return v

    def _vendor(self, op: str, call: Mapping[str, Any]) -> bool:
        return self._variant(op, call).provider != S.COMPOSED

    def index_key_dtype(self, cfg: Any) -> str:
        """How the index cache should hold keys for this backend: "int8" when the int8 indexer kernel is the
        variant for `cfg` (keys then go through npu_dynamic_quant + scatter), else the activation dtype."""
        kd = "int8" if self._vendor("lightning_indexer", index_call(cfg, self.dtype, "int8")) else self.dtype
        self._index_keys = kd  # the indexer metadata op selects with the same call as the indexer
        return kd

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row int8 over the last axis: (int8 like x, float32 scale x.shape[:-1]) (npu_dynamic_quant)."""
        if self.dtype in ("bfloat16", "float16") and x.numel():
            shape = x.shape
            q, sc = self.npu.npu_dynamic_quant(self._k(x).reshape(-1, shape[-1]))
            return q.reshape(shape), sc.to(F32).reshape(shape[:-1])
        q, sc = _act_quant(x.to(F32))
        return q, sc[..., 0]

    def scatter_update(self, cache: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
        return self._pick("kv_scatter", {})(cache, slot_mapping, x)

    def _kv_scatter_composed(self, cache, slot_mapping, x):
        return AttentionKernels.scatter_update(self, cache, slot_mapping, x)

    def _kv_scatter_custom(self, cache, slot_mapping, x):
        # A2/A3 (device_op.dsa_kv_compress_scatter): (block, offset) indices into [blocks, bs, ...]
        sm = slot_mapping.to(torch.int64)
        if sm.dim() == 1:
            bs = cache.shape[1]
            sm = torch.stack([torch.where(sm >= 0, sm // bs, -1), sm % bs], dim=1)
        self.custom.npu_scatter_nd_update_v2(cache, sm.to(torch.int32), x.to(cache.dtype).contiguous())

    def compressor_metadata(self, rope_cos, rope_sin, cu_seqlens, start_pos, kv_block_table, kv_block_size,
                            slot_mapping_format, compress_ratio, num_compressed_tokens, num_reqs_actual):
        return self._pick("compressor_metadata", {})(rope_cos, rope_sin, cu_seqlens, start_pos, kv_block_table,
                                                     kv_block_size, slot_mapping_format, compress_ratio,
                                                     num_compressed_tokens, num_reqs_actual)

    def _compressor_metadata_composed(self, *args):
        return AttentionKernels.compressor_metadata(self, *args)

    def _compressor_metadata_custom(self, rope_cos, rope_sin, cu_seqlens, start_pos, kv_block_table, *rest):
        i32 = torch.int32
        return self.custom.compressor_metadata(self._k(rope_cos), self._k(rope_sin), cu_seqlens.to(i32),
                                               start_pos.to(i32), kv_block_table.to(i32), *rest)

    def compressor(self, x, wkv, wgate, state_cache, ape, norm_weight, rope_sin, rope_cos, state_block_table,
                   cu_seqlens, seqused, start_pos, rope_head_dim, cmp_ratio, coff, norm_eps, rotary_mode, cache_mode):
        call = {"ratio": cmp_ratio, "head_dim": norm_weight.shape[0], "hidden": x.shape[-1],
                "rope_dim": rope_head_dim, "dtype": self.dtype}
        return self._pick("compressor", call)(x, wkv, wgate, state_cache, ape, norm_weight, rope_sin, rope_cos,
                                              state_block_table, cu_seqlens, seqused, start_pos, rope_head_dim,
                                              cmp_ratio, coff, norm_eps, rotary_mode, cache_mode)

    def _compressor_composed(self, *args):
        return AttentionKernels.compressor(self, *args)

    def _compressor_custom(self, x, wkv, wgate, state_cache, ape, norm_weight, rope_sin, rope_cos,
                           state_block_table, cu_seqlens, seqused, start_pos, *attrs):
        i32 = torch.int32
        R = rope_sin.shape[-1]
        out = self.custom.compressor(
            self._k(x), self._dense(wkv).to(self.kdtype), self._dense(wgate).to(self.kdtype), state_cache,
            ape.to(F32), norm_weight.to(self.kdtype), self._k(rope_sin.reshape(-1, R)),
            self._k(rope_cos.reshape(-1, R)), state_block_table.to(i32), cu_seqlens.to(i32),
            None if seqused is None else seqused.to(i32), start_pos.to(i32), *attrs)
        return out.to(self.act)

    def quant_lightning_indexer_metadata(self, num_heads_q, num_heads_k, head_dim, query_quant_mode,
                                         key_quant_mode, **kw):
        call = {"key_dtype": getattr(self, "_index_keys", self.dtype), "heads": num_heads_q, "head_dim": head_dim,
                "topk": kw.get("sparse_count", 2048), "ratio": kw.get("cmp_ratio", 1)}
        if self._variant("lightning_indexer", call).provider == S.CUSTOM:  # its metadata op goes with it
            kw = {k: (v.to(torch.int32) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            return self.custom.npu_vllm_quant_lightning_indexer_metadata(
                num_heads_q, num_heads_k, head_dim, query_quant_mode, key_quant_mode, device="cpu", **kw)
        return AttentionKernels.quant_lightning_indexer_metadata(self, num_heads_q, num_heads_k, head_dim,
                                                                 query_quant_mode, key_quant_mode, **kw)

    def lightning_indexer(self, query, key, weights, query_dequant_scale=None, key_dequant_scale=None,
                          query_quant_mode=0, key_quant_mode=0, actual_seq_lengths_query=None,
                          actual_seq_lengths_key=None, block_table=None, metadata=None, layout_query="BSND",
                          layout_key="BSND", sparse_count=2048, sparse_mode=3, pre_tokens=2**63 - 1,
                          next_tokens=2**63 - 1, cmp_ratio=1, return_value=False):
        kd = "int8" if key.dtype == torch.int8 else self.dtype
        call = {"key_dtype": kd, "heads": query.shape[-2], "head_dim": query.shape[-1], "topk": sparse_count,
                "ratio": cmp_ratio}
        return self._pick("lightning_indexer", call)(
            query, key, weights, query_dequant_scale, key_dequant_scale, query_quant_mode, key_quant_mode,
            actual_seq_lengths_query, actual_seq_lengths_key, block_table, metadata, layout_query, layout_key,
            sparse_count, sparse_mode, pre_tokens, next_tokens, cmp_ratio, return_value)

    def _lightning_indexer_composed(self, query, key, weights, qs, ks, *rest):
        # scores in float32 (the int8 values are exact in it)
        qs, ks = (None if t is None else t.to(F32) for t in (qs, ks))
        return AttentionKernels.lightning_indexer(self, query.to(F32), key.to(F32) if ks is None else key,
                                                  weights.to(F32), qs, ks, *rest)

    def _lightning_indexer_custom(self, query, key, weights, qs, ks, qm, km, asq, ask, bt, meta, *rest):
        i32, f16 = torch.int32, torch.float16
        # A2/A3 (device_op.indexer_quantize_query / prepare_dsa_indexer_*): fp16 weights and scales
        return self.custom.npu_vllm_quant_lightning_indexer(
            query, key, weights.to(f16).contiguous(), qs.to(f16).contiguous(), ks.to(f16).contiguous(), qm, km,
            asq.to(i32), ask.to(i32), bt.to(i32), meta, *rest)

    def sparse_attn_sharedkv_metadata(self, num_heads_q, num_heads_kv, head_dim, **kw):
        call = {"heads": num_heads_q, "topk": kw.get("cmp_topk", 0), "dtype": self.dtype}
        if self._variant("sparse_attn_sharedkv", call).provider == S.CUSTOM:  # its metadata op goes with it
            kw = {k: (v.to(torch.int32) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            return self.custom.npu_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, device="cpu",
                                                                 **kw)
        return AttentionKernels.sparse_attn_sharedkv_metadata(self, num_heads_q, num_heads_kv, head_dim, **kw)

    def sparse_attn_sharedkv(self, q, **kw):
        sel = kw.get("cmp_sparse_indices")
        call = {"heads": q.shape[-2], "topk": 0 if sel is None else sel.shape[-1], "dtype": self.dtype}
        return self._pick("sparse_attn_sharedkv", call)(q, **kw)

    def _sparse_attn_composed(self, q, **kw):
        return AttentionKernels.sparse_attn_sharedkv(self, q, **kw)

    def _sparse_attn_custom(self, q, **kw):
        i32 = torch.int32
        kw = {k: (v.to(i32) if isinstance(v, torch.Tensor) and k not in ("ori_kv", "cmp_kv", "sinks") else v)
              for k, v in kw.items()}
        kw["sinks"] = kw["sinks"].to(F32)
        out, lse = self.custom.npu_sparse_attn_sharedkv(self._k(q), **kw)
        return out.to(self.act), lse

    # ---- mixture of experts ---------------------------------------------------------------------------------
    def moe_gate(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
                 ids: torch.Tensor, topk: int, score_func: str, route_scale: float,
                 norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
        E = weight.shape[0]
        call = {"topk": topk, "experts": E, "score_func": score_func, "hash": tid2eid is not None}
        impl = self._pick("moe_gate", call)
        if x.shape[0] == 0:
            return (torch.zeros((0, topk), dtype=F32, device=self.device),
                    torch.zeros((0, topk), dtype=torch.int64, device=self.device))
        # router scores in float32 (official: x.float() @ gate.weight.float()), like vllm-ascend
        logits = torch.nn.functional.linear(x.to(F32), self._dense(weight).to(F32))
        return impl(logits, bias, tid2eid, ids, topk, score_func, route_scale, norm_topk_prob)

    def _gate_kernel_out(self, y, idx, norm, score_func, route_scale, norm_topk_prob):
        if score_func != "softmax" and not norm_topk_prob:
            # the kernels always renormalize sigmoid / sqrtsoftplus weights; without norm_topk_prob the weights
            # are the raw scores at the chosen ids (norm comes back through out_flag)
            y = torch.gather(norm, 1, idx.to(torch.int64)) * route_scale
        return y.to(F32), idx.to(torch.int64)

    def _moe_gate_npu(self, logits, bias, tid2eid, ids, topk, score_func, route_scale, norm_topk_prob):
        raw = score_func != "softmax" and not norm_topk_prob
        # input_ids / tid2eid only with hash routing: torch-npu 2.9.0's schema has neither argument
        hashed = {"input_ids": ids, "tid2eid": tid2eid} if tid2eid is not None else {}
        y, idx, norm = self.npu.npu_moe_gating_top_k(
            logits, topk, bias=bias, norm_type=0 if score_func == "softmax" else 1, out_flag=raw,
            routed_scaling_factor=route_scale, eps=1e-20, **hashed)
        return self._gate_kernel_out(y, idx, norm, score_func, route_scale, norm_topk_prob)

    def _moe_gate_custom(self, logits, bias, tid2eid, ids, topk, score_func, route_scale, norm_topk_prob):
        raw = score_func != "softmax" and not norm_topk_prob
        norm_type = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}[score_func]
        y, idx, norm = self.custom.moe_gating_top_k_hash(
            logits, topk, bias=bias, input_ids=ids if tid2eid is not None else None, tid2eid=tid2eid, k_group=1,
            group_count=1, routed_scaling_factor=route_scale, eps=1e-20, group_select_mode=1, renorm=0,
            norm_type=norm_type, out_flag=raw)
        return self._gate_kernel_out(y, idx, norm, score_func, route_scale, norm_topk_prob)

    def _moe_gate_composed(self, logits, bias, tid2eid, ids, topk, score_func, route_scale, norm_topk_prob):
        if score_func == "softmax":
            scores = self._softmax(logits, -1)
        elif score_func == "sigmoid":
            scores = _sigmoid(logits)
        else:
            scores = torch.sqrt(torch.logaddexp(torch.zeros_like(logits), logits))
        if tid2eid is not None:
            idx = tid2eid[ids].to(torch.int64)
        else:
            choice = scores + bias if bias is not None else scores
            idx = torch.sort(-choice, dim=-1, stable=True).indices[:, :topk]
        w = torch.gather(scores, 1, idx)
        if norm_topk_prob and score_func != "softmax":
            w = w / (torch.sum(w, dim=-1, keepdim=True) + 1e-20)
        return w * route_scale, idx

    def swiglu_mlp(self, x: torch.Tensor, w1: Any, w3: Any, w2: Any, limit: float) -> torch.Tensor:
        g, u = self.linear(x, w1), self.linear(x, w3)
        h = self._pick("swiglu", {"dtype": self.dtype})(torch.cat([g, u], dim=-1).to(F32), limit)
        return self.linear(h, w2)

    def _clamp_halves(self, gu: torch.Tensor, limit: float) -> torch.Tensor:
        if limit > 0:
            I = gu.shape[-1] // 2
            gu = gu.clone()
            gu[..., :I].clamp_(max=limit)
            gu[..., I:].clamp_(-limit, limit)
        return gu

    def _swiglu_npu(self, gu, limit):
        """Clamped SwiGLU on [.., 2I] = [gate | up]: the clamp runs before the fused op (it has no limit)."""
        if gu.shape[0] == 0:
            return gu[..., : gu.shape[-1] // 2].clone()
        return self.npu.npu_swiglu(self._k(self._clamp_halves(gu, limit)), dim=-1).to(F32)

    def _swiglu_composed(self, gu, limit):
        I = gu.shape[-1] // 2
        g, u = gu[..., :I], gu[..., I:]
        if limit > 0:
            g = torch.clamp(g, max=limit)
            u = torch.clamp(u, -limit, limit)
        return g * _sigmoid(g) * u

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
                    limit: float) -> torch.Tensor:
        """init_routing -> grouped GEMMs with clamped SwiGLU -> finalize_routing, over the local experts
        [experts.first, first + count) only: copies routed elsewhere contribute zero (a partial sum for the
        expert-parallel combine). Tokens may be any rows, e.g. ones received from other ranks."""
        call = {"hidden": x.shape[1], "topk": ids.shape[1]}
        impl = self._pick("moe_experts", call)
        if x.shape[0] == 0 or ids.shape[1] == 0:
            return torch.zeros((x.shape[0], x.shape[1]), dtype=self.act, device=self.device)
        return impl(x, weights.to(F32), ids, experts, limit).to(self.act)

    def _stacked(self, experts: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float experts as one [E, D, 2I] (gate|up) and one [E, I, D] weight (npu_grouped_matmul takes float32
        only as single tensors): transposed views of the buffer they already share (a fused checkpoint tensor,
        a preset's expert block), else of stacked copies made once. None if quantized."""
        hit = self._ecache.get(id(experts))
        if hit is not None and hit[0] is experts:
            return hit[1]
        ws = (experts.w1, experts.w3, experts.w2)
        if not all(isinstance(w, torch.Tensor) for lst in ws for w in lst):
            stacked = None
        else:
            w13 = _block_view([experts.w1, experts.w3])
            if w13 is None:
                w13 = torch.stack([torch.cat([a, b], dim=0) for a, b in zip(experts.w1, experts.w3, strict=True)])
            w2 = _block_view([experts.w2])
            if w2 is None:
                w2 = torch.stack(list(experts.w2))
            stacked = (w13.transpose(1, 2).to(self.kdtype), w2.transpose(1, 2).to(self.kdtype))
        self._ecache[id(experts)] = (experts, stacked)  # holding `experts` keeps its id from being reused
        return stacked

    def _moe_experts_npu(self, x, weights, ids, experts, limit):
        T, K = ids.shape
        first, count = experts.first, experts.count
        # quant_mode explicit: the 2.9.0 wheel defaults it to 0 (static quant), which the kernel does not support
        ex, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            self._k(x), ids.to(torch.int32), expert_num=experts.n_experts, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[first, first + count], row_idx_type=0)
        n = int(counts.sum())  # ex has T*K rows; the first n are the local experts' copies
        if n == 0:  # no copy routed to a local expert
            return torch.zeros((T, x.shape[1]), dtype=F32, device=self.device)
        # routing weight of each expanded row (row_idx maps source copy t*K + j -> expanded row, -1 if remote);
        # it scales the SwiGLU output before the down projection, the reference's order
        ok = row_idx >= 0
        w_exp = torch.zeros(T * K, dtype=F32, device=self.device)
        w_exp[row_idx[ok].to(torch.int64)] = weights.reshape(-1)[ok]
        stacked = self._stacked(experts)
        swiglu = self._pick("swiglu", {"dtype": self.dtype})
        if stacked is not None:
            w13, w2 = stacked
            gu = self.npu.npu_grouped_matmul([ex], [w13], group_list=counts, group_list_type=1, group_type=0,
                                             split_item=3)[0].to(F32)
            h = swiglu(gu, limit) * w_exp[:, None]
            y = self.npu.npu_grouped_matmul([self._k(h)], [w2], group_list=counts, group_list_type=1, group_type=0,
                                            split_item=3)[0]
        else:
            # quantized experts: each local expert's row block through the linear lowering (W8A8: npu_quant_matmul);
            # per-token activation quantization makes row blocks independent, so this equals one grouped GEMM
            exf, parts, a = ex[:n].to(F32), [], 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    rows = exf[a:a + c]
                    gu = torch.cat([self.linear(rows, experts.w1[e]), self.linear(rows, experts.w3[e])], dim=-1)
                    parts.append(self.linear(swiglu(gu, limit) * w_exp[a:a + c, None], experts.w2[e]))
                    a += c
            y = torch.cat(parts + [torch.zeros((T * K - n, x.shape[1]), dtype=F32, device=self.device)], dim=0)
        # finalize_routing takes only drop_pad_mode 0: a column-major map (entry i + j*T is copy j of token i) with
        # every value a valid row. Copies routed to remote experts (-1) read row n, past the local rows and zeroed,
        # so they add nothing. Scales of ones fix K without the `k` argument, which torch-npu 2.9.0 lacks.
        y = self._k(y)
        if n < T * K:
            y[n:] = 0
        dst = torch.where(row_idx >= 0, row_idx, n).reshape(T, K).t().reshape(-1).to(torch.int32)
        ones = torch.ones((T, K), dtype=y.dtype, device=self.device)
        out = self.npu.npu_moe_finalize_routing(y, None, None, None, ones, dst, None, drop_pad_mode=0)
        return out.to(F32)

    def _moe_experts_composed(self, x, weights, ids, experts, limit):
        T, k = ids.shape
        flat = ids.reshape(-1)
        flat = torch.where(flat < 0, experts.n_experts, flat)  # -1 (no expert) sorts last and is skipped
        order = torch.sort(flat, stable=True).indices  # init_routing: copies grouped by expert
        counts = torch.bincount(flat, minlength=experts.n_experts).tolist()
        ys = torch.zeros((T * k, x.shape[1]), dtype=F32, device=self.device)
        wflat = weights.reshape(-1)
        swiglu = self._pick("swiglu", {"dtype": self.dtype})
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = order[start:start + n]
            start += n
            le = experts.local(e)
            if not 0 <= le < experts.count:
                continue  # held by another expert-parallel rank
            xt = x[rows // k]
            gu = torch.cat([self.linear(xt, experts.w1[le]), self.linear(xt, experts.w3[le])], dim=-1)
            ys[rows] = self.linear(swiglu(gu, limit) * wflat[rows][:, None], experts.w2[le])
        return ys.reshape(T, k, x.shape[1]).sum(dim=1)

    # ---- sampling ---------------------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float, rng: Any) -> np.ndarray:
        return self._pick("sample", {})(logits, temperature, top_k, top_p, rng)

    def _sample_composed(self, logits, temperature, top_k, top_p, rng):
        # on the host with the caller's numpy Generator: the same draws as the NumPy reference
        return sample_numpy(self.to_numpy(logits).astype(np.float32), temperature, top_k, top_p, rng)


SIMULATED_PROVIDERS = (S.TORCH_NPU, S.CUSTOM, S.COMPOSED)


def simulated_providers(device: str, soc: str | None, providers: Iterable[str] | None) -> list[str] | None:
    """The providers of a CPU run that names a SoC: as deployed there, torch_npu and vllm-ascend's _C_ascend
    custom ops (their stand-ins here); explicit providers, an NPU or no SoC keep the backend's default."""
    if providers is None and device == "cpu" and soc is not None:
        return list(SIMULATED_PROVIDERS)
    return None if providers is None else list(providers)


def torch_backend(device: str = "cpu", soc: str | None = None, providers: Iterable[str] | None = None,
                  dtype: str = "float32", kernels: str | None = None) -> TorchBackend:
    """Factory used by `ascend.backends.get_backend("torch")`."""
    return TorchBackend(device=device, soc=soc, providers=providers, dtype=dtype, kernels=kernels)


# ---- our Triton-Ascend kernels (ascend/kernels): provider "triton" ---------------------------------------------
def _triton_provider(kernels: str | None, device: str, soc: str) -> frozenset:
    """{"triton"} when asked for (kernels="triton"; on a CPU the kernels then run under triton's interpreter)."""
    if kernels in (None, "default"):
        return frozenset()
    if kernels != "triton":
        raise ValueError(f"kernels must be 'default' or 'triton', got {kernels!r}")
    from .kernels import available, prepare

    if not available():
        from ops import BackendUnavailable

        raise BackendUnavailable("--kernels triton needs triton-ascend: pip install -e .[kernels] in its own venv "
                                 "(see README, 'Our kernels')")
    prepare(interpret=device == "cpu")
    from .kernels import tiles

    tiles.set_soc(soc)  # the launches take this SoC's tile sizes
    return frozenset({S.TRITON})


def _attach_triton_lowerings() -> None:
    from .kernels.lowering import LOWERINGS as TRITON_LOWERINGS

    for op, (kernel, fn) in TRITON_LOWERINGS.items():
        LOWERINGS[op][f"{S.TRITON}:{kernel}"] = f"_{op}_triton"
        setattr(TorchBackend, f"_{op}_triton", fn)


_attach_triton_lowerings()
