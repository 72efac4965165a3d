"""Tile sizes per SoC and the model shape sets the compile check builds.

Tiles are powers of two (triton-ascend) chosen so each kernel's unified-buffer and L0C use, as bishengir-compile
assigns it, stays under the SoC's limits (UB 192 KiB on A2/A3, ~248 KiB on 950; L0C 128 KiB). `dsv4 kernels`
prints the measured use. The attention tile splits heads (head_dim 512): 16 heads x 32 keys x 512.
"""

from __future__ import annotations

from typing import Any

SOCS = ("A2", "A3", "950")
SHAPE_SETS = ("flash-slice", "v4-flash", "v4-pro")

_A2A3 = {
    "mhc_pre": {"BK": 256, "BD": 512},
    "mhc_post": {"BD": 512},
    "compressor": {"BR": 4},
    "indexer_score": {"BH": 64, "BJ": 128},
    "indexer_topk": {"BJ": 1024, "BK": 64},
    "sparse_attention": {"BH": 16, "BS": 32, "BK": 32},
}
_950 = {**_A2A3, "indexer_score": {"BH": 64, "BJ": 128}, "compressor": {"BR": 16}}
TILES: dict[str, dict[str, dict[str, int]]] = {"A2": _A2A3, "A3": _A2A3, "950": _950}


_ACTIVE = {"soc": "A2"}


def tiles(kernel: str, soc: str) -> dict[str, int]:
    return dict(TILES[soc][kernel])


def set_soc(soc: str) -> None:
    """The SoC whose tiles the torch custom ops launch with (set by the torch backend)."""
    if soc not in TILES:
        raise ValueError(f"no tiles for SoC {soc!r}; known: {', '.join(TILES)}")
    _ACTIVE["soc"] = soc


def active(kernel: str) -> dict[str, int]:
    return tiles(kernel, _ACTIVE["soc"])


def model_shapes(name: str) -> dict[str, Any]:
    """The widths a shape set fixes at compile time. flash-slice = v4-flash's per-layer widths."""
    from common.config import load_preset

    cfg, _ = load_preset("v4-flash" if name == "flash-slice" else name)
    return {"hidden": cfg.dim, "hc": cfg.hc_mult, "heads": cfg.n_heads, "head_dim": cfg.head_dim,
            "rope_dim": cfg.rope_dim, "index_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
            "topk": cfg.index_topk, "ratios": sorted({r for r in cfg.compress_ratios if r})}


def instances(shape_set: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(instance name, kernel, shape) compiled for a shape set: the compressor once per layout (ratio 4 with the
    overlap layout and state, ratio 128 without) plus the indexer's own compressor (index_head_dim, ratio 4)."""
    sh = model_shapes(shape_set)
    out = [("mhc_pre", "mhc_pre", sh), ("mhc_post", "mhc_post", sh)]
    for r in sh["ratios"]:
        out.append((f"compressor_c{r}", "compressor", {**sh, "overlap": r == 4}))
    if 4 in sh["ratios"]:
        out.append(("compressor_index", "compressor", {**sh, "overlap": True, "head_dim": sh["index_head_dim"]}))
    out += [("indexer_score", "indexer_score", sh), ("indexer_topk", "indexer_topk", sh),
            ("sparse_attention", "sparse_attention", sh)]
    return out
