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
        _fix_interpreter_bf16_dot()


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


def _fix_interpreter_bf16_dot() -> None:
    # the interpreter stores bfloat16 as its uint16 bit pattern and its tl.dot multiplies those integers; widen
    # bf16 operands to float32 first (exact), which is the cube unit's bf16 x bf16 -> fp32 product
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    orig = builder.create_dot
    if getattr(orig, "_dsv4_fixed", False):
        return

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._dsv4_fixed = True
    builder.create_dot = create_dot
