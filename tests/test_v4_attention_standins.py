"""The V4 attention-side vendor stand-ins (ascend/standins/v4_attention.py): bound to vllm-ascend's real schemas,
holding the owners' compressor_metadata cases, agreeing with the NumPy golden (ops/attention_kernels.py), and
carrying a V4-shaped model through the torch backend in bfloat16 on A3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ascend import soc as S
from ascend.standins import v4_attention as V
from ascend.torch_backend import TorchBackend
from common.generate import SamplingParams, generate
from common.model import Model
from common.presets import random_weights
from ops.attention_kernels import SLOT_BLOCK_OFFSET, SLOT_FLAT
from ops.numpy_ref import NumpyBackend
from ops.quant import act_quant_per_token

from .conftest import small_config
from .test_attention_kernels import OWNER_CASES, _paged, _rope_table

R = NumpyBackend()
BF = torch.bfloat16
VENDOR = {S.TORCH_NPU, S.CUSTOM, S.COMPOSED}


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("ratio,qsl,start,table,want", OWNER_CASES)
def test_compressor_metadata_standin_owner_cases(ratio, qsl, start, table, want):
    rows = max(2048, max(s + qsl[i + 1] - qsl[i] for i, s in enumerate(start)) + 1)
    cos_t, sin_t = (_t(a).to(BF) for a in _rope_table(rows))
    args = (_t(np.array(qsl, np.int32)), _t(np.array(start, np.int32)), _t(np.array(table, np.int32)), 128)
    cos, sin, slot = V.compressor_metadata(cos_t, sin_t, *args, SLOT_BLOCK_OFFSET, ratio, len(want), len(start))
    assert [tuple(r) for r in slot.tolist()] == want and slot.dtype == torch.int32
    assert cos.shape == (len(want), 1, 1, 64) and cos.dtype == BF
    _, _, flat = V.compressor_metadata(cos_t, sin_t, *args, SLOT_FLAT, ratio, len(want), len(start))
    assert flat.tolist() == [b * 128 + o if b >= 0 else -1 for b, o in want]


def test_schemas_refuse_what_the_bindings_refuse():
    cos = torch.ones((4, 64), dtype=BF)
    i32 = torch.zeros(2, dtype=torch.int32)
    bt = torch.zeros((1, 1), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="num_reqs_actual should be greater than 0"):
        V.compressor_metadata(cos, cos, i32, i32[:1], bt, 128, 1, 4, 1, 0)
    with pytest.raises(RuntimeError, match="num_reqs_actual"):  # misspelt keyword: the real schema is parsed
        V.compressor_metadata(cos, cos, i32, i32[:1], bt, 128, 1, 4, 1, num_reqs=1)
    q = torch.zeros((2, 64, 512), dtype=BF)
    with pytest.raises(RuntimeError):  # keyword-only arguments passed positionally
        V.npu_sparse_attn_sharedkv(q, torch.zeros((2, 16, 1, 512), dtype=BF))
    kv = torch.zeros((2, 16, 1, 512), dtype=BF)
    args = dict(ori_kv=kv, ori_block_table=bt, cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
                seqused_kv=torch.tensor([2], dtype=torch.int32), sinks=torch.zeros(64), softmax_scale=0.1,
                ori_win_left=127, layout_q="TND")
    with pytest.raises(RuntimeError, match="metadata is required"):
        V.npu_sparse_attn_sharedkv(q, **args)
    meta = V.npu_sparse_attn_sharedkv_metadata(64, 1, 512, batch_size=1)
    with pytest.raises(RuntimeError, match="N1 must be 64"):
        V.npu_sparse_attn_sharedkv(q[:, :32], metadata=meta, **{**args, "sinks": torch.zeros(32)})
    with pytest.raises(RuntimeError, match=r"K2 512 only"):
        V.npu_sparse_attn_sharedkv(q, metadata=meta, cmp_kv=kv, cmp_block_table=bt, cmp_ratio=4,
                                   cmp_sparse_indices=torch.zeros((2, 1, 256), dtype=torch.int32), **args)
    out, lse = V.npu_sparse_attn_sharedkv(q, metadata=meta, **args)
    assert out.shape == q.shape and out.dtype == BF and lse.numel() == 0


def test_compressor_standin_matches_the_golden():
    """C4Li (D 128, coff 2, ratio 4) and C128A (D 512, coff 1) over a paged state, chunked, bf16 inputs."""
    rng = np.random.default_rng(0)
    H, bs = 1024, 16
    for D, coff, r, T in ((128, 2, 4, 37), (512, 1, 128, 300)):
        x = (rng.standard_normal((T, H)) * 0.5).astype(np.float32)
        wkv, wgate = ((rng.standard_normal((coff * D, H)) * 0.03).astype(np.float32) for _ in range(2))
        ape = rng.standard_normal((r, coff * D)).astype(np.float32)
        norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
        bf = [_t(a).to(BF) for a in (x, wkv, wgate, norm_w)]
        x, wkv, wgate, norm_w = (t.float().numpy() for t in bf)  # the golden sees the same bf16 values
        ang = np.arange(T + 1, dtype=np.float32)[:, None] * (1.0 / 10000 ** (np.arange(0, 64, 2) / 64)).astype(
            np.float32)
        cos_t = np.concatenate([np.cos(ang)] * 2, 1).astype(np.float32)
        sin_t = np.concatenate([np.sin(ang)] * 2, 1).astype(np.float32)
        cos_t, sin_t = (_t(a).to(BF).float().numpy() for a in (cos_t, sin_t))
        n_blocks = -(-T // bs) + 1
        st_np = np.zeros((n_blocks, bs, 2 * coff * D), np.float32)
        st_t = torch.zeros_like(_t(st_np))
        table = np.arange(1, n_blocks, dtype=np.int32)[None][:, ::-1].copy()  # reversed pages
        got, want, pos = [], [], 0
        for n in (T // 3, 1, T - T // 3 - 1):
            cu, sp = np.array([0, n], np.int32), np.array([pos], np.int32)
            rows = min(n, n // r + 1)
            cos, sin, _ = R.compressor_metadata(cos_t, sin_t, cu, sp, table, bs, SLOT_FLAT, r, rows, 1)
            cos, sin = cos.reshape(rows, 64), sin.reshape(rows, 64)
            want.append(R.compressor(x[pos:pos + n], wkv, wgate, st_np, ape, norm_w, sin, cos, table, cu, None, sp,
                                     64, r, coff, 1e-6, 2, 1))
            got.append(V.compressor(bf[0][pos:pos + n], bf[1], bf[2], st_t, _t(ape), bf[3], _t(sin).to(BF),
                                    _t(cos).to(BF), _t(table), _t(cu), None, _t(sp), 64, r, coff, 1e-6, 2, 1)
                       .float().numpy())
            pos += n
        g, w = np.concatenate(got), np.concatenate(want)
        assert g.shape == w.shape
        # bf16 output rounding of unit-RMS entries, rope tables in bf16 on both sides
        np.testing.assert_allclose(g, w, atol=3e-2, rtol=2e-2)
        np.testing.assert_allclose(st_t.numpy(), st_np, atol=1e-5, rtol=1e-5)  # the float32 state agrees


def test_int8_indexer_standin_selects_what_the_golden_selects():
    rng = np.random.default_rng(1)
    N, D, ratio, K, bs = 64, 128, 4, 512, 64
    lens, nq = [2600, 800], [3, 2]  # 650 entries > 512: the top-k really chooses; 200 < 512: all, then -1
    keys = [rng.standard_normal((L // ratio, D)).astype(np.float32) for L in lens]
    kq = [act_quant_per_token(k) for k in keys]
    kcache, table = _paged([k for k, _ in kq], D, bs, np.random.default_rng(5), np.int8)
    scache, _ = _paged([s.reshape(-1, 1) for _, s in kq], 1, bs, np.random.default_rng(5))
    q = rng.standard_normal((sum(nq), N, D)).astype(np.float32)
    qq, qs = act_quant_per_token(q)
    w = rng.standard_normal((sum(nq), N)).astype(np.float16)
    qs16, ks16 = qs[..., 0].astype(np.float16), scache[..., 0].astype(np.float16)
    ends, kl = np.cumsum(nq).astype(np.int32), np.array(lens, np.int32)
    want, _ = R.lightning_indexer(qq, kcache, w.astype(np.float32), qs16.astype(np.float32),
                                  ks16.astype(np.float32), 0, 0, ends, kl, table, None, "TND", "PA_BSND", K, 3,
                                  cmp_ratio=ratio)
    meta = V.npu_vllm_quant_lightning_indexer_metadata(64, 1, 128, 0, 0, batch_size=2)
    got, vals = V.npu_vllm_quant_lightning_indexer(_t(qq), _t(kcache), _t(w), _t(qs16), _t(ks16), 0, 0, _t(ends),
                                                   _t(kl), _t(table), meta, "TND", "PA_BSND", K, 3,
                                                   cmp_ratio=ratio)
    got = got.numpy()
    assert got.shape == (5, 1, K) and vals.numel() == 0
    # request 2's queries sit at 798 and 799: 199 and 200 visible entries, then -1
    assert (got[3, 0, :199] >= 0).all() and (got[3, 0, 199:] == -1).all()
    assert (got[4, 0, :200] >= 0).all() and (got[4, 0, 200:] == -1).all()
    # the same sets (the two fold the dequant scales in a different order: allow a near-tie swap at the edge)
    for t in range(5):
        a, b = set(got[t, 0].tolist()), set(want[t, 0].tolist())
        assert len(a ^ b) <= 2, t


def test_sparse_attn_standin_matches_the_golden():
    rng = np.random.default_rng(2)
    H, D, W, ratio, bs, K = 64, 512, 128, 4, 64, 512
    lens, nq = [2300, 150], [70, 1]
    raw = [rng.standard_normal((L, D)).astype(np.float32) for L in lens]
    comp = [rng.standard_normal((L // ratio, D)).astype(np.float32) for L in lens]
    raw = [_t(a).to(BF).float().numpy() for a in raw]
    comp = [_t(a).to(BF).float().numpy() for a in comp]
    ori, obt = _paged(raw, D, bs, rng)
    cmp, cbt = _paged(comp, D, bs, rng)
    q = _t(rng.standard_normal((sum(nq), H, D)).astype(np.float32) * 0.05).to(BF)
    sinks = rng.standard_normal(H).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    sel = np.full((sum(nq), 1, K), -1, np.int32)
    for t in range(sum(nq)):
        b = int(np.searchsorted(cu, t, side="right") - 1)
        pick = rng.permutation(len(comp[b]))[:K]
        sel[t, 0, : len(pick)] = pick
    kw = dict(cmp_ratio=ratio, ori_win_left=W - 1, layout_q="TND", layout_kv="PA_ND", softmax_scale=D ** -0.5)
    want, _ = R.sparse_attn_sharedkv(q.float().numpy(), ori_kv=ori, cmp_kv=cmp, cmp_sparse_indices=sel,
                                     ori_block_table=obt, cmp_block_table=cbt, cu_seqlens_q=cu,
                                     seqused_kv=np.array(lens, np.int32), sinks=sinks, **kw)
    meta = V.npu_sparse_attn_sharedkv_metadata(64, 1, 512, batch_size=2, cmp_topk=512)
    got, _ = V.npu_sparse_attn_sharedkv(q, ori_kv=_t(ori).to(BF), cmp_kv=_t(cmp).to(BF),
                                        cmp_sparse_indices=_t(sel), ori_block_table=_t(obt), cmp_block_table=_t(cbt),
                                        cu_seqlens_q=_t(cu), seqused_kv=_t(np.array(lens, np.int32)),
                                        sinks=_t(sinks), metadata=meta, **kw)
    g = got.float().numpy()
    assert np.abs(g - want).max() <= 1e-2 * np.abs(want).max() + 1e-3  # bf16 output rounding


# ---- a V4-shaped model through the lowering: every attention-side op on its vendor stand-in ----------------
def vendor_config(**over):
    """Small except where the kernels pin the shape: 64 heads of 512 (rope 64), hidden 1024 (compressor H >=
    1K), indexer 64 heads of 128 with top-k 512, window 128, C4 and C128 layers."""
    raw = dict(hidden_size=1024, num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=32,
               o_lora_rank=32, o_groups=8, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
               num_hash_layers=1, sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512,
               compress_ratios=[0, 4, 128], num_hidden_layers=3, vocab_size=256)
    raw.update(over)
    return small_config(**raw)


ATTN_OPS = {"compressor": "custom:compressor", "compressor_metadata": "custom:compressor_metadata",
            "lightning_indexer": "custom:npu_vllm_quant_lightning_indexer",
            "sparse_attn_sharedkv": "custom:npu_sparse_attn_sharedkv", "kv_scatter": "custom:npu_scatter_nd_update_v2"}


@pytest.fixture(scope="module")
def vendor_models():
    cfg = vendor_config()
    w = random_weights(cfg, seed=3)
    B = TorchBackend(soc=S.A3, providers=VENDOR, dtype="bfloat16")
    w16 = {k: (torch.from_numpy(np.asarray(v)).to(BF) if np.asarray(v).dtype == np.float32
               and not k.endswith(("ape", "attn_sink", "_fn", "_scale", "_base", "bias")) else v)
           for k, v in w.items()}
    # the reference sees the same bf16-valued weights, widened to float32
    w32 = {k: (v.float().numpy() if isinstance(v, torch.Tensor) else v) for k, v in w16.items()}
    return cfg, Model(cfg, w16, B), Model(cfg, w32, NumpyBackend()), B


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_v4_shaped_model_runs_the_attention_kernels_on_a3(vendor_models):
    cfg, dev, ref, B = vendor_models
    assert dev.index_int8  # the int8 indexer kernel is the variant: the index cache holds int8 + scales
    rng = np.random.default_rng(7)
    prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (300, 131, 9)]
    params = SamplingParams(max_new_tokens=3, stop_on_eos=False)
    got = generate(dev, prompts, params, keep_prompt_logits=True)
    used = B.variants()
    for op, kernel in ATTN_OPS.items():
        assert used[op] == kernel, (op, used.get(op))
    want = generate(ref, prompts, params, keep_prompt_logits=True)
    # the same lowering with the attention side composed, same dtype: the stand-ins add no error of their own
    comp = generate(Model(cfg, dev.w, TorchBackend(soc=S.A3, providers={S.TORCH_NPU, S.COMPOSED}, dtype="bfloat16")),
                    prompts, params, keep_prompt_logits=True)
    agree = []
    for g, w, c in zip(got.prompt_logits, want.prompt_logits, comp.prompt_logits, strict=True):
        g, c = np.asarray(g, np.float32), np.asarray(c, np.float32)
        assert _cos(g, c) >= 0.9995
        # bf16 against the float32 golden on random weights (measured: cos 0.9990-0.99996, the composed bf16
        # path the same); top-1 of a random model's near-tied logits is pooled over all prompt rows
        assert _cos(g, w) >= 0.998
        agree.extend(np.argmax(g, -1) == np.argmax(w, -1))
    assert np.mean(agree) >= 0.9


def test_v4_shaped_chunked_prefill_through_the_kernels(vendor_models):
    cfg, dev, _, _ = vendor_models
    ids = np.random.default_rng(8).integers(2, cfg.vocab_size, 280).tolist()
    full = dev.forward([dev.new_cache()], [ids], all_logits=True).logits[0].float().numpy()
    c, parts, a = dev.new_cache(), [], 0
    for n in (100, 1, 130, 49):
        parts.append(dev.forward([c], [ids[a:a + n]], all_logits=True).logits[0].float().numpy())
        a += n
    got = np.concatenate(parts)
    # bf16: chunking changes GEMM shapes and so roundings (measured cos 0.9996); the float32 reference holds
    # chunked == full to 1e-5 (tests/test_incremental.py)
    assert _cos(got, full) >= 0.999
    assert np.mean(np.argmax(got, -1) == np.argmax(full, -1)) >= 0.95


@pytest.mark.parametrize("soc", ["A2", "A3", "950"])
def test_doctor_names_the_attention_kernel_per_soc(soc):
    """`dsv4 doctor --model flash-slice --soc X --dtype bfloat16`: the vendor kernel where one exists for the SoC,
    and why not where none does (the compressor on A2 per its README; 950's fp8 caches)."""
    from tools.doctor_cmd import doctor_report

    ops = doctor_report(soc=soc, model="flash-slice", dtype="bfloat16")["ops"]
    chosen = {op: ops[op][op]["chosen"] for op in ("compressor", "lightning_indexer", "sparse_attn_sharedkv")}
    want = {
        "A2": {"compressor": "composed:", "lightning_indexer": "custom:npu_vllm_quant_lightning_indexer",
               "sparse_attn_sharedkv": "custom:npu_sparse_attn_sharedkv"},
        "A3": {"compressor": "custom:compressor", "lightning_indexer": "custom:npu_vllm_quant_lightning_indexer",
               "sparse_attn_sharedkv": "custom:npu_sparse_attn_sharedkv"},
        "950": {"compressor": "custom:compressor", "lightning_indexer": "composed:",
                "sparse_attn_sharedkv": "composed:"},
    }[soc]
    assert chosen == want
    if soc == "A2":
        why = {v["variant"]: v["reason"] for v in ops["compressor"]["compressor"]["variants"]}
        assert why["custom:compressor"] == "not on A2"
    if soc == "950":
        why = {v["variant"]: v["reason"] for v in ops["sparse_attn_sharedkv"]["sparse_attn_sharedkv"]["variants"]}
        assert "fp8 KV rows" in why["custom:npu_kv_quant_sparse_attn_sharedkv"]
        scat = {v["variant"]: v["reason"] for v in ops["scatter_update"]["kv_scatter"]["variants"]}
        assert "read only by npu_kv_quant_sparse_attn_sharedkv" in scat["custom:kv_compress_epilog"]
        assert "fp8-key npu_vllm_quant_lightning_indexer" in scat["custom:indexer_compress_epilog_v2"]
