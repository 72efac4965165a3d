"""The backend registry: `get_backend(name)` is the one place a compute backend is chosen.

It lives above ops/ (the contract and the NumPy reference) because it imports the Ascend lowerings; ops/
never imports ascend/.
"""

from __future__ import annotations

from typing import Any

from ops import Backend, BackendUnavailable

BACKENDS = ("cpu", "mindspore", "torch")
DEVICES = ("cpu", "npu")


def device_error(name: str, device: str | None) -> str | None:
    """Why backend `name` cannot run on `device`, or None (checked before any rank is started)."""
    if device is not None and device not in DEVICES:
        return f"unknown device {device!r}; choose from {', '.join(DEVICES)}"
    if name in ("cpu", "numpy") and device == "npu":
        return ("--device npu needs an Ascend backend: add --backend torch (torch_npu) or --backend mindspore; "
                "the cpu backend is the NumPy reference and runs on the host")
    return None


def get_backend(name: str, device: str | None = None, soc: str | None = None, **options: Any) -> Backend:
    """`device` ("cpu" or "npu") is translated per backend and `soc` goes to the Ascend backends; other
    `options` go to backends that take them (torch: providers, dtype; mindspore: jit, threads, ...). The NumPy
    reference runs on the host only: `device="npu"` with it is refused rather than silently ignored."""
    err = device_error(name, device)
    if err:
        raise BackendUnavailable(err)
    if name in ("cpu", "numpy"):
        from ops.numpy_ref import NumpyBackend

        return NumpyBackend()
    if name == "mindspore":
        # imported lazily: mindspore is an optional ~800 MB extra
        from .mindspore_backend import mindspore_backend

        if device is not None:
            options["device"] = "ascend" if device == "npu" else "cpu"
        if soc is not None:
            options["soc"] = soc
        return mindspore_backend(**options)
    if name == "torch":
        # imported lazily: torch is an optional extra, and torch_npu is only touched for device="npu"
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the torch backend needs torch: pip install -e .[torch]") from None
        from .torch_backend import torch_backend

        if device is not None:
            options["device"] = device
        if soc is not None:
            options["soc"] = soc
        return torch_backend(**options)
    raise BackendUnavailable(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
