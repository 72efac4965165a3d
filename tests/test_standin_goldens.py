"""The peers' own op goldens and pass criteria, held against the stand-ins AND the NumPy reference.

Formulas and criteria are re-implemented here from (all read at the commits in ascend/schemas/):
- vllm-ascend tests/e2e/nightly/single_node/ops/singlecard_ops/test_npu_hc_pre.py: inputs x = 2 U(0,1) in bf16,
  hc_fn = U(0,1)/(hc*d), hc_scale = 2 U(0,1), hc_base = 2 U(0,1); golden mixes = linear(HF32(x), HF32(hc_fn))
  * rsqrt(mean(x^2) + eps) (HF32 = fp32 with the low 13 mantissa bits cleared, round toward zero); criteria: y
  within 4e-3 (abs or rel) for >= 98% of elements, post / comb within 1e-4 for >= 99.5%; shapes [2,4,4096],
  [1,2,4,4096], [4,4,4096], [2,4,7168].
- vllm-ascend .../test_npu_moe_gating_top_k.py: x, bias U(-2,2); norm (softmax / sigmoid), + bias, group-limited
  (group max or top-2 sum) stable descending top-k, weights the unbiased norm renormalized for sigmoid, times the
  scaling factor; numpy allclose rtol 1e-5, atol 1e-8 and exact ids.
- cann-recipes-infer test_npu_moe_gating_top_k.py: the V4 router (sigmoid / sqrt(softplus), tid2eid hash
  routing, 256 and 384 experts, fp16/bf16/fp32), allclose rtol 0.01, atol 0.001 and exact ids.
- vllm-ascend .../test_fused_moe.py: torch_moe golden (each copy through its expert's SwiGLU MLP, weighted by the
  top-k weights, summed over k) and apply_mlp's npu_grouped_matmul call form; assert_close atol 4e-2, rtol 1.
- cann-recipes-infer ops/ascendc/examples/test_npu_hc_pre.py (data_compare: relative diff per element with the
  2^-14/thd floor, y 0.004 with <= 2% failing, post/comb 1e-4 with <= 0.5% failing; inputs x U(0,2) bf16,
  hc_fn U(0, 1/(hc*d)), scale / base U(0,2)), test_npu_hc_post.py (out = post x + sum_j comb[j,i] res_j,
  U(-10,10) inputs; the default data_compare 0.005 / 0.5%), test_npu_hc_pre_sinkhorn.py (float64 golden,
  allclose 1e-4 for y, 1e-5 for post / comb).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ascend.standins import cann_recipes as cr  # noqa: E402
from ascend.standins import torch_npu as tn  # noqa: E402
from ascend.standins import vllm_ascend as va  # noqa: E402
from ops.numpy_ref import NumpyBackend  # noqa: E402

R = NumpyBackend()
HC, MIX, ITERS, EPS = 4, 24, 20, 1e-6


# ---- the peers' criteria ------------------------------------------------------------------------------------
def pass_rate_vllm(actual, expected, thd: float) -> float:
    """vllm-ascend _assert_close_with_pass_rate: an element passes if |a-e| <= thd or |a-e|/max(|a|,|e|) <= thd."""
    a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    d = np.abs(a - e)
    mag = np.maximum(np.maximum(np.abs(a), np.abs(e)), np.finfo(np.float32).tiny)
    return float(((d <= thd) | (d / mag <= thd)).mean())


def pass_rate_cann(actual, expected, thd: float) -> float:
    """cann-recipes-infer data_compare: relative diff with the floor (2^-14)/thd, elements under thd in abs pass."""
    a, e = np.asarray(actual, np.float32).ravel(), np.asarray(expected, np.float32).ravel()
    d = np.abs(a - e)
    b = np.maximum(np.maximum(np.abs(a), np.abs(e)), (1.0 / (1 << 14)) / thd) + 10e-10
    r = np.where(d < thd, d, d / b)
    return float((r <= thd).mean())


def f32(t) -> torch.Tensor:
    return t.float() if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t, np.float32))


def hf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> HF32 (10 mantissa bits, round toward zero), as the HcPre cube matmul sees its operands."""
    return (t.contiguous().view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)


def golden_hc_pre(x, hc_fn, hc_scale, hc_base, iters=ITERS, norm_eps=EPS, hc_eps=EPS):
    xf = x.float()
    flat = xf.flatten(-2)
    mixes = torch.nn.functional.linear(hf32(flat), hf32(hc_fn)) * torch.rsqrt(flat.square().mean(-1, True) + norm_eps)
    pre, post, comb = mixes.split([HC, HC, HC * HC], dim=-1)
    pre = torch.sigmoid(pre * hc_scale[0] + hc_base[:HC]) + hc_eps
    post = 2 * torch.sigmoid(post * hc_scale[1] + hc_base[HC:2 * HC])
    comb = comb.unflatten(-1, (HC, HC)) * hc_scale[2] + hc_base[2 * HC:].view(HC, HC)
    comb = comb.softmax(-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return (pre.unsqueeze(-1) * xf).sum(-2).to(x.dtype), post, comb


def _ref_hc_pre(x, hc_fn, hc_scale, hc_base):
    """The NumPy reference on the same inputs (float32 of the bf16 values), reshaped to x's leading axes."""
    lead, d = tuple(x.shape[:-2]), x.shape[-1]
    y, post, comb = R.hc_pre(x.float().reshape(-1, HC, d).numpy(), hc_fn.numpy(), hc_scale.numpy(), hc_base.numpy(),
                             ITERS, EPS, EPS)
    return y.reshape(*lead, d), post.reshape(*lead, HC), comb.reshape(*lead, HC, HC)


HC_PRE_IMPLS = {
    "vllm_ascend.npu_hc_pre_v2": lambda x, f, s, b: va.npu_hc_pre_v2(x, f, s, b, HC, ITERS, EPS, EPS),
    "cann_recipes.npu_hc_pre": lambda x, f, s, b: cr.npu_hc_pre(x, f, s, b, hc_mult=HC, hc_sinkhorn_iters=ITERS,
                                                                norm_eps=EPS, hc_eps=EPS),
    "numpy reference": _ref_hc_pre,
}


# ---- hc_pre ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", sorted(HC_PRE_IMPLS))
@pytest.mark.parametrize("shape", [(2, HC, 4096), (1, 2, HC, 4096), (4, HC, 4096), (2, HC, 7168)])
def test_hc_pre_vllm_ascend_golden(impl, shape):
    torch.manual_seed(1024)
    d = shape[-1]
    x = (torch.rand(shape) * 2).to(torch.bfloat16)
    hc_fn = torch.rand(MIX, HC * d) / (HC * d)
    hc_scale, hc_base = torch.rand(3) * 2, torch.rand(MIX) * 2
    gy, gpost, gcomb = golden_hc_pre(x, hc_fn, hc_scale, hc_base)
    y, post, comb = HC_PRE_IMPLS[impl](x, hc_fn, hc_scale, hc_base)
    lead = shape[:-2]
    assert tuple(y.shape) == (*lead, d) and tuple(post.shape) == (*lead, HC) and tuple(comb.shape) == (*lead, HC, HC)
    if impl != "numpy reference":
        assert y.dtype == torch.bfloat16 and post.dtype == torch.float32 and comb.dtype == torch.float32
    assert pass_rate_vllm(f32(y), gy.float(), 4e-3) >= 0.98
    assert pass_rate_vllm(f32(post), gpost, 1e-4) >= 0.995
    assert pass_rate_vllm(f32(comb), gcomb, 1e-4) >= 0.995


@pytest.mark.parametrize("impl", sorted(HC_PRE_IMPLS))
@pytest.mark.parametrize("d", [4096, 7168])
def test_hc_pre_cann_recipes_golden(impl, d):
    rng = np.random.default_rng(42)  # their inputs (np.random.seed(42)); b=1, s=16 here instead of 192 for speed
    shape = (1, 16, HC, d)
    hc_scale = torch.tensor(rng.uniform(0, 2, 3), dtype=torch.float32)
    hc_base = torch.tensor(rng.uniform(0, 2, MIX), dtype=torch.float32)
    hc_fn = torch.tensor(rng.uniform(0, 1.0 / (HC * d), (MIX, HC * d)), dtype=torch.float32)
    x = torch.tensor(rng.uniform(0, 2, shape), dtype=torch.float32).to(torch.bfloat16)
    gy, gpost, gcomb = golden_hc_pre(x, hc_fn, hc_scale, hc_base)
    y, post, comb = HC_PRE_IMPLS[impl](x, hc_fn, hc_scale, hc_base)
    assert pass_rate_cann(f32(y), gy.float(), 0.004) >= 0.98
    assert pass_rate_cann(f32(post), gpost, 1e-4) >= 0.995
    assert pass_rate_cann(f32(comb), gcomb, 1e-4) >= 0.995


def test_hc_pre_sinkhorn_cann_recipes_golden():
    rng = np.random.default_rng(0)
    b, s, d = 1, 4, 4096
    mixes, rsqrt = rng.uniform(-2, 2, (b, s, MIX)), rng.uniform(-2, 2, (b, s))
    scale, base = rng.uniform(-2, 2, 3), rng.uniform(-2, 2, MIX)
    x = torch.tensor(rng.uniform(-2, 2, (b, s, HC, d)), dtype=torch.float32).to(torch.bfloat16)
    # the float64 golden (sink_horn_numpy / hc_pre_sinkhorn_numpy)
    m = mixes * rsqrt[..., None]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    pre = sig(m[..., :HC] * scale[0] + base[:HC]) + 1e-5
    post = sig(m[..., HC:2 * HC] * scale[1] + base[HC:2 * HC]) * 2
    c = m[..., 2 * HC:].reshape(b, s, HC, HC) * scale[2] + base[2 * HC:].reshape(HC, HC)
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + 1e-5
    c = c / (c.sum(-2, keepdims=True) + 1e-5)
    for _ in range(ITERS - 1):
        c = c / (c.sum(-1, keepdims=True) + 1e-5)
        c = c / (c.sum(-2, keepdims=True) + 1e-5)
    gy = torch.tensor((pre[..., None] * x.double().numpy()).sum(2)).to(torch.bfloat16).float()
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    y, p, cc = cr.npu_hc_pre_sinkhorn(t(mixes), t(rsqrt), t(scale), t(base), x, HC, ITERS, 1e-5)
    np.testing.assert_allclose(y.float().numpy().ravel(), gy.numpy().ravel(), rtol=1e-4, atol=1e-4)
    # post / comb against the float64 golden: their 1e-5 criterion
    np.testing.assert_allclose(p.numpy(), post, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cc.numpy(), c, rtol=1e-5, atol=1e-5)


# ---- hc_post ----------------------------------------------------------------------------------------------------
def golden_hc_post(x, residual, post, comb):
    """cann-recipes-infer _hc_post_cpu: post * x + sum over j of comb[.., j, i] * residual[.., j, :]."""
    out = post.float().unsqueeze(-1) * x.float().unsqueeze(-2) + torch.sum(
        comb.float().unsqueeze(-1) * residual.float().unsqueeze(-2), dim=x.dim() - 1)
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [4096, 7168])
def test_hc_post_cann_recipes_golden(dtype, d):
    rng = np.random.default_rng(0)
    b, s = 4, 4
    u = lambda *sh: torch.tensor(rng.uniform(-10, 10, sh), dtype=torch.float32).to(dtype)  # noqa: E731
    x, residual, post, comb = u(b, s, d), u(b, s, HC, d), u(b, s, HC), u(b, s, HC, HC)
    want = golden_hc_post(x, residual, post, comb).float()
    got = {
        "vllm_ascend [b,s,..]": va.npu_hc_post(x, residual, post, comb),
        "cann_recipes [b,s,..]": cr.npu_hc_post(x, residual, post, comb),
        "cann_recipes [bs,..]": cr.npu_hc_post(x.flatten(0, 1), residual.flatten(0, 1), post.flatten(0, 1),
                                               comb.flatten(0, 1)).reshape(b, s, HC, d),
        "numpy reference": torch.tensor(R.hc_post(*(t.float().flatten(0, 1).numpy() for t in (x, residual, post, comb)))
                                        ).reshape(b, s, HC, d).to(dtype),
    }
    for name, out in got.items():
        assert out.dtype == dtype, name
        assert pass_rate_cann(out.float(), want, 0.005) >= 0.995, name


# ---- moe gating ---------------------------------------------------------------------------------------------------
def golden_gating(x, k, bias, k_group, group_count, group_select_mode, norm_type, scale=1.0, eps=1e-20):
    """vllm-ascend moe_gating_top_k_numpy_ref (renorm 0: only the sigmoid weights are renormalized)."""
    xf = x.astype(np.float32)
    if norm_type == 0:
        e = np.exp(xf - xf.max(-1, keepdims=True))
        norm = e / e.sum(-1, keepdims=True)
    else:
        norm = 1 / (1 + np.exp(-xf))
    choice = norm + bias if bias is not None else norm
    if group_count > 1:
        g = choice.reshape(len(x), group_count, -1)
        gs = g.max(-1) if group_select_mode == 0 else np.partition(g, -2, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :k_group]
        mask = np.ones((len(x), group_count), bool)
        mask[np.arange(len(x))[:, None], keep] = False
        choice = np.where(mask[..., None], -np.inf, g).reshape(len(x), -1)
    idx = torch.sort(torch.from_numpy(choice), dim=-1, stable=True, descending=True).indices[:, :k].numpy()
    y = np.take_along_axis(norm, idx, axis=1)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdims=True) + eps)
    return y * scale, idx.astype(np.int32)


GATES = {
    "torch_npu.npu_moe_gating_top_k": lambda x, k, b, kg, gc, gsm, nt: tn.npu_moe_gating_top_k(
        x, k, bias=b, k_group=kg, group_count=gc, group_select_mode=gsm, norm_type=nt),
    "vllm_ascend.moe_gating_top_k_hash": lambda x, k, b, kg, gc, gsm, nt: va.moe_gating_top_k_hash(
        x, k, b, None, None, kg, gc, 1.0, 1e-20, gsm, 0, nt),
    "cann_recipes.npu_moe_gating_top_k": lambda x, k, b, kg, gc, gsm, nt: cr.npu_moe_gating_top_k(
        x, k, bias=b, k_group=kg, group_count=gc, group_select_mode=gsm, norm_type=nt, eps=1e-20),
}


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("group_select_mode", [0, 1])
@pytest.mark.parametrize("norm_type", [0, 1])
@pytest.mark.parametrize("group_count", [1, 8])
def test_moe_gating_vllm_ascend_golden(gate, group_select_mode, norm_type, group_count):
    rng = np.random.default_rng(45)
    for k in (4, 16, 32):
        for tokens in (1, 8, 16):
            for experts in (64, 128, 256):
                if k > experts // group_count:  # their skip rule
                    continue
                x = rng.uniform(-2, 2, (tokens, experts)).astype(np.float32)
                bias = rng.uniform(-2, 2, experts).astype(np.float32)
                gy, gidx = golden_gating(x, k, bias, 1, group_count, group_select_mode, norm_type)
                y, idx, _ = GATES[gate](torch.from_numpy(x), k, torch.from_numpy(bias), 1, group_count,
                                        group_select_mode, norm_type)
                np.testing.assert_array_equal(idx.numpy(), gidx)
                np.testing.assert_allclose(y.numpy(), gy, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("norm_type,score_func", [(0, "softmax"), (1, "sigmoid")])
def test_moe_gating_golden_numpy_reference(norm_type, score_func):
    """The reference's router (no expert groups in V4) against the same golden."""
    rng = np.random.default_rng(45)
    for k, experts in ((4, 64), (8, 256)):
        x = rng.uniform(-2, 2, (16, experts)).astype(np.float32)
        bias = rng.uniform(-2, 2, experts).astype(np.float32)
        gy, gidx = golden_gating(x, k, bias, 1, 1, 0, norm_type)
        w, idx = R.moe_gate(x, np.eye(experts, dtype=np.float32), bias, None, None, k, score_func, 1.0,
                            norm_type == 1)
        order = np.argsort(idx, axis=1)  # the reference's top-k is unordered (argpartition)
        np.testing.assert_array_equal(np.take_along_axis(idx, order, 1), np.sort(gidx, axis=1))
        np.testing.assert_allclose(np.take_along_axis(w, order, 1),
                                   np.take_along_axis(gy, np.argsort(gidx, axis=1), 1), rtol=1e-5, atol=1e-7)


# ---- fused MoE (vllm-ascend test_fused_moe.py: torch_moe golden, apply_mlp's grouped-matmul calls) ---------------
def golden_moe(a, w1, w2, topk_weights, topk_ids):
    """torch_moe: every (token, k) copy through expert topk_ids[t, k] (silu(x w1[:n]) * x w1[n:]) w2, weighted by
    topk_weights and summed over k. w1 [e, 2n, d], w2 [e, d, n]."""
    B, D = a.shape
    topk = topk_ids.shape[1]
    x = a.repeat_interleave(topk, 0)
    out = torch.zeros(B * topk, w2.shape[1], dtype=torch.float64)
    ids = topk_ids.reshape(-1)
    for i in range(w1.shape[0]):
        m = ids == i
        if m.any():
            h = x[m].double() @ w1[i].double().t()
            n = h.shape[-1] // 2
            out[m] = (torch.nn.functional.silu(h[:, :n]) * h[:, n:]) @ w2[i].double().t()
    return (out.view(B, topk, -1) * topk_weights.double().view(B, topk, 1)).sum(1)


@pytest.mark.parametrize("e,topk", [(8, 2), (64, 6)])
def test_fused_moe_vllm_ascend_golden(e, topk):
    from ascend.torch_backend import TorchBackend
    from ops.contract import ExpertWeights

    torch.manual_seed(0)
    m, n, k = 16, 128, 128
    a = torch.randn(m, k) / 10
    w1, w2 = torch.randn(e, 2 * n, k) / 10, torch.randn(e, k, n) / 10
    topk_weights, topk_ids = torch.topk(torch.softmax(torch.randn(m, e), -1), topk)
    want = golden_moe(a, w1, w2, topk_weights, topk_ids)
    # their apply_mlp call form on the stand-ins: init_routing_v2 -> grouped_matmul (split_item 2, counts) -> swiglu
    ex, row_idx, counts, _ = tn.npu_moe_init_routing_v2(
        a, topk_ids.to(torch.int32), expert_num=e, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1, active_expert_range=[0, e])
    h = tn.npu_grouped_matmul(x=[ex], weight=[w1.transpose(1, 2)], split_item=2, group_list_type=1, group_type=0,
                              group_list=counts)[0]
    y = tn.npu_grouped_matmul(x=[tn.npu_swiglu(h)], weight=[w2.transpose(1, 2)], split_item=2, group_list_type=1,
                              group_type=0, group_list=counts)[0]
    got = (y[row_idx.long()].view(m, topk, k) * topk_weights[..., None]).sum(1)
    torch.testing.assert_close(got.double(), want, atol=4e-2, rtol=1)  # their criterion
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)  # and float32-tight on the CPU
    # the backend's lowering (finalize_routing) and the NumPy reference, on the same golden
    experts = ExpertWeights([w[:n] for w in w1], [w[n:] for w in w1], list(w2), n_experts=e)
    B = TorchBackend(soc="A2")
    lowered = B.moe_experts(a, topk_weights, topk_ids.long(), experts, 0.0)
    assert B.variants()["moe_experts"].startswith("torch_npu:npu_moe_init_routing_v2")
    torch.testing.assert_close(lowered.double(), want, atol=1e-5, rtol=1e-4)
    np_experts = ExpertWeights([x.numpy() for x in experts.w1], [x.numpy() for x in experts.w3],
                               [x.numpy() for x in experts.w2], n_experts=e)
    ref = R.moe_experts(a.numpy(), topk_weights.numpy(), topk_ids.numpy(), np_experts, 0.0)
    np.testing.assert_allclose(ref, want.numpy(), atol=1e-5, rtol=1e-4)


# ---- V4 router with hash routing (cann-recipes-infer test_npu_moe_gating_top_k.py) ------------------------------
def golden_gating_hash(x, k, input_ids, tid2eid, norm_type, eps):
    """moe_gating_top_k_numpy: sigmoid (1) or sqrt(softplus) (2) of float32(x); ids tid2eid[input_ids] when given,
    else the stable descending top-k; weights the scores at the ids over (their sum + eps)."""
    xf = x.float().numpy()
    norm = 1 / (1 + np.exp(-xf)) if norm_type == 1 else np.sqrt(np.log1p(np.exp(xf)))
    idx = tid2eid[input_ids] if tid2eid is not None else np.argsort(-norm, axis=-1, kind="stable")[:, :k]
    y = np.take_along_axis(norm, idx.astype(np.int64), axis=1)
    return y / (y.sum(-1, keepdims=True) + eps), idx.astype(np.int32)


HASH_GATES = {
    "vllm_ascend.moe_gating_top_k_hash": lambda x, k, ids, t2e, nt, eps: va.moe_gating_top_k_hash(
        x, k, None, ids, t2e, 1, 1, 1.0, eps, 0, 0, nt)[:2],
    "cann_recipes.npu_moe_gating_top_k": lambda x, k, ids, t2e, nt, eps: cr.npu_moe_gating_top_k(
        x, k, input_ids=ids, tid2eid=t2e, routed_scaling_factor=1.0, eps=eps, norm_type=nt)[:2],
    "numpy reference": lambda x, k, ids, t2e, nt, eps: R.moe_gate(
        x.float().numpy(), np.eye(x.shape[1], dtype=np.float32), None, None if t2e is None else t2e.numpy(),
        None if ids is None else ids.numpy(), k, {1: "sigmoid", 2: "sqrtsoftplus"}[nt], 1.0, True),
}


@pytest.mark.parametrize("gate", sorted(HASH_GATES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm_type", [1, 2])
@pytest.mark.parametrize("experts,hashed", [(256, True), (384, False)])
def test_moe_gating_hash_cann_recipes_golden(gate, dtype, norm_type, experts, hashed):
    rng = np.random.default_rng(42)
    T, k, N, eps = 16, 6, 100, 1e-6
    x = torch.tensor(rng.uniform(-2, 2, (T, experts))).to(dtype)
    ids = torch.tensor(rng.uniform(0, N, T)).to(torch.int64) if hashed else None
    t2e = torch.tensor(rng.uniform(0, experts, (N, k))).to(torch.int32) if hashed else None
    gy, gidx = golden_gating_hash(x, k, None if ids is None else ids.numpy(),
                                  None if t2e is None else t2e.numpy(), norm_type, eps)
    y, idx = HASH_GATES[gate](x, k, ids, t2e, norm_type, eps)
    y, idx = np.asarray(f32(y)), np.asarray(idx)
    if gate == "numpy reference" and not hashed:
        # the reference's top-k (argpartition) is unordered and breaks exact ties arbitrarily, the kernels by the
        # lower expert id; fp16/bf16 logits tie often, float32 router logits practically never. So: the chosen
        # scores must be the golden's as a multiset, the weights likewise.
        xf = x.float().numpy()
        norm = 1 / (1 + np.exp(-xf)) if norm_type == 1 else np.sqrt(np.log1p(np.exp(xf)))
        np.testing.assert_array_equal(np.sort(np.take_along_axis(norm, idx, 1), 1),
                                      np.sort(np.take_along_axis(norm, gidx.astype(np.int64), 1), 1))
        np.testing.assert_allclose(np.sort(y, 1), np.sort(gy, 1), rtol=0.01, atol=0.001)
        return
    np.testing.assert_array_equal(idx, gidx)
    np.testing.assert_allclose(y, gy, rtol=0.01, atol=0.001)  # their criterion
