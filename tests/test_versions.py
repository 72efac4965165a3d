"""Supported versions, the start-up gate, the custom-op bootstrap and the MC2 limits, with fakes of the environment
(no NPU, torch_npu, CANN or vllm-ascend here)."""

from __future__ import annotations

import json
import types

import pytest

from ascend import soc as S
from ascend import versions


# ---- the supported stack ------------------------------------------------------------------------------------
def test_check_stack_accepts_the_supported_releases():
    assert versions.check_stack("2.14.0", "9.1.0") == "2.14.0"
    assert versions.check_stack("2.14.0.post2", "9.1.RC1") == "2.14.0"
    assert versions.check_stack("2.9.0", "8.5.0") == "2.9.0"
    assert versions.check_stack("2.14.0", None) == "2.14.0"  # CANN not found: the runtime itself refuses


@pytest.mark.parametrize("tn,cann,needle", [
    ("2.5.1", "8.1.RC1", "torch_npu 2.5.1 is not supported"),
    ("2.14.0", "8.5.0", "CANN 8.5.0 does not match torch_npu 2.14.0"),
    (None, None, "torch_npu None is not supported"),
])
def test_check_stack_names_the_version_and_what_to_install(tn, cann, needle):
    with pytest.raises(versions.UnsupportedStack) as e:
        versions.check_stack(tn, cann)
    assert needle in str(e.value) and "install torch-npu==2.14.0 with CANN 9.1.0" in str(e.value)


def test_require_torch_npu_gates_every_npu_path(monkeypatch):
    from ascend import device

    class Refused(Exception):
        pass

    monkeypatch.setattr(device, "import_torch_npu", lambda: (None, "not installed"))
    with pytest.raises(Refused, match="needs torch_npu and CANN \\(not installed\\); install torch-npu==2.14.0"):
        device.require_torch_npu(Refused)
    old = types.SimpleNamespace(__version__="2.6.0")
    monkeypatch.setattr(device, "import_torch_npu", lambda: (old, None))
    monkeypatch.setattr(device, "cann_version", lambda env=None: ("8.2.RC1", "/fake"))
    with pytest.raises(Refused, match="torch_npu 2.6.0 is not supported"):
        device.require_torch_npu(Refused)
    new = types.SimpleNamespace(__version__="2.14.0")
    monkeypatch.setattr(device, "import_torch_npu", lambda: (new, None))
    monkeypatch.setattr(device, "cann_version", lambda env=None: ("9.1.0", "/fake"))
    assert device.require_torch_npu(Refused) is new


def test_torch_backend_on_npu_without_torch_npu_is_refused_with_the_install_hint():
    pytest.importorskip("torch")
    from ascend.torch_backend import TorchBackend
    from ops import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="install torch-npu==2.14.0"):
        TorchBackend(device="npu")
    with pytest.raises(ValueError, match="schemas are kept for 2.14.0, 2.9.0"):
        TorchBackend(torch_npu_version="2.5.1")


def test_a_kernel_registered_with_another_schema_is_not_selected():
    pytest.importorskip("torch")
    from ascend.torch_backend import TorchBackend

    B = TorchBackend(soc=S.A2, dtype="bfloat16")
    assert B.plan({"rms_norm": {"dtype": "bfloat16"}})["rms_norm"][0]["status"] == "chosen"
    B._stale = {"npu_rms_norm"}  # what detect() finds when the installed op's schema differs from the kept one
    row = B.plan({"rms_norm": {"dtype": "bfloat16"}})["rms_norm"][0]
    assert row["status"] == "skipped" and "installed schema of npu_rms_norm differs" in row["reason"]


def test_mindspore_release_check():
    assert versions.mindspore_supported("2.10.0") and versions.mindspore_supported("2.10.1rc1")
    assert not versions.mindspore_supported("2.7.0") and not versions.mindspore_supported(None)


# ---- the custom-op bootstrap (vllm-ascend utils.py bootstrap_custom_op_env / enable_custom_op) -----------------
def test_bootstrap_prepends_the_vendor_dir_once(tmp_path):
    pkg = versions.CUSTOM_OP_PACKAGES["vllm_ascend"]
    vendor = tmp_path / "_cann_ops_custom" / "vendors" / "custom_transformer"
    env = {"ASCEND_CUSTOM_OPP_PATH": "/opt/other"}
    assert versions.bootstrap_custom_op_env(pkg, tmp_path, env) is None  # no bundled vendor dir: nothing to do
    assert env["ASCEND_CUSTOM_OPP_PATH"] == "/opt/other"
    vendor.mkdir(parents=True)
    assert versions.bootstrap_custom_op_env(pkg, tmp_path, env) == str(vendor)
    assert env["ASCEND_CUSTOM_OPP_PATH"] == f"{vendor}:/opt/other"
    assert versions.bootstrap_custom_op_env(pkg, tmp_path, env) is None  # idempotent
    assert env["ASCEND_CUSTOM_OPP_PATH"] == f"{vendor}:/opt/other"


def test_custom_ops_are_imported_after_the_bootstrap(tmp_path):
    pkg = versions.CUSTOM_OP_PACKAGES["vllm_ascend"]
    (tmp_path / pkg.vendor_dir).mkdir(parents=True)
    env: dict[str, str] = {}
    seen = []

    def fake_import(name):
        seen.append((name, env.get("ASCEND_CUSTOM_OPP_PATH")))

    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    ok, err = versions.import_custom_ops(pkg, find_spec=lambda n: spec, import_module=fake_import, env=env)
    assert ok and err is None
    assert seen == [("vllm_ascend.vllm_ascend_C", str(tmp_path / pkg.vendor_dir))]  # env set before the import

    def broken(name):
        raise OSError("libascendcl.so: cannot open shared object file")

    ok, err = versions.import_custom_ops(pkg, find_spec=lambda n: spec, import_module=broken, env={})
    assert not ok and err.startswith("OSError: libascendcl.so")
    assert versions.import_custom_ops(pkg, find_spec=lambda n: None) == (False, "not installed")


def test_live_schemas_are_compared_with_the_kept_ones():
    torch = pytest.importorskip("torch")

    def fake_op(schema):
        return types.SimpleNamespace(default=types.SimpleNamespace(_schema=torch._C.parse_schema(schema)))

    from ascend.standins import schema as schemas

    kept = schemas.get_schema("vllm_ascend", "npu_hc_post").schema
    same = types.SimpleNamespace(npu_hc_post=fake_op("_C_ascend::" + kept))
    assert versions.live_schema_mismatches("vllm_ascend", same) == []
    changed = types.SimpleNamespace(npu_hc_post=fake_op(
        "_C_ascend::npu_hc_post(Tensor x, Tensor residual, Tensor post, Tensor comb, int mode=0) -> Tensor"))
    found = versions.live_schema_mismatches("vllm_ascend", changed)
    assert len(found) == 1 and found[0].startswith("npu_hc_post: found") and "torch_binding.cpp:2358" in found[0]


# ---- MC2 limits in the SoC table ------------------------------------------------------------------------------
TORCH = {S.TORCH_NPU, S.COMPOSED}
MS = {S.MINDSPORE, S.COMPOSED}


@pytest.mark.parametrize("soc,providers,ep,tokens,hidden,topk,experts,idle,want", [
    # torch_npu doc (dispatch_v2, fullmesh): A2 ep in {2..8, 16, 32, 64, 128, 256}, H <= 7168 and % 32, BS <= 256
    (S.A2, TORCH, 8, 64, 4096, 6, 256, 0, "dispatch_combine"),  # V4-Flash on one 8-card A2 node
    (S.A2, TORCH, 12, 64, 4096, 6, 256, 0, "alltoall"),
    (S.A2, TORCH, 8, 300, 4096, 6, 256, 0, "alltoall"),
    (S.A2, TORCH, 8, 64, 7200, 6, 256, 0, "alltoall"),
    (S.A3, TORCH, 16, 512, 7168, 6, 384, 0, "dispatch_combine"),  # V4-Pro on A3
    (S.A3, TORCH, 16, 64, 512, 6, 256, 0, "alltoall"),  # A3: H in [1024, 8192]
    (S.A5, TORCH, 8, 64, 4096, 6, 256, 0, "alltoall"),  # the doc lists A2 and A3 only
    (S.A2, TORCH, 8, 64, 4096, 6, 256, 1, "dispatch_combine"),  # an idle rank sends a dummy token
    # MindSpore 2.10 docstrings: 910B ep in {16, 32, 64}; 910_93 H = 7168; experts <= 256; no x_active_mask
    (S.A2, MS, 8, 64, 4096, 6, 256, 0, "alltoall"),  # V4-Flash on one 8-card A2 node
    (S.A2, MS, 16, 64, 4096, 6, 256, 0, "dispatch_combine"),
    (S.A3, MS, 16, 64, 4096, 6, 256, 0, "alltoall"),
    (S.A3, MS, 16, 64, 7168, 6, 384, 0, "alltoall"),  # V4-Pro: 384 experts
    (S.A2, MS, 16, 64, 4096, 6, 256, 1, "alltoall"),
    (S.A2, TORCH, 1, 64, 4096, 6, 256, 0, "allgather"),
])
def test_mc2_limits_pick_the_strategy(soc, providers, ep, tokens, hidden, topk, experts, idle, want):
    got, rows = S.explain_moe_comm(soc, providers, ep, tokens, hidden, topk, experts, idle_ranks=idle)
    assert got == want, rows
    if want == "alltoall":
        assert all(r["reason"] for r in rows)  # doctor can say why


def test_doctor_reports_versions_and_the_moe_exchange():
    pytest.importorskip("torch")
    from tools.doctor_cmd import _text, doctor_report

    r = doctor_report(soc="A2", model="v4-flash", ep=8)
    json.dumps(r)
    assert r["versions"]["torch_npu"]["supported"] == ["2.14.0", "2.9.0"]
    assert r["versions"]["mindspore"]["supported"] == list(versions.MINDSPORE_SUPPORTED)
    assert r["moe_comm"]["frameworks"]["torch"]["strategy"] == "dispatch_combine"
    ms = r["moe_comm"]["frameworks"]["mindspore"]
    assert ms["strategy"] == "alltoall" and any("ep=8 not in [16, 32, 64]" in v["reason"] for v in ms["variants"])
    text = _text(r)
    assert "(simulated: --soc)" in text and "))" not in text.splitlines()[0]
    assert "MindSpore" in text and "torch_npu schemas 2.14.0" in text
