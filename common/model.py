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

from ops import Backend, ExpertWeights

from .cache import CompressorState, SequenceCache, new_sequence_cache
from .config import CSA, SWA, ModelConfig
from .names import expert_name, layer_prefix
from .rope import layer_inv_freqs


@dataclass
class Segment:
    """One sequence's slice [a, b) of the packed batch, starting at absolute position pos0."""

    cache: SequenceCache
    a: int
    b: int
    pos0: int


@dataclass
class ForwardOutput:
    logits: list[Any]  # per sequence: [rows, vocab] (all prompt rows, or the last row)
    hidden: Any | None = None  # packed final streams [N, hc, d] before hc_head (input of MTP)


class Model:
    def __init__(self, cfg: ModelConfig, weights: dict[str, Any], backend: Backend, mtp: bool | None = None,
                 expert_range: tuple[int, int] | None = None):
        """`expert_range` = (first, count): the routed experts this rank holds (expert parallelism); the
        weights need only those experts."""
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

    # ---- weights ---------------------------------------------------------------------------
    def _experts(self, layer: int) -> ExpertWeights:
        p = layer_prefix(self.cfg, layer)
        first, count = self.expert_range
        get = [[self.w[expert_name(p, e, k)] for e in range(first, first + count)] for k in ("w1", "w3", "w2")]
        return ExpertWeights(*get, n_experts=self.cfg.n_routed_experts, first=first, count=count)

    def new_cache(self) -> SequenceCache:
        return new_sequence_cache(self.cfg, self.B, self.mtp_enabled)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, caches: Sequence[SequenceCache], ids: Sequence[Any], all_logits: bool = False,
                keep_hidden: bool = False) -> ForwardOutput:
        """Run new tokens `ids[i]` of sequence i (any lengths) and advance the caches."""
        B, cfg = self.B, self.cfg
        segs, flat_ids = self._pack(caches, ids, "pos")
        tok = B.from_numpy(flat_ids)
        rope = self._rope(segs)
        self._scope("embed")
        h = B.embedding(tok, self.w["embed.weight"])
        x = B.cat([h[:, None, :]] * cfg.hc_mult, axis=1)
        for i in range(cfg.n_layers):
            x = self._block(i, x, tok, segs, rope)
        rows = self._rows(segs, all_logits)
        self._scope("head")
        logits = self._head(self._take_rows(x, rows), "")
        for s in segs:
            s.cache.pos = s.pos0 + (s.b - s.a)
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
        e = B.rms_norm(B.embedding(tok, w["embed.weight"]), w[f"{p}.enorm.weight"], cfg.norm_eps)
        hn = B.rms_norm(hidden, w[f"{p}.hnorm.weight"], cfg.norm_eps)
        x = B.linear(e, w[f"{p}.e_proj.weight"])[:, None, :] + B.linear(hn, w[f"{p}.h_proj.weight"])
        x = self._block(layer, x, tok, segs, rope)
        rows = self._rows(segs, all_logits)
        self._scope(f"{p}.head")
        logits = self._head(self._take_rows(x, rows), f"{p}.")
        for s in segs:
            s.cache.mtp_pos = s.pos0 + (s.b - s.a)
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

    def _block(self, i, x, tok, segs, rope):
        B, cfg, w = self.B, self.cfg, self.w
        p = layer_prefix(cfg, i)
        for sub in ("attn", "ffn"):
            self._scope(f"{p}.{sub}")
            y, post, comb = B.hc_pre(x, w[f"{p}.hc_{sub}_fn"], w[f"{p}.hc_{sub}_scale"], w[f"{p}.hc_{sub}_base"],
                                     cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
            y = B.rms_norm(y, w[f"{p}.{sub}_norm.weight"], cfg.norm_eps)
            out = self._attention(i, y, segs, rope) if sub == "attn" else self._moe(i, y, tok)
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

    def _compress(self, st: CompressorState, kv, score, p: str) -> Any:
        """Feed projected rows into a compressor; return the entries of the groups they close (or None)."""
        B, cfg, w = self.B, self.cfg, self.w
        r, c = st.ratio, st.width
        T = kv.shape[0]
        total = st.buf_len + T
        G = total // r
        if G == 0:
            st.buf_kv[st.buf_len:total] = kv
            st.buf_score[st.buf_len:total] = score
            st.buf_len = total
            return None
        rows_kv = B.cat([st.buf_kv[:st.buf_len], kv]) if st.buf_len else kv
        rows_sc = B.cat([st.buf_score[:st.buf_len], score]) if st.buf_len else score
        full_kv = rows_kv[:G * r].reshape(G, r, -1)
        full_sc = rows_sc[:G * r].reshape(G, r, -1) + w[f"{p}.ape"][None]
        rem = total - G * r
        st.buf_kv[:rem] = rows_kv[G * r:]
        st.buf_score[:rem] = rows_sc[G * r:]
        st.buf_len = rem
        if st.overlap:
            # entry g pools group g-1's first half with group g's second half (2r candidates per feature)
            prev_kv = B.cat([st.prev_kv[None], full_kv[:-1, :, :c]], axis=0)
            prev_sc = B.cat([st.prev_score[None], full_sc[:-1, :, :c]], axis=0)
            st.prev_kv[:] = full_kv[-1, :, :c]
            st.prev_score[:] = full_sc[-1, :, :c]
            cand_kv = B.cat([prev_kv, full_kv[:, :, c:]], axis=1)
            cand_sc = B.cat([prev_sc, full_sc[:, :, c:]], axis=1)
        else:
            cand_kv, cand_sc = full_kv, full_sc
        ent = B.compress(cand_kv, cand_sc)
        ent = B.rms_norm(ent, w[f"{p}.norm.weight"], cfg.norm_eps)
        pos = B.arange(st.n_emitted, st.n_emitted + G) * r  # an entry sits at its group's first token
        cos, sin = B.rope_freqs(pos, self.inv_freq["compress"])
        st.n_emitted += G
        return B.rope(ent, cos, sin)

    def _attention(self, i, x, segs, rope):
        B, cfg, w = self.B, self.cfg, self.w
        p = f"{layer_prefix(cfg, i)}.attn"
        kind, r = cfg.attn_kinds[i], cfg.compress_ratios[i]
        N, H, c, W = x.shape[0], cfg.n_heads, cfg.head_dim, cfg.window
        cos, sin = rope["main" if kind == SWA else "compress"]
        qr = B.rms_norm(B.linear(x, w[f"{p}.wq_a.weight"]), w[f"{p}.q_norm.weight"], cfg.norm_eps)
        q = B.rms_norm(B.linear(qr, w[f"{p}.wq_b.weight"]).reshape(N, H, c), None, cfg.norm_eps)
        q = B.rope(q, cos, sin)
        kv = B.rope(B.rms_norm(B.linear(x, w[f"{p}.wkv.weight"]), w[f"{p}.kv_norm.weight"], cfg.norm_eps), cos, sin)
        if kind != SWA:
            ckv = B.linear(x, w[f"{p}.compressor.wkv.weight"])
            csc = B.linear(x, w[f"{p}.compressor.wgate.weight"])
        if kind == CSA:
            Hi, ci = cfg.index_n_heads, cfg.index_head_dim
            iq = B.rope(B.linear(qr, w[f"{p}.indexer.wq_b.weight"]).reshape(N, Hi, ci), cos, sin)
            iw = B.linear(x, w[f"{p}.indexer.weights_proj.weight"]) * (Hi ** -0.5)
            ikv = B.linear(x, w[f"{p}.indexer.compressor.wkv.weight"])
            isc = B.linear(x, w[f"{p}.indexer.compressor.wgate.weight"])
        sinks = w[f"{p}.attn_sink"]
        outs = []
        for s in segs:
            lc = s.cache.layers[i]
            a, b, pos0 = s.a, s.b, s.pos0
            qpos = rope["pos"][a:b]
            # ring entries the first new query can still see: positions (pos0 - W, pos0)
            old = B.arange(max(0, pos0 - W + 1), pos0)
            keys = B.cat([lc.window_kv[old % W], kv[a:b]])
            kpos = B.cat([old, qpos])
            comp, sel = None, None
            if kind != SWA:
                ent = self._compress(lc.comp, ckv[a:b], csc[a:b], f"{p}.compressor")
                if ent is not None:
                    lc.comp_kv.append(ent)
                comp = lc.comp_kv.view()
            if kind == CSA:
                ient = self._compress(lc.index_comp, ikv[a:b], isc[a:b], f"{p}.indexer.compressor")
                if ient is not None:
                    lc.index_kv.append(ient)
                sel = B.indexer_topk(iq[a:b], iw[a:b], lc.index_kv.view(), qpos, r, cfg.index_topk,
                                     cfg.index_head_dim ** -0.5)
            outs.append(B.sparse_attention(q[a:b], qpos, keys, kpos, W, comp, r, sel, sinks, c ** -0.5))
            keep = min(b - a, W)
            lc.window_kv[qpos[b - a - keep:] % W] = kv[b - keep:b]
        o = B.rope(B.cat(outs) if outs else q, cos, sin, inverse=True)
        G = cfg.o_groups
        z = B.grouped_linear(o.reshape(N, G, H * c // G), w[f"{p}.wo_a.weight"]).reshape(N, G * cfg.o_lora_rank)
        return B.linear(z, w[f"{p}.wo_b.weight"])


def _f32(values: list[float]) -> Any:
    import array

    return array.array("f", values)


def _i64(values: list[int]) -> Any:
    import array

    return array.array("q", values)
