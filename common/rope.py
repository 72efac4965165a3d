"""RoPE inverse frequencies: plain for sliding-window layers, YaRN-scaled for compressed layers.

V4 applies no YaRN attention factor (mscale): only the frequencies change.
"""

from __future__ import annotations

import math

from .config import ModelConfig


def inv_freq(dim: int, base: float) -> list[float]:
    return [1.0 / (base ** (i / dim)) for i in range(0, dim, 2)]


def yarn_inv_freq(dim: int, base: float, factor: float, original_len: int, beta_fast: float,
                  beta_slow: float) -> list[float]:
    def correction_dim(rot: float) -> float:
        return dim * math.log(original_len / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for j, f in enumerate(inv_freq(dim, base)):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        smooth = 1.0 - ramp  # 1 = keep the original frequency (extrapolate), 0 = interpolate
        out.append(f / factor * (1.0 - smooth) + f * smooth)
    return out


def layer_inv_freqs(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    """(main, compress): main for SWA layers; compress for CSA/HCA layers, their compressors and indexers."""
    main = inv_freq(cfg.rope_dim, cfg.rope_theta)
    y = cfg.yarn
    if y is None:
        comp = inv_freq(cfg.rope_dim, cfg.compress_rope_theta)
    else:
        comp = yarn_inv_freq(cfg.rope_dim, cfg.compress_rope_theta, y.factor, y.original_max_position_embeddings,
                             y.beta_fast, y.beta_slow)
    return main, comp
