"""Sparse shared-KV attention with sinks (ops.numpy_ref `sparse_attention`), online softmax.

One program per (token, block of BH heads). Keys are values (shared KV, MQA): the raw entries in the token's
window (rows [kv_lo, kv_hi) of kv, positions pos - window < kv_pos <= pos and kv_pos >= 0) and then the
compressed entries, either all visible ones ((j + 1) * ratio <= pos + 1) or only the selected indices
(comp_sel, -1 / out-of-range / invisible skipped; the host wrapper drops repeats). The sink enters the
denominator only: the running max starts at the sink and the running sum at exp(0) = 1. head_dim 512 is split
by heads: BH heads x BS keys x D fits the unified buffer and L0C at BH = 16, BS = 32 (kernel_toolchain.md).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _step(m, l, acc, q, keys, valid, scale):
    s = tl.dot(q, tl.trans(keys)) * scale  # [BH, BS]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(keys.dtype), keys)
    return m_new, l, acc


@triton.jit
def sparse_attention_kernel(q_ptr, qpos_ptr, kv_ptr, kvpos_ptr, lo_ptr, hi_ptr, comp_ptr, sel_ptr, sink_ptr,
                            out_ptr, window, ratio, n_comp, n_sel, scale,
                            H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                            HAS_COMP: tl.constexpr, HAS_SEL: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = h < H
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (t * H + h[:, None]) * D + d[None, :], mask=hm[:, None], other=0.0)
    pos = tl.load(qpos_ptr + t)
    m = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32)  # the sink: max starts there, sum at 1
    l = tl.full([BH], 1.0, tl.float32)
    acc = tl.zeros([BH, D], tl.float32)
    lo = tl.load(lo_ptr + t)
    hi = tl.load(hi_ptr + t)
    ss = tl.arange(0, BS)
    for s0 in range(lo, hi, BS):
        rows = s0 + ss
        rm = rows < hi
        kp = tl.load(kvpos_ptr + rows, mask=rm, other=-1)
        valid = rm & (kp <= pos) & (kp > pos - window) & (kp >= 0)
        keys = tl.load(kv_ptr + rows[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
        m, l, acc = _step(m, l, acc, q, keys, valid, scale)
    if HAS_COMP:
        nvis = tl.minimum(n_comp, (pos + 1) // ratio)
        kk = tl.arange(0, BK)
        if HAS_SEL:
            for k0 in range(0, n_sel, BK):
                km = (k0 + kk) < n_sel
                j = tl.load(sel_ptr + t * n_sel + k0 + kk, mask=km, other=-1)
                valid = km & (j >= 0) & (j < nvis)
                jj = tl.where(valid, j, 0)
                keys = tl.load(comp_ptr + jj[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
                m, l, acc = _step(m, l, acc, q, keys, valid, scale)
        else:
            for k0 in range(0, nvis, BK):
                j = k0 + kk
                valid = j < nvis
                keys = tl.load(comp_ptr + j[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
                m, l, acc = _step(m, l, acc, q, keys, valid, scale)
    o = acc / l[:, None]
    tl.store(out_ptr + (t * H + h[:, None]) * D + d[None, :], o, mask=hm[:, None])


def launch(q, q_pos, kv, kv_pos, window: int, comp, ratio: int, comp_sel, sinks, scale: float,
           tiles: dict | None = None):
    """The contract's sparse_attention on torch tensors: q [T, H, D] -> [T, H, D] float32."""
    import torch

    T, H, D = q.shape
    t = tiles or {}
    if T == 0:
        return torch.empty((T, H, D), dtype=torch.float32, device=q.device)
    dp = max(16, triton.next_power_of_2(D))  # tl.arange needs a power of two, tl.dot K >= 16: zero-pad
    if dp != D:
        pad = torch.nn.functional.pad
        q, kv = pad(q, (0, dp - D)), pad(kv, (0, dp - D))
        comp = None if comp is None else pad(comp, (0, dp - D))
    out = torch.empty((T, H, dp), dtype=torch.float32, device=q.device)
    # each token's window as a row range of the ascending kv_pos (the host side of a block table)
    lo = torch.searchsorted(kv_pos, q_pos - window + 1).to(torch.int32)
    hi = torch.searchsorted(kv_pos, q_pos, right=True).to(torch.int32)
    dummy = torch.zeros(1, dtype=q.dtype, device=q.device)
    has_comp = comp is not None and comp.shape[0] > 0
    has_sel = has_comp and comp_sel is not None
    n_sel = comp_sel.shape[1] if has_sel else 0
    if has_sel and n_sel == 0:
        has_comp = has_sel = False
    if has_sel:
        # the reference attends each selected entry once: repeated indices in a row become -1
        comp_sel = torch.sort(comp_sel, dim=1).values
        comp_sel[:, 1:] = torch.where(comp_sel[:, 1:] == comp_sel[:, :-1], -1, comp_sel[:, 1:])
    bh = min(t.get("BH", 16), max(16, triton.next_power_of_2(H)))
    sparse_attention_kernel[(T, triton.cdiv(H, bh))](
        q.contiguous(), q_pos.contiguous(), kv.contiguous(), kv_pos.contiguous(), lo, hi,
        comp.contiguous() if has_comp else dummy, comp_sel.contiguous() if has_sel else dummy.to(torch.int64),
        sinks.contiguous(), out, window, ratio, comp.shape[0] if has_comp else 0, n_sel, scale,
        H=H, D=dp, BH=bh, BS=t.get("BS", 32), BK=t.get("BK", 32), HAS_COMP=has_comp, HAS_SEL=has_sel)
    return out if dp == D else out[..., :D].contiguous()


def compile_spec(shape: dict, tiles: dict) -> tuple:
    sig = {"q_ptr": "*bf16", "qpos_ptr": "*i64", "kv_ptr": "*bf16", "kvpos_ptr": "*i64", "lo_ptr": "*i32",
           "hi_ptr": "*i32", "comp_ptr": "*bf16", "sel_ptr": "*i64", "sink_ptr": "*fp32", "out_ptr": "*fp32",
           "window": "i32", "ratio": "i32", "n_comp": "i32", "n_sel": "i32", "scale": "fp32"}
    consts = {"H": shape["heads"], "D": shape["head_dim"], "BH": tiles["BH"], "BS": tiles["BS"], "BK": tiles["BK"],
              "HAS_COMP": True, "HAS_SEL": True}
    return sparse_attention_kernel, sig, consts
