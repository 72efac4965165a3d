"""The op contract and the NumPy reference. Backends are chosen in `ascend.backends.get_backend`."""

from __future__ import annotations

from .contract import Backend, ExpertWeights

__all__ = ["Backend", "ExpertWeights", "BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """A backend's framework is not installed or cannot start here."""
