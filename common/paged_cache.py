"""One paged cache manager for DeepSeek-V4's per-sequence attention state.

Every cache lives in fixed-size blocks, as the Ascend V4 kernels read them (vllm-ascend
csrc/attention/sparse_attn_sharedkv/README.md: paged `[block_num, block_size, 1, D]`, PA_ND / PA_BSND,
block_size a multiple of 16 up to 1024; csrc/attention/compressor/README.md: state `[block_num,
block_size, 2*coff*D]` float32). A sequence holds one block table per cache kind; layers of the same
kind share that table and each has its own storage (vLLM's KV-cache groups). Block id 0 is the null
block: never handed out, it pads tables (the compressor README: a 0 entry means "no update").

Kinds (r = a layer's compress ratio):
  swa            raw keys by position, [*, head_dim]; sliding: positions older than the window are released
  kv{r}          compressed entries by entry index j (entry j pools group j), [*, head_dim]
  state{r}       compressor state by position: [kv_state | score_state] of coff*head_dim each, float32;
                 sliding: only the open group (and, overlapping, the group before it) stays
  idx{r}         indexer keys by entry (CSA only), [*, index_head_dim]; int8 + a per-key scale
                 (`idx_scale{r}`, same table) when the indexer is quantized
  idx_state{r}   the indexer compressor's state, like state{r} at index_head_dim

The main layers and the MTP layers run at different positions (MTP lags by one token), so their tables
are separate groups ("main", "mtp"). Byte accounting (`sequence_bytes`, `CacheFormat`) is the one fact
that `dsv4 plan` and the benchmarks read.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import CSA, SWA, ModelConfig

MAIN, MTP = "main", "mtp"
NULL_BLOCK = 0
DEFAULT_BLOCK_SIZE = 128  # vllm-ascend DSV4_BLOCK_SIZES[128] (models/layer/attention/layer.py)
# compressor state pages: a few groups live at a time; the smallest block the kernels take (16-aligned)
STATE_BLOCK_SIZE = 16


def check_block_size(value: int, what: str = "block_size") -> int:
    """Rows per paged-cache block the V4 kernels take: a multiple of 16 in [16, 1024] (sparse_attn_sharedkv and
    vllm_quant_lightning_indexer READMEs). -> value; ValueError naming `what` otherwise."""
    if value % 16 or not 16 <= value <= 1024:
        raise ValueError(f"{what} must be a multiple of 16 in [16, 1024], got {value}")
    return value


class CacheFull(RuntimeError):
    """No free block of a kind with a fixed block budget (the scheduler must wait or preempt)."""


@dataclass(frozen=True)
class Kind:
    name: str
    by: str  # "pos": one row per token position; "entry": one row per compressed entry
    ratio: int  # 1 for positions
    sliding: str = ""  # "window" / "state" / "" (kept for the sequence's life)
    overlap: bool = False  # state of the overlapping (CSA) compressor keeps the previous group too
    storages: tuple[tuple[str, int, str], ...] = ()  # (storage name, row width, dtype)

    def live_rows(self, length: int, window: int) -> tuple[int, int]:
        """[first, end) rows a sequence of `length` tokens must keep for its next forward call."""
        if self.by == "entry":
            return 0, length // self.ratio
        if self.sliding == "window":
            return max(0, length - window + 1), length  # the next query at `length` sees (length - W, length]
        if self.sliding == "state":
            first = (length // self.ratio) * self.ratio - (self.ratio if self.overlap else 0)
            return max(0, first), length
        return 0, length


def coff(kind: str) -> int:
    """Compressor width factor: the overlapping CSA compressor projects two halves (a, b)."""
    return 2 if kind == CSA else 1


def layer_kinds(cfg: ModelConfig, layer: int, index_quant: bool = False,
                kv_dtype: str = "float32", index_dtype: str = "float32") -> list[Kind]:
    """The cache kinds one layer uses, with their storages."""
    kind, r = cfg.attn_kinds[layer], cfg.compress_ratios[layer]
    D, Di = cfg.head_dim, cfg.index_head_dim
    out = [Kind("swa", "pos", 1, "window", storages=(("swa", D, kv_dtype),))]
    if kind == SWA:
        return out
    c = coff(kind)
    out.append(Kind(f"kv{r}", "entry", r, storages=((f"kv{r}", D, kv_dtype),)))
    out.append(Kind(f"state{r}", "pos", r, "state", kind == CSA, ((f"state{r}", 2 * c * D, "float32"),)))
    if kind == CSA:
        if index_quant:
            st = ((f"idx{r}", Di, "int8"), (f"idx_scale{r}", 1, index_dtype))
        else:
            st = ((f"idx{r}", Di, index_dtype),)
        out.append(Kind(f"idx{r}", "entry", r, storages=st))
        out.append(Kind(f"idx_state{r}", "pos", r, "state", True, ((f"idx_state{r}", 4 * Di, "float32"),)))
    return out


def group_of(cfg: ModelConfig, layer: int) -> str:
    return MAIN if layer < cfg.n_layers else MTP


# ---- byte accounting: the one fact plan and benchmarks read ---------------------------------------------------
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}


@dataclass(frozen=True)
class CacheFormat:
    """Bytes per cached row of each kind family, for a deployment or for the CPU reference."""

    kv_entry: int  # one SWA / compressed entry (head_dim wide)
    index_entry: int  # one indexer key with its scale
    state_elem: int = 4  # compressor state is float32 everywhere (compressor README: kv_state FLOAT32)
    note: str = ""

    def row_bytes(self, cfg: ModelConfig, kind: Kind) -> int:
        fam = kind.name.rstrip("0123456789")
        if fam in ("swa", "kv"):
            return self.kv_entry
        if fam == "idx":
            return self.index_entry
        return sum(w for _, w, _ in kind.storages) * self.state_elem


def cache_format(cfg: ModelConfig, kv_dtype: str) -> CacheFormat:
    """Deployment formats: "bf16" (A2/A3 SWA + compressed caches in bf16, indexer keys int8 + fp16 scale as
    vllm-ascend device_op.indexer_quant_scatter stores them), "fp8" (vLLM / 950 layout: fp8 NoPE + bf16 RoPE
    + one ue8m0 scale per 64 NoPE dims padded to 8 B; indexer fp8 + float32 scale), "float32" (CPU reference)."""
    nope, rope = cfg.nope_dim, cfg.rope_dim
    if kv_dtype == "fp8":
        raw = nope + 2 * rope + math.ceil(nope / 64)
        entry = -(-raw // 8) * 8
        return CacheFormat(entry, cfg.index_head_dim + 4, 4,
                           f"fp8 NoPE {nope} B + bf16 RoPE {2 * rope} B + {math.ceil(nope / 64)} ue8m0 scales, "
                           f"padded to {entry} B per entry; indexer key {cfg.index_head_dim} B fp8 + 4 B scale")
    if kv_dtype == "bf16":
        return CacheFormat(2 * cfg.head_dim, cfg.index_head_dim + 2, 4,
                           f"bf16 {cfg.head_dim} x 2 = {2 * cfg.head_dim} B per entry; indexer key "
                           f"{cfg.index_head_dim} B int8 + 2 B fp16 scale")
    if kv_dtype == "float32":
        return CacheFormat(4 * cfg.head_dim, 4 * cfg.index_head_dim, 4, "float32 reference caches")
    raise ValueError(f"unknown cache dtype {kv_dtype!r}; known: fp8, bf16, float32")


def _blocks(first: int, end: int, bs: int) -> int:
    return 0 if end <= first else (end - 1) // bs - first // bs + 1


def kind_block_size(kind: Kind, block_size: int, state_block_size: int) -> int:
    """Rows per block of a kind: compressor state pages are smaller (a few groups live at a time)."""
    return state_block_size if kind.sliding == "state" else block_size


def peak_blocks(kind: Kind, length: int, chunk: int, window: int, block_size: int) -> int:
    """The most blocks of `kind` one sequence holds at once while it grows to `length` tokens in forward calls of
    at most `chunk` tokens (any split). A call at position p first allocates its rows beside live_rows(p) and only
    then trims the sliding kinds (`allocate` ... `trim`), so it holds [live_rows(p).first, p + its tokens)."""
    if length <= 0:
        return 0
    if not kind.sliding:  # kept for the sequence's life: the peak is the end
        first, end = kind.live_rows(length, window)
        return _blocks(first, end, block_size)
    # Once the live rows start past 0, moving p back by `period` moves them by whole blocks and leaves the call as
    # many tokens or more, so it holds as many blocks or more: the maximum lies at some p < start + period.
    if kind.sliding == "window":
        start, period = max(0, window - 1), block_size
    else:
        start, period = 2 * kind.ratio, math.lcm(kind.ratio, block_size)
    best = 0
    for p in range(min(length, start + period)):
        first, _ = kind.live_rows(p, window)
        best = max(best, _blocks(first, p + min(max(1, chunk), length - p), block_size))
    return best


def sequence_peak_blocks(cfg: ModelConfig, length: int, chunk: int, block_size: int,
                         state_block_size: int = STATE_BLOCK_SIZE) -> dict[str, int]:
    """`peak_blocks` of every kind the main layers use (what a served sequence needs; MTP layers not run)."""
    kinds = {k.name: k for i in range(cfg.n_layers) for k in layer_kinds(cfg, i)}
    return {name: peak_blocks(k, length, chunk, cfg.window, kind_block_size(k, block_size, state_block_size))
            for name, k in kinds.items()}


def layer_bytes(cfg: ModelConfig, fmt: CacheFormat, layer: int, context: int,
                block_size: int = DEFAULT_BLOCK_SIZE, state_block_size: int = STATE_BLOCK_SIZE) -> dict[str, int]:
    """Bytes (whole blocks) one layer holds for a sequence of `context` tokens, per kind."""
    out = {}
    for k in layer_kinds(cfg, layer):
        first, end = k.live_rows(context, cfg.window)
        bs = kind_block_size(k, block_size, state_block_size)
        out[k.name] = _blocks(first, end, bs) * bs * fmt.row_bytes(cfg, k)
    return out


def sequence_bytes(cfg: ModelConfig, fmt: CacheFormat, context: int, with_mtp: bool = False,
                   block_size: int = DEFAULT_BLOCK_SIZE,
                   state_block_size: int = STATE_BLOCK_SIZE) -> dict[str, dict[str, float]]:
    """Bytes one sequence of `context` tokens holds after its last forward call, per kind: whole blocks
    (`bytes`) and the rows they carry (`row_bytes`), summed over the layers of the kind."""
    out: dict[str, dict[str, float]] = {}
    n = cfg.n_total_layers if with_mtp else cfg.n_layers
    for i in range(n):
        for k in layer_kinds(cfg, i):
            first, end = k.live_rows(context, cfg.window)
            rb = fmt.row_bytes(cfg, k)
            bs = kind_block_size(k, block_size, state_block_size)
            d = out.setdefault(k.name, {"layers": 0, "rows": 0, "blocks": 0, "bytes": 0, "row_bytes": 0})
            d["layers"] += 1
            d["rows"] = end - first
            d["blocks"] = _blocks(first, end, bs)
            d["bytes"] += d["blocks"] * bs * rb
            d["row_bytes"] += (end - first) * rb
    return out


def family(kind_name: str) -> str:
    """swa / kv / state / idx / idx_state: the kind without its ratio."""
    return kind_name.rstrip("0123456789")


# ---- the manager ----------------------------------------------------------------------------------------------
@dataclass
class SequenceCache:
    """A sequence's handle: positions consumed and block tables (group, kind) -> block ids (0 = released)."""

    manager: Any
    pos: int = 0  # tokens consumed by the main model
    mtp_pos: int = 0  # tokens consumed by the MTP layer(s)
    tables: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def length(self, group: str) -> int:
        return self.pos if group == MAIN else self.mtp_pos


class PagedCacheManager:
    """Blocks of every kind for every layer of one model, handed to sequences on demand.

    `num_blocks` None grows the pools on demand (the reference, tests, `dsv4 generate`); an int or a
    {kind: int} fixes the budget, and `allocate` raises CacheFull past it (a server's admission control)."""

    def __init__(self, cfg: ModelConfig, backend: Any, with_mtp: bool = False, block_size: int = 16,
                 num_blocks: int | dict[str, int] | None = None, index_quant: bool = False,
                 kv_dtype: str = "float32", state_block_size: int = STATE_BLOCK_SIZE):
        check_block_size(block_size)
        check_block_size(state_block_size, "state_block_size")
        self.cfg, self.B, self.bs, self.state_bs = cfg, backend, block_size, state_block_size
        self.index_quant = index_quant
        self.n_layers = cfg.n_total_layers if with_mtp else cfg.n_layers
        self.layer_kinds = [layer_kinds(cfg, i, index_quant, kv_dtype) for i in range(self.n_layers)]
        self.kinds: dict[str, Kind] = {}
        self.kind_layers: dict[str, list[int]] = {}
        for i, ks in enumerate(self.layer_kinds):
            for k in ks:
                self.kinds.setdefault(k.name, k)
                self.kind_layers.setdefault(k.name, []).append(i)
        self.fixed = num_blocks is not None
        start = {k: (num_blocks.get(k, 0) if isinstance(num_blocks, dict) else (num_blocks or 4))
                 for k in self.kinds}
        self.capacity: dict[str, int] = {}
        self.free: dict[str, list[int]] = {}
        self.refs: dict[str, np.ndarray] = {}
        self.storage: dict[tuple[int, str], Any] = {}
        self._prefixes: dict[int, tuple[Any, int]] = {}  # hash of a token prefix -> (sequence weakref, tokens)
        for k, n in start.items():
            self.capacity[k] = 0
            self.free[k] = []
            self.refs[k] = np.zeros(1, dtype=np.int64)
            self._grow(k, n)

    # ---- storage -----------------------------------------------------------------------------------------
    def _shape(self, kind: Kind, width: int, n: int) -> tuple[int, ...]:
        # kernel layouts: PA_ND / PA_BSND [blocks, block_size, 1, D] for keys; [blocks, block_size, W] for state
        bs = self.kind_bs(kind.name)
        if kind.sliding == "state" or width == 1:
            return (n + 1, bs, width)
        return (n + 1, bs, 1, width)

    def kind_bs(self, kind: str) -> int:
        return kind_block_size(self.kinds[kind], self.bs, self.state_bs)

    def _grow(self, name: str, n: int) -> None:
        # n may be 0 (a fixed pool of 0 blocks, from __init__): the kind still gets its storages, null block alone
        kind = self.kinds[name]
        old = self.capacity[name]
        new = old + n
        for layer in self.kind_layers[name]:
            for sname, width, dtype in kind.storages:
                t = self.B.zeros(self._shape(kind, width, new), dtype)
                if old:
                    t[: old + 1] = self.storage[(layer, sname)]
                self.storage[(layer, sname)] = t
        self.capacity[name] = new
        self.free[name].extend(range(new, old, -1))  # pop() hands out the lowest ids first
        self.refs[name] = np.concatenate([self.refs[name], np.zeros(n, dtype=np.int64)])

    def cache(self, layer: int, storage: str) -> Any:
        """The storage tensor of a layer (kernel layout, block 0 = null)."""
        return self.storage[(layer, storage)]

    # ---- sequences ---------------------------------------------------------------------------------------------
    def new_sequence(self) -> SequenceCache:
        seq = SequenceCache(self)
        # blocks go back to the pools when the handle is dropped (generate never releases explicitly)
        weakref.finalize(seq, PagedCacheManager._release_tables, weakref.ref(self), seq.tables)
        return seq

    def release(self, seq: SequenceCache) -> None:
        """Return all of a sequence's blocks (shared prefix blocks stay while another sequence holds them)."""
        self._release_tables(weakref.ref(self), seq.tables)

    @staticmethod
    def _release_tables(mref: Any, tables: dict) -> None:
        self = mref()
        if self is None:
            return
        for (_, kind), table in tables.items():
            for i, b in enumerate(table):
                if b != NULL_BLOCK:
                    self._unref(kind, b)
                    table[i] = NULL_BLOCK
        tables.clear()

    def _unref(self, kind: str, b: int) -> None:
        self.refs[kind][b] -= 1
        if self.refs[kind][b] == 0:
            self.free[kind].append(b)

    def _take(self, kind: str) -> int:
        if not self.free[kind]:
            if self.fixed:
                raise CacheFull(f"no free {kind} block (capacity {self.capacity[kind]} blocks of "
                                f"{self.kind_bs(kind)})")
            self._grow(kind, max(4, self.capacity[kind]))
        b = self.free[kind].pop()
        self.refs[kind][b] = 1
        return b

    def kinds_of_group(self, group: str) -> list[str]:
        layers = [i for i in range(self.n_layers) if group_of(self.cfg, i) == group]
        return list(dict.fromkeys(k.name for i in layers for k in self.layer_kinds[i]))

    def blocks_needed(self, seq: SequenceCache | None, n_new: int, group: str = MAIN) -> dict[str, int]:
        """Blocks each kind must hand out to run `n_new` more tokens of `seq` (None: a new sequence)."""
        start = 0 if seq is None else seq.length(group)
        need = {}
        for name in self.kinds_of_group(group):
            k = self.kinds[name]
            first, _ = k.live_rows(start, self.cfg.window)
            end = (start + n_new) // k.ratio if k.by == "entry" else start + n_new
            table = [] if seq is None else seq.tables.get((group, name), [])
            bs = self.kind_bs(name)
            need[name] = sum(1 for lb in range(first // bs, -(-end // bs))
                             if lb >= len(table) or table[lb] == NULL_BLOCK)
        return need

    def peak_blocks(self, n_tokens: int, chunk: int, group: str = MAIN) -> dict[str, int]:
        """Blocks per kind a new sequence holds at its peak while it runs `n_tokens` in calls of <= `chunk` tokens:
        reserving these up front means `allocate` never raises CacheFull for it."""
        return {name: peak_blocks(self.kinds[name], n_tokens, chunk, self.cfg.window, self.kind_bs(name))
                for name in self.kinds_of_group(group)}

    def can_allocate(self, seq: SequenceCache | None, n_new: int, group: str = MAIN) -> bool:
        """Admission: whether the pools hold enough free blocks (always true when pools grow)."""
        if not self.fixed:
            return True
        return all(len(self.free[k]) >= n for k, n in self.blocks_needed(seq, n_new, group).items())

    def allocate(self, seq: SequenceCache, group: str, n_new: int) -> None:
        """Give `seq` the blocks its next `n_new` tokens write (positions, entries, state rows)."""
        start = seq.length(group)
        if self.fixed and not self.can_allocate(seq, n_new, group):
            short = {k: n for k, n in self.blocks_needed(seq, n_new, group).items() if len(self.free[k]) < n}
            raise CacheFull(f"not enough free blocks for {n_new} tokens: {short}")
        for name in self.kinds_of_group(group):
            k = self.kinds[name]
            first, _ = k.live_rows(start, self.cfg.window)
            end = (start + n_new) // k.ratio if k.by == "entry" else start + n_new
            table = seq.tables.setdefault((group, name), [])
            bs = self.kind_bs(name)
            n_lb = -(-end // bs)
            # entry kinds keep every block they had: only their last one and new ones can be missing
            lb0 = first // bs if k.sliding else max(0, len(table) - 1)
            if len(table) < n_lb:
                table.extend([NULL_BLOCK] * (n_lb - len(table)))
            for lb in range(min(lb0, n_lb), n_lb):
                if table[lb] == NULL_BLOCK:
                    table[lb] = self._take(name)

    def trim(self, seq: SequenceCache, group: str) -> None:
        """Release the sliding kinds' blocks the sequence no longer reads (SWA ring, compressor state)."""
        length = seq.length(group)
        for name in self.kinds_of_group(group):
            k = self.kinds[name]
            if not k.sliding:
                continue
            first, _ = k.live_rows(length, self.cfg.window)
            table = seq.tables.get((group, name), [])
            done = seq.extra.get(("trimmed", group, name), 0)  # blocks below this are released already
            upto = min(first // self.kind_bs(name), len(table))
            for lb in range(done, upto):
                if table[lb] != NULL_BLOCK:
                    self._unref(name, table[lb])
                    table[lb] = NULL_BLOCK
            seq.extra[("trimmed", group, name)] = max(done, upto)

    # ---- prefix reuse ---------------------------------------------------------------------------------------
    def prefix_unit(self) -> int:
        """Token granularity of whole-block prefix reuse: every entry kind's block ends on it."""
        unit = self.bs
        for k in self.kinds.values():
            if k.by == "entry":
                unit = math.lcm(unit, self.bs * k.ratio)
        return unit

    def share_prefix(self, src: SequenceCache, dst: SequenceCache, n_tokens: int) -> int:
        """Let a fresh `dst` start from the first `n_tokens` of `src` (rounded down to whole prefix units).
        Blocks of entry kinds (compressed entries, indexer keys) that lie wholly in the prefix are shared by
        reference; the sliding kinds' live rows at the boundary (SWA window, open compressor groups) are
        copied into new blocks, since both sequences go on writing them. Returns the tokens reused (0 when
        `src` no longer holds the window rows at that boundary or `n_tokens` is under one unit)."""
        if dst.pos or dst.mtp_pos or dst.tables:
            raise ValueError("share_prefix needs a fresh destination sequence")
        n = (min(n_tokens, src.pos) // self.prefix_unit()) * self.prefix_unit()
        if n == 0 or src.mtp_pos or any(g == MTP for g, _ in src.tables):
            return 0
        # the copied rows must still be live in src
        for name in self.kinds_of_group(MAIN):
            k = self.kinds[name]
            if k.sliding:
                first, end = k.live_rows(n, self.cfg.window)
                table = src.tables.get((MAIN, name), [])
                bs = self.kind_bs(name)
                if any(lb >= len(table) or table[lb] == NULL_BLOCK for lb in range(first // bs, -(-end // bs))):
                    return 0
        for name in self.kinds_of_group(MAIN):
            k = self.kinds[name]
            first, end = k.live_rows(n, self.cfg.window)
            table = src.tables[(MAIN, name)]
            bs = self.kind_bs(name)
            out = [NULL_BLOCK] * (-(-end // bs))
            for lb in range(first // bs, len(out)):
                if k.sliding:
                    out[lb] = self._take(name)
                    for layer in self.kind_layers[name]:
                        for sname, _, _ in k.storages:
                            t = self.storage[(layer, sname)]
                            t[out[lb]] = t[table[lb]]
                else:
                    out[lb] = table[lb]
                    self.refs[name][table[lb]] += 1
            dst.tables[(MAIN, name)] = out
        dst.pos = n
        return n

    def register_prefix(self, seq: SequenceCache, tokens: Sequence[int]) -> None:
        """Offer the whole prefix units of `tokens` that `seq` has consumed for reuse by later sequences."""
        unit = self.prefix_unit()
        index = self._prefixes
        for n in range(unit, min(len(tokens), seq.pos) + 1, unit):
            index[hash(tuple(tokens[:n]))] = (weakref.ref(seq), n)

    def reuse_prefix(self, dst: SequenceCache, tokens: Sequence[int]) -> int:
        """Start a fresh `dst` from the longest registered prefix of `tokens` still held in whole blocks
        (`share_prefix`); returns the tokens reused (0: none), so the caller prefills only the rest."""
        unit = self.prefix_unit()
        index = self._prefixes
        for n in range((len(tokens) - 1) // unit * unit, 0, -unit):  # keep >= 1 token to run
            hit = index.get(hash(tuple(tokens[:n])))
            src = hit[0]() if hit else None
            if src is not None and src is not dst and self.share_prefix(src, dst, n) == n:
                return n
        return 0

    # ---- views the kernels take --------------------------------------------------------------------------
    def block_table(self, seqs: Sequence[SequenceCache], group: str, kind: str) -> np.ndarray:
        """int32 [B, max blocks] (0-padded) for the kernels' block_table arguments."""
        tables = [s.tables.get((group, kind), []) for s in seqs]
        width = max([len(t) for t in tables] + [1])
        out = np.zeros((len(seqs), width), dtype=np.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = t
        return out

    def slots(self, seq: SequenceCache, group: str, kind: str, rows: Iterable[int]) -> np.ndarray:
        """Flat slot ids (block * block_size + offset) of rows of one sequence."""
        r = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        t = np.asarray(seq.tables.get((group, kind), []), dtype=np.int64)
        bs = self.kind_bs(kind)
        return t[r // bs] * bs + r % bs

    # ---- accounting -------------------------------------------------------------------------------------------
    def row_bytes(self, kind: str) -> int:
        return sum(w * DTYPE_BYTES[d] for _, w, d in self.kinds[kind].storages)

    def block_bytes(self, kind: str) -> int:
        """Bytes one block of a kind takes, summed over the kind's layers (each layer has its own storage)."""
        return self.kind_bs(kind) * self.row_bytes(kind) * len(self.kind_layers[kind])

    def blocks_in_use(self) -> dict[str, int]:
        """Blocks held by sequences (shared prefix blocks once), per kind."""
        return {name: int(np.count_nonzero(self.refs[name][1:])) for name in self.kinds}

    def bytes_in_use(self) -> dict[str, int]:
        """Bytes of the blocks held by sequences, per kind, summed over the kind's layers."""
        return {name: n * self.block_bytes(name) for name, n in self.blocks_in_use().items()}

    def free_blocks(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.free.items()}
