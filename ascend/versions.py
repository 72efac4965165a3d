"""The Ascend software stack this port supports: the one place that says which versions, and the checks on them.

Supported means "the lowering's calls were bound to that version's op schemas on CPU" (ascend/schemas/): the
torch_npu versions whose wheels the schemas were read from, the CANN each of them is built against (the wheels'
own README / compatibility table), the vllm-ascend and cann-recipes-infer commits whose bindings were read, and the
MindSpore whose primitive docstrings give the MC2 limits. Where an op's schema differs between supported torch_npu
versions (ascend/schemas/torch_npu.yaml `versions:`), `kernel_problem` tells the SoC-table selection which variant
the running version cannot take.

`check_stack` runs at backend start-up on an NPU: an unsupported torch_npu / CANN stops there with a message
naming the found version and what to install; `bootstrap_custom_op_env` prepares a custom-op package the way
vllm-ascend does before its op module is imported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import schemas

# torch_npu version -> the CANN release it is built against (torch-npu wheel README, "Install CANN 9.1.0";
# the 2.9.0 wheel's matching table row "CANN 8.5.0 | 2.9.0 | 2.9.0 | v2.9.0-7.3.0")
TORCH_NPU_CANN = {"2.14.0": "9.1.0", "2.9.0": "8.5.0"}
TORCH_NPU_PRIMARY = "2.14.0"
# the commits whose bindings were read (ascend/schemas/vllm_ascend.yaml, cann_recipes.yaml)
VLLM_ASCEND_COMMIT = "182b75ea84ff13ece27b57391331ef8935410aea"
CANN_RECIPES_COMMIT = "fbc225d2de3157a093a2e7dfc2b23086d23ed8f9"
# the MindSpore whose ops.auto_generate docstrings give the MC2 limits in the SoC table
MINDSPORE_SUPPORTED = ("2.10",)

INSTALL_HINT = (f"install torch-npu=={TORCH_NPU_PRIMARY} with CANN {TORCH_NPU_CANN[TORCH_NPU_PRIMARY]} "
                f"(or torch-npu==2.9.0 with CANN {TORCH_NPU_CANN['2.9.0']})")


class UnsupportedStack(RuntimeError):
    """The installed Ascend software is outside what the port was checked against."""


def release(version: str | None) -> str | None:
    """"2.14.0.post3" / "2.14.0+git54e365d" -> "2.14.0"; None stays None."""
    if not version:
        return None
    m = re.match(r"(\d+\.\d+(?:\.\d+)?)", version)
    return m.group(1) if m else None


def supported_torch_npu(version: str | None) -> str | None:
    """The supported torch_npu release a found version counts as (post releases of it included), else None."""
    r = release(version)
    return r if r in TORCH_NPU_CANN else None


def cann_matches(torch_npu: str, cann: str | None) -> bool:
    """CANN "9.1.0" / "9.1.0.alpha001" / "9.1.RC1" counts as 9.1.0 for torch_npu 2.14.0 (major.minor must match)."""
    if cann is None:
        return True  # not found is reported by the doctor; the runtime itself refuses a missing CANN
    want = TORCH_NPU_CANN[torch_npu].split(".")[:2]
    return cann.split(".")[:2] == want


def check_stack(torch_npu_version: str | None, cann_version: str | None) -> str:
    """The supported torch_npu release of this stack; raises UnsupportedStack naming what to install."""
    tn = supported_torch_npu(torch_npu_version)
    if tn is None:
        raise UnsupportedStack(f"torch_npu {torch_npu_version} is not supported (supported: "
                               f"{', '.join(sorted(TORCH_NPU_CANN))}); {INSTALL_HINT}")
    if not cann_matches(tn, cann_version):
        raise UnsupportedStack(f"CANN {cann_version} does not match torch_npu {torch_npu_version}, which is built "
                               f"for CANN {TORCH_NPU_CANN[tn]}; {INSTALL_HINT}")
    return tn


def mindspore_supported(version: str | None) -> bool:
    r = release(version)
    return r is not None and any(r == v or r.startswith(v + ".") for v in MINDSPORE_SUPPORTED)


# ---- per-version op schemas --------------------------------------------------------------------------------
def has_op(op: str, version: str | None) -> bool:
    """torch_npu `op` exists in that version's schemas (ops not kept in ascend/schemas count as present)."""
    try:
        return schemas.get_schema("torch_npu", op, version) is not None
    except KeyError:
        return True


def has_arg(op: str, arg: str, version: str | None) -> bool:
    """torch_npu `op` at that version takes an argument called `arg`."""
    s = schemas.get_schema("torch_npu", op, version)
    if s is None:
        return False
    import torch

    return any(a.name == arg for a in torch._C.parse_schema(s.schema).arguments)


def kernel_problem(kernels: str, requires: tuple[str, ...], version: str | None) -> str | None:
    """Why a torch_npu variant cannot run at `version` (an op absent, a required `op.arg` missing), else None."""
    for k in kernels.split("+"):
        if k and not has_op(k, version):
            return f"{k} is not in torch_npu {version}"
    for req in requires:
        op, _, arg = req.partition(".")
        if not has_arg(op, arg, version):
            return f"{op} has no {arg!r} in torch_npu {version}"
    return None


def live_schema_mismatches(library: str, namespace: Any, version: str | None = None) -> list[str]:
    """Kept schemas that differ from the ones a loaded package registered (`namespace` is torch.ops.<ns>).

    Names are compared without the namespace; an op the package does not register is not listed here
    (the device probe reports missing kernels)."""
    out = []
    for name in schemas.op_names(library):
        kept = schemas.get_schema(library, name, version)
        if kept is None:
            continue
        try:
            live = str(getattr(namespace, name).default._schema)
        except (AttributeError, RuntimeError):
            continue
        if not _same_schema(live, kept.schema):
            out.append(f"{name}: found {live}; checked against {kept.schema} ({kept.source})")
    return out


def _same_schema(a: str, b: str) -> bool:
    """Equal as parsed function schemas, the namespace aside."""
    import torch

    parse = torch._C.parse_schema
    return parse(a.split("::", 1)[-1]) == parse(b.split("::", 1)[-1])


# ---- custom-op package bootstrap (vllm-ascend@182b75e vllm_ascend/utils.py:299-316, enable_custom_op :418-423) --
@dataclass(frozen=True)
class CustomOpPackage:
    package: str  # the Python package
    namespace: str  # torch.ops namespace its kernels register
    module: str  # the module whose import registers them
    vendor_dir: str  # the bundled CANN custom-op vendor directory, relative to the package
    schema_library: str  # ascend/schemas/<schema_library>.yaml


CUSTOM_OP_PACKAGES = {
    "vllm_ascend": CustomOpPackage("vllm_ascend", "_C_ascend", "vllm_ascend.vllm_ascend_C",
                                   "_cann_ops_custom/vendors/custom_transformer", "vllm_ascend"),  # utils.py:79,308
    "custom_ops": CustomOpPackage("custom_ops", "custom", "custom_ops", "", "cann_recipes"),
}


def bootstrap_custom_op_env(pkg: CustomOpPackage, package_dir: str | Path,
                            env: dict[str, str] | None = None) -> str | None:
    """Prepend the package's bundled vendor directory to ASCEND_CUSTOM_OPP_PATH (once), as vllm-ascend does
    before importing its op module, so the aclnn kernels resolve. Returns the directory added, or None when the
    package bundles none (or it is already on the path)."""
    env = os.environ if env is None else env
    if not pkg.vendor_dir:
        return None
    vendor = Path(package_dir) / pkg.vendor_dir
    if not vendor.is_dir():
        return None
    current = [p for p in env.get("ASCEND_CUSTOM_OPP_PATH", "").split(":") if p]
    if str(vendor) in current:
        return None
    env["ASCEND_CUSTOM_OPP_PATH"] = ":".join([str(vendor), *current])
    return str(vendor)


def import_custom_ops(pkg: CustomOpPackage, find_spec: Callable[[str], Any] | None = None,
                      import_module: Callable[[str], Any] | None = None,
                      env: dict[str, str] | None = None) -> tuple[bool, str | None]:
    """Bootstrap and import a custom-op package: (imported, error). Never raises (the probe is guarded)."""
    import importlib
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    import_module = import_module or importlib.import_module
    try:
        spec = find_spec(pkg.package)
    except Exception as e:  # noqa: BLE001 - a broken parent package can raise here
        return False, f"{type(e).__name__}: {e}"
    if spec is None:
        return False, "not installed"
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    if locations:
        bootstrap_custom_op_env(pkg, locations[0], env)
    try:
        import_module(pkg.module)
    except Exception as e:  # noqa: BLE001 - without CANN this fails in many ways
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return True, None


def summary(found: Mapping[str, str | None]) -> dict[str, dict[str, Any]]:
    """found-vs-supported per component, for `dsv4 doctor`."""
    tn = found.get("torch_npu")
    return {
        "torch_npu": {"found": tn, "supported": sorted(TORCH_NPU_CANN),
                      "ok": tn is None or supported_torch_npu(tn) is not None},
        "cann": {"found": found.get("cann"),
                 "supported": sorted(set(TORCH_NPU_CANN.values())),
                 "ok": found.get("cann") is None or tn is None or supported_torch_npu(tn) is None
                 or cann_matches(supported_torch_npu(tn), found.get("cann"))},
        "vllm_ascend": {"found": found.get("vllm_ascend"), "supported": f"commit {VLLM_ASCEND_COMMIT[:7]} bindings",
                        "ok": True},
        "mindspore": {"found": found.get("mindspore"), "supported": list(MINDSPORE_SUPPORTED),
                      "ok": found.get("mindspore") is None or mindspore_supported(found.get("mindspore"))},
        "schemas": {"found": None, "supported": {lib: schemas.schema_version(lib) for lib in schemas.LIBRARIES},
                    "ok": True},
    }
