"""The SoC capability table: which lowering variant each contract op uses on each Ascend SoC.

One table, read by the torch_npu backend, the MindSpore backend and `dsv4 doctor`. A variant names
its provider (the `torch_npu` wheel, a CANN custom-op package, a MindSpore primitive, or a composition
of plain ops that every SoC runs), the SoCs that ship it, and the limits its documentation states.
Selection walks an op's variants in order and takes the first whose provider is present, whose SoC
list holds the target and whose limits the call satisfies. Sources: shared/spec/ascend_ecosystem.md
section 1 (torch_npu op docs in Ascend/op-plugin, vllm-ascend `_C_ascend` READMEs) and section 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

A2, A3, A5 = "A2", "A3", "950"
SOCS = {
    A2: "Ascend 910B (Atlas 800 A2): 8-card HCCS mesh, PCIe host link",
    A3: "Ascend 910C (Atlas 800 A3): two dies per card, HCCS / UB super-node",
    A5: "Ascend 950PR / 950DT",
}
# expert-parallel token exchange strategies (select_moe_comm picks one per call under "auto")
MOE_COMM_STRATEGIES = ("allgather", "alltoall", "dispatch_combine")
MOE_COMM_CHOICES = ("auto", *MOE_COMM_STRATEGIES)
# chip names reported by the runtime (torch_npu.npu.get_device_name / npu-smi) -> SoC family
SOC_BY_CHIP_PREFIX = (("Ascend910B", A2), ("Ascend910_93", A3), ("Ascend910C", A3), ("Ascend950", A5))

# providers
TORCH_NPU = "torch_npu"  # ops in the torch-npu wheel (CANN aclnn kernels)
CUSTOM = "custom"  # CANN custom-op packages (vllm-ascend _C_ascend, CANN 8.5 custom_ops wheel)
MINDSPORE = "mindspore"  # MindSpore ops.auto_generate primitives (same aclnn kernels)
COMPOSED = "composed"  # plain framework ops (matmul, softmax, gather, ...): runs on every SoC and on CPU
# our Triton-Ascend kernels (ascend/kernels, torch.ops.dsv4): after the vendors' kernels, before compositions
TRITON = "triton"


@dataclass(frozen=True)
class Variant:
    provider: str
    kernel: str  # the function / primitive name; "" for a composition
    socs: tuple[str, ...] = (A2, A3, A5)
    limits: Mapping[str, int | tuple] = field(default_factory=dict)
    note: str = ""
    # "op.arg" the provider's schema must have at the running version (ascend/versions.py kernel_problem)
    requires: tuple[str, ...] = ()
    source: str = ""  # where the limits are documented

    def fits(self, call: Mapping[str, int]) -> str | None:
        """None if the call is within the documented limits, else the first limit it breaks."""
        for key, lim in self.limits.items():
            # the call names the quantity ("topk"); the limit key adds the kind of bound ("topk_max")
            quantity = next((key[: -len(s)] for s in ("_multiple_of", "_max", "_min", "_in") if key.endswith(s)),
                            key)
            if quantity not in call:
                continue
            v = call[quantity]
            if key.endswith("_max") and v > lim:
                return f"{quantity}={v} > {lim}"
            if key.endswith("_min") and v < lim:
                return f"{quantity}={v} < {lim}"
            if key.endswith("_in") and v not in lim:
                return f"{quantity}={v} not in {list(lim)}"
            if key.endswith("_multiple_of") and v % lim:
                return f"{quantity}={v} not a multiple of {lim}"
        return None


_ALL = (A2, A3, A5)

# op -> variants in order of preference. Limit keys: <quantity>_max, <quantity>_in, <quantity>_multiple_of;
# the backend passes the call's quantities (hidden, heads, topk, tokens_per_rank, ...).
TABLE: dict[str, tuple[Variant, ...]] = {
    "rms_norm": (
        Variant(TORCH_NPU, "npu_rms_norm"),
        Variant(MINDSPORE, "RmsNorm"),
        Variant(COMPOSED, ""),
    ),
    "rope": (
        # op-plugin doc: D must be 64 and cos/sin N 1; A2/A3 take fp16/bf16 only, 950 also fp32
        Variant(TORCH_NPU, "npu_interleave_rope", socs=(A2, A3),
                limits={"rope_dim_in": (64,), "dtype_in": ("bfloat16", "float16")},
                note="interleaved pairs on the trailing rope slice"),
        Variant(TORCH_NPU, "npu_interleave_rope", socs=(A5,), limits={"rope_dim_in": (64,)},
                note="interleaved pairs on the trailing rope slice"),
        Variant(CUSTOM, "inplace_partial_rotary_mul", note="vllm-ascend _C_ascend partial rotary"),
        Variant(MINDSPORE, "ApplyRotaryPosEmb"),
        Variant(COMPOSED, ""),
    ),
    "linear_w8a8": (
        # op-plugin docs: npu_dynamic_quant takes fp16/bf16 only; npu_quant_matmul's x1 and x2 last dims <= 65535
        Variant(TORCH_NPU, "npu_dynamic_quant+npu_quant_matmul",
                limits={"k_max": 65535, "n_max": 65535, "dtype_in": ("bfloat16", "float16")},
                note="per-token int8 activations, per-channel int8 weights, int32 accumulate"),
        Variant(TORCH_NPU, "npu_quant_matmul", limits={"k_max": 65535, "n_max": 65535},
                note="float32 activations: per-token int8 quant composed, int32 output, float32 dequant"),
        Variant(MINDSPORE, "QuantBatchMatmul"),
        Variant(COMPOSED, "", note="integer GEMM emulated exactly in float32/float64"),
    ),
    "grouped_linear": (
        Variant(TORCH_NPU, "npu_transpose_batchmatmul", limits={"k_multiple_of": 16, "n_multiple_of": 16},
                note="V4 grouped wo_a einsum"),
        Variant(COMPOSED, ""),
    ),
    "hc_pre": (
        Variant(TORCH_NPU, "npu_mhc_pre+npu_mhc_sinkhorn", socs=(A5,),
                limits={"hc_mult_in": (4, 6, 8), "hidden_multiple_of": 16, "dtype_in": ("bfloat16", "float16")},
                note="torch_npu mHC ops ship for 950 only"),
        # vllm-ascend csrc/torch_binding.cpp:1289-1292,1339-1355 (182b75e): bf16 x, hc 4, D 4096 or 7168, mix 24
        Variant(CUSTOM, "npu_hc_pre_v2", socs=(A2, A3),
                limits={"hc_mult_in": (4,), "hidden_in": (4096, 7168), "mix_in": (24,), "dtype_in": ("bfloat16",)},
                note="x [T, hc, D] or [B, S, hc, D]; hc_fn [24, hc*D]"),
        Variant(TRITON, "dsv4.hc_pre", note="ours: ascend/kernels/mhc_pre.py"),
        Variant(COMPOSED, ""),
    ),
    "hc_post": (
        Variant(TORCH_NPU, "npu_mhc_post", socs=(A5,), limits={"dtype_in": ("bfloat16", "float16")}),
        # check_hc_post_shape_and_dtype (torch_binding.cpp:1240): x [b,s,d], residual [b,s,hc,d], post [b,s,hc]
        Variant(CUSTOM, "npu_hc_post", socs=(A2, A3), note="called with b = 1, s = T"),
        Variant(TRITON, "dsv4.hc_post", note="ours: ascend/kernels/mhc_post.py"),
        Variant(COMPOSED, ""),
    ),
    # the primitives the kernel-granularity ops below compose (every backend's composed path)
    "compress": (Variant(COMPOSED, ""),),
    "indexer_topk": (Variant(COMPOSED, ""),),
    "sparse_attention": (Variant(COMPOSED, ""),),
    # ---- the V4 attention-side kernels (ops/attention_kernels.py; sources: vllm-ascend@182b75e
    # csrc/attention/<op>/README.md and csrc/torch_binding.cpp host checks) ----
    "compressor": (
        # README: A3 and 950 only; D 128/512 with (D, coff, ratio) in C4A / C4Li / C128A; H 1K-10K 512-aligned;
        # rope_head_dim 64; x / weights fp16 or bf16; block_size <= 1024, 16-aligned
        Variant(CUSTOM, "compressor", socs=(A3, A5),
                limits={"ratio_in": (4, 128), "head_dim_in": (128, 512), "hidden_min": 1024, "hidden_max": 10240,
                        "hidden_multiple_of": 512, "rope_dim_in": (64,), "dtype_in": ("bfloat16", "float16")},
                note="fused projections + paged float32 state + pooling + RMSNorm + RoPE",
                source="csrc/attention/compressor/README.md"),
        Variant(TRITON, "dsv4.compressor", note="ours: matmul projections + paged state, then ascend/kernels/"
                                                "compressor.py (pooling, RMSNorm, RoPE) over the gathered groups"),
        Variant(COMPOSED, "", note="A2 has no compressor kernel (README): projections, pooling, norm, rope apart"),
    ),
    "compressor_metadata": (
        Variant(CUSTOM, "compressor_metadata", socs=(A3, A5), note="slot mapping + entry RoPE rows for compressor",
                source="csrc/torch_binding.cpp:887-980"),
        Variant(COMPOSED, ""),
    ),
    "lightning_indexer": (
        # README vllm_quant_lightning_indexer: A2/A3 int8 query / key with fp16 weights and scales; N 64 / 1,
        # D 128; sparse_count [1, 2048]; cmp_ratio 1..128 (powers of 2); 950: fp8 keys, sparse_count 512 only
        Variant(CUSTOM, "npu_vllm_quant_lightning_indexer", socs=(A2, A3),
                limits={"key_dtype_in": ("int8",), "heads_in": (64,), "head_dim_in": (128,), "topk_max": 2048,
                        "ratio_in": (1, 2, 4, 8, 16, 32, 64, 128)},
                note="int8 paged keys + fp16 scales (npu_dynamic_quant + scatter), metadata op",
                source="csrc/attention/vllm_quant_lightning_indexer/README.md"),
        Variant(CUSTOM, "npu_vllm_quant_lightning_indexer", socs=(A5,),
                limits={"key_dtype_in": ("fp8",), "heads_in": (64,), "head_dim_in": (128,), "topk_in": (512,),
                        "ratio_in": (1, 4, 128)},
                note="950: fp8 keys written by indexer_compress_epilog_v2",
                source="csrc/attention/vllm_quant_lightning_indexer/README.md"),
        # torch-npu 2.14.0 npu_lightning_indexer has no cmp_ratio: right-down causal over the compressed keys
        # equals V4's visibility only for one query per sequence (decode)
        Variant(TORCH_NPU, "npu_lightning_indexer", limits={"topk_max": 2048, "q_per_seq_max": 1},
                note="float keys, decode only (no cmp_ratio argument)"),
        # ours take float keys (an int8 index cache would change the selection against the float reference)
        Variant(TRITON, "dsv4.lightning_indexer", limits={"key_dtype_in": ("float32", "bfloat16", "float16")},
                note="ours: ascend/kernels/indexer_score.py + indexer_topk.py over gathered pages"),
        Variant(COMPOSED, ""),
    ),
    "sparse_attn_sharedkv": (
        # README sparse_attn_sharedkv: A2/A3; q heads N1 64; K2 512 when cmp_sparse_indices are given; q / kv
        # fp16 or bf16; cmp_ratio 4 or 128; ori_win_right 0; PA_ND block_size 16-aligned <= 1024
        Variant(CUSTOM, "npu_sparse_attn_sharedkv", socs=(A2, A3),
                limits={"heads_in": (64,), "topk_in": (0, 512), "dtype_in": ("bfloat16", "float16")},
                note="paged window + (selected) compressed keys, sinks, metadata op",
                source="csrc/attention/sparse_attn_sharedkv/README.md"),
        Variant(CUSTOM, "npu_kv_quant_sparse_attn_sharedkv", socs=(A5,), limits={"heads_in": (64,)},
                note="950: fp8 KV (kv_compress_epilog) with tile_size 64, rope_head_dim 64",
                source="vllm_ascend/device/device_op.py (A5 operator)"),
        Variant(TORCH_NPU, "npu_fused_infer_attention_score_v2", note="learnable_sink; masks built by the backend"),
        Variant(TRITON, "dsv4.sparse_attn_sharedkv",
                note="ours: ascend/kernels/sparse_attention.py over gathered pages"),
        Variant(COMPOSED, ""),
    ),
    "kv_scatter": (
        Variant(CUSTOM, "npu_scatter_nd_update_v2", socs=(A2, A3), note="(block, offset) slot mapping",
                source="vllm_ascend/device/device_op.py dsa_kv_compress_scatter"),
        Variant(CUSTOM, "kv_compress_epilog", socs=(A5,), note="950: fp8 quantize + scatter of compressed KV",
                source="csrc/torch_binding.cpp:1437-1482"),
        Variant(CUSTOM, "indexer_compress_epilog_v2", socs=(A5,),
                note="950: fp8 e4m3 + float32 scale quantize + scatter of indexer keys",
                source="csrc/torch_binding.cpp:1703-1711"),
        Variant(COMPOSED, ""),
    ),
    "moe_gate": (
        Variant(CUSTOM, "moe_gating_top_k_hash", limits={"experts_max": 2048},
                note="norm_type 2 = sqrtsoftplus, tid2eid hash routing", source="torch_binding.cpp:737"),
        # hash routing (tid2eid via input_ids) exists only in the torch-npu 2.14.0 schema, not in 2.9.0
        Variant(TORCH_NPU, "npu_moe_gating_top_k",
                limits={"topk_max": 8, "experts_max": 2048, "score_func_in": ("softmax", "sigmoid"),
                        "hash_in": (True,)},
                note="norm_type 0 softmax / 1 sigmoid; tid2eid via input_ids",
                requires=("npu_moe_gating_top_k.tid2eid", "npu_moe_gating_top_k.input_ids")),
        Variant(TORCH_NPU, "npu_moe_gating_top_k",
                limits={"topk_max": 8, "experts_max": 2048, "score_func_in": ("softmax", "sigmoid"),
                        "hash_in": (False,)},
                note="norm_type 0 softmax / 1 sigmoid"),
        Variant(MINDSPORE, "MoeGatingTopKSoftmax", limits={"score_func_in": ("softmax",)}),
        Variant(COMPOSED, ""),
    ),
    "moe_experts": (
        Variant(TORCH_NPU, "npu_moe_init_routing_v2+npu_grouped_matmul+npu_moe_finalize_routing",
                note="permute + histogram, grouped GEMM (group_list counts), weighted un-permute"),
        Variant(MINDSPORE, "MoeInitRoutingV2+GroupedMatmul+MoeTokenUnpermute"),
        Variant(COMPOSED, ""),
    ),
    "swiglu": (
        Variant(TORCH_NPU, "npu_swiglu", note="clamp (swiglu_limit) applied before the fused op"),
        Variant(COMPOSED, ""),
    ),
    # expert-parallel communication strategies (chosen per call, see select_moe_comm). Quantities: ep (group
    # size), hidden, tokens_per_rank (the largest BS), topk, experts, servers, idle_ranks (ranks with BS = 0).
    # torch: op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_distribute_dispatch_v2.md (04f7867),
    # comm_alg "" = fullmesh on A2 / fullmesh_v1 on A3; the doc lists A2 and A3 only (not 950).
    "moe_comm_dispatch_combine": (
        Variant(TORCH_NPU, "npu_moe_distribute_dispatch_v2+npu_moe_distribute_combine_v2", socs=(A2,),
                limits={"ep_in": (2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256), "hidden_max": 7168,
                        "hidden_multiple_of": 32, "tokens_per_rank_max": 256, "topk_max": 16, "experts_max": 1024,
                        "servers_in": (1, 2, 4, 8)},
                note="A2 fullmesh: multi-server MC2 limited to 2/4/8 servers",
                source="torch_npu-npu_moe_distribute_dispatch_v2.md (A2, fullmesh)"),
        Variant(TORCH_NPU, "npu_moe_distribute_dispatch_v2+npu_moe_distribute_combine_v2", socs=(A3,),
                limits={"ep_min": 2, "ep_max": 768, "hidden_min": 1024, "hidden_max": 8192,
                        "tokens_per_rank_max": 512, "topk_max": 16, "experts_max": 1024},
                note="A3 fullmesh_v1; local experts x ep <= 2048",
                source="torch_npu-npu_moe_distribute_dispatch_v2.md (A3, fullmesh_v1)"),
        # MindSpore 2.10 ops.auto_generate moe_distribute_dispatch / moe_distribute_combine docstrings:
        # x_active_mask is reserved (so no idle rank), expert_scales unsupported on 910_93 (the port passes it to
        # dispatch on 910B only), global_bs = 256 * ep on 910B when ranks' BS differ
        Variant(MINDSPORE, "MoeDistributeDispatch+MoeDistributeCombine", socs=(A2,),
                limits={"ep_in": (16, 32, 64), "hidden_max": 7168, "hidden_multiple_of": 32,
                        "tokens_per_rank_max": 256, "topk_max": 8, "experts_max": 256, "servers_in": (1, 2, 4, 8),
                        "idle_ranks_max": 0},
                source="mindspore 2.10 gen_ops_def.py moe_distribute_dispatch docstring (910B)"),
        Variant(MINDSPORE, "MoeDistributeDispatch+MoeDistributeCombine", socs=(A3,),
                limits={"ep_in": (8, 16, 32, 64, 128, 144, 256, 288), "hidden_in": (7168,),
                        "tokens_per_rank_max": 512, "topk_max": 8, "experts_max": 256, "idle_ranks_max": 0},
                source="mindspore 2.10 gen_ops_def.py moe_distribute_dispatch docstring (910_93)"),
    ),
    "moe_comm_alltoall": (
        Variant(TORCH_NPU, "all_to_all_single", note="split sizes from a counts exchange; torch.distributed"),
        Variant(MINDSPORE, "AlltoAllV"),
        Variant(COMPOSED, "all_to_all_single"),
    ),
    "moe_comm_allgather": (
        Variant(TORCH_NPU, "all_gather+reduce_scatter"),
        Variant(MINDSPORE, "AllGather+ReduceScatter"),
        Variant(COMPOSED, "all_gather+all_reduce"),
    ),
    "sample": (
        Variant(TORCH_NPU, "npu_top_k_top_p"),
        Variant(COMPOSED, ""),
    ),
}

class NoVariant(RuntimeError):
    """No variant of an op runs on this SoC with these providers and this call shape."""


def soc_of_chip(chip: str) -> str | None:
    for prefix, soc in SOC_BY_CHIP_PREFIX:
        if chip.startswith(prefix):
            return soc
    return None


def explain(op: str, soc: str, providers: Iterable[str], call: Mapping[str, Any] | None = None,
            kernel_problem: Callable[[Variant], str | None] | None = None) -> list[dict[str, str]]:
    """Every variant of `op`, in order, with status "chosen" (at most one) or "skipped" and why. The rules: the
    provider is present, the SoC ships the variant, the call fits its limits, and `kernel_problem` (the
    backend: lowered? kernel present at this library version?) has no objection."""
    if op not in TABLE:
        raise KeyError(f"no op {op!r} in the SoC table")
    providers = set(providers)
    out, chosen = [], False
    for v in TABLE[op]:
        reason = ""
        if chosen:
            reason = "a preferred variant was chosen"
        elif v.provider not in providers:
            reason = "provider absent"
        elif v.provider != COMPOSED and soc not in v.socs:
            reason = f"not on {soc}"
        else:
            reason = v.fits(call or {}) or ""
            if reason and v.source:
                reason += f" ({v.source})"
            if not reason and v.provider != COMPOSED and kernel_problem is not None:
                reason = kernel_problem(v) or ""
        chosen = chosen or not reason
        out.append({"variant": f"{v.provider}:{v.kernel}", "status": "skipped" if reason else "chosen",
                    "reason": reason, "note": v.note, "index": str(TABLE[op].index(v))})
    return out


def select(op: str, soc: str, providers: Iterable[str], call: Mapping[str, Any] | None = None,
           kernel_problem: Callable[[Variant], str | None] | None = None) -> Variant:
    """The variant `explain` chooses; NoVariant listing why each was skipped."""
    rows = explain(op, soc, providers, call, kernel_problem)
    for row in rows:
        if row["status"] == "chosen":
            return TABLE[op][int(row["index"])]
    raise NoVariant(f"{op} on {soc}: no usable variant; tried " + "; ".join(
        f"{r['variant']} ({r['reason']})" for r in rows))


def moe_comm_call(ep_size: int, tokens_per_rank: int, hidden: int, topk: int, experts: int | None = None,
                  servers: int = 1, idle_ranks: int = 0) -> dict[str, int]:
    call = {"ep": ep_size, "hidden": hidden, "tokens_per_rank": tokens_per_rank, "topk": topk, "servers": servers,
            "idle_ranks": idle_ranks}
    if experts is not None:
        call["experts"] = experts
    return call


def explain_moe_comm(soc: str, providers: Iterable[str], ep_size: int, tokens_per_rank: int, hidden: int,
                     topk: int, experts: int | None = None, servers: int = 1,
                     idle_ranks: int = 0) -> tuple[str, list[dict[str, str]]]:
    """The expert-parallel strategy and, when it is not dispatch/combine, why each MC2 variant was refused:
    allgather without EP, dispatch/combine (MC2) within its documented limits, all-to-all beyond them
    (vllm-ascend's select_moe_comm_method, without its LoRA/310P cases)."""
    if ep_size <= 1:
        return "allgather", [{"variant": "moe_comm", "status": "chosen", "reason": "no expert parallelism"}]
    rows = explain("moe_comm_dispatch_combine", soc, providers,
                   moe_comm_call(ep_size, tokens_per_rank, hidden, topk, experts, servers, idle_ranks))
    return ("dispatch_combine" if any(r["status"] == "chosen" for r in rows) else "alltoall"), rows


def select_moe_comm(soc: str, providers: Iterable[str], ep_size: int, tokens_per_rank: int, hidden: int,
                    topk: int, servers: int = 1, experts: int | None = None, idle_ranks: int = 0) -> str:
    """The expert-parallel strategy (see explain_moe_comm)."""
    return explain_moe_comm(soc, providers, ep_size, tokens_per_rank, hidden, topk, experts, servers, idle_ranks)[0]
