"""vllm-ascend's DeepSeek-V4 attention-side `_C_ascend` kernels as CPU stand-ins bound to their real schemas.

compressor, compressor_metadata, npu_vllm_quant_lightning_indexer(+_metadata), npu_sparse_attn_sharedkv
(+_metadata) and npu_scatter_nd_update_v2, defined from the `ops.def(...)` strings of vllm-ascend
csrc/torch_binding.cpp at 182b75e (ascend/schemas/vllm_ascend.yaml) through ascend/standins/schema.py, with the
binding's host checks (BINDING:<line>) and the READMEs' documented limits (README <op>) mirrored. The bodies are
written here in torch, independently of the NumPy golden (ops/attention_kernels.py) they are tested against
(tests/test_v4_attention_standins.py), and the compressor_metadata body against the owners' own cases.

Registered in the same `dsv4_vllm_ascend` namespace as ascend/standins/vllm_ascend.py, which re-exports them.
"""

from __future__ import annotations

import torch

from ops.numpy_ref import ATTN_BLOCK as _ROWS  # query rows per block: bounds the [rows, heads, keys] scores

from .common import F32, LOW
from .schema import StandinLibrary, check

LIB = StandinLibrary("vllm_ascend")
SRC = "vllm-ascend@182b75e csrc/torch_binding.cpp"
README = "vllm-ascend@182b75e csrc/attention/{}/README.md"
SLOT_FLAT, SLOT_BLOCK_OFFSET = 1, 2  # vllm_ascend/device/device_op.py:34-35
METADATA_SIZE = 1024  # BINDING:1162 OUTPUT_SIZE
_MAGIC = 0x5634


def _b(line: int) -> str:
    return f"{SRC}:{line}"


def _r(op: str) -> str:
    return README.format(op)


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _rows(cache: torch.Tensor, table: torch.Tensor, b: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows of request b from a paged cache [blocks, bs, ...] through its block table: [n, width]."""
    bs = cache.shape[1]
    blk = table[b].to(torch.int64)[rows // bs]
    return cache[blk, rows % bs].reshape(rows.shape[0], -1)


# ---- compressor_metadata -------------------------------------------------------------------------------------
@LIB.impl("compressor_metadata")
def compressor_metadata(rope_cos: torch.Tensor, rope_sin: torch.Tensor, cu_seqlens: torch.Tensor,
                        start_pos: torch.Tensor, kv_block_table: torch.Tensor, kv_block_size: int,
                        slot_mapping_format: int, compress_ratio: int, num_compressed_tokens: int,
                        num_reqs_actual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE rows (entry * ratio) and cache slots of the entries `compressor` emits, padding rows cos 1 / sin 0 /
    slot -1 (block-offset: (-1, block_size - 1)); vllm-ascend test_compressor_metadata.py `_reference_outputs`."""
    check(rope_cos.dim() == 2 and rope_sin.dim() == 2, "rope_cos and rope_sin should be 2D tensors", _b(894))
    check(rope_cos.dtype == rope_sin.dtype, "rope_cos and rope_sin should have same dtype", _b(896))
    check(rope_cos.shape == rope_sin.shape, "rope_cos and rope_sin should have same shape", _b(898))
    check(rope_cos.shape[0] > 0 and rope_cos.shape[1] > 0, "rope_cos shape should be non-empty", _b(900))
    check(cu_seqlens.dim() == 1, "cu_seqlens should be a 1D tensor", _b(902))
    check(start_pos.dim() == 1, "start_pos should be a 1D tensor", _b(903))
    check(kv_block_table.dim() == 2, "kv_block_table should be a 2D tensor", _b(904))
    check(kv_block_size > 0, "kv_block_size should be greater than 0", _b(905))
    check(compress_ratio > 0, "compress_ratio should be greater than 0", _b(906))
    check(slot_mapping_format in (SLOT_FLAT, SLOT_BLOCK_OFFSET),
          f"slot_mapping_format should be 1(flat) or 2(block_offset), but got {slot_mapping_format}", _b(907))
    check(num_reqs_actual > 0, "num_reqs_actual should be greater than 0", _b(909))
    check(cu_seqlens.shape[0] > num_reqs_actual, "cu_seqlens dim0 should be greater than num_reqs_actual", _b(910))
    check(start_pos.shape[0] >= num_reqs_actual, "start_pos dim0 should be >= num_reqs_actual", _b(912))
    check(kv_block_table.shape[0] >= num_reqs_actual, "kv_block_table dim0 should be >= num_reqs_actual", _b(914))
    check(num_compressed_tokens > 0, "num_compressed_tokens should be greater than 0", _b(958))
    N, R, P, r, bs = num_compressed_tokens, rope_cos.shape[1], rope_cos.shape[0], compress_ratio, kv_block_size
    cu, sp, bt = _ints(cu_seqlens), _ints(start_pos), kv_block_table.to(torch.int64)
    cos = torch.ones((N, 1, 1, R), dtype=rope_cos.dtype)
    sin = torch.zeros((N, 1, 1, R), dtype=rope_sin.dtype)
    slot = torch.tensor([[-1, bs - 1]] * N if slot_mapping_format == SLOT_BLOCK_OFFSET else [-1] * N,
                        dtype=torch.int32)
    row = 0
    for req in range(num_reqs_actual):
        n, s = cu[req + 1] - cu[req], sp[req]
        if s < 0 or n <= 0:
            continue
        for cpos in range(s // r, (s + n) // r):
            if row >= N:
                break
            lb, rpos = cpos // bs, cpos * r
            if lb < bt.shape[1] and rpos < P and int(bt[req, lb]) >= 0:
                cos[row, 0, 0], sin[row, 0, 0] = rope_cos[rpos], rope_sin[rpos]
                blk = int(bt[req, lb])
                if slot_mapping_format == SLOT_BLOCK_OFFSET:
                    slot[row] = torch.tensor([blk, cpos % bs], dtype=torch.int32)
                else:
                    slot[row] = blk * bs + cpos % bs
            row += 1
    return cos, sin, slot


# ---- compressor ------------------------------------------------------------------------------------------------
@LIB.impl("compressor")
def compressor(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, state_cache: torch.Tensor, ape: torch.Tensor,
               norm_weight: torch.Tensor, rope_sin: torch.Tensor, rope_cos: torch.Tensor,
               state_block_table: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
               seqused: torch.Tensor | None, start_pos: torch.Tensor | None, rope_head_dim: int, cmp_ratio: int,
               coff: int, norm_eps: float, rotary_mode: int, cache_mode: int) -> torch.Tensor:
    """kv = x wkv^T, score = x wgate^T + ape (float32 state), written to the paged state at each position; each
    group closing in this call pools softmax(score) * kv over its candidates (coff 2: previous group's first
    half + this group's second half), then RMSNorm and interleaved RoPE on the last rope_head_dim features
    (cos/sin rows in rotate-half layout). TND only (x [T, H]); output [rope_sin rows, D] in x's dtype."""
    op = "compressor"
    check(x.dim() in (2, 3), f"x dim num[{x.dim()}] should be 2 or 3", _b(851))
    check(norm_weight.dim() == 1, f"norm_weight dim num[{norm_weight.dim()}] should be 1", _b(854))
    check(rope_sin.dim() == x.dim(), f"rope_sin dim num[{rope_sin.dim()}] should be equal to x dim num[{x.dim()}]",
          _b(857))
    check(cmp_ratio > 0, "cmp_ratio should be greater than 0", _b(859))
    check(state_cache.dim() == 3, f"state_cache dim num[{state_cache.dim()}] should be 3", _b(863))
    check(x.dim() == 2, "compressor stand-in: only the TND (BS-merged) layout is modelled", _r(op))
    check(x.dtype in LOW, f"x must be float16/bfloat16, got {x.dtype}", _r(op))
    check(wkv.dtype == x.dtype and wgate.dtype == x.dtype, "wkv / wgate must have x's dtype", _r(op))
    check(state_cache.dtype == F32 and ape.dtype == F32, "state_cache and ape must be float32", _r(op))
    D = norm_weight.shape[0]
    check(D in (128, 512), f"D must be 128 or 512, got {D}", _r(op))
    check((D, coff, cmp_ratio) in ((512, 2, 4), (128, 2, 4), (512, 1, 128)),
          f"(D, coff, cmp_ratio) = ({D}, {coff}, {cmp_ratio}) is none of C4A, C4Li, C128A", _r(op))
    H = x.shape[1]
    check(1024 <= H <= 10240 and H % 512 == 0, f"hidden H={H} must be in [1K, 10K] and 512-aligned", _r(op))
    check(rope_head_dim == 64 and rope_cos.shape[-1] == 64, "rope_head_dim must be 64", _r(op))
    check(rotary_mode == 2, "rotary_mode must be 2 (interleave)", _r(op))
    bs = state_cache.shape[1]
    check(bs % 16 == 0 and bs <= 1024, f"block_size {bs} must be a multiple of 16, <= 1024", _r(op))
    check(tuple(wkv.shape) == (coff * D, H) and tuple(wgate.shape) == (coff * D, H), "wkv / wgate [coff*D, H]", _r(op))
    check(tuple(ape.shape) == (cmp_ratio, coff * D), "ape [cmp_ratio, coff*D]", _r(op))
    check(state_cache.shape[2] == 2 * coff * D, "state_cache [blocks, block_size, 2*coff*D]", _r(op))
    check(cu_seqlens is not None and start_pos is not None and state_block_table is not None,
          "TND needs cu_seqlens, start_pos and state_block_table", _r(op))
    r, cD, N, half = cmp_ratio, coff * D, rope_sin.shape[0], rope_head_dim // 2
    cu, sp, used = _ints(cu_seqlens), _ints(start_pos), _ints(seqused)
    xf = x.to(F32)
    kv = xf @ wkv.to(F32).t()
    sc = xf @ wgate.to(F32).t()
    out = torch.zeros((N, D), dtype=F32)
    row = 0
    st = state_block_table.to(torch.int64)
    for b in range(len(sp)):
        a, n, s = cu[b], (cu[b + 1] - cu[b]) if used is None else used[b], sp[b]
        if n <= 0:
            continue
        pos = torch.arange(s, s + n)
        blk = st[b][pos // bs]
        state_cache[blk, pos % bs] = torch.cat([kv[a:a + n], sc[a:a + n] + ape[pos % r]], dim=1)
        for g in range(s // r, (s + n) // r):
            cur = _rows(state_cache, state_block_table, b, torch.arange(g * r, (g + 1) * r))
            if coff == 2:
                if g == 0:
                    pk, ps = torch.zeros((r, D)), torch.full((r, D), float("-inf"))
                else:
                    prev = _rows(state_cache, state_block_table, b, torch.arange((g - 1) * r, g * r))
                    pk, ps = prev[:, :D], prev[:, cD:cD + D]
                ck = torch.cat([pk, cur[:, D:cD]])
                cs = torch.cat([ps, cur[:, cD + D:]])
            else:
                ck, cs = cur[:, :cD], cur[:, cD:]
            e = (ck * torch.softmax(cs, dim=0)).sum(0)
            e = e * torch.rsqrt(e.square().mean() + norm_eps) * norm_weight.to(F32)
            c, si = rope_cos[row, :half].to(F32), rope_sin[row, :half].to(F32)
            x0, x1 = e[D - rope_head_dim::2].clone(), e[D - rope_head_dim + 1::2].clone()
            e[D - rope_head_dim::2] = x0 * c - x1 * si
            e[D - rope_head_dim + 1::2] = x0 * si + x1 * c
            check(row < N, f"{row + 1} entries close but rope_sin has {N} rows", _r(op))
            out[row] = e
            row += 1
    return out.to(x.dtype)


# ---- lightning indexer -------------------------------------------------------------------------------------------
def _metadata(head: list[int], device: torch.device) -> torch.Tensor:
    m = torch.zeros(METADATA_SIZE, dtype=torch.int32, device=device)
    m[: len(head)] = torch.tensor(head, dtype=torch.int32)
    return m


@LIB.impl("npu_vllm_quant_lightning_indexer_metadata")
def npu_vllm_quant_lightning_indexer_metadata(
        num_heads_q: int, num_heads_k: int, head_dim: int, query_quant_mode: int, key_quant_mode: int,
        actual_seq_lengths_query: torch.Tensor | None = None, actual_seq_lengths_key: torch.Tensor | None = None,
        batch_size: int = 0, max_seqlen_q: int = 0, max_seqlen_k: int = 0, layout_query: str = "BSND",
        layout_key: str = "BSND", sparse_count: int = 2048, sparse_mode: int = 3,
        pre_tokens: int = 9223372036854775807, next_tokens: int = 9223372036854775807, cmp_ratio: int = 1,
        device: str = "npu") -> torch.Tensor:
    """The kernel's core split (an AI-CPU tiling we cannot reproduce): int32 [1024] carrying the call's
    quantities, which the indexer stand-in checks against its own call."""
    op = "vllm_quant_lightning_indexer_metadata"
    check(num_heads_q == 64 and num_heads_k == 1, "query heads 64 and key heads 1 only", _r(op))
    check(head_dim == 128, "head_dim must be 128", _r(op))
    return _metadata([_MAGIC, 2, batch_size, num_heads_q, num_heads_k, head_dim, max_seqlen_q, max_seqlen_k,
                      sparse_count, sparse_mode, cmp_ratio, query_quant_mode, key_quant_mode], torch.device("cpu"))


def _check_meta(metadata: torch.Tensor | None, kind: int, batch: int, op: str) -> None:
    check(metadata is not None, "metadata is required", _r(op))
    check(metadata.dtype == torch.int32 and tuple(metadata.shape) == (METADATA_SIZE,), "metadata int32 [1024]",
          _r(op))
    m = _ints(metadata)
    check(m[0] == _MAGIC and m[1] == kind, "metadata was not built by this op's metadata op", _r(op))
    check(m[2] == batch, f"metadata built for batch {m[2]}, called with {batch}", _r(op))


@LIB.impl("npu_vllm_quant_lightning_indexer")
def npu_vllm_quant_lightning_indexer(
        query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor, query_dequant_scale: torch.Tensor,
        key_dequant_scale: torch.Tensor, query_quant_mode: int = 0, key_quant_mode: int = 0,
        actual_seq_lengths_query: torch.Tensor | None = None, actual_seq_lengths_key: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None, metadata: torch.Tensor | None = None, layout_query: str = "BSND",
        layout_key: str = "BSND", sparse_count: int = 2048, sparse_mode: int = 3,
        pre_tokens: int = 9223372036854775807, next_tokens: int = 9223372036854775807, cmp_ratio: int = 1,
        return_value: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-sparse_count compressed keys per query of sum_h w[t,h] relu(sq[t,h] sk[j] (q[t,h] . k[j])) (int8 dot
    products exact, the scales applied after), keys visible when (j+1) cmp_ratio <= p+1 for the query at p
    (sparse_mode 3, right-aligned on actual_seq_lengths_key raw tokens); -1 past the visible keys.
    A2/A3 form: int8 query and key, float16 weights and scales. TND query, PA_BSND key."""
    op = "vllm_quant_lightning_indexer"
    for name, t in (("query", query), ("key", key)):
        for i, s in enumerate(t.shape):
            check(s > 0, f"All values within {name}'s shape should be greater than 0, but shape[{i}] is {s}",
                  _b(1012 if name == "query" else 1016))
    check(sparse_count > 0, f"sparse count should be greater than 0, but now is {sparse_count}", _b(1020))
    check(query.dtype == torch.int8 and key.dtype == torch.int8, "query / key must be int8 on A2/A3", _r(op))
    for name, t in (("weights", weights), ("query_dequant_scale", query_dequant_scale),
                    ("key_dequant_scale", key_dequant_scale)):
        check(t.dtype == torch.float16, f"{name} must be float16 on A2/A3, got {t.dtype}", _r(op))
    check(query_quant_mode == 0 and key_quant_mode == 0, "quant modes: only 0 (per-token-head)", _r(op))
    check(layout_query == "TND" and layout_key == "PA_BSND", "stand-in: TND query, PA_BSND key", _r(op))
    check(query.shape[1] == 64 and key.shape[2] == 1, "query heads 64, key heads 1", _r(op))
    check(query.shape[2] == 128 and key.shape[3] == 128, "query / key D must be 128", _r(op))
    check(sparse_mode in (0, 3), f"sparse_mode must be 0 or 3, got {sparse_mode}", _r(op))
    check(pre_tokens == 2**63 - 1 and next_tokens == 2**63 - 1, "pre/next_tokens: default only", _r(op))
    check(cmp_ratio in (1, 2, 4, 8, 16, 32, 64, 128), f"cmp_ratio {cmp_ratio} not in 1..128 powers of 2", _r(op))
    check(not return_value, "return_value must be False", _r(op))
    check(1 <= sparse_count <= 2048, "sparse_count in [1, 2048] on A3", _r(op))
    check(actual_seq_lengths_query is not None and actual_seq_lengths_key is not None and block_table is not None,
          "TND needs actual_seq_lengths_query; PA_BSND needs actual_seq_lengths_key and block_table", _r(op))
    check(key.shape[1] % 16 == 0 and key.shape[1] <= 1024, "block_size a multiple of 16, <= 1024", _r(op))
    check(key_dequant_scale.stride(-1) == 1, "key_dequant_scale must be contiguous except axis 0", _b(1054))
    ends, lens = _ints(actual_seq_lengths_query), _ints(actual_seq_lengths_key)
    check(len(ends) == len(lens) == block_table.shape[0], "batch of lengths and block_table differ", _r(op))
    _check_meta(metadata, 2, len(ends), op)
    T, K = query.shape[0], sparse_count
    out = torch.full((T, 1, K), -1, dtype=torch.int32)
    a = 0
    for b, e in enumerate(ends):
        n, L = e - a, lens[b]
        J = L // cmp_ratio
        if n > 0 and J > 0:
            rows = torch.arange(J)
            k = _rows(key, block_table, b, rows).to(F32)  # [J, D] int8 values
            sk = _rows(key_dequant_scale.reshape(*key_dequant_scale.shape[:2], 1), block_table, b, rows)[:, 0].to(F32)
            dots = torch.einsum("thd,jd->thj", query[a:e].to(F32), k)  # exact integers
            s = torch.relu(dots * query_dequant_scale[a:e].to(F32)[..., None] * sk)
            score = torch.einsum("thj,th->tj", s, weights[a:e].to(F32))
            qpos = torch.arange(L - n, L) if sparse_mode == 3 else torch.full((n,), J * cmp_ratio - 1)
            vis = (rows[None] + 1) * cmp_ratio <= qpos[:, None] + 1
            score = torch.where(vis, score, float("-inf"))
            k_eff = min(K, J)
            order = torch.sort(-score, dim=-1, stable=True).indices[:, :k_eff]
            ok = torch.gather(vis, 1, order)
            out[a:e, 0, :k_eff] = torch.where(ok, order, -1).to(torch.int32)
        a = e
    return out, torch.empty(0, dtype=F32)


# ---- sparse shared-KV attention ---------------------------------------------------------------------------------
@LIB.impl("npu_sparse_attn_sharedkv_metadata")
def npu_sparse_attn_sharedkv_metadata(
        num_heads_q: int, num_heads_kv: int, head_dim: int, cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_ori_kv: torch.Tensor | None = None, cu_seqlens_cmp_kv: torch.Tensor | None = None,
        seqused_q: torch.Tensor | None = None, seqused_kv: torch.Tensor | None = None, batch_size: int = 0,
        max_seqlen_q: int = 0, max_seqlen_kv: int = 0, ori_topk: int = 0, cmp_topk: int = 0, cmp_ratio: int = 4,
        ori_mask_mode: int = 4, cmp_mask_mode: int = 3, ori_win_left: int = 128, ori_win_right: int = 0,
        layout_q: str = "BSND", layout_kv: str = "PA_ND", has_ori_kv: bool = True, has_cmp_kv: bool = True,
        device: str = "npu") -> torch.Tensor:
    """The attention kernel's core split: int32 [1024] with the call's quantities (see the indexer's)."""
    check(num_heads_q == 64 and num_heads_kv == 1, "q heads 64, kv heads 1", _r("sparse_attn_sharedkv"))
    return _metadata([_MAGIC, 1, batch_size, num_heads_q, num_heads_kv, head_dim, max_seqlen_q, max_seqlen_kv,
                      cmp_topk, cmp_ratio, ori_win_left, int(has_ori_kv), int(has_cmp_kv)], torch.device("cpu"))


@LIB.impl("npu_sparse_attn_sharedkv")
def npu_sparse_attn_sharedkv(
        q: torch.Tensor, *, ori_kv: torch.Tensor | None = None, cmp_kv: torch.Tensor | None = None,
        ori_sparse_indices: torch.Tensor | None = None, cmp_sparse_indices: torch.Tensor | None = None,
        ori_block_table: torch.Tensor | None = None, cmp_block_table: torch.Tensor | None = None,
        cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_ori_kv: torch.Tensor | None = None,
        cu_seqlens_cmp_kv: torch.Tensor | None = None, seqused_q: torch.Tensor | None = None,
        seqused_kv: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
        metadata: torch.Tensor | None = None, softmax_scale: float = 0, cmp_ratio: int = 0, ori_mask_mode: int = 4,
        cmp_mask_mode: int = 3, ori_win_left: int = 128, ori_win_right: int = 0, layout_q: str = "BSND",
        layout_kv: str = "PA_ND", return_softmax_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q K^T * softmax_scale) K over the window keys (positions [p - ori_win_left, p]) and the (selected)
    compressed keys with (j+1) cmp_ratio <= p+1, the per-head sink in the denominator; float32 inside,
    q's dtype out. TND q [T, 64, D] with cu_seqlens_q; PA_ND caches [blocks, bs, 1, D]."""
    op = "sparse_attn_sharedkv"
    for i, s in enumerate(q.shape):
        check(s > 0, f"All values within query's shape should be greater than 0, but shape[{i}] is {s}", _b(1088))
    check(q.dtype in LOW, f"q must be bfloat16/float16, got {q.dtype}", _r(op))
    check(layout_q == "TND" and q.dim() == 3, "stand-in: TND q [T, N1, D]", _r(op))
    check(q.shape[1] == 64, f"N1 must be 64, got {q.shape[1]}", _r(op))
    check(layout_kv == "PA_ND", "layout_kv PA_ND", _r(op))
    check(ori_kv is not None and ori_block_table is not None and seqused_kv is not None,
          "ori_kv, ori_block_table and seqused_kv are required", _r(op))
    for name, kv in (("ori_kv", ori_kv), ("cmp_kv", cmp_kv)):
        if kv is not None:
            check(kv.dim() == 4 and kv.shape[2] == 1, f"{name} [blocks, block_size, 1, D]", _r(op))
            check(kv.shape[1] % 16 == 0 and kv.shape[1] <= 1024, f"{name} block_size multiple of 16, <= 1024",
                  _r(op))
            check(kv.dtype == q.dtype and kv.shape[3] == q.shape[2], f"{name} dtype / D must match q", _r(op))
    check(ori_mask_mode == 4 and cmp_mask_mode == 3, "ori_mask_mode 4 and cmp_mask_mode 3 only", _r(op))
    check(ori_win_right == 0, "ori_win_right 0 only", _r(op))
    check(not return_softmax_lse, "return_softmax_lse False only", _r(op))
    check(ori_sparse_indices is None, "ori_sparse_indices is not supported", _r(op))
    check(cu_seqlens_q is not None, "TND needs cu_seqlens_q", _r(op))
    check(sinks is not None and sinks.dtype == F32 and sinks.shape == (q.shape[1],), "sinks float32 [N1]", _r(op))
    if cmp_kv is not None:
        check(cmp_ratio in (4, 128), f"cmp_ratio must be 4 or 128, got {cmp_ratio}", _r(op))
        check(cmp_block_table is not None, "cmp_kv needs cmp_block_table", _r(op))
    if cmp_sparse_indices is not None:
        check(cmp_kv is not None and cmp_sparse_indices.dim() == 3 and cmp_sparse_indices.shape[1] == 1
              and cmp_sparse_indices.shape[2] == 512, "cmp_sparse_indices [T, 1, 512] (K2 512 only)", _r(op))
        check(cmp_sparse_indices.dtype == torch.int32, "cmp_sparse_indices int32", _r(op))
    cu, lens = _ints(cu_seqlens_q), _ints(seqused_kv)
    check(len(cu) == len(lens) + 1 == ori_block_table.shape[0] + 1, "batch sizes differ", _r(op))
    _check_meta(metadata, 1, len(lens), op)
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=F32)
    W = ori_win_left + 1
    for b in range(len(lens)):
        L, n = lens[b], cu[b + 1] - cu[b]
        J = L // cmp_ratio if cmp_kv is not None else 0
        comp = _rows(cmp_kv, cmp_block_table, b, torch.arange(J)).to(F32) if J else None
        for a in range(cu[b], cu[b + 1], _ROWS):  # query blocks bound the [rows, heads, keys] scores
            e = min(cu[b + 1], a + _ROWS)
            qpos = torch.arange(L - n + (a - cu[b]), L - n + (e - cu[b]))
            kpos = torch.arange(max(0, int(qpos[0]) - W + 1), int(qpos[-1]) + 1)
            keys = _rows(ori_kv, ori_block_table, b, kpos).to(F32)
            mask = (kpos[None] <= qpos[:, None]) & (kpos[None] > qpos[:, None] - W)
            if comp is not None:
                cj = torch.arange(J)
                cmask = (cj[None] + 1) * cmp_ratio <= qpos[:, None] + 1
                if cmp_sparse_indices is not None:
                    sel = cmp_sparse_indices[a:e, 0].to(torch.int64)
                    picked = torch.zeros((e - a, J + 1), dtype=torch.bool)
                    picked.scatter_(1, torch.where((sel >= 0) & (sel < J), sel, J), True)
                    cmask &= picked[:, :J]
                keys = torch.cat([keys, comp])
                mask = torch.cat([mask, cmask], dim=1)
            s = torch.einsum("thd,kd->thk", q[a:e].to(F32), keys) * softmax_scale
            s = torch.where(mask[:, None], s, float("-inf"))
            m = torch.maximum(s.amax(-1), sinks[None])
            p = torch.exp(s - m[..., None])
            denom = p.sum(-1) + torch.exp(sinks[None] - m)
            out[a:e] = torch.einsum("thk,kd->thd", p, keys) / denom[..., None]
    return out.to(q.dtype), torch.empty(0, dtype=F32)


# ---- scatter ----------------------------------------------------------------------------------------------------
@LIB.impl("npu_scatter_nd_update_v2")
def npu_scatter_nd_update_v2(var: torch.Tensor, indices: torch.Tensor, update: torch.Tensor) -> None:
    """var[indices[i]] = update[i]: indices [N, k] index var's first k axes ((block, offset) pairs of a paged
    cache from compressor_metadata's block-offset format); rows whose first index is < 0 are skipped (the
    metadata's padding rows)."""
    check(indices.dim() == 2 and indices.dtype in (torch.int32, torch.int64), "indices [N, k] int32/int64",
          _b(1777))
    k = indices.shape[1]
    check(k <= var.dim() and update.shape[0] == indices.shape[0], "update [N, ...] per index row", _b(1777))
    check(update.dtype == var.dtype, f"update dtype {update.dtype} must equal var's {var.dtype}", _b(1777))
    ok = indices[:, 0] >= 0
    idx = indices[ok].to(torch.int64)
    var[tuple(idx[:, i] for i in range(k))] = update[ok].reshape((int(ok.sum()),) + tuple(var.shape[k:]))


# ---- 950 compress epilogs: fp8 quantise + scatter ---------------------------------------------------------------
# Host checks: the binding's TORCH_CHECKs (kv_compress_epilog only; indexer_compress_epilog_v2's binding at
# BINDING:1703-1711 checks nothing) and the A5 tiling's refusals (TILING_KV / TILING_IDX / DEF_IDX lines).
TILING_KV = "vllm-ascend@182b75e csrc/attention/kv_compress_epilog/op_host/kv_compress_epilog_tiling_arch35.cpp:{}"
TILING_IDX = ("vllm-ascend@182b75e csrc/attention/indexer_compress_epilog_v2/op_host/"
              "indexer_compress_epilog_v2_tiling.cpp:{}")
DEF_IDX = "vllm-ascend@182b75e csrc/attention/indexer_compress_epilog_v2/op_host/indexer_compress_epilog_v2_def.cpp:{}"
GOLDEN_KV = "cann-recipes-infer@fbc225d ops/ascendc/examples/test_npu_kv_compress_epilog.py"
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_INV_E4M3 = torch.tensor([0x3B124925], dtype=torch.int32).view(F32)  # indexer base.h:38: float32(1/448)


def _cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    check(cache.is_contiguous(), "cache must be contiguous: it is written through its byte view", "stand-in")
    return cache.view(torch.uint8).reshape(-1)


def _kv_mx(v: torch.Tensor, dt: torch.dtype, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """v [T, C] float32 -> fp8 bytes [T, C], e8m0 bytes [T, C/64]; scale from the exponent bits."""
    t, c = v.shape
    g = v.reshape(t, c // 64, 64)
    scale = g.abs().amax(-1).clamp_min(1e-4) * torch.tensor(1.0 / _FP8_MAX[dt], dtype=F32)
    bits = scale.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    if round_scale:  # round up to a power of two: exponent + 1 when any mantissa bit is set
        exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = (exp << 23).view(F32)
    y = (g / scale[..., None]).clamp(-_FP8_MAX[dt], _FP8_MAX[dt]).to(dt)
    return y.view(torch.uint8).reshape(t, c), exp.to(torch.uint8)


def _kv_group(v: torch.Tensor, dt: torch.dtype, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v [T, C] float32 -> fp8 bytes [T, C], float32 scale bytes [T, 4 * groups]; zero group: scale inf."""
    t, c = v.shape
    n = -(-c // group)
    g = torch.nn.functional.pad(v, (0, n * group - c)).reshape(t, n, group)
    amax = torch.nan_to_num(g, nan=0.0).abs().amax(-1)
    scale = torch.where(amax == 0, torch.full_like(amax, float("inf")), amax / _FP8_MAX[dt])
    y = torch.nan_to_num(g / scale[..., None], nan=0.0).reshape(t, n * group)[:, :c]
    return y.to(dt).view(torch.uint8), scale.contiguous().view(torch.uint8).reshape(t, 4 * n)


@LIB.impl("kv_compress_epilog")
def kv_compress_epilog(kv_compress_cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor,
                       quant_group_size: int, quant_mode: int, round_scale_flag: bool, layout: int) -> None:
    """x [T, D] bf16 -> one layout-1 row per slot of the fp8 cache: mode 2 [rope bf16 | fp8 | e8m0 per 64],
    mode 1 [fp8 | rope bf16 | float32 per 128]; zero-padded to a multiple of 128 bytes; slots < 0 skipped."""
    check(x.dim() == 2, f"x must be 2D tensor, but got dimensions: {x.dim()}", _b(1443))
    check(x.shape[0] > 0 and x.shape[1] > 0, f"x dimensions must be positive, but got: {list(x.shape)}", _b(1444))
    check(slot_mapping.dim() == 1, f"slot_mapping must be 1D tensor, but got dimensions: {slot_mapping.dim()}",
          _b(1446))
    check(slot_mapping.shape[0] == x.shape[0], "slot_mapping size must equal x's first dimension", _b(1448))
    if kv_compress_cache.dim() == 4:
        check(kv_compress_cache.shape[2] == 1, "kv_compress_cache 4D tensor requires headnum (dim 2) == 1",
              _b(1452))
    check(x.dtype == torch.bfloat16, f"x must be BF16, but got {x.dtype}", _b(1456))
    check(slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping must be INT32 or INT64", _b(1457))
    check(kv_compress_cache.dtype in _FP8_MAX, f"kv_compress_cache must be FP8_E5M2 or FP8_E4M3, but got "
          f"{kv_compress_cache.dtype}", _b(1459))
    if quant_mode == 2:
        check(quant_group_size in (64, 128), f"MXFP8 quant_group_size must be 64 or 128, got {quant_group_size}",
              TILING_KV.format(199))
    # not modelled (the golden defines no bytes for them): say so rather than guess
    check(layout == 1, f"layout {layout} not modelled: vllm-ascend calls layout=1 (device_op.py:1480)", "stand-in")
    check(quant_mode in (1, 2), f"quant_mode {quant_mode} not modelled (3 = hifloat8)", "stand-in")
    check(quant_mode == 1 or quant_group_size == 64, "MXFP8 groups of 128 not modelled", GOLDEN_KV)
    check(quant_mode == 2 or quant_group_size == 128, "group fp8 modelled for quant_group_size 128 only",
          TILING_KV.format(204))
    cache = kv_compress_cache.squeeze(2) if kv_compress_cache.dim() == 4 else kv_compress_cache
    stride = cache.stride(0)  # BINDING:1480: the row (block) stride the kernel addresses slots with
    D, dt = x.shape[1], kv_compress_cache.dtype
    qc = D - 64
    check(qc > 0 and (quant_mode == 1 or qc % 64 == 0), f"head dim {D}: D - 64 must be > 0 (x64 for MXFP8)",
          "stand-in")
    scale_bytes = -(-qc // 64) if quant_mode == 2 else 4 * -(-qc // 128)
    row_w = -(-(qc + 128 + scale_bytes) // 128) * 128
    check(stride >= row_w, f"block_stride ({stride}) must be >= layout=1 row width ({row_w})", TILING_KV.format(253))
    flat = _cache_bytes(kv_compress_cache)
    keep = slot_mapping >= 0
    if not bool(keep.any()):
        return
    slots = slot_mapping[keep].to(torch.int64)
    check(int(slots.max()) * stride + row_w <= flat.numel(), f"slot {int(slots.max())} outside the cache "
          "(the kernel does not check)", "stand-in")
    xs = x[keep]
    rope = xs[:, qc:].contiguous().view(torch.uint8)
    if quant_mode == 2:
        y, s = _kv_mx(xs[:, :qc].to(F32), dt, bool(round_scale_flag))
        row = torch.cat([rope, y, s], dim=1)
    else:
        y, s = _kv_group(xs[:, :qc].to(F32), dt, quant_group_size)
        row = torch.cat([y, rope, s], dim=1)
    row = torch.nn.functional.pad(row, (0, row_w - row.shape[1]))
    flat[(slots * stride)[:, None] + torch.arange(row_w)] = row


@LIB.impl("indexer_compress_epilog_v2")
def indexer_compress_epilog_v2(indexer_compress_cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor,
                               layout: int = 2) -> None:
    """x [..., d] fp16/bf16 -> fp8 e4m3fn + float32 scale per 128 columns into the uint8 paged cache
    [blocks, bs, 1, W]: per block, bs value rows of d bytes, then bs scale rows (single_row.h:83-87)."""
    check(indexer_compress_cache.dtype == torch.uint8, "indexer_compress_cache must be UINT8", DEF_IDX.format(24))
    check(x.dtype in (torch.float16, torch.bfloat16), f"x must be FLOAT16 or BF16, got {x.dtype}", DEF_IDX.format(30))
    check(slot_mapping.dtype == torch.int32, f"slot_mapping must be INT32, got {slot_mapping.dtype}",
          DEF_IDX.format(35))
    check(indexer_compress_cache.dim() == 4, "the dim of indexer_compress_cache only support 4", TILING_IDX.format(100))
    check(indexer_compress_cache.shape[2] == 1, "the third dim of indexer_compress_cache must be 1",
          TILING_IDX.format(105))
    check(layout == 2, "layout only support 2", TILING_IDX.format(139))
    d, bs, stride = x.shape[-1], indexer_compress_cache.shape[1], indexer_compress_cache.stride(0)
    n = slot_mapping.numel()
    check(x.numel() == n * d, f"x holds {x.numel() // max(d, 1)} rows of {d} but slot_mapping {n} "
          "(the kernel reads one x row per slot without checking)", "stand-in")
    nblk = -(-d // 128)
    check(bs * (d + 4 * nblk) <= stride, f"a block of {stride} bytes cannot hold {bs} x ({d} values + {4 * nblk} "
          "scale bytes) (the kernel does not check)", "stand-in")
    flat = _cache_bytes(indexer_compress_cache)
    keep = slot_mapping.reshape(-1) >= 0
    if not bool(keep.any()):
        return
    slots = slot_mapping.reshape(-1)[keep].to(torch.int64)
    check(int(slots.max()) // bs < indexer_compress_cache.shape[0], f"slot {int(slots.max())} outside the cache",
          "stand-in")
    g = torch.nn.functional.pad(x.reshape(n, d)[keep].to(F32), (0, nblk * 128 - d)).reshape(-1, nblk, 128)
    fin = torch.isfinite(g)
    scale = torch.where(fin, g.abs(), torch.zeros_like(g)).amax(-1) * _INV_E4M3  # base.h:190-206
    q = g / scale[..., None]
    q = torch.where(torch.isfinite(q), q, g).clamp(-448.0, 448.0)  # base.h:209-212: non-finite keeps x
    y = q.reshape(-1, nblk * 128)[:, :d].to(torch.float8_e4m3fn).view(torch.uint8)
    blk, off = slots // bs, slots % bs
    flat[(blk * stride + off * d)[:, None] + torch.arange(d)] = y
    flat[(blk * stride + bs * d + off * 4 * nblk)[:, None] + torch.arange(4 * nblk)] = \
        scale.contiguous().view(torch.uint8).reshape(-1, 4 * nblk)
