"""What Ascend software this machine has: torch, torch_npu, CANN, the SoC, CANN custom-op packages.

Every probe is guarded: importing torch_npu without CANN raises all sorts of exceptions (ImportError,
OSError from missing .so files, RuntimeError from the ACL runtime), so each import sits in its own
try/except and `detect()` never raises on a machine that has none of it. Nothing here imports
torch_npu at module import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import soc as socmod
from . import versions

# CANN custom-op packages probed (package -> namespace, op module, vendor dir: ascend/versions.py)
CUSTOM_PACKAGES = versions.CUSTOM_OP_PACKAGES
# the package whose kernels the torch backend lowers to, and those kernels (ascend/standins/vllm_ascend.py);
# cann-recipes-infer's `custom` ops share some names but not the binding rules, so they are only reported
LOWERED_PACKAGE = "vllm_ascend"
CUSTOM_KERNELS = ("moe_gating_top_k_hash", "npu_hc_pre_v2", "npu_hc_post")

_DEFAULT_CANN_HOMES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann/latest")
_VERSION_FILES = ("version.cfg", "ascend_toolkit_install.info", "compiler/version.info", "runtime/version.info",
                  "arm64-linux/ascend_toolkit_install.info", "x86_64-linux/ascend_toolkit_install.info")


@dataclass
class DeviceInfo:
    """The result of `detect()`: plain data, printable by `dsv4 doctor`."""

    torch_version: str | None = None
    torch_npu_version: str | None = None
    torch_npu_error: str | None = None  # why torch_npu is unusable (not installed / failed to import)
    # kept torch_npu schemas that the installed torch_npu registers differently (versions.live_schema_mismatches)
    torch_npu_schema_mismatches: list[str] = field(default_factory=list)
    npu_count: int = 0
    chip: str | None = None  # e.g. "Ascend910B2", from torch_npu.npu.get_device_name
    soc: str | None = None  # A2 / A3 / 950, from the chip name
    cann_version: str | None = None
    cann_home: str | None = None
    mindspore_version: str | None = None
    # package -> {"namespace": ..., "kernels": [custom kernels found], "error": ...}
    custom_packages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def has_npu(self) -> bool:
        return self.torch_npu_version is not None and self.npu_count > 0

    @property
    def custom_kernels(self) -> set[str]:
        return {k for p in self.custom_packages.values() for k in p.get("kernels", [])}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["has_npu"] = self.has_npu
        return d


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def import_torch_npu() -> tuple[Any | None, str | None]:
    """(torch_npu module, None) or (None, reason). Never raises."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "not installed"
    try:
        import torch_npu  # noqa: F401  (registers the npu device with torch)

        return torch_npu, None
    except Exception as e:  # noqa: BLE001 - without CANN this fails in many ways
        return None, _short(e)


def require_torch_npu(error: type[Exception] = RuntimeError, purpose: str = "--device npu") -> Any:
    """torch_npu, imported, on a supported stack (ascend/versions.py); else `error` naming the problem and what
    to install. The one start-up gate of every NPU path (backend, expert parallelism, distributed init)."""
    npu, err = import_torch_npu()
    if npu is None:
        raise error(f"{purpose} needs torch_npu and CANN ({err}); {versions.INSTALL_HINT}")
    try:
        versions.check_stack(getattr(npu, "__version__", None), cann_version()[0])
    except versions.UnsupportedStack as e:
        raise error(str(e)) from None
    return npu


def cann_version(env: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(version, toolkit home) from ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH version files, else (None, home)."""
    env = os.environ if env is None else env
    homes = [env.get("ASCEND_TOOLKIT_HOME"), env.get("ASCEND_HOME_PATH"), *_DEFAULT_CANN_HOMES]
    for home in homes:
        if not home or not Path(home).is_dir():
            continue
        for name in _VERSION_FILES:
            p = Path(home) / name
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            m = re.search(r"^\s*(?:toolkit_installed_)?version\s*[=:]\s*([^\s#]+)", text, re.I | re.M)
            if m:
                return m.group(1).strip().strip('"'), home
        return None, home
    return None, None


def _probe_custom(package: str, torch_npu_ok: bool) -> dict[str, Any] | None:
    """Which kernels a custom-op package registers (bootstrapped the way its owner does, see
    versions.import_custom_ops); None when the package is not installed."""
    pkg = CUSTOM_PACKAGES[package]
    try:
        installed = importlib.util.find_spec(package) is not None
    except Exception:  # noqa: BLE001 - a broken parent package can raise here
        installed = False
    if not installed:
        return None
    info: dict[str, Any] = {"namespace": pkg.namespace, "kernels": [], "error": None, "schema_mismatches": []}
    if not torch_npu_ok:  # the kernels are NPU code: importing them without torch_npu only fails
        info["error"] = "torch_npu unavailable; kernels not probed"
        return info
    ok, err = versions.import_custom_ops(pkg)
    if not ok:
        info["error"] = err
        return info
    import torch

    from .standins import schema as schemas

    ns = getattr(torch.ops, pkg.namespace)
    for k in schemas.op_names(pkg.schema_library):
        try:
            getattr(ns, k)
            info["kernels"].append(k)
        except (AttributeError, RuntimeError):
            pass
    info["schema_mismatches"] = versions.live_schema_mismatches(pkg.schema_library, ns)
    return info


def _mindspore_version() -> str | None:
    """The installed MindSpore's version from its metadata (importing it is slow and not needed)."""
    try:
        from importlib.metadata import version

        return version("mindspore")
    except Exception:  # noqa: BLE001 - not installed
        return None


def detect() -> DeviceInfo:
    """Probe everything; never raises."""
    info = DeviceInfo()
    try:
        import torch

        info.torch_version = torch.__version__
    except Exception as e:  # noqa: BLE001
        info.torch_npu_error = f"torch unavailable ({_short(e)})"
        info.cann_version, info.cann_home = cann_version()
        return info
    npu, err = import_torch_npu()
    info.torch_npu_error = err
    if npu is not None:
        info.torch_npu_version = getattr(npu, "__version__", "unknown")
        try:
            info.npu_count = int(npu.npu.device_count())
            if info.npu_count:
                info.chip = str(npu.npu.get_device_name(0))
                info.soc = socmod.soc_of_chip(info.chip)
        except Exception as e:  # noqa: BLE001 - driver present but no usable device
            info.torch_npu_error = _short(e)
        supported = versions.supported_torch_npu(info.torch_npu_version)
        if supported is not None:
            info.torch_npu_schema_mismatches = versions.live_schema_mismatches("torch_npu", torch.ops.npu, supported)
    info.cann_version, info.cann_home = cann_version()
    info.mindspore_version = _mindspore_version()
    for pkg in CUSTOM_PACKAGES:
        probed = _probe_custom(pkg, npu is not None)
        if probed is not None:
            info.custom_packages[pkg] = probed
    return info


class RealCustomOps:
    """The lowered package's kernels (vllm-ascend `_C_ascend`), under the names of `standins.vllm_ascend`.
    A kernel whose registered schema differs from the one the lowering was checked against is left out."""

    def __init__(self, info: DeviceInfo):
        import torch

        self._ops: dict[str, Any] = {}
        probed = info.custom_packages.get(LOWERED_PACKAGE, {})
        stale = {m.split(":", 1)[0] for m in probed.get("schema_mismatches", [])}
        ns = getattr(torch.ops, CUSTOM_PACKAGES[LOWERED_PACKAGE].namespace, None)
        for k in probed.get("kernels", []):
            if k in CUSTOM_KERNELS and k not in stale and ns is not None:
                self._ops[k] = getattr(ns, k)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_ops"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def __bool__(self) -> bool:
        return bool(self._ops)
