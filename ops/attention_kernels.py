"""The V4 attention-side ops at the granularity of the Ascend V4 kernels, composed from the contract's primitives.

Each method takes the argument list of the kernel it stands for (vllm-ascend csrc/torch_binding.cpp `ops.def`
strings at commit 182b75e: `compressor`, `compressor_metadata`, `npu_vllm_quant_lightning_indexer(+_metadata)`,
`npu_sparse_attn_sharedkv(+_metadata)`, `npu_scatter_nd_update_v2`) and its layouts: TND queries with
cu_seqlens, paged caches [blocks, block_size, 1, D] (PA_ND / PA_BSND) addressed through int32 block tables,
start positions, cmp_ratio, the sliding window as ori_win_left, sinks and softmax scale.

`AttentionKernels` is a mixin: on the NumPy backend it is the CPU golden of each vendor kernel; every other
backend inherits it as its composed path (the math runs in the backend's own primitives: compress, rms_norm,
rope, indexer_topk, sparse_attention, linear) and overrides it where it has the vendor kernel. Integer metadata
(block tables, cu_seqlens, positions) is read on the host, as the kernels' tiling does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# compressor_metadata slot_mapping formats (vllm-ascend vllm_ascend/device/device_op.py:34-35): A5 flat slot
# ids, A2/A3 (block id, offset) pairs for npu_scatter_nd_update_v2
SLOT_FLAT, SLOT_BLOCK_OFFSET = 1, 2
METADATA_SIZE = 1024  # sparse_attn_sharedkv README: "shape大小固定为[1024]"
_META_MAGIC = 0x5634  # "V4": marks a tensor built by our metadata ops
INT64_MAX = 9223372036854775807


class KernelArgError(ValueError):
    """A call the vendor kernel's host checks would refuse (rank, layout, mode, shape)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelArgError(msg)


class AttentionKernels:
    """The kernel-granularity attention ops, composed (see the module docstring)."""

    # ---- host helpers --------------------------------------------------------------------------------------
    def _host(self, t: Any) -> np.ndarray | None:
        return None if t is None else np.asarray(self.to_numpy(t)).astype(np.int64, copy=False)

    def _idx(self, a: np.ndarray) -> Any:
        return self.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    @staticmethod
    def _cast(x: Any, like: Any) -> Any:
        """x in the dtype of `like` (a cache): caches keep their own dtype (bf16 keys, float32 state)."""
        if x.dtype == like.dtype:
            return x
        return x.astype(like.dtype) if hasattr(x, "astype") else x.to(like.dtype)

    @staticmethod
    def _slots(table: np.ndarray, b: Any, rows: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) of rows of request(s) b (an int, or ids broadcasting against rows) through a table."""
        return table[b, rows // bs], rows % bs

    @classmethod
    def _flat_slots(cls, table: np.ndarray, b: Any, rows: np.ndarray, bs: int) -> np.ndarray:
        """Flat slot ids (block * bs + offset), as _slots."""
        blk, off = cls._slots(table, b, rows, bs)
        return blk * bs + off

    def _gather(self, cache: Any, table: np.ndarray, b: Any, rows: np.ndarray) -> Any:
        """Rows of request(s) b from a paged cache [blocks, bs, 1 or W...]: [len(rows), width] (rows 1-D)."""
        bs = int(cache.shape[1])
        flat = cache.reshape(int(cache.shape[0]) * bs, -1)
        return flat[self._idx(self._flat_slots(table, b, rows, bs))]

    # ---- scatter ---------------------------------------------------------------------------------------------
    def scatter_update(self, cache: Any, slot_mapping: Any, x: Any) -> None:
        """npu_scatter_nd_update_v2(var!, indices, update): rows of x into a paged cache at slot_mapping
        ([N] flat ids or [N, 2] (block, offset)); slots < 0 (padding rows) are skipped."""
        sm = self._host(slot_mapping)
        bs = int(cache.shape[1])
        flat_ids = sm[:, 0] * bs + sm[:, 1] if sm.ndim == 2 else sm
        ok = sm[:, 0] >= 0 if sm.ndim == 2 else sm >= 0
        n = int(ok.sum())
        if n == 0:
            return
        rows = np.nonzero(ok)[0]
        src = x if n == int(x.shape[0]) else x[self._idx(rows)]
        blk, off = flat_ids[ok] // bs, flat_ids[ok] % bs
        cache[self._idx(blk), self._idx(off)] = self._cast(src, cache).reshape((n,) + tuple(cache.shape[2:]))

    # ---- compressor --------------------------------------------------------------------------------------
    def compressor_metadata(self, rope_cos: Any, rope_sin: Any, cu_seqlens: Any, start_pos: Any,
                            kv_block_table: Any, kv_block_size: int, slot_mapping_format: int, compress_ratio: int,
                            num_compressed_tokens: int, num_reqs_actual: int) -> tuple[Any, Any, Any]:
        """-> (compress_cos, compress_sin [N, 1, 1, R], slot_mapping [N, 2] or [N]) for the N =
        num_compressed_tokens output rows of `compressor`: row i is the i-th entry closed in this call (requests
        in order), its RoPE row is the full table's row at entry * ratio and its slot is where the compressed
        cache keeps it. Rows past the closed entries are padding: cos 1, sin 0, slot -1 (block-offset:
        (-1, block_size - 1)). Semantics of vllm-ascend tests/e2e/nightly/single_node/ops/singlecard_ops/
        test_compressor_metadata.py `_reference_outputs`."""
        _need(slot_mapping_format in (SLOT_FLAT, SLOT_BLOCK_OFFSET),
              f"compressor_metadata: slot_mapping_format must be 1 or 2, got {slot_mapping_format}")
        cu, sp, bt = self._host(cu_seqlens), self._host(start_pos), self._host(kv_block_table)
        _need(cu.ndim == 1 and bt.ndim == 2 and len(sp) + 1 == len(cu) == bt.shape[0] + 1,
              "compressor_metadata: cu_seqlens [B+1], start_pos [B], kv_block_table [B, n]")
        r, bs, N, P = int(compress_ratio), int(kv_block_size), int(num_compressed_tokens), int(rope_cos.shape[0])
        counts = [((s + int(cu[i + 1] - cu[i])) // r - s // r) if (i < num_reqs_actual and s >= 0
                                                                   and cu[i + 1] > cu[i]) else 0
                  for i, s in enumerate(sp.tolist())]
        prefix = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rope_row = np.full(N, P, dtype=np.int64)  # row P: the appended (1, 0) padding row
        slot = np.full((N, 2), (-1, bs - 1), dtype=np.int64) if slot_mapping_format == SLOT_BLOCK_OFFSET \
            else np.full(N, -1, dtype=np.int64)
        for row in range(min(N, int(prefix[-1]))):
            req = int(np.searchsorted(prefix, row, side="right") - 1)
            cpos = int(sp[req]) // r + row - int(prefix[req])
            lb, rpos = cpos // bs, cpos * r
            if lb >= bt.shape[1] or rpos >= P or bt[req, lb] < 0:
                continue
            rope_row[row] = rpos
            if slot_mapping_format == SLOT_BLOCK_OFFSET:
                slot[row] = (bt[req, lb], cpos % bs)
            else:
                slot[row] = bt[req, lb] * bs + cpos % bs
        R = int(rope_cos.shape[-1])
        valid = rope_row < P
        idx = self._idx(np.where(valid, rope_row, 0))
        keep = self.from_numpy(valid.astype(np.float32)[:, None])  # padding rows: cos 1, sin 0 (exact: *1 + 0)
        cos = (rope_cos[idx] * keep + (1.0 - keep)).reshape(N, 1, 1, R)
        sin = (rope_sin[idx] * keep).reshape(N, 1, 1, R)
        return cos, sin, self.from_numpy(slot.astype(np.int32))

    def compressor(self, x: Any, wkv: Any, wgate: Any, state_cache: Any, ape: Any, norm_weight: Any,
                   rope_sin: Any, rope_cos: Any, state_block_table: Any, cu_seqlens: Any, seqused: Any,
                   start_pos: Any, rope_head_dim: int, cmp_ratio: int, coff: int, norm_eps: float,
                   rotary_mode: int, cache_mode: int) -> Any:
        """_C_ascend.compressor, TND (x [T, H] with cu_seqlens [B+1], start_pos [B]): projects kv_state = x wkv^T
        and score_state = x wgate^T + ape[pos % ratio] (each [T, coff*D]) into the paged float32 state cache
        [blocks, block_size, 2*coff*D] at each token's position, then for every group of `cmp_ratio` tokens that
        closes in this call pools its candidates with a per-feature softmax over the scores (coff 2: the previous
        group's first half and this group's second half, 2*ratio candidates; the first group's previous half is
        empty), RMSNorms (norm_weight) and RoPEs the last rope_head_dim features with the rows of rope_cos/sin
        ([N, 1, 1, R] from compressor_metadata, rotate-half layout: the pair angle for both halves).
        Returns cmp_kv [N, D] (N = rope_cos rows = min(T, T//ratio + B)): the closed entries of each request in
        order, then zero padding. README (csrc/attention/compressor): D in {128, 512}, ratio in {4, 128},
        rotary_mode 2 (interleave) only; coff 2 only with ratio 4."""
        _need(rotary_mode == 2, f"compressor: rotary_mode must be 2 (interleave), got {rotary_mode}")
        _need(cache_mode == 1, f"compressor: only cache_mode 1 (paged state cache) is modelled, got {cache_mode}")
        _need(coff in (1, 2), f"compressor: coff must be 1 or 2, got {coff}")
        r = int(cmp_ratio)
        cD = int(ape.shape[-1])
        D = cD // coff
        _need(tuple(ape.shape) == (r, cD), f"compressor: ape must be [cmp_ratio, coff*D], got {tuple(ape.shape)}")
        _need(int(state_cache.shape[-1]) == 2 * cD,
              f"compressor: state_cache last dim must be 2*coff*D = {2 * cD}, got {int(state_cache.shape[-1])}")
        _need(int(rope_cos.shape[-1]) == rope_head_dim, "compressor: rope_cos width must equal rope_head_dim")
        cu, sp, st = self._host(cu_seqlens), self._host(start_pos), self._host(state_block_table)
        used = self._host(seqused)
        N = int(rope_cos.shape[0])
        kv = self.linear(x, wkv)
        sc = self.linear(x, wgate)
        sbs = int(state_cache.shape[1])
        # all requests at once (host index arithmetic, then one write, one gather per half, one pooling): every
        # token's state row goes to its position's slot; every group that closes in this call is one entry
        n = (cu[1:] - cu[:-1]) if used is None else used[: len(sp)]
        live = np.nonzero(n > 0)[0]
        tb, k = self._ragged(live, n[live])  # per token: its request, its index in the request's rows
        tok, pos = cu[tb] + k, sp[tb] + k
        if len(tok):
            all_rows = len(tok) == int(x.shape[0]) and bool((tok == np.arange(len(tok))).all())
            kv_t, sc_t = (kv, sc) if all_rows else (kv[self._idx(tok)], sc[self._idx(tok)])
            rows = self.cat([kv_t, sc_t + ape[self._idx(pos % r)]], axis=1)
            blk, off = self._slots(st, tb, pos, sbs)
            state_cache[self._idx(blk), self._idx(off)] = self._cast(rows, state_cache)
        g0 = sp[live] // r
        gb, gk = self._ragged(live, (sp[live] + n[live]) // r - g0)  # per closing group: request, index
        grp = sp[gb] // r + gk
        NG = len(grp)
        _need(NG <= N, f"compressor: {NG} entries close but rope_cos has {N} rows")
        if NG == 0:
            return self.zeros((N, D))
        cur = self._group_rows(state_cache, st, gb, grp, r)
        if coff == 2:
            # the previous group's first half; before the first group: zero keys with -inf scores (weight 0)
            first = grp == 0
            prev = None if first.all() else self._group_rows(state_cache, st, gb[~first], grp[~first] - 1, r)
            prev_kv = None if prev is None else prev[:, :, :D]
            prev_sc = None if prev is None else prev[:, :, cD:cD + D]
            if first.any():
                nz = int(first.sum())
                prev_kv = self.cat(([] if prev is None else [prev_kv]) + [self.zeros((nz, r, D))])
                prev_sc = self.cat(([] if prev is None else [prev_sc]) + [self.full((nz, r, D), float("-inf"))])
                if prev is not None:  # back to group order: the groups with a previous half first, then the rest
                    order = np.empty(NG, dtype=np.int64)
                    order[~first] = np.arange(NG - nz)
                    order[first] = NG - nz + np.arange(nz)
                    prev_kv, prev_sc = prev_kv[self._idx(order)], prev_sc[self._idx(order)]
            cand_kv = self.cat([prev_kv, cur[:, :, D:cD]], axis=1)
            cand_sc = self.cat([prev_sc, cur[:, :, cD + D:]], axis=1)
        else:
            cand_kv, cand_sc = cur[:, :, :cD], cur[:, :, cD:]
        ent = self.rms_norm(self.compress(cand_kv, cand_sc), norm_weight, norm_eps)
        half = rope_head_dim // 2
        cos = rope_cos.reshape(N, rope_head_dim)[:NG, :half]
        sin = rope_sin.reshape(N, rope_head_dim)[:NG, :half]
        out = self.rope(ent, cos, sin)
        return out if NG == N else self.cat([out, self.zeros((N - NG, D))])

    @staticmethod
    def _ragged(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id repeated by its count, with the running index 0..count-1 of each repeat."""
        counts = np.maximum(counts, 0)
        rep = np.repeat(ids, counts)
        k = np.arange(len(rep)) - np.repeat(np.cumsum(counts) - counts, counts)
        return rep, k

    def _group_rows(self, state_cache: Any, table: np.ndarray, reqs: np.ndarray, groups: np.ndarray, r: int) -> Any:
        """The r state rows of group groups[i] of request reqs[i], from the paged state cache: [G, r, width]."""
        rows = (groups[:, None] * r + np.arange(r)).reshape(-1)
        return self._gather(state_cache, table, np.repeat(reqs, r), rows).reshape(len(groups), r, -1)

    # ---- lightning indexer -------------------------------------------------------------------------------------
    def quant_lightning_indexer_metadata(self, num_heads_q: int, num_heads_k: int, head_dim: int,
                                         query_quant_mode: int, key_quant_mode: int,
                                         actual_seq_lengths_query: Any = None, actual_seq_lengths_key: Any = None,
                                         batch_size: int = 0, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                                         layout_query: str = "BSND", layout_key: str = "BSND",
                                         sparse_count: int = 2048, sparse_mode: int = 3,
                                         pre_tokens: int = INT64_MAX, next_tokens: int = INT64_MAX,
                                         cmp_ratio: int = 1, device: str = "npu") -> Any:
        """npu_vllm_quant_lightning_indexer_metadata: the kernel's core split, int32 [1024]. The split itself is
        the NPU's; this records the call quantities the kernel checks (batch, heads, dims, lengths, mode)."""
        _need(num_heads_k == 1, f"lightning indexer metadata: num_heads_k must be 1, got {num_heads_k}")
        head = [_META_MAGIC, 2, batch_size, num_heads_q, num_heads_k, head_dim, max_seqlen_q, max_seqlen_k,
                sparse_count, sparse_mode, cmp_ratio, query_quant_mode, key_quant_mode]
        return self._metadata(head)

    def _metadata(self, head: list[int]) -> Any:
        m = np.zeros(METADATA_SIZE, dtype=np.int32)
        m[: len(head)] = head
        return self.from_numpy(m)

    def _check_metadata(self, metadata: Any, kind: int, batch: int, op: str) -> None:
        if metadata is None:
            return
        m = self._host(metadata)
        _need(m.shape == (METADATA_SIZE,), f"{op}: metadata must be int32 [{METADATA_SIZE}], got {m.shape}")
        _need(int(m[0]) == _META_MAGIC and int(m[1]) == kind,
              f"{op}: metadata was not built by this op's metadata op")
        _need(int(m[2]) == batch, f"{op}: metadata built for batch {int(m[2])}, called with batch {batch}")

    def lightning_indexer(self, query: Any, key: Any, weights: Any, query_dequant_scale: Any = None,
                          key_dequant_scale: Any = None, query_quant_mode: int = 0, key_quant_mode: int = 0,
                          actual_seq_lengths_query: Any = None, actual_seq_lengths_key: Any = None,
                          block_table: Any = None, metadata: Any = None, layout_query: str = "BSND",
                          layout_key: str = "BSND", sparse_count: int = 2048, sparse_mode: int = 3,
                          pre_tokens: int = INT64_MAX, next_tokens: int = INT64_MAX, cmp_ratio: int = 1,
                          return_value: bool = False) -> tuple[Any, Any]:
        """npu_vllm_quant_lightning_indexer (scales given: int8 query / keys with per-token-head and per-key
        dequant scales) and its float form (scales None; torch_npu npu_lightning_indexer's math).
        For query row t of request b at position p (right-aligned: the request's last query sits at
        actual_seq_lengths_key[b] - 1, sparse_mode 3), score_j = sum_h weights[t, h] * relu(sq[t, h] sk[j]
        q[t, h] . k[j]) over the compressed keys j with (j + 1) * cmp_ratio <= p + 1; returns (sparse_indices
        [T, 1, sparse_count] int32, the top-k entries in descending score, equal scores by lower index, -1 past
        the visible ones; sparse_values, not returned by the kernel: zeros). layout_query TND: query [T, N, D],
        actual_seq_lengths_query = cumulative ends [B]; BSND: [B, S, N, D]. layout_key PA_BSND: key [blocks,
        block_size, 1, D] with block_table; actual_seq_lengths_key = raw token counts [B]. The softmax scale and
        the 1/sqrt(heads) weight scale are folded into `weights` by the caller (the kernel has no scale)."""
        op = "lightning_indexer"
        _need(not return_value, f"{op}: return_value must be False (README: sparse_values not returned)")
        _need(sparse_mode in (0, 3), f"{op}: sparse_mode must be 0 or 3, got {sparse_mode}")
        _need(layout_key == "PA_BSND", f"{op}: layout_key must be PA_BSND, got {layout_key!r}")
        _need(query_quant_mode == 0 and key_quant_mode == 0, f"{op}: quant modes must be 0 (per-token-head)")
        _need((query_dequant_scale is None) == (key_dequant_scale is None),
              f"{op}: give both dequant scales (int8) or neither (float keys)")
        if layout_query == "BSND":
            _need(query.ndim == 4, f"{op}: BSND query must be [B, S, N, D]")
            Bq, S = int(query.shape[0]), int(query.shape[1])
            query = query.reshape(Bq * S, *query.shape[2:])
            weights = weights.reshape(Bq * S, -1)
            if query_dequant_scale is not None:
                query_dequant_scale = query_dequant_scale.reshape(Bq * S, -1)
            ends = np.arange(1, Bq + 1) * S
        else:
            _need(layout_query == "TND", f"{op}: layout_query must be TND or BSND, got {layout_query!r}")
            _need(actual_seq_lengths_query is not None, f"{op}: TND needs actual_seq_lengths_query")
            ends = self._host(actual_seq_lengths_query)
        _need(query.ndim == 3 and key.ndim == 4 and int(key.shape[2]) == 1,
              f"{op}: query [T, N, D] and key [blocks, block_size, 1, D]")
        _need(int(query.shape[-1]) == int(key.shape[-1]), f"{op}: query and key head dims differ")
        kl, bt = self._host(actual_seq_lengths_key), self._host(block_table)
        _need(kl is not None and bt is not None, f"{op}: PA_BSND needs actual_seq_lengths_key and block_table")
        _need(len(kl) == len(ends) == bt.shape[0], f"{op}: batch sizes of lengths and block_table differ")
        self._check_metadata(metadata, 2, len(ends), op)
        r, K = max(int(cmp_ratio), 1), int(sparse_count)
        T = int(query.shape[0])
        if query_dequant_scale is not None:
            # sum_h w sq sk relu(qi . ki) = sum_h (w sq) relu(qi . (sk ki)) for positive scales (the kernel's
            # W (.) Scale_Q product); int8 values are exact in float32
            weights = weights * query_dequant_scale
        out = np.full((T, 1, K), -1, dtype=np.int32)
        starts = np.zeros_like(ends)
        starts[1:] = ends[:-1]
        n_q, J_all = ends - starts, kl // r
        live = np.nonzero(n_q > 0)[0]
        # the keys of all requests in one gather, then a slice per request (one host index build, not one each)
        reqs, rows = (int(live[0]), np.arange(J_all[live[0]])) if len(live) == 1 else self._ragged(live, J_all[live])
        key_all = self._gather(key, bt, reqs, rows) if len(rows) else None
        if key_dequant_scale is not None and len(rows):
            key_all = key_all * self._gather(key_dequant_scale.reshape(*key_dequant_scale.shape[:2], 1), bt, reqs,
                                             rows)
        o = 0
        for b in live.tolist():
            a, e, n, L, J = int(starts[b]), int(ends[b]), int(n_q[b]), int(kl[b]), int(J_all[b])
            qpos = np.arange(L - n, L) if sparse_mode == 3 else np.full(n, J * r - 1)
            keys = key_all[o:o + J] if J else self.zeros((0, int(key.shape[-1])))
            o += J
            sel = self.to_numpy(self.indexer_topk(query[a:e], weights[a:e], keys, self._idx(qpos), r, K, 1.0))
            out[a:e, 0, : sel.shape[1]] = sel
        return self.from_numpy(out), self.zeros((T, 1, K))

    # ---- sparse shared-KV attention -------------------------------------------------------------------------------
    def sparse_attn_sharedkv_metadata(self, num_heads_q: int, num_heads_kv: int, head_dim: int,
                                      cu_seqlens_q: Any = None, cu_seqlens_ori_kv: Any = None,
                                      cu_seqlens_cmp_kv: Any = None, seqused_q: Any = None, seqused_kv: Any = None,
                                      batch_size: int = 0, max_seqlen_q: int = 0, max_seqlen_kv: int = 0,
                                      ori_topk: int = 0, cmp_topk: int = 0, cmp_ratio: int = 4,
                                      ori_mask_mode: int = 4, cmp_mask_mode: int = 3, ori_win_left: int = 128,
                                      ori_win_right: int = 0, layout_q: str = "BSND", layout_kv: str = "PA_ND",
                                      has_ori_kv: bool = True, has_cmp_kv: bool = True, device: str = "npu") -> Any:
        """npu_sparse_attn_sharedkv_metadata: the kernel's core split, int32 [1024] (see the indexer's)."""
        _need(num_heads_kv == 1, f"sparse_attn_sharedkv metadata: num_heads_kv must be 1, got {num_heads_kv}")
        head = [_META_MAGIC, 1, batch_size, num_heads_q, num_heads_kv, head_dim, max_seqlen_q, max_seqlen_kv,
                cmp_topk, cmp_ratio, ori_win_left, int(has_ori_kv), int(has_cmp_kv)]
        return self._metadata(head)

    def _sparse_attn_plan(self, q: Any, ori_kv: Any, cmp_kv: Any, ori_sparse_indices: Any, cmp_sparse_indices: Any,
                          ori_block_table: Any, cmp_block_table: Any, cu_seqlens_q: Any, seqused_kv: Any,
                          metadata: Any, cmp_ratio: int, ori_mask_mode: int, cmp_mask_mode: int, ori_win_left: int,
                          ori_win_right: int, layout_q: str, layout_kv: str, return_softmax_lse: bool) -> tuple:
        """npu_sparse_attn_sharedkv's argument checks and host-side plan, shared by this golden and every kernel
        lowering of the op: (q as TND, q's shape as given, cu_seqlens_q, seqused_kv, ori / cmp block tables,
        the selected compressed indices or None, cmp_ratio (>= 1), window length)."""
        op = "sparse_attn_sharedkv"
        _need(not return_softmax_lse, f"{op}: return_softmax_lse must be False")
        _need(ori_mask_mode == 4 and cmp_mask_mode == 3 and ori_win_right == 0,
              f"{op}: only ori_mask_mode 4, cmp_mask_mode 3, ori_win_right 0 are supported")
        _need(layout_kv == "PA_ND", f"{op}: layout_kv must be PA_ND here, got {layout_kv!r}")
        _need(ori_kv is not None and ori_block_table is not None and seqused_kv is not None,
              f"{op}: ori_kv, ori_block_table and seqused_kv are required")
        _need(ori_sparse_indices is None, f"{op}: ori_sparse_indices is not supported")
        _need(cmp_sparse_indices is None or cmp_kv is not None, f"{op}: cmp_sparse_indices without cmp_kv")
        shape = tuple(q.shape)
        if layout_q == "BSND":
            _need(q.ndim == 4, f"{op}: BSND q must be [B, S, N, D]")
            cu = np.arange(shape[0] + 1) * shape[1]
            q = q.reshape(shape[0] * shape[1], shape[2], shape[3])
            if cmp_sparse_indices is not None:
                cmp_sparse_indices = cmp_sparse_indices.reshape(shape[0] * shape[1], 1, -1)
        else:
            _need(layout_q == "TND" and q.ndim == 3, f"{op}: layout_q must be TND ([T, N, D]) or BSND")
            _need(cu_seqlens_q is not None, f"{op}: TND needs cu_seqlens_q")
            cu = self._host(cu_seqlens_q)
        sk, obt = self._host(seqused_kv), self._host(ori_block_table)
        cbt = self._host(cmp_block_table)
        _need(cmp_kv is None or cbt is not None, f"{op}: cmp_kv needs cmp_block_table")
        _need(len(cu) == len(sk) + 1 == obt.shape[0] + 1, f"{op}: batch sizes of cu_seqlens_q / seqused_kv differ")
        self._check_metadata(metadata, 1, len(sk), op)
        sel_all = None if cmp_sparse_indices is None else self._host(cmp_sparse_indices)
        r, W = max(int(cmp_ratio), 1), int(ori_win_left) + 1
        return q, shape, cu, sk, obt, cbt, sel_all, r, W

    @staticmethod
    def _cmp_visible(s: np.ndarray, qpos: np.ndarray, r: int) -> np.ndarray:
        """Selected compressed indices s [rows, K] with those a row at qpos [rows] may not read set to -1
        (cmp_mask_mode 3: entry j is readable once (j + 1) * ratio <= p + 1)."""
        return np.where((s >= 0) & ((s + 1) * r <= qpos[:, None] + 1), s, -1)

    def _sparse_attn_requests(self, cu: np.ndarray, sk: np.ndarray, obt: np.ndarray, cbt: np.ndarray | None,
                              ori_kv: Any, cmp_kv: Any, sel_all: np.ndarray | None, r: int, W: int,
                              skip_single: bool = False) -> Iterator[tuple]:
        """Per request with queries: (row range a, e, query positions, its window keys gathered from the paged raw
        cache, their positions, the compressed entries it may read, their ratio, local selected indices or None).
        Shared by this golden and every kernel lowering of sparse_attn_sharedkv. skip_single: leave out the
        requests with exactly one query row (those `_sparse_attn_decode_plan` batches)."""
        for b in range(len(sk)):
            a, e = int(cu[b]), int(cu[b + 1])
            n = e - a
            if n <= 0 or (skip_single and n == 1):
                continue
            L = int(sk[b])
            qpos = np.arange(L - n, L)
            kpos = np.arange(max(0, L - n - W + 1), L)
            keys = self._gather(ori_kv, obt, b, kpos)
            comp, sel, ratio = None, None, r
            if cmp_kv is not None:
                if sel_all is not None:
                    s = self._cmp_visible(sel_all[a:e, 0], qpos, r)
                    used = np.unique(s[s >= 0])
                    if len(used):
                        # only the selected entries are read; local indices keep visibility exact because
                        # a selected entry's rank in `used` is at most its index (see ratio 1 below)
                        comp = self._gather(cmp_kv, cbt, b, used)
                        sel, ratio = np.where(s >= 0, np.searchsorted(used, np.maximum(s, 0)), -1), 1
                elif L // r:
                    comp = self._gather(cmp_kv, cbt, b, np.arange(L // r))
            yield a, e, qpos, keys, kpos, comp, ratio, sel

    def _sparse_attn_decode_plan(self, cu: np.ndarray, sk: np.ndarray, obt: np.ndarray, cbt: np.ndarray | None,
                                 ori_kv: Any, cmp_kv: Any, sel_all: np.ndarray | None, r: int,
                                 W: int) -> tuple | None:
        """The requests with exactly one query row (decode), all at once, as host slot ids: (request ids [R],
        their query rows [R], flat slot ids into ori_kv of their window keys [R, Sw] and a validity mask,
        flat slot ids into cmp_kv of the compressed entries they read [R, Sc] and a mask, or None, None).
        Row k reads exactly the keys `_sparse_attn_requests` gives that request alone, in the same order
        (window by position, then the read compressed entries by index, each once); masked ids are padding."""
        reqs = np.nonzero(cu[1:] - cu[:-1] == 1)[0]
        if not len(reqs):
            return None
        rows, L = cu[reqs], sk[reqs]
        qpos = L - 1
        # a single query at p sees raw positions (p - W, p]: L - W .. L - 1, fewer at the start of a sequence
        Sw = int(min(W, L.max()))
        kpos = np.maximum(L - W, 0)[:, None] + np.arange(Sw)
        win_ok = kpos < L[:, None]
        win_ids = self._flat_slots(obt, reqs[:, None], np.where(win_ok, kpos, 0), int(ori_kv.shape[1]))
        cmp_ids = cmp_ok = None
        if cmp_kv is not None:
            if sel_all is not None:
                s = self._cmp_visible(sel_all[rows, 0], qpos, r)
                big = np.iinfo(np.int64).max
                j = np.sort(np.where(s >= 0, s, big), axis=1)  # ascending, as np.unique orders them alone
                cmp_ok = j != big
                cmp_ok[:, 1:] &= j[:, 1:] != j[:, :-1]  # a repeated index is read once
            else:
                J = L // r
                j = np.broadcast_to(np.arange(int(J.max())), (len(reqs), int(J.max())))
                cmp_ok = j < J[:, None]
            cols = np.nonzero(cmp_ok.any(axis=0))[0]
            Sc = int(cols[-1]) + 1 if len(cols) else 0
            j, cmp_ok = j[:, :Sc], cmp_ok[:, :Sc]
            cmp_ids = self._flat_slots(cbt, reqs[:, None], np.where(cmp_ok, j, 0), int(cmp_kv.shape[1]))
        return reqs, rows, win_ids, win_ok, cmp_ids, cmp_ok

    # backends that attend all single-row (decode) requests of one call in one batched product set this and
    # implement _sparse_attn_decode (see NumpyBackend); the others run each request alone
    batched_decode = False

    def _sparse_attn_decode(self, q: Any, ori_kv: Any, win_ids: np.ndarray, win_ok: np.ndarray, cmp_kv: Any,
                            cmp_ids: np.ndarray | None, cmp_ok: np.ndarray | None, sinks: Any,
                            scale: float) -> Any:
        """q [R, H, D], one query row per request, attending the keys at the valid slot ids of each row."""
        raise NotImplementedError(f"{type(self).__name__} has no batched decode attention")

    def sparse_attn_sharedkv(self, q: Any, *, ori_kv: Any = None, cmp_kv: Any = None, ori_sparse_indices: Any = None,
                             cmp_sparse_indices: Any = None, ori_block_table: Any = None, cmp_block_table: Any = None,
                             cu_seqlens_q: Any = None, cu_seqlens_ori_kv: Any = None, cu_seqlens_cmp_kv: Any = None,
                             seqused_q: Any = None, seqused_kv: Any = None, sinks: Any = None, metadata: Any = None,
                             softmax_scale: float = 0.0, cmp_ratio: int = 0, ori_mask_mode: int = 4,
                             cmp_mask_mode: int = 3, ori_win_left: int = 128, ori_win_right: int = 0,
                             layout_q: str = "BSND", layout_kv: str = "PA_ND",
                             return_softmax_lse: bool = False) -> tuple[Any, Any]:
        """npu_sparse_attn_sharedkv: shared-KV MQA (one KV head, K = V) with sinks. Query row t of request b sits
        at position p = seqused_kv[b] - n_b + i (right-aligned). Keys: the raw entries of ori_kv at positions
        [p - ori_win_left, p] (ori_mask_mode 4, sliding window), plus the compressed entries of cmp_kv with
        (j + 1) * cmp_ratio <= p + 1 (cmp_mask_mode 3), only those in cmp_sparse_indices [T, 1, K] when given
        (-1 = none). softmax(q k^T * softmax_scale) with the per-head sink in the denominator only.
        Caches PA_ND [blocks, block_size, 1, D] with block tables [B, n]; TND q [T, N, D] with cu_seqlens_q
        [B+1], or BSND [B, S, N, D]. Returns (out like q, softmax_lse zeros: the kernel returns none).
        README limits (sparse_attn_sharedkv): N1 64, K 512, KV_N 1, ori_mask_mode 4, cmp_mask_mode 3,
        ori_win_right 0, return_softmax_lse False, ori_sparse_indices unused; cu_seqlens_*_kv ignored for PA_ND."""
        q, shape, cu, sk, obt, cbt, sel_all, r, W = self._sparse_attn_plan(
            q, ori_kv, cmp_kv, ori_sparse_indices, cmp_sparse_indices, ori_block_table, cmp_block_table,
            cu_seqlens_q, seqused_kv, metadata, cmp_ratio, ori_mask_mode, cmp_mask_mode, ori_win_left, ori_win_right,
            layout_q, layout_kv, return_softmax_lse)
        dec = self._sparse_attn_decode_plan(cu, sk, obt, cbt, ori_kv, cmp_kv, sel_all, r, W) \
            if self.batched_decode else None
        pieces = []  # (first row, output rows), put back in row order
        if dec is not None:
            reqs, rows, win_ids, win_ok, cmp_ids, cmp_ok = dec
            all_rows = len(rows) == int(q.shape[0])  # rows ascend within [0, T): then they are all of q
            dec_out = self._sparse_attn_decode(q if all_rows else q[self._idx(rows)], ori_kv, win_ids, win_ok,
                                               cmp_kv, cmp_ids, cmp_ok, sinks, float(softmax_scale))
            pieces += [(int(a), dec_out[k:k + 1]) for k, a in enumerate(rows.tolist())]
        for a, e, qpos, keys, kpos, comp, ratio, sel in self._sparse_attn_requests(
                cu, sk, obt, cbt, ori_kv, cmp_kv, sel_all, r, W, skip_single=dec is not None):
            o = self.sparse_attention(q[a:e], self._idx(qpos), keys, self._idx(kpos), W, comp, ratio,
                                      None if sel is None else self._idx(sel), sinks, float(softmax_scale))
            pieces.append((a, o))
        if dec is not None and len(pieces) == len(rows):  # decode only: already in row order
            out = dec_out
        else:
            pieces.sort(key=lambda p: p[0])
            out = self.cat([p for _, p in pieces]) if pieces else q[:0]
        if layout_q == "BSND":
            out = out.reshape(shape)
        return out, self.zeros((int(q.shape[0]), int(q.shape[1])))
