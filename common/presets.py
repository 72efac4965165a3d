"""Random weights for the bundled presets (tiny, bench-small): a model that runs with no download.

Initialisation is scaled so activations stay O(1) through every layer (fan-in scaling for
projections, norms near one, non-trivial mHC, ape, sinks and router biases), which keeps the
random model's arithmetic representative of a trained one for tests and benchmarks.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import Weights, as_float, float_dtype_np
from .config import ModelConfig
from .names import device_dtype, expected_tensors, parse_expert

_CHUNK = 1 << 22  # elements per float32 draw of a large tensor


def random_weights(cfg: ModelConfig, seed: int = 0, with_mtp: bool = True, float_dtype: str = "float32",
                   experts: range | None = None) -> Weights:
    """`float_dtype` bfloat16 / float16: each tensor is drawn in float32 (the same values for every dtype, so
    runs compare against the float32 reference) and rounded to its device dtype at once, so no float32 copy
    of the whole model is ever held. `experts`: keep only that slice of the routed experts (the others are
    still drawn, so every rank's weights equal the single-process model's)."""
    rng = np.random.default_rng(seed)
    w = Weights()
    w.mtp_enabled = with_mtp and cfg.n_mtp_layers > 0
    blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    E = cfg.n_routed_experts
    for name, shape, kind in expected_tensors(cfg, with_mtp=w.mtp_enabled):
        leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
        if kind == "i":  # tid2eid: k distinct experts per token
            keys = rng.random((shape[0], cfg.n_routed_experts), dtype=np.float32)
            w[name] = np.argsort(keys, axis=1)[:, : shape[1]].astype(np.int64)
        elif len(shape) == 1 and ("norm" in leaf or leaf.endswith("norm")):
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        elif leaf.endswith("_scale"):
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        elif leaf.endswith("_base") or leaf in ("ape", "attn_sink"):
            w[name] = (0.5 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        elif leaf == "bias":
            w[name] = (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:  # the big matrices: drawn straight into their destination, a chunk at a time
            std = None if name == "embed.weight" else np.float32(1.0 / np.sqrt(shape[-1]))
            pe = parse_expert(name)
            if pe is not None and experts is not None and pe[1] not in experts:
                _normal(rng, np.empty(shape, np.float32), std)  # another rank's expert: keep the stream
                continue
            dt = float_dtype_np(device_dtype(name, float_dtype))
            dst = _block_view(blocks, pe, dt, list(experts) if experts is not None else range(E), cfg) \
                if pe is not None else np.empty(shape, dt)
            w[name] = _normal(rng, dst, std)
            continue
        if kind != "i":
            w[name] = as_float(w[name], device_dtype(name, float_dtype))
    return w


def _normal(rng: np.random.Generator, out: np.ndarray, std: np.float32 | None) -> np.ndarray:
    """Fill `out` with float32 N(0, 1) draws (times std), rounded to out's dtype chunk by chunk: the same values
    as one draw of the whole shape, with no float32 copy of a large tensor."""
    rows = out if out.ndim == 2 else out.reshape(out.shape[0], -1)
    if not np.shares_memory(rows, out):
        raise ValueError("random weights: destination is not contiguous")
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    for a in range(0, rows.shape[0], step):
        v = rng.standard_normal(rows[a:a + step].shape, dtype=np.float32)
        rows[a:a + step] = v if std is None else v * std
    return out


def _block_view(blocks: dict, pe: tuple[int, int, str], dtype: np.dtype, held, cfg) -> np.ndarray:
    """A layer's routed experts share two blocks, [E, 2I, d] (w1 rows, then w3 rows) and [E, d, I], as a fused
    checkpoint stores them: each expert weight is a view, and a backend can take the whole layer as one tensor
    without copying it (ascend.torch_backend._stacked)."""
    layer, e, which = pe
    E, I, d = len(held), cfg.moe_inter_dim, cfg.dim
    if layer not in blocks:
        blocks[layer] = (np.empty((E, 2 * I, d), dtype), np.empty((E, d, I), dtype))
    b13, b2 = blocks[layer]
    i = held.index(e)
    return b13[i, :I] if which == "w1" else b13[i, I:] if which == "w3" else b2[i]
