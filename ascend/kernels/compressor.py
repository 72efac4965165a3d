"""The compressor: gated pooling (overlap layout), RMSNorm, partial RoPE and the state update, one program per
compressed entry.

Math of common/model.py `Model._compress` after the rows are grouped: entry g pools, per feature, the softmax-
weighted sum of its candidates (ops.numpy_ref `compress`); with the overlap layout (ratio 4) the candidates are
group g-1's first C features (the carried state for g = 0) and group g's last C features, 2r rows in all. Then
`rms_norm` with the norm weight and interleaved `rope` on the trailing rope features at position (first + g) * r.
The last group's first half (kv and score + ape) is the next call's state. Features are handled as even / odd
halves so the interleaved rope pairs need no in-register shuffle; the softmax over rows is online, BR rows at a
time, so any ratio (4 or 128) fits the unified buffer. With OVERLAP, APE, NORM and ROPE all off the kernel is the
contract's plain `compress` (kv, score [G, R, C] -> [G, C]).

"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pool(m, l, acc, kv, sc):
    # one online-softmax step over a [BR, HP] row chunk; fully masked features keep m = -inf without NaNs
    m_new = tl.maximum(m, tl.max(sc, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(sc - m_safe[None, :])
    return m_new, l * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p * kv, axis=0)


@triton.jit
def compressor_kernel(kv_ptr, sc_ptr, ape_ptr, prev_kv_ptr, prev_sc_ptr, w_ptr, cos_ptr, sin_ptr,
                      out_ptr, state_kv_ptr, state_sc_ptr,
                      G, R, off_b, eps,
                      W: tl.constexpr, C: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr,
                      OVERLAP: tl.constexpr, APE: tl.constexpr,
                      NORM: tl.constexpr, ROPE_PAIRS: tl.constexpr):
    g = tl.program_id(0)
    half = C // 2
    p = tl.arange(0, HP)
    pm = p < half
    rr = tl.arange(0, BR)
    ninf = float("-inf")
    m_e = tl.full([HP], ninf, tl.float32)
    m_o = tl.full([HP], ninf, tl.float32)
    l_e = tl.zeros([HP], tl.float32)
    l_o = tl.zeros([HP], tl.float32)
    a_e = tl.zeros([HP], tl.float32)
    a_o = tl.zeros([HP], tl.float32)
    # this group's rows: features [C, 2C) with the overlap layout, [0, C) without. Group and feature offsets go
    # on the scalar base pointer: triton-adapter-opt 3.2.0's InterleaveOptimization aborts when a constant
    # feature offset sits inside the stride-2 offset tensor next to a program-id term, and on a constant pointer
    # offset: off_b (C with the overlap layout, else 0) is therefore a runtime argument
    kv_g = kv_ptr + g * R * W + off_b
    sc_g = sc_ptr + g * R * W + off_b
    ape_b = ape_ptr + off_b
    for r0 in range(0, R, BR):
        rm = ((r0 + rr) < R)[:, None] & pm[None, :]
        base = (r0 + rr[:, None]) * W + 2 * p[None, :]
        kv_e = tl.load(kv_g + base, mask=rm, other=0.0).to(tl.float32)
        kv_o = tl.load(kv_g + base + 1, mask=rm, other=0.0).to(tl.float32)
        sc_e = tl.load(sc_g + base, mask=rm, other=ninf).to(tl.float32)
        sc_o = tl.load(sc_g + base + 1, mask=rm, other=ninf).to(tl.float32)
        if APE:
            sc_e += tl.load(ape_b + base, mask=rm, other=0.0)
            sc_o += tl.load(ape_b + base + 1, mask=rm, other=0.0)
        m_e, l_e, a_e = _pool(m_e, l_e, a_e, kv_e, sc_e)
        m_o, l_o, a_o = _pool(m_o, l_o, a_o, kv_o, sc_o)
    if OVERLAP:
        # previous group's first half: the carried state for g = 0, else rows of group g - 1 (+ ape)
        # scalar conditions folded into row limits (the adapter's interleave pass rejects scalar-and-mask masks)
        lim_rows = R * (g > 0).to(tl.int32)
        lim_state = R - lim_rows
        lim_last = R * (g == G - 1).to(tl.int32)
        kv_p = kv_ptr + tl.maximum(g - 1, 0) * R * W  # group g - 1 (masked off for g = 0)
        sc_p = sc_ptr + tl.maximum(g - 1, 0) * R * W
        kv_l = kv_ptr + g * R * W
        sc_l = sc_ptr + g * R * W
        for r0 in range(0, R, BR):
            rok = ((r0 + rr) < R)[:, None] & pm[None, :]
            abase = (r0 + rr[:, None]) * W + 2 * p[None, :]
            sbase = (r0 + rr[:, None]) * C + 2 * p[None, :]
            from_rows = ((r0 + rr) < lim_rows)[:, None] & pm[None, :]
            from_state = ((r0 + rr) < lim_state)[:, None] & pm[None, :]
            kv_e = (tl.load(kv_p + abase, mask=from_rows, other=0.0).to(tl.float32)
                    + tl.load(prev_kv_ptr + sbase, mask=from_state, other=0.0).to(tl.float32))
            kv_o = (tl.load(kv_p + abase + 1, mask=from_rows, other=0.0).to(tl.float32)
                    + tl.load(prev_kv_ptr + sbase + 1, mask=from_state, other=0.0).to(tl.float32))
            sc_e = (tl.load(sc_p + abase, mask=from_rows, other=0.0).to(tl.float32)
                    + tl.load(prev_sc_ptr + sbase, mask=from_state, other=0.0).to(tl.float32))
            sc_o = (tl.load(sc_p + abase + 1, mask=from_rows, other=0.0).to(tl.float32)
                    + tl.load(prev_sc_ptr + sbase + 1, mask=from_state, other=0.0).to(tl.float32))
            if APE:  # off when the scores already carry ape (the V4 kernels' paged state holds score + ape)
                sc_e += tl.load(ape_ptr + abase, mask=from_rows, other=0.0)
                sc_o += tl.load(ape_ptr + abase + 1, mask=from_rows, other=0.0)
            sc_e = tl.where(rok, sc_e, ninf)
            sc_o = tl.where(rok, sc_o, ninf)
            m_e, l_e, a_e = _pool(m_e, l_e, a_e, kv_e, sc_e)
            m_o, l_o, a_o = _pool(m_o, l_o, a_o, kv_o, sc_o)
            # state update: the last group's first half (kv, score + ape) for the next call
            last = ((r0 + rr) < lim_last)[:, None] & pm[None, :]
            tl.store(state_kv_ptr + sbase, tl.load(kv_l + abase, mask=last, other=0.0), mask=last)
            tl.store(state_kv_ptr + sbase + 1, tl.load(kv_l + abase + 1, mask=last, other=0.0), mask=last)
            s_e = tl.load(sc_l + abase, mask=last, other=0.0).to(tl.float32)
            s_o = tl.load(sc_l + abase + 1, mask=last, other=0.0).to(tl.float32)
            if APE:
                s_e += tl.load(ape_ptr + abase, mask=last, other=0.0)
                s_o += tl.load(ape_ptr + abase + 1, mask=last, other=0.0)
            tl.store(state_sc_ptr + sbase, s_e, mask=last)
            tl.store(state_sc_ptr + sbase + 1, s_o, mask=last)
    y_e = a_e / l_e
    y_o = a_o / l_o
    if NORM:
        ss = tl.sum(tl.where(pm, y_e * y_e + y_o * y_o, 0.0), axis=0)
        rinv = 1.0 / tl.sqrt(ss / C + eps)
        y_e = y_e * rinv * tl.load(w_ptr + 2 * p, mask=pm, other=0.0)
        y_o = y_o * rinv * tl.load(w_ptr + 2 * p + 1, mask=pm, other=0.0)
    if ROPE_PAIRS > 0:
        # pair p rotates when it is one of the last ROPE_PAIRS pairs; cos / sin [G, ROPE_PAIRS]
        k = p - (half - ROPE_PAIRS)
        rot = pm & (k >= 0)
        c = tl.load(cos_ptr + g * ROPE_PAIRS + k, mask=rot, other=1.0)
        s = tl.load(sin_ptr + g * ROPE_PAIRS + k, mask=rot, other=0.0)
        y_e, y_o = y_e * c - y_o * s, y_e * s + y_o * c
    tl.store(out_ptr + g * C + 2 * p, y_e, mask=pm)
    tl.store(out_ptr + g * C + 2 * p + 1, y_o, mask=pm)


def launch(kv, score, *, ape=None, prev_kv=None, prev_score=None, norm_weight=None, eps: float = 1e-6,
           cos=None, sin=None, overlap: bool = False, tiles: dict | None = None):
    """kv, score [G, R, W] (W = 2C with the overlap layout, else C) -> (entries [G, C], state_kv, state_score).

    ape [R, W] is added to the rows' scores; prev_kv / prev_score [R, C] are the carried state (overlap); the
    state returned is the last group's first half (None without overlap). norm_weight [C] switches on RMSNorm,
    cos / sin [G, P] the interleaved rope of the last P feature pairs."""
    import torch

    G, R, W = kv.shape
    C = W // 2 if overlap else W
    dev = kv.device
    f32 = torch.float32
    out = torch.empty((G, C), dtype=f32, device=dev)
    dummy = torch.zeros(1, dtype=f32, device=dev)
    state_kv = torch.empty((R, C), dtype=f32, device=dev) if overlap else dummy
    state_sc = torch.empty((R, C), dtype=f32, device=dev) if overlap else dummy
    if overlap and G == 0:
        return out, prev_kv, prev_score
    pairs = 0 if cos is None else cos.shape[-1]
    br = (tiles or {}).get("BR", 8)
    if G:
        compressor_kernel[(G,)](
            kv.contiguous(), score.contiguous(), dummy if ape is None else ape.contiguous(),
            dummy if prev_kv is None else prev_kv.contiguous(),
            dummy if prev_score is None else prev_score.contiguous(),
            dummy if norm_weight is None else norm_weight.contiguous(),
            dummy if cos is None else cos.contiguous(), dummy if sin is None else sin.contiguous(),
            out, state_kv, state_sc, G, R, C if overlap else 0, eps, W=W, C=C,
            HP=triton.next_power_of_2(max(C // 2, 1)), BR=min(br, triton.next_power_of_2(R)), OVERLAP=overlap,
            APE=ape is not None, NORM=norm_weight is not None, ROPE_PAIRS=pairs)
    return out, (state_kv if overlap else None), (state_sc if overlap else None)


def compile_spec(shape: dict, tiles: dict) -> tuple:
    """The instance the torch backend launches for the V4 `compressor` op (ascend/kernels/lowering.py): rows
    gathered from the float32 paged state, whose scores already carry ape (so APE off); overlap layout for
    ratio 4; RMSNorm and rope on the model's head_dim / rope_dim."""
    C = shape["head_dim"]
    sig = {"kv_ptr": "*fp32", "sc_ptr": "*fp32", "ape_ptr": "*fp32", "prev_kv_ptr": "*fp32", "prev_sc_ptr": "*fp32",
           "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*fp32", "state_kv_ptr": "*fp32",
           "state_sc_ptr": "*fp32", "G": "i32", "R": "i32", "off_b": "i32",
           "eps": "fp32"}
    overlap = shape.get("overlap", True)
    consts = {"W": 2 * C if overlap else C, "C": C, "HP": C // 2, "BR": tiles["BR"], "OVERLAP": overlap,
              "APE": False, "NORM": True,
              "ROPE_PAIRS": shape["rope_dim"] // 2}
    return compressor_kernel, sig, consts
