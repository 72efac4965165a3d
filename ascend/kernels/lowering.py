"""The torch backend's lowerings onto our kernels (provider "triton"): table op -> torch.ops.dsv4.*.

Attached to ascend.torch_backend.TorchBackend by that module; each takes the backend as `self`. mHC pre/post call
the kernels directly. The attention side follows the V4 kernels' argument lists (ops/attention_kernels.py:
`compressor`, `lightning_indexer`, `sparse_attn_sharedkv`): these wrappers stay on the host for the integer
metadata (cu_seqlens, positions, block tables, as the kernels' tiling does), gather each request's rows from the
paged caches through its block table, and launch our kernels on plain tensors. The kernels read any float dtype
and accumulate in float32.
"""

from __future__ import annotations

import numpy as np
import torch

from ops.attention_kernels import KernelArgError

F32 = torch.float32
I64 = torch.int64


def _ops():
    from . import torch_ops  # noqa: F401  (registers torch.ops.dsv4.*)

    return torch.ops.dsv4


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelArgError(msg)


def hc_pre(self, x, fn, scale, base, iters, hc_eps, norm_eps):
    return _ops().hc_pre(self._k(x), fn.to(F32), scale.to(F32), base.to(F32), iters, hc_eps, norm_eps)


def hc_post(self, y, x, post, comb):
    return _ops().hc_post(self._k(y), self._k(x), post.to(F32), comb.to(F32))


def compressor(self, x, wkv, wgate, state_cache, ape, norm_weight, rope_sin, rope_cos, state_block_table,
               cu_seqlens, seqused, start_pos, rope_head_dim, cmp_ratio, coff, norm_eps, rotary_mode, cache_mode):
    """_C_ascend.compressor's arguments (AttentionKernels.compressor has the semantics). The projections and the
    write of the float32 state rows (kv | score + ape) into the paged state cache stay matmul + scatter; each
    request's closed groups are then gathered from the state pages and pooled + RMSNormed + RoPEd by our fused
    compressor kernel (overlap layout for coff 2: the previous group's first half is the kernel's carried state,
    zero keys with -inf scores before the first group)."""
    op = "compressor"
    _need(rotary_mode == 2, f"{op}: rotary_mode must be 2 (interleave), got {rotary_mode}")
    _need(cache_mode == 1, f"{op}: only cache_mode 1 (paged state cache) is modelled, got {cache_mode}")
    _need(coff in (1, 2), f"{op}: coff must be 1 or 2, got {coff}")
    r, cD = int(cmp_ratio), int(ape.shape[-1])
    D = cD // coff
    _need(tuple(ape.shape) == (r, cD), f"{op}: ape must be [cmp_ratio, coff*D], got {tuple(ape.shape)}")
    _need(int(state_cache.shape[-1]) == 2 * cD, f"{op}: state_cache last dim must be 2*coff*D = {2 * cD}")
    _need(int(rope_cos.shape[-1]) == rope_head_dim, f"{op}: rope_cos width must equal rope_head_dim")
    cu, sp, st = self._host(cu_seqlens), self._host(start_pos), self._host(state_block_table)
    used = self._host(seqused)
    N = int(rope_cos.shape[0])
    half = rope_head_dim // 2
    cos_all = rope_cos.reshape(N, rope_head_dim)[:, :half].to(F32)
    sin_all = rope_sin.reshape(N, rope_head_dim)[:, :half].to(F32)
    kv = self.linear(x, wkv).to(F32)
    sc = self.linear(x, wgate).to(F32)
    apef, nw = ape.to(F32), norm_weight.to(F32)
    sbs = int(state_cache.shape[1])
    out = torch.zeros((N, D), dtype=F32, device=x.device)
    n_out = 0
    for b in range(len(sp)):
        a, n = int(cu[b]), int(cu[b + 1] - cu[b]) if used is None else int(used[b])
        s = int(sp[b])
        if n <= 0:
            continue
        pos = np.arange(s, s + n)
        rows = torch.cat([kv[a:a + n], sc[a:a + n] + apef[self._idx(pos % r)]], dim=1)
        blk, off = self._slots(st, b, pos, sbs)
        state_cache[self._idx(blk), self._idx(off)] = rows.to(state_cache.dtype)
        g0, g1 = s // r, (s + n) // r
        G = g1 - g0
        if G == 0:
            continue
        _need(n_out + G <= N, f"{op}: more entries close than rope_cos has rows ({N})")
        cur = self._gather(state_cache, st, b, (np.arange(g0, g1)[:, None] * r + np.arange(r)).reshape(-1))
        cur = cur.reshape(G, r, 2 * cD).to(F32)
        cos, sin = cos_all[n_out:n_out + G], sin_all[n_out:n_out + G]
        if coff == 2:
            if g0 == 0:
                prev_kv = torch.zeros((r, D), dtype=F32, device=x.device)
                prev_sc = torch.full((r, D), float("-inf"), dtype=F32, device=x.device)
            else:
                prev = self._gather(state_cache, st, b, (g0 - 1) * r + np.arange(r)).to(F32)
                prev_kv, prev_sc = prev[:, :D], prev[:, cD:cD + D]
            ent, _, _ = _ops().compressor(cur[:, :, :cD].contiguous(), cur[:, :, cD:].contiguous(), None,
                                          prev_kv.contiguous(), prev_sc.contiguous(), nw, float(norm_eps),
                                          cos.contiguous(), sin.contiguous(), True)
        else:
            ent, _, _ = _ops().compressor(cur[:, :, :cD].contiguous(), cur[:, :, cD:].contiguous(), None, None,
                                          None, nw, float(norm_eps), cos.contiguous(), sin.contiguous(), False)
        out[n_out:n_out + G] = ent
        n_out += G
    return out.to(self.act)


def lightning_indexer(self, query, key, weights, query_dequant_scale=None, key_dequant_scale=None,
                      query_quant_mode=0, key_quant_mode=0, actual_seq_lengths_query=None,
                      actual_seq_lengths_key=None, block_table=None, metadata=None, layout_query="BSND",
                      layout_key="BSND", sparse_count=2048, sparse_mode=3, pre_tokens=2**63 - 1,
                      next_tokens=2**63 - 1, cmp_ratio=1, return_value=False):
    """The lightning indexer's arguments (AttentionKernels.lightning_indexer has the semantics) on our score +
    radix top-k kernels: per request the visible compressed keys are gathered from the paged index cache
    (PA_BSND, block table); int8 keys are dequantized with their scales on the way (exact in float32)."""
    op = "lightning_indexer"
    _need(not return_value, f"{op}: return_value must be False")
    _need(sparse_mode in (0, 3), f"{op}: sparse_mode must be 0 or 3, got {sparse_mode}")
    _need(layout_key == "PA_BSND", f"{op}: layout_key must be PA_BSND, got {layout_key!r}")
    _need(query_quant_mode == 0 and key_quant_mode == 0, f"{op}: quant modes must be 0 (per-token-head)")
    _need((query_dequant_scale is None) == (key_dequant_scale is None), f"{op}: give both dequant scales or neither")
    if layout_query == "BSND":
        _need(query.dim() == 4, f"{op}: BSND query must be [B, S, N, D]")
        Bq, S = int(query.shape[0]), int(query.shape[1])
        query, weights = query.reshape(Bq * S, *query.shape[2:]), weights.reshape(Bq * S, -1)
        if query_dequant_scale is not None:
            query_dequant_scale = query_dequant_scale.reshape(Bq * S, -1)
        ends = np.arange(1, Bq + 1) * S
    else:
        _need(layout_query == "TND" and actual_seq_lengths_query is not None,
              f"{op}: layout_query TND needs actual_seq_lengths_query")
        ends = self._host(actual_seq_lengths_query)
    kl, bt = self._host(actual_seq_lengths_key), self._host(block_table)
    _need(kl is not None and bt is not None, f"{op}: PA_BSND needs actual_seq_lengths_key and block_table")
    _need(len(kl) == len(ends) == bt.shape[0], f"{op}: batch sizes of lengths and block_table differ")
    self._check_metadata(metadata, 2, len(ends), op)
    r, K, T = max(int(cmp_ratio), 1), int(sparse_count), int(query.shape[0])
    q, w = query.to(F32), weights.to(F32)
    if query_dequant_scale is not None:
        w = w * query_dequant_scale.to(F32)  # sum_h w sq relu(q . sk k): the kernel's W (.) Scale_Q product
    out = torch.full((T, 1, K), -1, dtype=torch.int32, device=query.device)
    a = 0
    for b, e in enumerate(ends.tolist()):
        e = int(e)
        n = e - a
        if n <= 0:
            continue
        L = int(kl[b])
        J = L // r
        if J:
            qpos = np.arange(L - n, L) if sparse_mode == 3 else np.full(n, J * r - 1)
            keys = self._gather(key, bt, b, np.arange(J)).to(F32)
            if key_dequant_scale is not None:
                ks = key_dequant_scale.reshape(*key_dequant_scale.shape[:2], 1)
                keys = keys * self._gather(ks, bt, b, np.arange(J)).to(F32)
            sel = _ops().indexer_topk(q[a:e].contiguous(), w[a:e].contiguous(), keys.contiguous(),
                                      torch.as_tensor(qpos, dtype=I64, device=query.device), r, K, 1.0)
            out[a:e, 0, :sel.shape[1]] = sel.to(torch.int32)
        a = e
    return out, torch.zeros((T, 1, K), dtype=F32, device=query.device)


def sparse_attn_sharedkv(self, q, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None, cmp_sparse_indices=None,
                         ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                         cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None, metadata=None,
                         softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128,
                         ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", return_softmax_lse=False):
    """npu_sparse_attn_sharedkv's arguments (AttentionKernels.sparse_attn_sharedkv has the semantics) on our
    shared-KV attention kernel: per request the window rows are gathered from the paged raw cache (PA_ND) and
    the compressed entries from the compressed cache -- only the selected ones when cmp_sparse_indices is
    given, renumbered so the kernel sees local indices with ratio 1 (a selected entry's rank among the used
    ones is at most its index, and invisible ones were dropped first, so visibility is unchanged)."""
    q, shape, cu, sk, obt, cbt, sel_all, r, W = self._sparse_attn_plan(
        q, ori_kv, cmp_kv, ori_sparse_indices, cmp_sparse_indices, ori_block_table, cmp_block_table, cu_seqlens_q,
        seqused_kv, metadata, cmp_ratio, ori_mask_mode, cmp_mask_mode, ori_win_left, ori_win_right, layout_q,
        layout_kv, return_softmax_lse)
    dev = q.device
    sinks = sinks.to(F32)
    out = torch.zeros((int(q.shape[0]),) + tuple(q.shape[1:]), dtype=F32, device=dev)
    for a, e, qpos, keys, kpos, comp, ratio, sel in self._sparse_attn_requests(
            cu, sk, obt, cbt, ori_kv, cmp_kv, sel_all, r, W):
        out[a:e] = _ops().sparse_attention(self._k(q[a:e]), torch.as_tensor(qpos, dtype=I64, device=dev),
                                           self._k(keys), torch.as_tensor(kpos, dtype=I64, device=dev), W,
                                           None if comp is None else self._k(comp), ratio,
                                           None if sel is None else torch.as_tensor(sel, dtype=I64, device=dev),
                                           sinks, float(softmax_scale))
    out = out.to(self.act)
    if layout_q == "BSND":
        out = out.reshape(shape)
    return out, torch.zeros((int(q.shape[0]), int(q.shape[1])), dtype=F32, device=dev)


# table op -> (kernel name in the SoC table, function); the host helpers (_host, _gather, _slots, _idx,
# _check_metadata) are ops.attention_kernels.AttentionKernels', which TorchBackend inherits
LOWERINGS = {
    "hc_pre": ("dsv4.hc_pre", hc_pre),
    "hc_post": ("dsv4.hc_post", hc_post),
    "compressor": ("dsv4.compressor", compressor),
    "lightning_indexer": ("dsv4.lightning_indexer", lightning_indexer),
    "sparse_attn_sharedkv": ("dsv4.sparse_attn_sharedkv", sparse_attn_sharedkv),
}
