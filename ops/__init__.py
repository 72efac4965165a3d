"""The op contract and its backends. `get_backend(name)` is the one place a backend is chosen."""

from __future__ import annotations

from .contract import Backend, ExpertWeights

__all__ = ["Backend", "ExpertWeights", "get_backend", "BackendUnavailable", "BACKENDS"]

BACKENDS = ("cpu",)


class BackendUnavailable(RuntimeError):
    """A backend's framework is not installed or cannot start here."""


def get_backend(name: str) -> Backend:
    if name in ("cpu", "numpy"):
        from .numpy_ref import NumpyBackend

        return NumpyBackend()
    raise BackendUnavailable(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
