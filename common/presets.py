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
        elif name == "embed.weight":
            w[name] = rng.standard_normal(shape, dtype=np.float32)
        else:
            std = np.float32(1.0 / np.sqrt(shape[-1]))
            w[name] = rng.standard_normal(shape, dtype=np.float32) * std
        pe = parse_expert(name)
        if pe is not None and experts is not None and pe[1] not in experts:
            del w[name]
        elif pe is not None:
            w[name] = _into_block(blocks, pe, w[name], float_dtype_np(device_dtype(name, float_dtype)),
                                  list(experts) if experts is not None else range(cfg.n_routed_experts), cfg)
        elif kind != "i":
            w[name] = as_float(w[name], device_dtype(name, float_dtype))
    return w


def _into_block(blocks: dict, pe: tuple[int, int, str], value: np.ndarray, dtype: np.dtype, held, cfg) -> np.ndarray:
    """A layer's routed experts share two blocks, [E, 2I, d] (w1 rows, then w3 rows) and [E, d, I], as a fused
    checkpoint stores them: each expert weight is a view, and a backend can take the whole layer as one tensor
    without copying it (ascend.torch_backend._stacked)."""
    layer, e, which = pe
    E, I, d = len(held), cfg.moe_inter_dim, cfg.dim
    if layer not in blocks:
        blocks[layer] = (np.empty((E, 2 * I, d), dtype), np.empty((E, d, I), dtype))
    b13, b2 = blocks[layer]
    i = held.index(e)
    view = b13[i, :I] if which == "w1" else b13[i, I:] if which == "w3" else b2[i]
    view[...] = value
    return view
