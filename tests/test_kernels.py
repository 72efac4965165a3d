"""Our Triton-Ascend kernels (ascend/kernels) against the NumPy reference under triton's interpreter, their torch
custom-op registration, the model end to end through them, and the HIVM compile check.

Needs the `kernels` extra (triton-ascend, in its own venv; README "Our kernels"); in the base environment every
test here but the last skips. Tolerances (float32, max error relative to the reference's largest magnitude):
mHC pre/post, compressor, sparse attention 1e-4; indexer top-k exact; model prompt logits 1e-4, greedy tokens
identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ascend.kernels import available  # noqa: E402

KERNELS = available()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="triton-ascend not installed (the `kernels` extra)")
if KERNELS:
    from ascend.kernels import prepare

    prepare(interpret=True)  # before any kernel module import: triton.jit reads TRITON_INTERPRET when it decorates

from ops.numpy_ref import NumpyBackend  # noqa: E402

from .conftest import small_config  # noqa: E402

R = NumpyBackend()
RTOL = 1e-4


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def assert_close(got, want, rtol=RTOL):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-30)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x scale {scale:.3g}"


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@needs_kernels
@pytest.mark.parametrize("n,D,Tn", [(4, 64, 5), (3, 40, 2), (4, 7168, 2), (4, 32, 0)])
def test_mhc_pre_post(rng, n, D, Tn):
    from ascend.kernels import mhc_post, mhc_pre

    x = f32(rng, Tn, n, D)
    m = 2 * n + n * n
    fn, scale, base = f32(rng, m, n * D, scale=0.1), 1 + f32(rng, 3, scale=0.1), f32(rng, m, scale=0.5)
    got = mhc_pre.launch(T(x), T(fn), T(scale), T(base), 20, 1e-6, 1e-6)
    want = R.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):
        assert_close(g.numpy(), w)
    y = f32(rng, Tn, D)
    assert_close(mhc_post.launch(T(y), T(x), T(want[1]), T(want[2])).numpy(), R.hc_post(y, x, want[1], want[2]))


@needs_kernels
@pytest.mark.parametrize("G,Rr,C", [(5, 8, 16), (3, 128, 64), (0, 4, 16)])
def test_compress_pooling_with_masked_scores(rng, G, Rr, C):
    from ascend.kernels import compressor

    kv, score = f32(rng, G, Rr, C), f32(rng, G, Rr, C)
    score[:, : Rr // 2, :3] = -np.inf  # the overlap compressor's first window: half its candidates masked
    assert_close(compressor.launch(T(kv), T(score))[0].numpy(), R.compress(kv, score))


def _compressor_reference(kv, sc, ape, prev_kv, prev_sc, w, cos, sin, overlap, eps):
    """common/model.py Model._compress after grouping, from the reference ops."""
    G, r, W = kv.shape
    c = W // 2 if overlap else W
    full_sc = sc + ape[None]
    if overlap:
        pk = np.concatenate([prev_kv[None], kv[:-1, :, :c]], axis=0)
        ps = np.concatenate([prev_sc[None], full_sc[:-1, :, :c]], axis=0)
        cand_kv = np.concatenate([pk, kv[:, :, c:]], axis=1)
        cand_sc = np.concatenate([ps, full_sc[:, :, c:]], axis=1)
        state = (kv[-1, :, :c], full_sc[-1, :, :c])
    else:
        cand_kv, cand_sc, state = kv, full_sc, None
    ent = R.rms_norm(R.compress(cand_kv, cand_sc), w, eps)
    return R.rope(ent, cos, sin), state


@needs_kernels
@pytest.mark.parametrize("overlap,r,C,rope", [(True, 4, 64, 16), (False, 16, 32, 8), (True, 4, 512, 64)])
def test_fused_compressor_overlap_norm_rope_state(rng, overlap, r, C, rope):
    from ascend.kernels import compressor

    G = 3
    W = 2 * C if overlap else C
    kv, sc, ape = f32(rng, G, r, W), f32(rng, G, r, W), f32(rng, r, W, scale=0.5)
    prev_kv, prev_sc = f32(rng, r, C), f32(rng, r, C)
    w = 1 + f32(rng, C, scale=0.1)
    ang = (np.arange(G)[:, None] * r * 0.37 * (np.arange(rope // 2)[None, :] + 1)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    want, state = _compressor_reference(kv, sc, ape, prev_kv, prev_sc, w, cos, sin, overlap, 1e-6)
    got, skv, ssc = compressor.launch(T(kv), T(sc), ape=T(ape), prev_kv=T(prev_kv), prev_score=T(prev_sc),
                                      norm_weight=T(w), eps=1e-6, cos=T(cos), sin=T(sin), overlap=overlap)
    assert_close(got.numpy(), want)
    if overlap:
        np.testing.assert_array_equal(skv.numpy(), state[0])
        assert_close(ssc.numpy(), state[1], 1e-6)


@needs_kernels
def test_indexer_topk_order_ties_and_visibility(rng):
    import ascend.kernels.torch_ops  # noqa: F401

    op = torch.ops.dsv4.indexer_topk
    q, w, keys = f32(rng, 20, 4, 16), f32(rng, 20, 4), f32(rng, 9, 16)
    pos = np.arange(20, dtype=np.int64) * 2
    np.testing.assert_array_equal(op(T(q), T(w), T(keys), T(pos), 4, 5, 0.25).numpy(),
                                  R.indexer_topk(q, w, keys, pos, 4, 5, 0.25))
    # every score 0: ties resolve to the lowest entry index; invisible -> -1
    qn, kp = -np.abs(f32(rng, 3, 2, 4)), np.abs(f32(rng, 6, 4))
    ones, qp = np.ones((3, 2), np.float32), np.array([3, 11, 40])
    sel = op(T(qn), T(ones), T(kp), T(qp), 4, 4, 1.0).numpy()
    np.testing.assert_array_equal(sel, [[0, -1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3]])
    assert op(T(q[:0]), T(w[:0]), T(keys), T(pos[:0]), 4, 5, 0.25).shape == (0, 5)
    assert op(T(q), T(w), T(keys[:0]), T(pos), 4, 5, 0.25).shape == (20, 0)


@needs_kernels
def test_indexer_topk_v4_widths(rng):
    # 64 indexer heads x 128 (the V4 widths), 300 entries, top-64
    import ascend.kernels.torch_ops  # noqa: F401

    q, w, keys = f32(rng, 2, 64, 128), f32(rng, 2, 64), f32(rng, 300, 128)
    pos = np.array([700, 1199])
    np.testing.assert_array_equal(torch.ops.dsv4.indexer_topk(T(q), T(w), T(keys), T(pos), 4, 64, 0.1).numpy(),
                                  R.indexer_topk(q, w, keys, pos, 4, 64, 0.1))


@needs_kernels
def test_indexer_topk_radix_select_ties_signed_zero_and_v4_topk(rng):
    # scores straight into the top-k kernel: heavy ties, -0.0 next to +0.0 (equal for the reference), negatives,
    # invisible -inf entries, and the V4-Pro top-k of 1024 over 4096 entries
    from ascend.kernels import indexer_topk

    s = rng.integers(-3, 4, (3, 4096)).astype(np.float32) * np.float32(0.5)
    s[0, ::7] = -0.0
    s[1, 3000:] = -np.inf
    s[2, :] = 0.0
    s[2, 5] = -0.0
    got = indexer_topk.launch(T(s), 1024).numpy()
    order = np.argsort(-s, axis=-1, kind="stable")[:, :1024]
    want = np.where(np.take_along_axis(np.isfinite(s), order, axis=-1), order, -1)
    np.testing.assert_array_equal(got, want)
    few = np.full((1, 10), -np.inf, np.float32)
    few[0, 4] = 1.0
    np.testing.assert_array_equal(indexer_topk.launch(T(few), 3).numpy(), [[4, -1, -1]])


@needs_kernels
@pytest.mark.parametrize("case", ["window", "compressed", "selected", "empty", "d512"])
def test_sparse_attention(rng, case):
    from ascend.kernels import sparse_attention

    H, D, W, r, Tn, pos0 = 4, 16, 6, 4, 40, 30
    if case == "d512":
        H, D, Tn = 20, 512, 3  # head_dim 512, two head blocks of 16
    if case == "empty":
        Tn = 0
    q = f32(rng, Tn, H, D)
    qpos = np.arange(pos0, pos0 + Tn, dtype=np.int64)
    kv_pos = np.arange(pos0 - W + 1, pos0 + Tn, dtype=np.int64)
    kv, sinks = f32(rng, len(kv_pos), D), f32(rng, H)
    comp = f32(rng, (pos0 + Tn) // r, D) if case in ("compressed", "selected", "d512") else None
    sel = rng.integers(-1, comp.shape[0], (Tn, 3)).astype(np.int64) if case in ("selected", "d512") else None
    args = (q, qpos, kv, kv_pos, W, comp, r, sel, sinks, D ** -0.5)
    targs = [T(a) if isinstance(a, np.ndarray) else a for a in args]
    assert_close(sparse_attention.launch(*targs).numpy(), R.sparse_attention(*args))


def _bf16(a):
    """bf16-rounded copy as (torch bf16 tensor, float32 numpy of the same values)."""
    t = torch.from_numpy(a).to(torch.bfloat16)
    return t, t.to(torch.float32).numpy()


@needs_kernels
def test_bf16_inputs(rng):
    # bf16 activations (the device dtype): the kernels widen to float32, so against the reference on the same
    # bf16-rounded values mHC pre and the indexer are float32-exact (1e-4 / identical), attention keeps its
    # P @ V product in bf16 (bound 1e-2)
    import ascend.kernels.torch_ops  # noqa: F401
    from ascend.kernels import mhc_pre, sparse_attention

    xt, xr = _bf16(f32(rng, 3, 4, 64))
    fn, scale, base = f32(rng, 24, 256, scale=0.1), 1 + f32(rng, 3, scale=0.1), f32(rng, 24, scale=0.5)
    got = mhc_pre.launch(xt, T(fn), T(scale), T(base), 20, 1e-6, 1e-6)
    for g, w in zip(got, R.hc_pre(xr, fn, scale, base, 20, 1e-6, 1e-6), strict=True):
        assert_close(g.numpy(), w)
    (qt, qr), (kt, kr), w = _bf16(f32(rng, 6, 8, 32)), _bf16(f32(rng, 30, 32)), f32(rng, 6, 8)
    pos = np.arange(100, 106)
    np.testing.assert_array_equal(torch.ops.dsv4.indexer_topk(qt, T(w), kt, T(pos), 4, 8, 0.2).numpy(),
                                  R.indexer_topk(qr, w, kr, pos, 4, 8, 0.2))
    (qt, qr), (vt, vr) = _bf16(f32(rng, 6, 16, 64)), _bf16(f32(rng, 40, 64))
    kv_pos, sinks = np.arange(66, 106), f32(rng, 16)
    args = (qr, pos, vr, kv_pos, 16, None, 4, None, sinks, 0.125)
    got = sparse_attention.launch(qt, T(pos), vt, T(kv_pos), 16, None, 4, None, T(sinks), 0.125)
    assert_close(got.numpy(), R.sparse_attention(*args), 1e-2)


@needs_kernels
def test_custom_ops_registered_with_fake_shapes(rng):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ascend.kernels import torch_ops

    assert all(torch_ops.registered(n) for n in torch_ops.OPS)
    ops = torch.ops.dsv4
    with FakeTensorMode():
        x = torch.empty(7, 4, 64)
        y, post, comb = ops.hc_pre(x, torch.empty(24, 256), torch.empty(3), torch.empty(24), 20, 1e-6, 1e-6)
        assert (y.shape, post.shape, comb.shape) == ((7, 64), (7, 4), (7, 4, 4))
        assert ops.hc_post(y, x, post, comb).shape == (7, 4, 64)
        assert ops.compress(torch.empty(5, 8, 32), torch.empty(5, 8, 32)).shape == (5, 32)
        e, skv, _ = ops.compressor(torch.empty(5, 4, 64), torch.empty(5, 4, 64), None, None, None, None, 1e-6,
                                   None, None, True)
        assert e.shape == (5, 32) and skv.shape == (4, 32)
        sel = ops.indexer_topk(torch.empty(7, 4, 16), torch.empty(7, 4), torch.empty(9, 16),
                               torch.empty(7, dtype=torch.int64), 4, 5, 0.1)
        assert sel.shape == (7, 5) and sel.dtype == torch.int64
        o = ops.sparse_attention(torch.empty(7, 4, 16), torch.empty(7, dtype=torch.int64), torch.empty(9, 16),
                                 torch.empty(9, dtype=torch.int64), 8, None, 4, None, torch.empty(4), 0.25)
        assert o.shape == (7, 4, 16)
    # graph capture: the ops stay single nodes of a fake-traced graph (no kernel runs)
    from torch.fx.experimental.proxy_tensor import make_fx

    def block(x, fn, scale, base, y):
        _, post, comb = ops.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
        return ops.hc_post(y, x, post, comb)

    g = make_fx(block, tracing_mode="fake")(torch.empty(7, 4, 64), torch.empty(24, 256), torch.empty(3),
                                            torch.empty(24), torch.empty(7, 64))
    targets = [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
    assert "dsv4.hc_pre.default" in targets and "dsv4.hc_post.default" in targets
    q = T(f32(rng, 3, 4, 16))
    torch.library.opcheck(ops.hc_post, (T(f32(rng, 3, 16)), q, T(f32(rng, 3, 4)), T(f32(rng, 3, 4, 4))),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the kernel-granularity attention ops (ops/attention_kernels.py argument lists) on our kernels, against
# the NumPy golden of the same ops over the same paged caches ---------------------------------------------------
def _ours():
    from ascend import soc as S
    from ascend.torch_backend import TorchBackend

    return TorchBackend(providers={S.COMPOSED}, kernels="triton")


@needs_kernels
@pytest.mark.parametrize("ratio,coff", [(4, 2), (8, 1)])
def test_compressor_op_over_paged_state_matches_golden(ratio, coff):
    from ops.attention_kernels import SLOT_FLAT

    rng = np.random.default_rng(0)
    H, D, Rd, bs = 24, 16, 8, 16
    x = f32(rng, 45, H)
    wkv, wgate = f32(rng, coff * D, H, scale=0.3), f32(rng, coff * D, H, scale=0.3)
    ape, norm_w = f32(rng, ratio, coff * D), rng.uniform(0.5, 1.5, D).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, Rd, 2, dtype=np.float32) / Rd)).astype(np.float32)
    ang = np.arange(64, dtype=np.float32)[:, None] * inv
    cos_t, sin_t = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)
    st_table = np.array([[3, 1, 6, 2]], np.int32)  # scattered pages
    B = _ours()
    s_ref, s_got = np.zeros((8, bs, 2 * coff * D), np.float32), torch.zeros((8, bs, 2 * coff * D))
    pos = 0
    for n in (3, 1, 9, 20, 12):  # chunks: groups close across calls, the state carries the overlap half
        cu, sp = np.array([0, n], np.int32), np.array([pos], np.int32)
        rows = min(n, n // ratio + 1)
        cos, sin, _ = R.compressor_metadata(cos_t, sin_t, cu, sp, np.array([[1]], np.int32), bs, SLOT_FLAT, ratio,
                                            rows, 1)
        args = (Rd, ratio, coff, 1e-6, 2, 1)
        want = R.compressor(x[pos:pos + n], wkv, wgate, s_ref, ape, norm_w, sin, cos, st_table, cu, None, sp, *args)
        got = B.compressor(T(x[pos:pos + n]), T(wkv), T(wgate), s_got, T(ape), T(norm_w), T(sin), T(cos),
                           T(st_table), T(cu), None, T(sp), *args)
        assert_close(got.numpy(), want)
        assert_close(s_got.numpy(), s_ref)
        pos += n
    assert B.variants()["compressor"] == "triton:dsv4.compressor"


@needs_kernels
def test_lightning_indexer_op_float_and_int8_matches_golden():
    from ops.quant import act_quant_per_token

    from .test_attention_kernels import _paged

    rng = np.random.default_rng(1)
    N, D, ratio, K, bs = 8, 32, 4, 6, 16
    lens, nq = [70, 9, 33], [5, 9, 1]
    keys = [f32(rng, L // ratio, D) for L in lens]
    cache, table = _paged(keys, D, bs, rng)
    q, w = f32(rng, sum(nq), N, D), f32(rng, sum(nq), N)
    ends, kl = np.cumsum(nq).astype(np.int32), np.array(lens, np.int32)
    B = _ours()
    tail = ("TND", "PA_BSND", K, 3)
    want, _ = R.lightning_indexer(q, cache, w, None, None, 0, 0, ends, kl, table, None, *tail, cmp_ratio=ratio)
    got, _ = B.lightning_indexer(T(q), T(cache), T(w), None, None, 0, 0, T(ends), T(kl), T(table), None, *tail,
                                 cmp_ratio=ratio)
    np.testing.assert_array_equal(got.numpy(), want)
    assert B.variants()["lightning_indexer"] == "triton:dsv4.lightning_indexer"
    # int8 keys + scales are dequantized on the host wrapper's gather: same choice as the golden
    kq = [act_quant_per_token(k) for k in keys]
    kcache, ktable = _paged([k for k, _ in kq], D, bs, np.random.default_rng(1), np.int8)
    scache, _ = _paged([s.reshape(-1, 1) for _, s in kq], 1, bs, np.random.default_rng(1))
    qq, qs = act_quant_per_token(q.reshape(-1, D))
    qq, qs = qq.reshape(q.shape), qs.reshape(-1, N)
    want, _ = R.lightning_indexer(qq, kcache, w, qs, scache[..., 0], 0, 0, ends, kl, ktable, None, *tail,
                                  cmp_ratio=ratio)
    got, _ = B._lightning_indexer_triton(T(qq), T(kcache), T(w), T(qs), T(scache[..., 0]), 0, 0, T(ends), T(kl),
                                         T(ktable), None, *tail, cmp_ratio=ratio)
    np.testing.assert_array_equal(got.numpy(), want)


@needs_kernels
@pytest.mark.parametrize("with_sel", [False, True])
def test_sparse_attn_sharedkv_op_matches_golden(with_sel):
    from .test_attention_kernels import sparse_attn_case

    c = sparse_attn_case(np.random.default_rng(2), with_sel)
    ins = {k: v for k, v in c.items() if k not in ("raw", "comp")}
    kw = dict(cmp_ratio=4, ori_win_left=7, layout_q="TND", layout_kv="PA_ND", softmax_scale=0.3)
    want, _ = R.sparse_attn_sharedkv(**ins, **kw)
    B = _ours()
    got, _ = B.sparse_attn_sharedkv(**{k: None if v is None else T(v) for k, v in ins.items()}, **kw)
    assert_close(got.numpy(), want)
    assert B.variants()["sparse_attn_sharedkv"] == "triton:dsv4.sparse_attn_sharedkv"


@needs_kernels
@pytest.mark.parametrize("soc", ["A2", "950"])
def test_model_end_to_end_through_our_kernels(soc):
    from ascend import soc as S
    from ascend.torch_backend import TorchBackend
    from common.generate import SamplingParams, generate
    from common.model import Model
    from common.presets import random_weights

    cfg = small_config()
    weights = random_weights(cfg, seed=11)
    B = TorchBackend(soc=soc, providers={S.TORCH_NPU, S.COMPOSED}, kernels="triton")  # launches with soc's tiles
    prompt = np.random.default_rng(3).integers(2, cfg.vocab_size, 12).tolist()
    params = SamplingParams(max_new_tokens=6, stop_on_eos=False)
    want = generate(Model(cfg, weights, R), [prompt], params, keep_prompt_logits=True)
    got = generate(Model(cfg, weights, B), [prompt], params, keep_prompt_logits=True)
    assert_close(got.prompt_logits[0], want.prompt_logits[0], 1e-4)
    assert got.output_ids == want.output_ids
    used = B.variants()
    for op in ("hc_pre", "hc_post", "compressor", "lightning_indexer", "sparse_attn_sharedkv"):
        assert used[op] == f"triton:dsv4.{op}", (op, used[op])
    for op in ("compress", "indexer_topk", "sparse_attention"):  # the composed primitives are not reached
        assert op not in used, (op, used[op])


@needs_kernels
def test_cli_generate_kernels_triton_matches_cpu(capsys):
    from tools.cli import main

    args = ["generate", "--model", "tiny", "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--json"]
    assert main(args + ["--backend", "torch", "--kernels", "triton"]) == 0
    tri = json.loads(capsys.readouterr().out)
    assert main(args + ["--backend", "cpu"]) == 0
    assert tri["output_ids"] == json.loads(capsys.readouterr().out)["output_ids"]


@needs_kernels
def test_doctor_a2_bf16_uses_our_kernels_not_compositions():
    from tools.doctor_cmd import doctor_report

    rep = doctor_report(soc="A2", model="v4-flash", dtype="bfloat16")
    chosen = {op: rep["ops"][op][op]["chosen"] for op in
              ("hc_pre", "hc_post", "compressor", "lightning_indexer", "sparse_attn_sharedkv")}
    # simulated A2 deployment: vllm-ascend's kernels where they fit, ours where A2 has none, never a composition
    assert all(not v.startswith("composed") for v in chosen.values()), chosen
    assert chosen["compressor"] == "triton:dsv4.compressor", chosen  # A2 has no compressor kernel (README)
    # with the vendors' providers off, ours take every one of them
    rep = doctor_report(soc="A2", model="v4-flash", dtype="bfloat16", providers=["torch_npu", "composed", "triton"])
    for op in chosen:
        assert rep["ops"][op][op]["chosen"] == f"triton:dsv4.{op}", (op, rep["ops"][op][op]["chosen"])


def _have_compiler() -> bool:
    try:
        from ascend.kernels.compile import tools

        tools()
        return True
    except Exception:
        return False


def _compile_env(tmp_path) -> dict:
    # the compile check needs triton's compiler frontend, not the interpreter: a fresh process without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DSV4_KERNEL_CACHE"] = str(tmp_path)
    return env


@needs_kernels
@pytest.mark.skipif(not KERNELS or not _have_compiler(), reason="ascendnpu-ir not installed")
def test_kernels_command_compiles_everything_for_a2(tmp_path):
    cmd = [sys.executable, "-m", "tools.cli", "kernels", "--soc", "A2", "--model", "v4-flash", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_compile_env(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(p.stdout)
    assert rep["ok"] and {r["source"] for r in rep["results"]} == set(rep["kernels"])
    for r in rep["results"]:
        assert r["status"] == "ok" and 0 < r["ub_bytes"] <= r["ub_limit"] and r["l0c_bytes"] <= r["l0c_limit"], r
    again = subprocess.run(cmd, capture_output=True, text=True, env=_compile_env(tmp_path))
    assert all(r["cached"] for r in json.loads(again.stdout)["results"])


@needs_kernels
@pytest.mark.skipif(not KERNELS or not _have_compiler(), reason="ascendnpu-ir not installed")
def test_compile_check_catches_overflow(tmp_path):
    # a 64-head x 128-key attention tile at head_dim 512 cannot fit the A2 unified buffer: the check must say so
    code = ("import json; from ascend.kernels import compile as C, kernel_module, tiles as TL; "
            "sh = TL.model_shapes('v4-flash'); "
            "k, sig, c = kernel_module('sparse_attention').compile_spec(sh, {'BH': 64, 'BS': 128, 'BK': 128}); "
            "print(json.dumps(C.compile_kernel('sparse_attention_big', k, sig, c, 'A2')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_compile_env(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["status"] == "overflow", res


@pytest.mark.skipif(KERNELS, reason="checks the base environment without triton-ascend")
def test_kernels_triton_without_triton_is_a_clean_error(capsys):
    from tools.cli import main

    rc = main(["generate", "--model", "tiny", "--backend", "torch", "--kernels", "triton", "--prompt-ids", "5",
               "--max-new-tokens", "1"])
    assert rc != 0
    assert "triton-ascend" in capsys.readouterr().err


def test_kernels_triton_needs_the_torch_backend(capsys):
    from tools.cli import main

    assert main(["generate", "--model", "tiny", "--kernels", "triton", "--prompt-ids", "5", "--max-new-tokens",
                 "1"]) == 2
    assert "--backend torch" in capsys.readouterr().err
