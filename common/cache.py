"""Per-sequence decoding state with the real V4 shapes.

Per layer: the sliding-window ring [window, head_dim] (slot = pos % window); for CSA/HCA the
compressed entries [n, head_dim] and the compressor's open group (raw projections of < ratio tokens,
and for the overlapping CSA compressor the previous group's first half); for CSA also the indexer's
compressed keys [n, index_head_dim] and its own compressor state.

The window ring and the compressed entries are held in the backend's activation dtype (`act_dtype`, bf16 on
a device as the official kv cache; float32 when the backend has none); the compressor's open groups stay
float32, as the official compressor state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ops import Backend

from .config import CSA, SWA, ModelConfig


class GrowingRows:
    """Rows appended over time into a buffer that doubles when full."""

    def __init__(self, B: Backend, width: int, capacity: int = 16, dtype: str = "float32"):
        self.B = B
        self.dtype = dtype
        self.buf = B.zeros((capacity, width), dtype)
        self.n = 0

    def append(self, rows: Any) -> None:
        k = rows.shape[0]
        if k == 0:
            return
        if self.n + k > self.buf.shape[0]:
            cap = max(2 * self.buf.shape[0], self.n + k)
            new = self.B.zeros((cap, self.buf.shape[1]), self.dtype)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n:self.n + k] = rows
        self.n += k

    def view(self) -> Any:
        return self.buf[: self.n]


@dataclass
class CompressorState:
    """The open group of a compressor: raw kv / score rows (ape not yet added) of < ratio tokens."""

    ratio: int
    overlap: bool
    width: int  # entry width (head_dim or index_head_dim)
    B: Backend
    buf_kv: Any = None
    buf_score: Any = None
    buf_len: int = 0
    prev_kv: Any = None  # overlap only: previous full group's first half [ratio, width]
    prev_score: Any = None  # its scores (ape included); -inf before the first group
    n_emitted: int = 0

    def __post_init__(self) -> None:
        coff = 2 if self.overlap else 1
        self.buf_kv = self.B.zeros((self.ratio, coff * self.width))
        self.buf_score = self.B.zeros((self.ratio, coff * self.width))
        if self.overlap:
            self.prev_kv = self.B.zeros((self.ratio, self.width))
            self.prev_score = self.B.full((self.ratio, self.width), float("-inf"))


@dataclass
class LayerCache:
    kind: str
    window_kv: Any  # slot p % window holds position p; which positions are live follows from the sequence length
    comp: CompressorState | None = None
    comp_kv: GrowingRows | None = None
    index_comp: CompressorState | None = None
    index_kv: GrowingRows | None = None


@dataclass
class SequenceCache:
    """Everything one sequence carries between forward calls."""

    layers: list[LayerCache]
    pos: int = 0  # tokens consumed by the main model
    mtp_pos: int = 0  # tokens consumed by the MTP layer(s)
    extra: dict = field(default_factory=dict)


def new_sequence_cache(cfg: ModelConfig, B: Backend, with_mtp: bool) -> SequenceCache:
    layers = []
    act = getattr(B, "act_dtype", "float32")
    n = cfg.n_total_layers if with_mtp else cfg.n_layers
    for i in range(n):
        kind, r = cfg.attn_kinds[i], cfg.compress_ratios[i]
        lc = LayerCache(kind, B.zeros((cfg.window, cfg.head_dim), act))
        if kind != SWA:
            lc.comp = CompressorState(r, kind == CSA, cfg.head_dim, B)
            lc.comp_kv = GrowingRows(B, cfg.head_dim, dtype=act)
        if kind == CSA:
            lc.index_comp = CompressorState(r, True, cfg.index_head_dim, B)
            lc.index_kv = GrowingRows(B, cfg.index_head_dim, dtype=act)
        layers.append(lc)
    return SequenceCache(layers)
