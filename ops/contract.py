"""The op contract: what every backend implements, one method per fused Ascend-sized op.

Layouts follow the Ascend TND convention: tokens of all sequences are packed along the first axis
(T), heads next (N), features last (D). Integer index tensors are int64; -1 marks "no entry".
The NumPy kernels in `ops.numpy_ref` are the reference semantics; every other backend is tested
against them. `common/` only ever calls these methods, never a tensor library directly.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Tensor = Any  # the backend's tensor type (numpy.ndarray, torch.Tensor, mindspore.Tensor)


@runtime_checkable
class Backend(Protocol):
    name: str

    # ---- plumbing: create, move and reshape ---------------------------------------------
    def from_numpy(self, a: Any) -> Tensor: ...
    def to_numpy(self, x: Tensor) -> Any: ...
    def zeros(self, shape: tuple[int, ...], dtype: str = "float32") -> Tensor: ...
    def full(self, shape: tuple[int, ...], value: float, dtype: str = "float32") -> Tensor: ...
    def cat(self, xs: list[Tensor], axis: int = 0) -> Tensor: ...
    def arange(self, start: int, stop: int) -> Tensor: ...

    # ---- dense math -------------------------------------------------------------------------
    def embedding(self, ids: Tensor, table: Tensor) -> Tensor:
        """[T] int -> [T, D] rows of `table` (float32)."""
    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        """RMSNorm over the last axis; weight None = unweighted (V4's per-head q norm)."""
    def linear(self, x: Tensor, w: Any) -> Tensor:
        """x [..., K] @ w[N, K]^T. `w` may be a dense tensor or a quantized weight object."""
    def grouped_linear(self, x: Tensor, w: Any) -> Tensor:
        """Grouped output projection: x [T, G, K], w [G*N, K] viewed [G, N, K] -> [T, G, N]."""
    def rope_freqs(self, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [T, R/2] for integer positions [T] (angle computed in float32)."""
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
        """Interleaved-pair RoPE on the last 2*cos.shape[-1] features of x [T, ..., D]; inverse de-rotates."""

    # ---- manifold-constrained hyper-connections --------------------------------------------
    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, n, D] -> (collapsed [T, D], post [T, n], comb [T, n, n]) with `iters` Sinkhorn passes."""
    def hc_post(self, y: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """x' [T, n, D]: x'_b = post_b * y + sum_a comb[a, b] * x_a (comb used transposed)."""
    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_eps: float,
                norm_eps: float) -> Tensor:
        """Final stream collapse x [T, n, D] -> [T, D] (sigmoid weights, no Sinkhorn)."""

    # ---- compressed sparse attention: the primitives the kernel-granularity ops below compose ----------
    def compress(self, kv: Tensor, score: Tensor) -> Tensor:
        """Gated pooling: kv, score [G, R, D] -> [G, D] = sum_R softmax_R(score) * kv, per feature."""
    def indexer_topk(self, q: Tensor, weights: Tensor, keys: Tensor, q_pos: Tensor, ratio: int, topk: int,
                     scale: float) -> Tensor:
        """Lightning indexer: I[t, j] = sum_h weights[t, h] * relu(q[t, h] . keys[j]) * scale over the
        entries visible at q_pos ((j+1)*ratio <= pos+1); returns [T, min(topk, J)] indices, -1 padded."""
    def sparse_attention(self, q: Tensor, q_pos: Tensor, kv: Tensor, kv_pos: Tensor, window: int,
                         comp: Tensor | None, ratio: int, comp_sel: Tensor | None, sinks: Tensor,
                         scale: float) -> Tensor:
        """Shared-KV MQA with sinks. q [T, H, D]; kv [S, D] raw entries at ascending positions kv_pos
        (visible when pos - window < kv_pos <= pos); comp [J, D] compressed entries (visible when
        (j+1)*ratio <= pos+1, and when comp_sel [T, k] is given only the selected ones). The sink
        enters the softmax denominator only. Returns [T, H, D]."""

    # ---- the attention-side kernels at Ascend granularity (ops.attention_kernels) --------------------
    # Argument lists and layouts of vllm-ascend's _C_ascend kernels (csrc/torch_binding.cpp); caches are
    # paged [blocks, block_size, 1, D] (state [blocks, block_size, 2*coff*D]) behind int32 block tables.
    # `AttentionKernels` composes them from the primitives above; backends override them with the kernels.
    def dynamic_quant(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row int8 over the last axis (npu_dynamic_quant): (int8 like x, float32 scale x.shape[:-1])."""
    def scatter_update(self, cache: Tensor, slot_mapping: Tensor, x: Tensor) -> None:
        """npu_scatter_nd_update_v2: rows of x into cache slots ([N] flat or [N, 2] block/offset; < 0 skipped)."""
    def compressor_metadata(self, rope_cos: Tensor, rope_sin: Tensor, cu_seqlens: Tensor, start_pos: Tensor,
                            kv_block_table: Tensor, kv_block_size: int, slot_mapping_format: int,
                            compress_ratio: int, num_compressed_tokens: int,
                            num_reqs_actual: int) -> tuple[Tensor, Tensor, Tensor]:
        """(compress_cos, compress_sin [N, 1, 1, R], slot_mapping) of the entries `compressor` emits."""
    def compressor(self, x: Tensor, wkv: Any, wgate: Any, state_cache: Tensor, ape: Tensor, norm_weight: Tensor,
                   rope_sin: Tensor, rope_cos: Tensor, state_block_table: Tensor | None, cu_seqlens: Tensor | None,
                   seqused: Tensor | None, start_pos: Tensor | None, rope_head_dim: int, cmp_ratio: int, coff: int,
                   norm_eps: float, rotary_mode: int, cache_mode: int) -> Tensor:
        """Projections + paged state cache + gated pooling + RMSNorm + RoPE: cmp_kv [N, D] (closed entries)."""
    def quant_lightning_indexer_metadata(self, num_heads_q: int, num_heads_k: int, head_dim: int,
                                         query_quant_mode: int, key_quant_mode: int, **kw: Any) -> Tensor:
        """The indexer's core-split metadata, int32 [1024]."""
    def lightning_indexer(self, query: Tensor, key: Tensor, weights: Tensor, query_dequant_scale: Tensor | None = None,
                          key_dequant_scale: Tensor | None = None, query_quant_mode: int = 0,
                          key_quant_mode: int = 0, actual_seq_lengths_query: Tensor | None = None,
                          actual_seq_lengths_key: Tensor | None = None, block_table: Tensor | None = None,
                          metadata: Tensor | None = None, layout_query: str = "BSND", layout_key: str = "BSND",
                          sparse_count: int = 2048, sparse_mode: int = 3, pre_tokens: int = 2**63 - 1,
                          next_tokens: int = 2**63 - 1, cmp_ratio: int = 1,
                          return_value: bool = False) -> tuple[Tensor, Tensor]:
        """Top-k compressed entries per query (float keys, or int8 keys + scales): ([T, 1, k] int32, -1 = none)."""
    def sparse_attn_sharedkv_metadata(self, num_heads_q: int, num_heads_kv: int, head_dim: int, **kw: Any) -> Tensor:
        """The attention kernel's core-split metadata, int32 [1024]."""
    def sparse_attn_sharedkv(self, q: Tensor, **kw: Any) -> tuple[Tensor, Tensor]:
        """Window keys + (selected) compressed keys, shared-KV MQA with sinks: (out like q, softmax_lse)."""

    # ---- mixture of experts ------------------------------------------------------------------
    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, tid2eid: Tensor | None,
                 ids: Tensor, topk: int, score_func: str, route_scale: float,
                 norm_topk_prob: bool) -> tuple[Tensor, Tensor]:
        """Routing: (weights [T, k] float32, expert ids [T, k] int64). Bias only steers the choice;
        hash layers take ids from tid2eid[token]."""
    def moe_experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: Any, limit: float) -> Tensor:
        """init_routing -> grouped matmul with clamped SwiGLU -> finalize_routing: [T, D]."""
    def swiglu_mlp(self, x: Tensor, w1: Any, w3: Any, w2: Any, limit: float) -> Tensor:
        """The shared expert: w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit)); limit 0 = no clamp."""

    # ---- sampling -----------------------------------------------------------------------------
    def sample(self, logits: Tensor, temperature: float, top_k: int, top_p: float, rng: Any) -> Any:
        """Next token ids [B] (numpy int64) from logits [B, V]; temperature 0 = greedy."""


class ExpertWeights:
    """Routed experts of one layer: w1/w3 [I, D] and w2 [D, I] per expert, indexable by global expert id.

    `first` and `count` describe the locally held slice (expert parallelism); ids outside it are
    skipped by `moe_experts`, whose result is then a partial sum that the caller combines.
    """

    __slots__ = ("w1", "w3", "w2", "first", "count", "n_experts")

    def __init__(self, w1: Any, w3: Any, w2: Any, n_experts: int, first: int = 0, count: int | None = None):
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.n_experts = n_experts
        self.first = first
        self.count = n_experts - first if count is None else count

    def local(self, e: int) -> int:
        """Position of global expert e in the local lists."""
        return e - self.first
