"""The op contract and its backends. `get_backend(name)` is the one place a backend is chosen."""

from __future__ import annotations

from typing import Any

from .contract import Backend, ExpertWeights

__all__ = ["Backend", "ExpertWeights", "get_backend", "BackendUnavailable", "BACKENDS"]

BACKENDS = ("cpu", "mindspore", "torch")


class BackendUnavailable(RuntimeError):
    """A backend's framework is not installed or cannot start here."""


def get_backend(name: str, **options: Any) -> Backend:
    """`options` go to backends that take them (torch: device, soc, providers, dtype)."""
    if name in ("cpu", "numpy"):
        from .numpy_ref import NumpyBackend

        return NumpyBackend()
    if name == "mindspore":
        # imported lazily: mindspore is an optional ~800 MB extra
        from ascend.mindspore_backend import mindspore_backend

        return mindspore_backend(**options)
    if name == "torch":
        # imported lazily: torch is an optional extra, and torch_npu is only touched for device="npu"
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the torch backend needs torch: pip install -e .[torch]") from None
        from ascend.torch_backend import torch_backend

        return torch_backend(**options)
    raise BackendUnavailable(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
