"""Every stand-in is the real op's schema plus the real binding's host-side checks, and every call the torch
backend makes binds to the schema of each supported library version.

Sources: ascend/schemas/*.yaml (torch-npu 2.14.0 and 2.9.0 wheels, vllm-ascend 182b75e csrc/torch_binding.cpp,
cann-recipes-infer fbc225d ops_def_registration.cpp); the REJECTED cases below are inputs the bindings' TORCH_CHECKs
refuse (line numbers in the stand-ins' messages). A stand-in loosened to accept any of them fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ascend import soc as S  # noqa: E402
from ascend import versions  # noqa: E402
from ascend.standins import cann_recipes as cr  # noqa: E402
from ascend.standins import mc2, schema  # noqa: E402
from ascend.standins import torch_npu as tn  # noqa: E402
from ascend.standins import vllm_ascend as va  # noqa: E402
from ascend.standins.vllm_ascend import hc_post_math  # noqa: E402
from ascend.torch_backend import TorchBackend  # noqa: E402

BF, F32 = torch.bfloat16, torch.float32
MODULES = {"torch_npu": (tn, mc2), "vllm_ascend": (va,), "cann_recipes": (cr,)}


# ---- the stand-ins are the real schemas ---------------------------------------------------------------------
@pytest.mark.parametrize("library", sorted(MODULES))
def test_registered_schemas_are_the_kept_real_ones(library):
    """Each stand-in op's dispatcher schema is the owner's string verbatim (only the namespace differs)."""
    seen = 0
    for mod in MODULES[library]:
        for name, op in mod.LIB.ops().items():
            kept = schema.get_schema(library, name)
            live = str(op.default._schema).split("::", 1)[1]
            assert torch._C.parse_schema(live) == torch._C.parse_schema(kept.schema), (name, live, kept.schema)
            seen += 1
    assert seen >= {"torch_npu": 16, "vllm_ascend": 3, "cann_recipes": 4}[library]


def test_dispatcher_rejects_what_the_real_binding_rejects():
    x = torch.zeros(2, 8, dtype=BF)
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'epsilon_'"):
        tn.npu_rms_norm(x, torch.ones(8, dtype=BF), epsilon_=1e-6)
    with pytest.raises(RuntimeError, match="positional argument"):  # out_flag is keyword-only in the schema
        tn.npu_mhc_sinkhorn(torch.zeros(1, 4, 4), 1e-6, 20)
    with pytest.raises(RuntimeError, match="export_for_source_row"):
        tn.npu_moe_finalize_routing(x, None, None, None, None, torch.zeros(2, dtype=torch.int32),
                                    expert_for_source_row=None)  # the schema spells it export_for_source_row
    with pytest.raises(RuntimeError, match="Expected a value of type 'Optional\\[Tensor\\]'"):
        tn.npu_grouped_matmul([x], [torch.zeros(1, 8, 4, dtype=BF)], group_list=[2], group_type=0)
    with pytest.raises(RuntimeError, match="positional argument"):  # cann's npu_hc_pre takes hc_mult by keyword
        cr.npu_hc_pre(torch.zeros(1, 4, 4096, dtype=BF), torch.zeros(24, 16384), torch.zeros(3), torch.zeros(24), 4)


def test_body_must_match_the_schema_signature():
    lib = schema.StandinLibrary("vllm_ascend", namespace="dsv4_test_signature")

    with pytest.raises(TypeError, match="parameters"):
        @lib.impl("npu_hc_post")
        def renamed(x, res, post, comb):
            return res

    with pytest.raises(TypeError, match="default of eps"):
        @lib.impl("moe_gating_top_k_hash")
        def wrong_default(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                          routed_scaling_factor=1.0, eps=1e-6, group_select_mode=0, renorm=0, norm_type=0,
                          out_flag=False):
            return x, x, x


def test_a_none_where_the_schema_returns_a_tensor_is_refused():
    lib = schema.StandinLibrary("torch_npu", namespace="dsv4_test_returns")

    @lib.impl("npu_mhc_sinkhorn")
    def sinkhorn_returning_none(x, *, eps=1e-6, num_iters=20, out_flag=0):
        return x, None, None

    with pytest.raises(RuntimeError, match="where the schema declares a Tensor"):
        sinkhorn_returning_none(torch.zeros(1, 4, 4))


# ---- host-side checks: inputs the real bindings refuse ----------------------------------------------------------
def _hc_post_ok(b=1, s=3, hc=4, d=4096, dt=BF, pdt=F32):
    return [torch.zeros(b, s, d, dtype=dt), torch.zeros(b, s, hc, d, dtype=dt), torch.zeros(b, s, hc, dtype=pdt),
            torch.zeros(b, s, hc, hc, dtype=pdt)]


def _hc_pre_ok(lead=(3,), d=4096, dt=BF):
    return [torch.zeros(*lead, 4, d, dtype=dt), torch.zeros(24, 4 * d), torch.zeros(3), torch.zeros(24)]


def _flat_hc_post():  # the form the lowering used to pass: x [T, d], residual [T, hc, d], post [T, hc], comb [T,hc,hc]
    x, r, p, c = _hc_post_ok()
    return [x[0], r[0], p[0], c[0]]


# (op, arguments the binding refuses, the message it gives); each from a TORCH_CHECK the stand-in cites
REJECTED = {
    "vllm_ascend.npu_hc_post": [
        (_flat_hc_post, "x's dim num should be 3"),  # torch_binding.cpp:1242
        (lambda: _hc_post_ok()[:1] + [torch.zeros(1, 3, 4, 4095, dtype=BF)] + _hc_post_ok()[2:], "must be"),
        (lambda: _hc_post_ok()[:2] + [torch.zeros(1, 3, 5)] + _hc_post_ok()[3:], "post"),
        (lambda: _hc_post_ok(dt=torch.float64), "FLOAT16, BFLOAT16, or FLOAT32"),
        (lambda: _hc_post_ok()[:3] + [torch.zeros(1, 3, 4, 4, dtype=BF)], "com's dtype"),
    ],
    "vllm_ascend.npu_hc_pre_v2": [
        (lambda: [*_hc_pre_ok(dt=F32), 4, 20, 1e-6, 1e-6], "BFLOAT16"),  # torch_binding.cpp:1355
        (lambda: [*_hc_pre_ok(d=2048), 4, 20, 1e-6, 1e-6], "4096 or 7168"),
        (lambda: [*_hc_pre_ok(), 6, 20, 1e-6, 1e-6], "hc_mult only supports 4"),
        (lambda: [torch.zeros(4, 4096, dtype=BF), *_hc_pre_ok()[1:], 4, 20, 1e-6, 1e-6], "3 or 4"),
        (lambda: [_hc_pre_ok()[0], torch.zeros(20, 16384), *_hc_pre_ok()[2:], 4, 20, 1e-6, 1e-6], "only supports 24"),
    ],
    "vllm_ascend.moe_gating_top_k_hash": [
        (lambda: [torch.zeros(2, 3, 8), 2], "x must be 2D"),
        (lambda: [torch.zeros(2, 4096), 2], "<= 2048"),
        (lambda: [torch.zeros(2, 8), 2, torch.zeros(8, dtype=torch.float64)], "bias dtype"),
        (lambda: [torch.zeros(2, 8), 2, None, None, None, 1, 1, 1.0, 1e-20, 0, 1], "renorm"),
        (lambda: [torch.zeros(2, 8), 2, None, None, None, 1, 1, 1.0, 1e-20, 0, 0, 3], "norm_type"),
    ],
    # the 950 compress epilogs (more cases, and the NumPy golden's refusals, in tests/test_compress_epilog.py)
    "vllm_ascend.kv_compress_epilog": [
        (lambda: [torch.zeros(8, 1, 640, dtype=torch.float8_e4m3fn), torch.zeros(4, 512), torch.arange(4), 64, 2,
                  True, 1], "x must be BF16"),  # torch_binding.cpp:1456
        (lambda: [torch.zeros(8, 1, 640, dtype=BF), torch.zeros(4, 512, dtype=BF), torch.arange(4), 64, 2, True, 1],
         "FP8_E5M2 or FP8_E4M3"),  # torch_binding.cpp:1459
        (lambda: [torch.zeros(8, 1, 640, dtype=torch.float8_e4m3fn), torch.zeros(4, 512, dtype=BF),
                  torch.arange(3), 64, 2, True, 1], "slot_mapping size"),  # torch_binding.cpp:1448
    ],
    "vllm_ascend.indexer_compress_epilog_v2": [
        (lambda: [torch.zeros(8, 1, 132, dtype=torch.uint8), torch.zeros(3, 128, dtype=torch.float16),
                  torch.arange(3, dtype=torch.int32)], "only support 4"),  # tiling.cpp:100
        (lambda: [torch.zeros(2, 4, 1, 132, dtype=torch.uint8), torch.zeros(3, 128, dtype=torch.float16),
                  torch.arange(3, dtype=torch.int32), 1], "layout only support 2"),  # tiling.cpp:139
    ],
    "cann_recipes.npu_hc_post": [
        (lambda: [t[0, 0] if i else t[0, 0] for i, t in enumerate(_hc_post_ok())], "dim num"),
        (lambda: [t[0] for t in _hc_post_ok(d=512)], "4096 or 7168"),
        (lambda: [t[0] for t in _hc_post_ok(hc=6)], "hc of residual only support 4"),
    ],
    "torch_npu.npu_moe_finalize_routing": [
        (lambda: [torch.zeros(4, 2), None, None, None, torch.ones(2, 2), torch.tensor([0, -1, 2, 3],
                                                                                       dtype=torch.int32), None],
         "values must be in"),
        (lambda: [torch.zeros(4, 2), None, None, None, torch.ones(2, 2), torch.arange(4, dtype=torch.int32),
                  None, 2], "drop_pad_mode"),
    ],
    "torch_npu.npu_moe_init_routing_v2": [
        (lambda: ([torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.int32)],
                  {"expert_num": 4, "expert_tokens_num_type": 1, "expert_tokens_num_flag": True}),
         "quant_mode 0"),  # the 2.9.0 default quant_mode=0 spelt out: the doc says only -1 and 1
    ],
}
_OPS = {"vllm_ascend": va, "cann_recipes": cr, "torch_npu": tn}


def conformance_failures(op_name: str, op=None) -> list[str]:
    """The REJECTED cases of `op_name` that `op` (default: the stand-in) does not refuse with the message."""
    lib, name = op_name.split(".")
    op = op if op is not None else getattr(_OPS[lib], name)
    bad = []
    for make, msg in REJECTED[op_name]:
        made = make()
        args, kwargs = made if isinstance(made, tuple) else (made, {})
        if name == "npu_moe_init_routing_v2":
            kwargs = {**kwargs, "quant_mode": 0}
        try:
            op(*args, **kwargs)
        except RuntimeError as e:
            if msg not in str(e):
                bad.append(f"{msg!r}: refused for another reason: {e}")
            continue
        bad.append(f"{msg!r}: accepted")
    return bad


@pytest.mark.parametrize("op_name", sorted(REJECTED))
def test_standins_refuse_what_the_bindings_refuse(op_name):
    assert conformance_failures(op_name) == []


def test_a_loosened_standin_fails_the_conformance_cases():
    """npu_hc_post accepting the flat [T, d] form (what the lowering passed before): the schema tests catch it."""
    lib = schema.StandinLibrary("vllm_ascend", namespace="dsv4_test_loose")

    @lib.impl("npu_hc_post")
    def loose_hc_post(x, residual, post, comb):
        return hc_post_math(x, residual, post, comb).to(residual.dtype)

    failures = conformance_failures("vllm_ascend.npu_hc_post", loose_hc_post)
    assert any("dim num should be 3" in f for f in failures) and len(failures) >= 3

    @lib.impl("npu_hc_pre_v2")
    def loose_hc_pre(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps):
        y, post, comb = va.hc_pre_math(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)
        return y.to(x.dtype), post, comb  # no bf16 / D / hc / mix checks

    assert len(conformance_failures("vllm_ascend.npu_hc_pre_v2", loose_hc_pre)) >= 3


# ---- every call the lowering makes binds to each supported version ----------------------------------------------
class Recorder:
    """Stands between the backend and a stand-in module, recording each kernel call."""

    def __init__(self, mod, library: str):
        self._mod, self._library, self.calls = mod, library, []

    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if not name.startswith(("npu_", "moe_")):
            return fn

        def call(*args, **kwargs):
            self.calls.append((self._library, name, args, kwargs))
            return fn(*args, **kwargs)
        return call


def _exercise(B, rng, hidden=4096, hash_gate=True):
    """One call of every table op through the backend, at shapes the real kernels take."""
    f = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    T, n = 3, 4
    x = f(T, n, hidden)
    fn, sc, base = f(24, n * hidden) * 0.01, f(3) * 0.1, f(24) * 0.1
    y, post, comb = B.hc_pre(x, fn, sc, base, 20, 1e-6, 1e-6)
    B.hc_post(y, x, post, comb)
    B.rms_norm(f(T, 64), f(64), 1e-6)
    cos, sin = f(T, 32), f(T, 32)
    B.rope(f(T, 2, 64), cos, sin)
    from ops.quant import W8A8Weight

    B.linear(f(T, 64), W8A8Weight.from_float(rng.standard_normal((32, 64)).astype(np.float32)))
    B.grouped_linear(f(T, 2, 32), f(2 * 16, 32))
    E, K = 8, 2
    ids = torch.arange(T)
    tid2eid = torch.stack([torch.randperm(E)[:K] for _ in range(16)]) if hash_gate else None
    w, idx = B.moe_gate(f(T, 64), f(E, 64), None, tid2eid, ids, K, "sqrtsoftplus", 1.5, True)
    B.moe_gate(f(T, 64), f(E, 64), f(E), None, ids, K, "sigmoid", 1.5, True)
    from ops.contract import ExpertWeights

    ex = ExpertWeights(w1=[f(32, 64) for _ in range(E)], w3=[f(32, 64) for _ in range(E)],
                       w2=[f(64, 32) for _ in range(E)], first=0, count=E, n_experts=E)
    B.moe_experts(f(T, 64), w, idx, ex, 10.0)


@pytest.mark.parametrize("version", sorted(versions.TORCH_NPU_CANN))
@pytest.mark.parametrize("soc", [S.A2, S.A3, S.A5])
def test_every_lowering_call_binds_to_that_versions_schema(rng, soc, version):
    calls = []
    for providers in ({S.TORCH_NPU, S.CUSTOM, S.COMPOSED}, {S.TORCH_NPU, S.COMPOSED}):
        B = TorchBackend(soc=soc, providers=providers, dtype="bfloat16", torch_npu_version=version)
        B.npu, B.custom = Recorder(tn, "torch_npu"), Recorder(va, "vllm_ascend")
        _exercise(B, rng)
        calls += B.npu.calls + B.custom.calls
    names = {(c[0], c[1]) for c in calls}
    assert {n for lib, n in names if lib == "torch_npu"} >= {
        "npu_rms_norm", "npu_moe_init_routing_v2", "npu_moe_finalize_routing", "npu_grouped_matmul",
        "npu_moe_gating_top_k", "npu_dynamic_quant", "npu_quant_matmul", "npu_swiglu"}
    if soc != S.A5:
        assert {n for lib, n in names if lib == "vllm_ascend"} == {"npu_hc_pre_v2", "npu_hc_post",
                                                                   "moe_gating_top_k_hash"}
    for library, name, args, kwargs in calls:
        v = version if library == "torch_npu" else None
        assert schema.binds(library, name, args, kwargs, v) is None, (name, version)


def test_the_version_check_has_teeth(rng):
    """The 2.14.0 lowering's hash-routed gate call (input_ids / tid2eid) does not bind to 2.9.0's schema, and a
    2.9.0 backend therefore routes hash layers elsewhere; the mHC ops are absent there."""
    args = (torch.zeros(2, 8),)
    kw = {"k": 2, "input_ids": torch.zeros(2, dtype=torch.int64), "tid2eid": torch.zeros(4, 2, dtype=torch.int32)}
    assert schema.binds("torch_npu", "npu_moe_gating_top_k", args, kw, "2.14.0") is None
    assert "input_ids" in schema.binds("torch_npu", "npu_moe_gating_top_k", args, kw, "2.9.0")
    old = TorchBackend(soc=S.A5, providers={S.TORCH_NPU, S.COMPOSED}, dtype="bfloat16", torch_npu_version="2.9.0")
    plan = old.plan({"hc_pre": {"hc_mult": 4, "hidden": 4096, "dtype": "bfloat16"},
                     "moe_gate": {"topk": 6, "experts": 256, "score_func": "softmax", "hash": True}})
    assert "npu_mhc_pre is not in torch_npu 2.9.0" in plan["hc_pre"][0]["reason"]
    hashed = [e for e in plan["moe_gate"] if e["variant"] == "torch_npu:npu_moe_gating_top_k"][0]
    assert "no 'tid2eid' in torch_npu 2.9.0" in hashed["reason"]


def test_2_9_0_routing_defaults_are_spelt_out(rng):
    """quant_mode defaults to 0 (static quant, unsupported) in torch-npu 2.9.0's schema: the lowering passes -1."""
    s = schema.get_schema("torch_npu", "npu_moe_init_routing_v2", "2.9.0").schema
    assert "int quant_mode=0" in s
    B = TorchBackend(soc=S.A2, providers={S.TORCH_NPU, S.COMPOSED}, torch_npu_version="2.9.0")
    B.npu = Recorder(tn, "torch_npu")
    _exercise(B, rng, hidden=64, hash_gate=False)
    routing = [c for c in B.npu.calls if c[1] == "npu_moe_init_routing_v2"]
    assert routing and all(c[3]["quant_mode"] == -1 for c in routing)
    assert all("k" not in c[3] for c in B.npu.calls if c[1] == "npu_moe_finalize_routing")
