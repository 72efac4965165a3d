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

A2, A3, A5 = "A2", "A3", "950"
SOCS = {
    A2: "Ascend 910B (Atlas 800 A2): 8-card HCCS mesh, PCIe host link",
    A3: "Ascend 910C (Atlas 800 A3): two dies per card, HCCS / UB super-node",
    A5: "Ascend 950PR / 950DT",
}
# chip names reported by the runtime (torch_npu.npu.get_device_name / npu-smi) -> SoC family
SOC_BY_CHIP_PREFIX = (("Ascend910B", A2), ("Ascend910_93", A3), ("Ascend910C", A3), ("Ascend950", A5))

# providers
TORCH_NPU = "torch_npu"  # ops in the torch-npu wheel (CANN aclnn kernels)
CUSTOM = "custom"  # CANN custom-op packages (vllm-ascend _C_ascend, CANN 8.5 custom_ops wheel)
MINDSPORE = "mindspore"  # MindSpore ops.auto_generate primitives (same aclnn kernels)
COMPOSED = "composed"  # plain framework ops (matmul, softmax, gather, ...): runs on every SoC and on CPU
# our Triton-Ascend kernels (ascend/kernels, torch.ops.dsv4): after the vendors' kernels, before compositions
TRITON = "triton"
PROVIDERS = (TORCH_NPU, CUSTOM, MINDSPORE, TRITON, COMPOSED)


@dataclass(frozen=True)
class Variant:
    provider: str
    kernel: str  # the function / primitive name; "" for a composition
    socs: tuple[str, ...] = (A2, A3, A5)
    limits: Mapping[str, int | tuple] = field(default_factory=dict)
    note: str = ""

    def fits(self, call: Mapping[str, int]) -> str | None:
        """None if the call is within the documented limits, else the first limit it breaks."""
        for key, lim in self.limits.items():
            # the call names the quantity ("topk"); the limit key adds the kind of bound ("topk_max")
            quantity = next((key[: -len(s)] for s in ("_multiple_of", "_max", "_in") if key.endswith(s)), key)
            if quantity not in call:
                continue
            v = call[quantity]
            if key.endswith("_max") and v > lim:
                return f"{quantity}={v} > {lim}"
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
        Variant(CUSTOM, "npu_hc_pre_v2", socs=(A2, A3), limits={"hc_mult_in": (4,), "dtype_in": ("bfloat16",)}),
        Variant(TRITON, "dsv4.hc_pre"),
        Variant(COMPOSED, ""),
    ),
    "hc_post": (
        Variant(TORCH_NPU, "npu_mhc_post", socs=(A5,), limits={"dtype_in": ("bfloat16", "float16")}),
        Variant(CUSTOM, "npu_hc_post", socs=(A2, A3)),
        Variant(TRITON, "dsv4.hc_post"),
        Variant(COMPOSED, ""),
    ),
    "compress": (
        Variant(CUSTOM, "compressor", socs=(A3, A5), limits={"ratio_in": (4, 128)},
                note="vllm-ascend README: A3 and 950 only"),
        Variant(TRITON, "dsv4.compress"),
        Variant(COMPOSED, ""),
    ),
    "indexer_topk": (
        Variant(CUSTOM, "npu_vllm_quant_lightning_indexer", socs=(A2, A3, A5), limits={"topk_max": 2048}),
        Variant(TORCH_NPU, "npu_lightning_indexer", limits={"topk_max": 2048}),
        Variant(TRITON, "dsv4.indexer_topk"),
        Variant(COMPOSED, ""),
    ),
    "sparse_attention": (
        Variant(CUSTOM, "npu_sparse_attn_sharedkv", socs=(A2, A3), limits={"heads_in": (64,), "topk_max": 512},
                note="README: q heads 64 only, top-k 512"),
        Variant(TORCH_NPU, "npu_fused_infer_attention_score_v2", note="learnable_sink; masks built by the backend"),
        Variant(TRITON, "dsv4.sparse_attention"),
        Variant(COMPOSED, ""),
    ),
    "moe_gate": (
        Variant(CUSTOM, "moe_gating_top_k_hash", note="norm_type 2 = sqrtsoftplus, tid2eid hash routing"),
        Variant(TORCH_NPU, "npu_moe_gating_top_k",
                limits={"topk_max": 8, "experts_max": 2048, "score_func_in": ("softmax", "sigmoid")},
                note="norm_type 0 softmax / 1 sigmoid; tid2eid via input_ids"),
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
    # expert-parallel communication strategies (chosen per token count, see select_moe_comm)
    "moe_comm_dispatch_combine": (
        Variant(TORCH_NPU, "npu_moe_distribute_dispatch_v2+npu_moe_distribute_combine_v2", socs=(A2,),
                limits={"hidden_max": 7168, "hidden_multiple_of": 32, "tokens_per_rank_max": 256, "topk_max": 8,
                        "servers_in": (1, 2, 4, 8)},
                note="A2: multi-server MC2 limited to 2/4/8 servers"),
        Variant(TORCH_NPU, "npu_moe_distribute_dispatch_v2+npu_moe_distribute_combine_v2", socs=(A3, A5),
                limits={"hidden_max": 7168, "hidden_multiple_of": 32, "tokens_per_rank_max": 512, "topk_max": 8}),
        Variant(MINDSPORE, "MoeDistributeDispatch+MoeDistributeCombine",
                limits={"tokens_per_rank_max": 256, "topk_max": 8}),
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

# Default HCCL buffer per communication domain (MB); MC2 ops carve their window out of it.
HCCL_BUFFSIZE_DEFAULT_MB = 200


class NoVariant(RuntimeError):
    """No variant of an op runs on this SoC with these providers and this call shape."""


def soc_of_chip(chip: str) -> str | None:
    for prefix, soc in SOC_BY_CHIP_PREFIX:
        if chip.startswith(prefix):
            return soc
    return None


def select(op: str, soc: str, providers: Iterable[str], call: Mapping[str, int] | None = None,
           has_kernel: Callable[[Variant], bool] | None = None) -> Variant:
    """First variant of `op` that the SoC ships, a present provider offers, and the call fits."""
    if op not in TABLE:
        raise KeyError(f"no op {op!r} in the SoC table")
    providers = set(providers)
    why = []
    for v in TABLE[op]:
        if v.provider not in providers:
            why.append(f"{v.provider}:{v.kernel or 'composed'} (provider absent)")
            continue
        if v.provider != COMPOSED and soc not in v.socs:
            why.append(f"{v.provider}:{v.kernel} (not on {soc})")
            continue
        broken = v.fits(call or {})
        if broken:
            why.append(f"{v.provider}:{v.kernel} ({broken})")
            continue
        if has_kernel is not None and v.provider != COMPOSED and not has_kernel(v):
            why.append(f"{v.provider}:{v.kernel} (kernel missing)")
            continue
        return v
    raise NoVariant(f"{op} on {soc}: no usable variant; tried " + "; ".join(why))


def select_moe_comm(soc: str, providers: Iterable[str], ep_size: int, tokens_per_rank: int, hidden: int,
                    topk: int, servers: int = 1) -> str:
    """The expert-parallel strategy: allgather without EP, dispatch/combine (MC2) within its limits,
    all-to-all beyond them (vllm-ascend's select_moe_comm_method, without its LoRA/310P cases)."""
    if ep_size <= 1:
        return "allgather"
    call = {"hidden": hidden, "tokens_per_rank": tokens_per_rank, "topk": topk, "servers": servers}
    try:
        v = select("moe_comm_dispatch_combine", soc, providers, call)
        if v.provider != COMPOSED:
            return "dispatch_combine"
    except NoVariant:
        pass
    return "alltoall"
