"""The DeepSeek-V4 forward, written once against the op contract.

Tokens of all sequences in a call are packed along one axis (TND); per-token work (projections, mHC,
MoE) runs on the packed batch, attention runs per sequence against that sequence's cache. The same
code serves prefill of any length, chunked prefill and decode, which is what makes
"prefill + decode == full recompute" hold by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ops import Backend, ExpertWeights
from ops.attention_kernels import SLOT_FLAT

from .config import CSA, CSA_RATIO, SWA, ModelConfig
from .names import expert_name, layer_prefix
from .paged_cache import MAIN, MTP, PagedCacheManager, SequenceCache, coff
from .rope import layer_inv_freqs


@dataclass
class Segment:
    """One sequence's slice [a, b) of the packed batch, starting at absolute position pos0."""

    cache: SequenceCache
    a: int
    b: int
    pos0: int


@dataclass
class BatchMeta:
    """What the attention kernels take for one forward call of one layer group (host int arrays turned
    into backend tensors once per call, as vllm-ascend's metadata builder does per step)."""

    group: str
    n_tokens: int
    cu_seqlens: Any  # int32 [B+1]
    start_pos: Any  # int32 [B]
    seqused_kv: Any  # int32 [B]: tokens of each sequence after this call
    swa_slots: Any  # int32 [T]: flat slot of each new token in the SWA cache
    tables: dict[str, Any]  # kind -> int32 block table [B, n]
    max_len: int
    n_seqs: int
    sas_meta: dict[int, Any]  # ratio -> sparse_attn_sharedkv metadata
    qli_meta: Any = None


@dataclass
class ForwardOutput:
    logits: list[Any]  # per sequence: [rows, vocab] (all prompt rows, or the last row)
    hidden: Any | None = None  # packed final streams [N, hc, d] before hc_head (input of MTP)


class Model:
    def __init__(self, cfg: ModelConfig, weights: dict[str, Any], backend: Backend, mtp: bool | None = None,
                 expert_range: tuple[int, int] | None = None, block_size: int = 16,
                 num_blocks: int | dict[str, int] | None = None):
        """`expert_range` = (first, count): the routed experts this rank holds (expert parallelism); the
        weights need only those experts. `block_size` / `num_blocks` shape the paged caches (None: pools
        grow on demand)."""
        self.cfg = cfg
        self.B = backend
        self.expert_range = expert_range or (0, cfg.n_routed_experts)
        self.mtp_enabled = bool(getattr(weights, "mtp_enabled", False)) if mtp is None else mtp
        self.w = {k: backend.from_numpy(v) for k, v in weights.items()}
        main, comp = layer_inv_freqs(cfg)
        self.inv_freq = {"main": backend.from_numpy(_f32(main)), "compress": backend.from_numpy(_f32(comp))}
        n = cfg.n_total_layers if self.mtp_enabled else cfg.n_layers
        self.experts = [self._experts(i) for i in range(n)]
        self._enter_scope = getattr(backend, "enter_scope", None)
        # window keys and compressed entries in the backend's activation dtype (bf16 on a device, as the
        # official kv cache); compressor state float32 (compressor README: kv_state / score_state FLOAT32)
        # indexer keys: int8 + per-key scale where the backend's indexer kernel takes them (vllm-ascend A2/A3),
        # else the activation dtype (the reference: float32, exact)
        key_dtype = getattr(backend, "index_key_dtype", None)
        self.index_int8 = key_dtype is not None and key_dtype(cfg) == "int8"
        self.caches = PagedCacheManager(cfg, backend, self.mtp_enabled, block_size, num_blocks,
                                        index_quant=self.index_int8,
                                        kv_dtype=getattr(backend, "act_dtype", "float32"))
        self._rope_tab: tuple[int, Any, Any] = (0, None, None)

    # ---- weights ---------------------------------------------------------------------------
    def _experts(self, layer: int) -> ExpertWeights:
        p = layer_prefix(self.cfg, layer)
        first, count = self.expert_range
        get = [[self.w[expert_name(p, e, k)] for e in range(first, first + count)] for k in ("w1", "w3", "w2")]
        return ExpertWeights(*get, n_experts=self.cfg.n_routed_experts, first=first, count=count)

    def new_cache(self) -> SequenceCache:
        return self.caches.new_sequence()

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, caches: Sequence[SequenceCache], ids: Sequence[Any], all_logits: bool = False,
                keep_hidden: bool = False) -> ForwardOutput:
        """Run new tokens `ids[i]` of sequence i (any lengths) and advance the caches."""
        B, cfg = self.B, self.cfg
        segs, flat_ids = self._pack(caches, ids, "pos")
        tok = B.from_numpy(flat_ids)
        rope = self._rope(segs)
        meta = self._meta(segs, MAIN)
        self._scope("embed")
        h = B.embedding(tok, self.w["embed.weight"])
        x = B.cat([h[:, None, :]] * cfg.hc_mult, axis=1)
        for i in range(cfg.n_layers):
            x = self._block(i, x, tok, segs, rope, meta)
        rows = self._rows(segs, all_logits)
        self._scope("head")
        logits = self._head(self._take_rows(x, rows), "")
        for s in segs:
            s.cache.pos = s.pos0 + (s.b - s.a)
            self.caches.trim(s.cache, MAIN)
        return ForwardOutput(self._split(logits, segs, all_logits), x if keep_hidden else None)

    def mtp_forward(self, caches: Sequence[SequenceCache], hidden: Any, next_ids: Sequence[Any],
                    all_logits: bool = False, depth: int = 0) -> list[Any]:
        """MTP layer `depth`: main-model streams at positions t plus token t+1 -> logits for token t+2."""
        if not self.mtp_enabled:
            raise RuntimeError("this checkpoint has no MTP weights (mtp.* tensors)")
        B, cfg, w = self.B, self.cfg, self.w
        layer = cfg.n_layers + depth
        p = layer_prefix(cfg, layer)
        segs, flat_ids = self._pack(caches, next_ids, "mtp_pos")
        tok = B.from_numpy(flat_ids)
        rope = self._rope(segs)
        meta = self._meta(segs, MTP)
        e = B.rms_norm(B.embedding(tok, w["embed.weight"]), w[f"{p}.enorm.weight"], cfg.norm_eps)
        hn = B.rms_norm(hidden, w[f"{p}.hnorm.weight"], cfg.norm_eps)
        x = B.linear(e, w[f"{p}.e_proj.weight"])[:, None, :] + B.linear(hn, w[f"{p}.h_proj.weight"])
        x = self._block(layer, x, tok, segs, rope, meta)
        rows = self._rows(segs, all_logits)
        self._scope(f"{p}.head")
        logits = self._head(self._take_rows(x, rows), f"{p}.")
        for s in segs:
            s.cache.mtp_pos = s.pos0 + (s.b - s.a)
            self.caches.trim(s.cache, MTP)
        return self._split(logits, segs, all_logits)

    # ---- pieces ----------------------------------------------------------------------------
    def _pack(self, caches, ids, pos_attr):
        """Segments and flat token ids. No sequences at all is allowed: an idle data-parallel rank still
        runs every layer with zero tokens so it takes part in the MoE collectives."""
        segs, flat, a = [], [], 0
        for c, t in zip(caches, ids, strict=True):
            t = [int(v) for v in t]
            if not t:
                raise ValueError("every sequence in a forward call needs at least one token")
            segs.append(Segment(c, a, a + len(t), getattr(c, pos_attr)))
            flat.extend(t)
            a += len(t)
        bad = [v for v in flat if not 0 <= v < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return segs, _i64(flat)

    def _rope(self, segs):
        B = self.B
        pos = B.cat([B.arange(s.pos0, s.pos0 + s.b - s.a) for s in segs]) if segs else B.arange(0, 0)
        out = {"pos": pos}
        for k, f in self.inv_freq.items():
            out[k] = B.rope_freqs(pos, f)
        return out

    @staticmethod
    def _take_rows(x, rows):
        # an empty index list is refused by some frameworks (MindSpore); zero sequences take zero rows
        return x if rows is None else x[rows] if rows else x[:0]

    @staticmethod
    def _rows(segs, all_logits):
        return None if all_logits else [s.b - 1 for s in segs]

    def _split(self, logits, segs, all_logits):
        if not all_logits:
            return [logits[i:i + 1] for i in range(len(segs))]
        return [logits[s.a:s.b] for s in segs]

    def _head(self, x, p: str):
        B, cfg, w = self.B, self.cfg, self.w
        y = B.hc_head(x, w[f"{p}hc_head_fn"], w[f"{p}hc_head_scale"], w[f"{p}hc_head_base"], cfg.hc_eps,
                      cfg.norm_eps)
        y = B.rms_norm(y, w[f"{p}norm.weight"], cfg.norm_eps)
        return B.linear(y, w["head.weight"])

    def _scope(self, name: str) -> None:
        """Name the ops that follow (e.g. `layers.3.attn`), for backends that record per-op outputs."""
        if self._enter_scope is not None:
            self._enter_scope(name)

    def _block(self, i, x, tok, segs, rope, meta):
        B, cfg, w = self.B, self.cfg, self.w
        p = layer_prefix(cfg, i)
        for sub in ("attn", "ffn"):
            self._scope(f"{p}.{sub}")
            y, post, comb = B.hc_pre(x, w[f"{p}.hc_{sub}_fn"], w[f"{p}.hc_{sub}_scale"], w[f"{p}.hc_{sub}_base"],
                                     cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
            y = B.rms_norm(y, w[f"{p}.{sub}_norm.weight"], cfg.norm_eps)
            out = self._attention(i, y, rope, meta) if sub == "attn" else self._moe(i, y, tok)
            x = B.hc_post(out, x, post, comb)
        return x

    def _moe(self, i, x, tok):
        B, cfg, w = self.B, self.cfg, self.w
        p = f"{layer_prefix(cfg, i)}.ffn"
        hashed = cfg.hash_layers[i]
        wts, idx = B.moe_gate(x, w[f"{p}.gate.weight"], None if hashed else w[f"{p}.gate.bias"],
                              w[f"{p}.gate.tid2eid"] if hashed else None, tok, cfg.n_activated_experts,
                              cfg.score_func, cfg.route_scale, cfg.norm_topk_prob)
        y = B.moe_experts(x, wts, idx, self.experts[i], cfg.swiglu_limit)
        if cfg.n_shared_experts:
            s = f"{p}.shared_experts"
            y = y + B.swiglu_mlp(x, w[f"{s}.w1.weight"], w[f"{s}.w3.weight"], w[f"{s}.w2.weight"], cfg.swiglu_limit)
        return y

    # ---- paged-cache metadata -------------------------------------------------------------------------
    def _meta(self, segs, group: str) -> BatchMeta:
        """Allocate the blocks this call writes and build the kernels' integer arguments."""
        B, cfg, mgr = self.B, self.cfg, self.caches
        for s in segs:
            mgr.allocate(s.cache, group, s.b - s.a)
        seqs = [s.cache for s in segs]
        n = [s.b - s.a for s in segs]
        cu = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        start = np.asarray([s.pos0 for s in segs], dtype=np.int32)
        used = start + np.asarray(n, dtype=np.int32)
        slots = [mgr.slots(s.cache, group, "swa", np.arange(s.pos0, s.pos0 + s.b - s.a)) for s in segs]
        swa_slots = np.concatenate(slots).astype(np.int32) if slots else np.zeros(0, np.int32)
        tables = {k: B.from_numpy(mgr.block_table(seqs, group, k)) for k in mgr.kinds_of_group(group)}
        max_q, max_kv = (max(n), int(used.max())) if segs else (0, 0)
        layers = [i for i in range(mgr.n_layers) if (i < cfg.n_layers) == (group == MAIN)]
        ratios = sorted({cfg.compress_ratios[i] for i in layers})
        cu_t, used_t = B.from_numpy(cu), B.from_numpy(used)
        sas = {r: B.sparse_attn_sharedkv_metadata(
            num_heads_q=cfg.n_heads, num_heads_kv=1, head_dim=cfg.head_dim, cu_seqlens_q=cu_t, seqused_kv=used_t,
            batch_size=len(segs), max_seqlen_q=max_q, max_seqlen_kv=max_kv,
            cmp_topk=cfg.index_topk if r == CSA_RATIO else 0, cmp_ratio=max(r, 1),
            ori_win_left=cfg.window - 1, layout_q="TND", layout_kv="PA_ND", has_cmp_kv=r > 0) for r in ratios}
        qli = None
        if any(cfg.attn_kinds[i] == CSA for i in layers):
            r = next(cfg.compress_ratios[i] for i in layers if cfg.attn_kinds[i] == CSA)
            qli = B.quant_lightning_indexer_metadata(
                num_heads_q=cfg.index_n_heads, num_heads_k=1, head_dim=cfg.index_head_dim, query_quant_mode=0,
                key_quant_mode=0, actual_seq_lengths_query=B.from_numpy(cu[1:]), actual_seq_lengths_key=used_t,
                batch_size=len(segs), max_seqlen_q=max_q, max_seqlen_k=max_kv, layout_query="TND",
                layout_key="PA_BSND", sparse_count=cfg.index_topk, sparse_mode=3, cmp_ratio=r)
        return BatchMeta(group, int(cu[-1]), cu_t, B.from_numpy(start), used_t, B.from_numpy(swa_slots), tables,
                         max_kv, len(segs), sas, qli)

    def _rope_table(self, n: int) -> tuple[Any, Any]:
        """Full compress-RoPE table [P >= n, rope_dim] (rotate-half layout: each pair's angle for both halves),
        what compressor_metadata selects entry rows from (vllm-ascend get_full_cos_and_sin_dsa)."""
        P, cos, sin = self._rope_tab
        if n > P:
            B = self.B
            P = max(n, 2 * P, 256)
            c, s = B.rope_freqs(B.arange(0, P), self.inv_freq["compress"])
            cos, sin = B.cat([c, c], axis=1), B.cat([s, s], axis=1)
            self._rope_tab = (P, cos, sin)
        return cos, sin

    def _compressor(self, i: int, x, meta: BatchMeta, p: str, kind: str, width_kind: str):
        """One compressor (attention or indexer) over the packed batch: entries of closed groups land in the
        `width_kind` cache (kv{r} or idx{r})."""
        B, cfg, w, mgr = self.B, self.cfg, self.w, self.caches
        r = cfg.compress_ratios[i]
        state = "idx_state" if width_kind.startswith("idx") else "state"
        cos_t, sin_t = self._rope_table(max(meta.max_len, 1))
        n_rows = min(meta.n_tokens, meta.n_tokens // r + meta.n_seqs)
        ccos, csin, slots = B.compressor_metadata(cos_t, sin_t, meta.cu_seqlens, meta.start_pos,
                                                  meta.tables[f"{width_kind}{r}"], mgr.bs, SLOT_FLAT, r, n_rows,
                                                  meta.n_seqs)
        R = cfg.rope_dim
        ccos, csin = ccos.reshape(n_rows, R), csin.reshape(n_rows, R)  # TND: rope rows 2-D like x (BINDING:857)
        ent = B.compressor(x, w[f"{p}.wkv.weight"], w[f"{p}.wgate.weight"], mgr.cache(i, f"{state}{r}"),
                           w[f"{p}.ape"], w[f"{p}.norm.weight"], csin, ccos, meta.tables[f"{state}{r}"],
                           meta.cu_seqlens, None, meta.start_pos, cfg.rope_dim, r,
                           2 if width_kind.startswith("idx") else coff(kind), cfg.norm_eps, 2, 1)
        if width_kind == "idx" and self.index_int8:
            # A2/A3 (vllm-ascend device_op.indexer_quant_scatter): per-key int8 + scale, both scattered
            kq, ks = B.dynamic_quant(ent)
            B.scatter_update(mgr.cache(i, f"idx{r}"), slots, kq)
            B.scatter_update(mgr.cache(i, f"idx_scale{r}"), slots, ks.reshape(n_rows, 1))
        else:
            B.scatter_update(mgr.cache(i, f"{width_kind}{r}"), slots, ent)

    def _attention(self, i, x, rope, meta: BatchMeta):
        B, cfg, w, mgr = self.B, self.cfg, self.w, self.caches
        p = f"{layer_prefix(cfg, i)}.attn"
        kind, r = cfg.attn_kinds[i], cfg.compress_ratios[i]
        N, H, c, W = x.shape[0], cfg.n_heads, cfg.head_dim, cfg.window
        if N == 0:  # an idle rank: the kernels refuse empty queries (BINDING:1088); x is [0, dim] like the output
            return x
        cos, sin = rope["main" if kind == SWA else "compress"]
        qr = B.rms_norm(B.linear(x, w[f"{p}.wq_a.weight"]), w[f"{p}.q_norm.weight"], cfg.norm_eps)
        q = B.rms_norm(B.linear(qr, w[f"{p}.wq_b.weight"]).reshape(N, H, c), None, cfg.norm_eps)
        q = B.rope(q, cos, sin)
        kv = B.rope(B.rms_norm(B.linear(x, w[f"{p}.wkv.weight"]), w[f"{p}.kv_norm.weight"], cfg.norm_eps), cos, sin)
        swa = mgr.cache(i, "swa")
        B.scatter_update(swa, meta.swa_slots, kv)  # the window keys are in the cache before attention reads it
        cmp_kv = cmp_table = sel = None
        if kind != SWA:
            self._compressor(i, x, meta, f"{p}.compressor", kind, "kv")
            cmp_kv, cmp_table = mgr.cache(i, f"kv{r}"), meta.tables[f"kv{r}"]
        if kind == CSA:
            Hi, ci = cfg.index_n_heads, cfg.index_head_dim
            iq = B.rope(B.linear(qr, w[f"{p}.indexer.wq_b.weight"]).reshape(N, Hi, ci), cos, sin)
            # the kernel has no scale argument: 1/sqrt(heads) and the softmax scale ride on the weights
            iw = B.linear(x, w[f"{p}.indexer.weights_proj.weight"]) * (Hi ** -0.5 * ci ** -0.5)
            self._compressor(i, x, meta, f"{p}.indexer.compressor", kind, "idx")
            qs = ks = None
            if self.index_int8:  # query per token-head int8 (device_op.indexer_quantize_query)
                iq, qs = B.dynamic_quant(iq)
                ks = mgr.cache(i, f"idx_scale{r}")
            sel, _ = B.lightning_indexer(iq, mgr.cache(i, f"idx{r}"), iw, qs, ks, 0, 0,
                                         meta.cu_seqlens[1:], meta.seqused_kv, meta.tables[f"idx{r}"],
                                         meta.qli_meta, "TND", "PA_BSND", cfg.index_topk, 3, cmp_ratio=r)
        o, _ = B.sparse_attn_sharedkv(
            q, ori_kv=swa, cmp_kv=cmp_kv, cmp_sparse_indices=sel, ori_block_table=meta.tables["swa"],
            cmp_block_table=cmp_table, cu_seqlens_q=meta.cu_seqlens, seqused_kv=meta.seqused_kv,
            sinks=w[f"{p}.attn_sink"], metadata=meta.sas_meta[r], softmax_scale=c ** -0.5, cmp_ratio=max(r, 1),
            ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=W - 1, ori_win_right=0, layout_q="TND",
            layout_kv="PA_ND")
        o = B.rope(o, cos, sin, inverse=True)
        G = cfg.o_groups
        z = B.grouped_linear(o.reshape(N, G, H * c // G), w[f"{p}.wo_a.weight"]).reshape(N, G * cfg.o_lora_rank)
        return B.linear(z, w[f"{p}.wo_b.weight"])


def _f32(values: list[float]) -> Any:
    import array

    return array.array("f", values)


def _i64(values: list[int]) -> Any:
    import array

    return array.array("q", values)
