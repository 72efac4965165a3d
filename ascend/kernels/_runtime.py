"""Loading triton-ascend: availability, interpreter mode, and one compatibility shim for its interpreter."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def triton_installed() -> bool:
    """triton-ascend (the package `triton`, with its `ascend` backend) and pybind11 are installed.

    Looks at files only: importing `triton` here would bind `triton.jit` before TRITON_INTERPRET is set."""
    try:
        spec = importlib.util.find_spec("triton")
        if spec is None or not spec.submodule_search_locations:
            return False
        root = Path(list(spec.submodule_search_locations)[0])
        return (root / "backends" / "ascend" / "compiler.py").is_file() and \
            importlib.util.find_spec("pybind11") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def prepare(interpret: bool) -> None:
    """Call before the first kernel module import: `triton.jit` reads TRITON_INTERPRET when it decorates."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        _fix_interpreter_index()


def _fix_interpreter_index() -> None:
    # triton-ascend 3.2's interpreter holds scalars as 1-element arrays and converts them with int(array), which
    # NumPy >= 2.x refuses ("only 0-dimensional arrays can be converted"): loops with runtime bounds then fail.
    # Wrap its per-launch tensor patch so __index__ reads the single element instead.
    import numpy as np
    from triton.runtime import interpreter as interp

    orig = interp._patch_lang_tensor
    if getattr(orig, "_dsv4_fixed", False):
        return

    def patched(tensor):
        orig(tensor)
        tensor.__index__ = lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])

    patched._dsv4_fixed = True
    interp._patch_lang_tensor = patched
