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

    # ---- compressed sparse attention -------------------------------------------------------
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
