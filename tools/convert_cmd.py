"""`dsv4 convert`: a checkpoint the loader reads in, Ascend-ready weights (bf16 / W8A8 / W4A8) out.

Pipeline (peak memory bounded by a few tensors, never by the model):

1. Validate everything from headers before writing a byte: the recipe, the config, every expected tensor
   (presence, shape, dtype, quantized-format/scale shapes via `ops.quant.detect_format`), the parallel
   layout (`--ep` divides the experts, `--tp` splits whole heads / groups) and the W4A8 group size.
2. Plan: the output tensors of every source tensor (dtype and shape are known from the recipe alone),
   their part (top level, or `shared/`, `tp-NNNNN/`, `ep-NNNNN/`) and shard; so each shard's safetensors
   header is written first and the tensor bytes are streamed after it.
3. Convert with a thread pool, one source tensor per job, consumed in plan order with a small look-ahead
   window; the main thread appends each result to its part's open shard (one writer per shard) and hashes
   the bytes as they are written. Threads, not processes: numpy releases the GIL in the heavy loops
   (casts, abs/max reductions, rint, clip) and hashlib does for large buffers, and threads share the
   source reader without pickling multi-MB arrays between processes (which would copy every tensor twice).
4. Every file is written to `NAME.tmp` and renamed; after each finished shard its size and sha256 go to
   the journal `dsv4_progress.json` (that is what `--resume` trusts, after re-hashing the file). Indices,
   configs and `dsv4_convert.json` follow, and `dsv4_manifest.json` is written LAST: a directory without
   it is never a complete conversion.

Source tensors are read with `os.preadv` at the offsets the (mmap-based) `Checkpoint` headers give, not
through the map: pages of a map that has been read count in the process's resident set until unmapped,
so a multi-GB source would make the converter's RSS as large as the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import yaml

from common import names
from common.checkpoint import INDEX, Checkpoint, lookup, resolve_names
from common.config import ModelConfig, load_config
from common.safetensors_io import DTYPES, TAGS, CheckpointError
from ops import quant

from .errors import EXIT_USAGE, CliError, log

MANIFEST = "dsv4_manifest.json"
RESOLVED = "dsv4_convert.json"
JOURNAL = "dsv4_progress.json"
RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs" / "quant"
# small files next to the weights that a converted directory keeps (tokenizer, generation defaults)
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja")
DEFAULT_SHARD = 2 << 30
# float32 elements converted at once per job (row chunks). Small enough that the codecs' temporaries stay
# in cache: 256K elements run ~3x faster than 4M (measured on FP4 -> bf16 / W8A8), and bound each worker's
# memory to a few MiB besides the tensor's own input and output.
CHUNK_ELEMS = 256 << 10
# elements per job: bigger tensors are converted as several row ranges, so memory does not grow with them
JOB_ELEMS = 8 << 20
# converted bytes waiting for the writer thread (bounds memory while the disk is slower than the workers)
WRITE_QUEUE_BYTES = 256 << 20
# test hook: raise KeyboardInterrupt after this many shards completed (exercises the real Ctrl-C path)
INTERRUPT_ENV = "DSV4_CONVERT_INTERRUPT_AFTER_SHARDS"

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
INT_TAGS = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")


# ==== schemes and recipes =================================================================================

@dataclass(frozen=True)
class Scheme:
    """How one tensor is stored: `specs` gives the output (name, dtype tag, shape) list from the logical
    shape before any data is read; `encode` turns float32 rows into those arrays (rows are independent)."""

    name: str
    kinds: str  # 'f' floating tensors, 'i' integer tables
    linear_only: bool  # needs a 2-D weight that the model multiplies through Backend.linear
    specs: Callable[[str, tuple[int, ...], str, int], list[tuple[str, str, tuple[int, ...]]]]
    encode: Callable[[np.ndarray, int], tuple[np.ndarray, ...]] | None


def _w8a8_encode(x: np.ndarray, group: int) -> tuple[np.ndarray, ...]:
    w = quant.W8A8Weight.from_float(x)
    return w.qweight, w.scale


def _w4a8_encode(x: np.ndarray, group: int) -> tuple[np.ndarray, ...]:
    w = quant.W4A8Weight.from_float(x, group)
    return w.qweight, w.scale


SCHEMES: dict[str, Scheme] = {
    "bf16": Scheme("bf16", "f", False, lambda n, s, tag, g: [(n, "BF16", s)], lambda x, g: (x.astype(BF16),)),
    "f32": Scheme("f32", "f", False, lambda n, s, tag, g: [(n, "F32", s)], lambda x, g: (x,)),
    "keep": Scheme("keep", "i", False, lambda n, s, tag, g: [(n, tag, s)], None),
    "w8a8": Scheme("w8a8", "f", True,
                   lambda n, s, tag, g: [(n, "I8", s), (names.scale_name(n), "F32", (s[0],))], _w8a8_encode),
    "w4a8": Scheme("w4a8", "f", True,
                   lambda n, s, tag, g: [(n, "I8", (s[0], s[1] // 2)), (names.scale_name(n), "F32", (s[0], s[1] // g))],
                   _w4a8_encode),
}

# Roles whose tensors are integer tables, and roles the model multiplies through Backend.linear (or
# grouped_linear, which dequantizes): only those may take an integer weight format. The embedding is a
# lookup table, the router's logits are computed in float by moe_gate, the rest are vectors or mHC maps.
INT_ROLES = frozenset({"hash_table"})
LINEAR_ROLES = frozenset({"head", "attn_linear", "attn_out_a", "compressor", "indexer_linear", "indexer_weights",
                          "expert", "shared_expert", "mtp_proj"})
RECIPE_KEYS = ("format", "description", "group_size", "roles")


@dataclass(frozen=True)
class Recipe:
    format: str
    roles: dict[str, str]
    group_size: int | None
    path: str
    description: str = ""

    def uses(self, scheme: str) -> bool:
        return scheme in self.roles.values()


def recipe_path(fmt: str) -> Path:
    return RECIPE_DIR / f"{fmt}.yaml"


def bundled_formats() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe: every role of `common.names.ROLES` mapped to a scheme it can take."""
    path = Path(path)
    where = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CliError(f"recipe {where}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CliError(f"recipe {where}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise CliError(f"recipe {where}: expected a mapping with keys {', '.join(RECIPE_KEYS)}")
    for k in doc:
        if k not in RECIPE_KEYS:
            raise CliError(f"recipe {where}: unknown field {k!r} (known: {', '.join(RECIPE_KEYS)})")
    fmt = doc.get("format")
    if not isinstance(fmt, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", fmt):
        raise CliError(f"recipe {where}: field 'format' must be a name like w8a8, got {fmt!r}")
    roles = doc.get("roles")
    if not isinstance(roles, dict):
        raise CliError(f"recipe {where}: field 'roles' must map each tensor role to a scheme")
    for r, s in roles.items():
        if r not in names.ROLES:
            raise CliError(f"recipe {where}: roles.{r}: unknown role (known: {', '.join(names.ROLES)})")
        if s not in SCHEMES:
            raise CliError(f"recipe {where}: roles.{r}: unknown scheme {s!r} (known: {', '.join(SCHEMES)})")
        sch = SCHEMES[s]
        want_kind = "i" if r in INT_ROLES else "f"
        if sch.kinds != want_kind:
            allowed = [k for k, v in SCHEMES.items() if v.kinds == want_kind]
            raise CliError(f"recipe {where}: roles.{r}: scheme {s!r} does not apply to "
                           f"{'integer tables' if want_kind == 'i' else 'floating tensors'} "
                           f"(use {' or '.join(allowed)})")
        if sch.linear_only and r not in LINEAR_ROLES:
            raise CliError(f"recipe {where}: roles.{r}: scheme {s!r} applies only to linear weights "
                           f"({', '.join(sorted(LINEAR_ROLES))})")
    missing = [r for r in names.ROLES if r not in roles]
    if missing:
        raise CliError(f"recipe {where}: roles.{missing[0]} is missing (every role needs a scheme: "
                       f"{', '.join(missing)})")
    g = doc.get("group_size")
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2):
        raise CliError(f"recipe {where}: field 'group_size' must be a positive even integer, got {g!r}")
    return Recipe(fmt, {r: roles[r] for r in names.ROLES}, g, where, str(doc.get("description") or ""))


# ==== parallel layout =====================================================================================

# Tensors split across tensor-parallel ranks: (pattern, axis, style, config attribute of the unit a slice
# must hold whole). Column-parallel splits output rows (whole heads / o-groups / rows), row-parallel splits
# input columns (whole o-groups for wo_b). A scale with that axis is split with its weight; a scale
# without it (the per-output-channel W8A8 scale of a row-parallel weight) is replicated to every slice.
TP_RULES: list[tuple[re.Pattern, int, str, str | None]] = [
    (re.compile(r"\.attn\.wq_b\.weight$"), 0, "column (whole heads)", "head_dim"),
    (re.compile(r"\.attn\.indexer\.wq_b\.weight$"), 0, "column (whole indexer heads)", "index_head_dim"),
    (re.compile(r"\.attn\.wo_a\.weight$"), 0, "column (whole o_groups)", "o_lora_rank"),
    (re.compile(r"\.ffn\.shared_experts\.w[13]\.weight$"), 0, "column", None),
    (re.compile(r"^head\.weight$"), 0, "column (vocab rows)", None),
    (re.compile(r"\.attn\.wo_b\.weight$"), 1, "row (whole o_groups)", "o_lora_rank"),
    (re.compile(r"\.ffn\.shared_experts\.w2\.weight$"), 1, "row", None),
]
_EXPERT_ID = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(?:weight|scale)$")  # and its scale


def tp_rule(name: str) -> tuple[int, str, str | None] | None:
    for rx, axis, style, unit in TP_RULES:
        if rx.search(name):
            return axis, style, unit
    return None


@dataclass(frozen=True)
class Layout:
    """W = lcm(ep, tp) ranks; rank r holds TP slice r % tp and the experts of EP slice r // (W / ep)."""

    ep: int
    tp: int
    n_experts: int

    @property
    def single(self) -> bool:
        return self.ep == 1 and self.tp == 1

    @property
    def world(self) -> int:
        return self.ep * self.tp // math.gcd(self.ep, self.tp)

    def experts(self, ep_rank: int) -> tuple[int, int]:
        per = self.n_experts // self.ep
        return ep_rank * per, (ep_rank + 1) * per

    def rank(self, r: int) -> dict[str, Any]:
        t, e = r % self.tp, r // (self.world // self.ep)
        parts = ["shared"] + ([f"tp-{t:05d}"] if self.tp > 1 else []) + ([f"ep-{e:05d}"] if self.ep > 1 else [])
        return {"rank": r, "tp_rank": t, "ep_rank": e, "experts": list(self.experts(e)), "parts": parts,
                "index": f"rank-{r:05d}/{INDEX}"}

    def part_of(self, name: str, tp_slice: int | None) -> str:
        if self.single:
            return ""
        m = _EXPERT_ID.search(name)
        if m and self.ep > 1:
            return f"ep-{int(m.group(1)) // (self.n_experts // self.ep):05d}"
        if tp_slice is not None:
            return f"tp-{tp_slice:05d}"
        return "shared"


# ==== source ==============================================================================================

@dataclass(frozen=True)
class Loc:
    """Where a stored array lives: absolute byte offset in a file."""

    file: Path
    offset: int
    nbytes: int
    tag: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Source:
    name: str  # official name
    shape: tuple[int, ...]  # logical shape
    kind: str  # 'f' / 'i'
    weight: Loc
    scale: Loc | None
    fmt: str | None  # quant format of (weight, scale), None for a plain tensor
    fmt_kw: tuple[tuple[str, Any], ...]
    stored_as: str  # for messages: checkpoint name

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.scale.nbytes if self.scale else 0)


def _loc(ckpt: Checkpoint, cname: str) -> Loc:
    info = ckpt.info(cname)
    f = ckpt.files[ckpt.where[cname]]
    return Loc(info.file, f.data_start + info.begin, info.nbytes, info.dtype, info.shape)


def scan_source(cfg: ModelConfig, ckpt: Checkpoint) -> tuple[list[Source], list[str]]:
    """Every tensor the model reads, validated from headers alone (the loader's rules); plus unused names."""
    resolved = resolve_names(ckpt)
    with_mtp = cfg.n_mtp_layers > 0 and any(n.startswith("mtp.") for n in resolved)
    out: list[Source] = []
    used: set[str] = set()
    for name, shape, kind in names.expected_tensors(cfg, with_mtp=with_mtp):
        cname, sel = lookup(ckpt, resolved, name)
        used.add(cname)
        info = ckpt.info(cname)
        shown = name if cname == name else f"{name} (stored as {cname})"
        if sel is not None:  # one expert's slice of a fused transformers tensor [E, 2I, d] / [E, d, I]
            e, which = sel
            I, d, E = cfg.moe_inter_dim, cfg.dim, cfg.n_routed_experts
            want = (E, 2 * I, d) if which in ("w1", "w3") else (E, d, I)
            if info.shape != want:
                raise CheckpointError(f"{info.file}: tensor {cname!r} has shape {list(info.shape)}, "
                                      f"expected {list(want)}")
            if info.dtype not in FLOAT_TAGS:
                raise CheckpointError(f"{info.file}: tensor {cname!r} is stored as {info.dtype}, not a float type")
            base = _loc(ckpt, cname)
            isz = DTYPES[info.dtype].itemsize
            row0 = e * want[1] + (I if which == "w3" else 0)
            n = shape[0] * shape[1]
            loc = Loc(base.file, base.offset + row0 * want[2] * isz, n * isz, info.dtype, shape)
            out.append(Source(name, shape, kind, loc, None, None, (), shown))
            continue
        sname = names.scale_name(name)
        if sname in resolved and kind == "f":
            scname = resolved[sname][0]
            used.add(scname)
            sinfo = ckpt.info(scname)
            try:
                fmt, kw = quant.detect_format(info.dtype, info.shape, sinfo.dtype, sinfo.shape, shape)
            except ValueError as e:
                raise CheckpointError(f"{info.file}: tensor {name!r}: {e}") from None
            out.append(Source(name, shape, kind, _loc(ckpt, cname), _loc(ckpt, scname), fmt,
                              tuple(sorted(kw.items())), shown))
            continue
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {shown} has shape {list(info.shape)}, expected {list(shape)}")
        ok = FLOAT_TAGS if kind == "f" else INT_TAGS
        if info.dtype not in ok:
            what = f"without a scale tensor {sname!r}" if kind == "f" else "(an integer table is expected)"
            raise CheckpointError(f"{info.file}: tensor {shown} is stored as {info.dtype} {what}")
        out.append(Source(name, shape, kind, _loc(ckpt, cname), None, None, (), shown))
    unused = [c for c in ckpt if c not in used]
    return out, unused


class SourceReader:
    """Reads stored arrays with positional reads into fresh buffers (thread-safe; see module docstring)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
            return self._fds[path]

    def read(self, loc: Loc, what: str) -> np.ndarray:
        fd = self._fd(loc.file)
        buf = np.empty(loc.nbytes, dtype=np.uint8)
        done = 0
        while done < loc.nbytes:
            try:
                n = os.preadv(fd, [memoryview(buf)[done:]], loc.offset + done)
            except OSError as e:
                raise CheckpointError(f"{loc.file}: cannot read tensor {what!r} ({e.strerror})") from None
            if n == 0:
                raise CheckpointError(f"{loc.file}: truncated while reading tensor {what!r} "
                                      f"(file ends before byte {loc.offset + loc.nbytes})")
            done += n
        return buf.view(DTYPES[loc.tag]).reshape(loc.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ==== plan ================================================================================================

@dataclass(frozen=True)
class OutTensor:
    name: str
    part: str
    tag: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.tag].itemsize


@dataclass
class TensorPlan:
    src: Source
    role: str
    scheme: str
    specs: list[tuple[str, str, tuple[int, ...]]]  # unsplit outputs (weight, and its scale)
    split: tuple[int, str] | None  # (axis, style) when tensor-parallel
    outputs: list[OutTensor]  # what lands in files: outputs[t * len(specs) + k] is spec k of TP slice t


@dataclass
class Job:
    """Rows [r0, r1) of one tensor, the unit a worker converts: bounded in size whatever the tensor's."""

    tensor: TensorPlan
    r0: int
    r1: int
    tp_slice: int | None  # for row-split (axis 0) tensors: the slice these rows belong to
    outputs: list[OutTensor]  # the file tensors these rows land in
    nbytes: int  # source bytes (progress)


@dataclass
class Shard:
    relpath: str
    part: str
    entries: list[OutTensor]
    done: bool = False

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass
class Plan:
    tensors: list[TensorPlan]
    jobs: list[Job]
    shards: list[Shard]
    shard_of: dict[tuple[str, str], Shard] = field(default_factory=dict)


def _block_rows(s: Source) -> int:
    """Weight rows one stored scale row covers (128 for FP8 blocks, else 1): row ranges align to it."""
    return quant.FORMATS[s.fmt].block[0] if s.fmt else 1


def _jobs_of(t: TensorPlan, tp: int) -> list[Job]:
    s = t.src
    N = s.shape[0] if s.shape else 1
    K = int(np.prod(s.shape[1:], dtype=np.int64)) if len(s.shape) > 1 else 1
    br = _block_rows(s)
    step = max(br, JOB_ELEMS // K // br * br)
    n_specs = len(t.specs)
    if t.split is not None and t.split[0] == 0:
        bounds = [(i * N // tp, (i + 1) * N // tp, i) for i in range(tp)]
    else:
        bounds = [(0, N, None)]
    jobs = []
    for b0, b1, sl in bounds:
        outs = t.outputs if sl is None else t.outputs[sl * n_specs:(sl + 1) * n_specs]
        r = b0
        while r < b1:
            e = min(b1, (r // step + 1) * step)  # ends on multiples of step: FP8 block rows stay whole
            jobs.append(Job(t, r, e, sl, outs, s.nbytes * (e - r) // N))
            r = e
    return jobs


def plan_conversion(cfg: ModelConfig, sources: list[Source], recipe: Recipe, layout: Layout, group: int | None,
                    shard_size: int) -> Plan:
    """Decide every output tensor (dtype, shape, part, shard) before reading any data; validate splits."""
    tensors: list[TensorPlan] = []
    for s in sources:
        role = names.role(s.name)
        scheme = SCHEMES[recipe.roles[role]]
        if scheme.kinds != s.kind:
            raise CliError(f"tensor {s.name!r} (role {role}) cannot use scheme {scheme.name!r}")
        if scheme.linear_only and len(s.shape) != 2:
            raise CliError(f"tensor {s.name!r} (role {role}) is not a 2-D weight; scheme {scheme.name!r} needs one")
        if scheme.name == "w4a8":
            K = s.shape[1]
            if group is None or K % group:
                raise CliError(f"tensor {s.name!r}: W4A8 group size {group} does not divide its input width {K}; "
                               f"pass --group-size with a divisor of {K}")
        specs = scheme.specs(s.name, s.shape, s.weight.tag, group or 0)
        rule = tp_rule(s.name) if layout.tp > 1 else None
        outputs: list[OutTensor] = []
        if rule is None:
            outputs = [OutTensor(n, layout.part_of(n, None), tag, shp) for n, tag, shp in specs]
        else:
            axis, style, unit_attr = rule
            unit = getattr(cfg, unit_attr) if unit_attr else 1
            full = s.shape[axis]
            if full % (layout.tp * unit):
                raise CliError(f"--tp {layout.tp}: tensor {s.name!r} dimension {axis} ({full}) does not split into "
                               f"{layout.tp} slices of whole {unit_attr or 'rows'} ({unit})")
            for n, _tag, shp in specs:
                if len(shp) > axis and shp[axis] % layout.tp:
                    raise CliError(f"--tp {layout.tp}: stored tensor {n!r} {list(shp)} does not split along axis "
                                   f"{axis} (for W4A8 the slice width must be a multiple of the group size)")
            for t in range(layout.tp):
                for n, tag, shp in specs:
                    sl = tuple(d // layout.tp if i == axis else d for i, d in enumerate(shp)) if len(shp) > axis \
                        else shp
                    outputs.append(OutTensor(n, layout.part_of(n, t), tag, sl))
            rule = (axis, style)
        tensors.append(TensorPlan(s, role, scheme.name, specs, rule, outputs))
    # shards: per part, in plan order, greedily up to shard_size (a bigger tensor gets a shard of its own)
    per_part: dict[str, list[list[OutTensor]]] = {}
    sizes: dict[str, int] = {}
    for t in tensors:
        for o in t.outputs:
            groups = per_part.setdefault(o.part, [[]])
            if groups[-1] and sizes[o.part] + o.nbytes > shard_size:
                groups.append([])
                sizes[o.part] = 0
            groups[-1].append(o)
            sizes[o.part] = sizes.get(o.part, 0) + o.nbytes
    plan = Plan(tensors, [j for t in tensors for j in _jobs_of(t, layout.tp)], [])
    for part in sorted(per_part):
        groups = per_part[part]
        for i, entries in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            sh = Shard(f"{part}/{fname}" if part else fname, part, entries)
            plan.shards.append(sh)
            for o in entries:
                key = (o.part, o.name)
                if key in plan.shard_of:
                    raise AssertionError(f"output tensor {o.name!r} planned twice in part {part!r}")
                plan.shard_of[key] = sh
    return plan


# ==== conversion of one row range (runs in a worker thread) =================================================

def _rows(loc: Loc, a: int, b: int) -> Loc:
    """Rows [a, b) of a stored C-contiguous array (contiguous bytes)."""
    row = loc.nbytes // loc.shape[0]
    return Loc(loc.file, loc.offset + a * row, (b - a) * row, loc.tag, (b - a,) + loc.shape[1:])


def _dequant_rows(s: Source, raw: np.ndarray, sraw: np.ndarray | None, r0: int, r1: int) -> np.ndarray:
    """float32 rows [r0, r1) of read source rows (r0 on a block-row boundary); ops.quant decodes storage."""
    if s.fmt is None:
        return raw[r0:r1].astype(F32)
    br = _block_rows(s)
    try:
        obj = quant.from_storage(s.fmt, raw[r0:r1], sraw[r0 // br: -(-r1 // br)], **dict(s.fmt_kw))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{s.weight.file}: tensor {s.name!r}: {e}") from None
    return obj.dequantize()


def convert_job(job: Job, reader: SourceReader, group: int | None) -> tuple[list[tuple[OutTensor, int, np.ndarray]],
                                                                            str]:
    """Read, dequantize and re-encode rows [r0, r1) of one tensor. Returns (file tensor, first row, rows) pieces
    and the rows' exactness: 'exact' (bf16/f32 equal to the source values), 'rounded' (bf16 rounding
    happened), 'quantized' (w8a8/w4a8) or 'kept' (integer tables)."""
    t = job.tensor
    s = t.src
    br = _block_rows(s)
    a0 = job.r0 // br * br  # read from the block boundary (TP slice starts need not be on one)
    raw = reader.read(_rows(s.weight, a0, job.r1), s.stored_as)
    if t.scheme == "keep":
        pieces = [raw[job.r0 - a0:]]
        status = "kept"
    else:
        sraw = reader.read(_rows(s.scale, a0 // br, -(-job.r1 // br)), names.scale_name(s.name)) if s.scale else None
        scheme = SCHEMES[t.scheme]
        n = job.r1 - a0
        bufs = [np.empty((n,) + shp[1:], dtype=DTYPES[tag]) for _, tag, shp in t.specs]
        exact = True
        # cache-sized row chunks, multiples of the block rows
        step = max(br, CHUNK_ELEMS // max(1, int(np.prod(s.shape[1:], dtype=np.int64))) // br * br)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            x = _dequant_rows(s, raw, sraw, c0, c1)
            enc = scheme.encode(x, group or 0)
            for buf, a in zip(bufs, enc, strict=True):
                buf[c0:c1] = a
            if t.scheme == "bf16" and exact:
                # bf16 is float32's upper half (same exponent range): exact iff the low 16 bits are zero.
                # ~13x cheaper than casting back and comparing, which cost more than the dequantization.
                exact = not np.any(x.view(np.uint32) & np.uint32(0xFFFF))
            del x, enc
        pieces = [b[job.r0 - a0:] for b in bufs]
        status = "quantized" if scheme.linear_only else ("exact" if exact else "rounded")
        if status == "rounded" and s.fmt in ("fp8", "fp4"):
            # ue8m0 scales are powers of two: e4m3 / e2m1 times them always fits bf16 unless a scale is
            # outside bf16's exponent range, which no real release has; refuse rather than round silently
            raise CheckpointError(f"{s.weight.file}: tensor {s.name!r}: {s.fmt} values times its ue8m0 scales are "
                                  f"not exactly representable in bf16 (scale out of range)")
    if t.split is None:
        return [(o, job.r0, p) for o, p in zip(job.outputs, pieces, strict=True)], status
    axis, _ = t.split
    tp = len(t.outputs) // len(t.specs)
    if axis == 0:  # these rows lie in one slice
        off = job.r0 - job.tp_slice * (s.shape[0] // tp)
        return [(o, off, p) for o, p in zip(job.outputs, pieces, strict=True)], status
    outs = []
    for ti in range(tp):  # split along the input columns
        for k, p in enumerate(pieces):
            o = job.outputs[ti * len(t.specs) + k]
            if p.ndim > axis:  # else a per-output-channel scale of a row-parallel weight: replicated
                w = p.shape[axis] // tp
                p = np.ascontiguousarray(p[:, ti * w:(ti + 1) * w])
            outs.append((o, job.r0, p))
    return outs, status


# ==== writing ==============================================================================================

def _header_bytes(entries: list[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.tag, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return len(hb).to_bytes(8, "little") + hb


class ShardFile:
    """One output shard streamed to `NAME.tmp`: header first, then each tensor's rows in plan order (a tensor
    may arrive in several row pieces), hashed as written."""

    def __init__(self, root: Path, shard: Shard):
        self.shard, self.path = shard, root / shard.relpath
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sha = hashlib.sha256()
        self.size = 0
        self.next = 0  # entry being written
        self.row = 0  # rows of it written so far
        self._f = open(self.tmp, "wb")
        self._write(memoryview(_header_bytes(shard.entries)))

    def _write(self, mv: memoryview) -> None:
        try:
            self._f.write(mv)
        except OSError as e:
            raise CliError(f"{self.tmp}: write failed ({e.strerror})") from None
        self.sha.update(mv)
        self.size += mv.nbytes

    @property
    def current(self) -> OutTensor:
        return self.shard.entries[self.next]

    def write(self, o: OutTensor, row0: int, a: np.ndarray) -> None:
        """Rows [row0, row0 + len(a)) of entry `o`, which must be the current entry's next rows."""
        want = self.current
        if o != want or row0 != self.row or TAGS.get(a.dtype) != o.tag or tuple(a.shape[1:]) != o.shape[1:] \
                or row0 + a.shape[0] > o.shape[0]:
            raise AssertionError(f"{self.path}: got {o.name} rows {row0}+{a.shape} {a.dtype}, planned {want} "
                                 f"at row {self.row}")
        a = np.ascontiguousarray(a)
        self._write(memoryview(a.reshape(-1).view(np.uint8)))
        self.row += a.shape[0]
        if self.row == o.shape[0]:
            self.next += 1
            self.row = 0

    @property
    def complete(self) -> bool:
        return self.next == len(self.shard.entries)

    def finish(self) -> tuple[int, str]:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())  # the journal will vouch for this file: make it durable first
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise CliError(f"{self.path}: cannot finish ({e.strerror})") from None
        return self.size, self.sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise CliError(f"{path}: cannot write ({e.strerror})") from None


def sha256_file(path: Path, stop: threading.Event | None = None, chunk: int = 16 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            size += n
    return size, h.hexdigest()


class Journal:
    """`dsv4_progress.json`: the conversion's identity and every completed shard (size, sha256)."""

    def __init__(self, dst: Path, identity: dict):
        self.path = dst / JOURNAL
        self.identity = identity
        self.shards: dict[str, dict] = {}
        # per source tensor: exact / rounded / quantized / kept, so a resumed run can report tensors it skipped
        self.status: dict[str, str] = {}

    def save(self) -> None:
        write_json_atomic(self.path, {"identity": self.identity, "shards": self.shards, "status": self.status})

    def record(self, relpath: str, size: int, sha: str) -> None:
        self.shards[relpath] = {"size": size, "sha256": sha}
        self.save()


# ==== destination state, identity, manifest, verify ========================================================

def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def conversion_identity(args_fmt: str, recipe: Recipe, group: int | None, layout: Layout, shard_size: int,
                        src: Path, ckpt: Checkpoint, cfg: ModelConfig) -> dict:
    """What makes two conversions the same: a destination holding a different one is never touched."""
    return _jsonable({
        "format": args_fmt, "recipe": recipe.roles, "group_size": group, "ep": layout.ep, "tp": layout.tp,
        "shard_size": shard_size, "source": str(src.resolve()),
        "source_files": {f: (ckpt.dir / f).stat().st_size for f in sorted(ckpt.files)},
        "model": cfg.to_dict(),
    })


def _describe_diff(old: dict, new: dict) -> str:
    diffs = []
    for k in ("format", "source", "recipe", "group_size", "ep", "tp", "shard_size", "model", "source_files"):
        if old.get(k) != new.get(k):
            if k in ("recipe", "model", "source_files"):
                diffs.append(f"{k} differs")
            else:
                diffs.append(f"{k}: it has {old.get(k)!r}, this run asks for {new.get(k)!r}")
    return "; ".join(diffs) or "identity differs"


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CliError(f"{path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise CliError(f"{path}: expected a JSON object")
    return d


def verify_dir(dst: Path, manifest: dict, workers: int) -> int:
    """Re-hash every output file and every source file listed in the manifest; error naming a mismatch.
    A source directory that no longer exists is skipped with a note (converted models outlive releases)."""
    items = [(dst / rel, rec, "output") for rel, rec in sorted(manifest.get("files", {}).items())]
    src_dir = Path(manifest.get("source", {}).get("dir", ""))
    if not src_dir.is_dir():
        log(f"note: source directory {src_dir} is gone; checking the output files only")
    else:
        items += [(src_dir / rel, rec, "source") for rel, rec in sorted(manifest["source"].get("files", {}).items())]

    def check(item):
        path, rec, what = item
        if not path.is_file():
            raise CliError(f"verify: {what} file {path} is missing")
        size = path.stat().st_size
        if size != rec["size"]:
            raise CliError(f"verify: {what} file {path} has {size} bytes, the manifest records {rec['size']}")
        _, sha = sha256_file(path)
        if sha != rec["sha256"]:
            raise CliError(f"verify: {what} file {path} does not match the manifest (sha256 {sha[:16]}..., "
                           f"expected {rec['sha256'][:16]}...)")
        return size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return sum(pool.map(check, items))


def _tool_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("dsv4-ascend")
    except PackageNotFoundError:
        return "unknown"


# ==== the command ==========================================================================================

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise CliError(f"--shard-size: {text!r} is not a size like 2GiB, 500MB or 1048576", EXIT_USAGE)
    mult = {"": 1, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2)]
    base = 1024 if m.group(3).startswith("i") or m.group(3) == "" else 1000
    n = int(float(m.group(1)) * base ** mult) if m.group(2) else int(float(m.group(1)))
    if n <= 0:
        raise CliError("--shard-size must be positive", EXIT_USAGE)
    return n


def _resolve_recipe(args) -> tuple[Recipe, str]:
    if args.recipe:
        recipe = load_recipe(args.recipe)
        if args.format and args.format != recipe.format:
            raise CliError(f"--format {args.format} disagrees with recipe {args.recipe} (format: {recipe.format})",
                           EXIT_USAGE)
        return recipe, recipe.format
    if not args.format:
        raise CliError(f"pass --format ({', '.join(bundled_formats())}) or --recipe FILE", EXIT_USAGE)
    path = recipe_path(args.format)
    if not path.is_file():
        raise CliError(f"--format {args.format!r}: no such recipe; known: {', '.join(bundled_formats())}", EXIT_USAGE)
    return load_recipe(path), args.format


def _output_config(raw: dict, fmt: str, recipe: Recipe, group: int | None) -> dict:
    """The source config.json with the dtype fields of the converted storage (loadable by common.config)."""
    conf = dict(raw)
    for k in ("quantization_config", "expert_dtype", "scale_fmt"):
        conf.pop(k, None)
    if "dtype" in conf:
        conf["dtype"] = "bfloat16"
    conf["torch_dtype"] = "bfloat16"
    int_roles = {r: s for r, s in recipe.roles.items() if SCHEMES[s].linear_only}
    if int_roles:
        conf["quantization_config"] = {
            "quant_method": "dsv4_ascend", "format": fmt, "activation_scheme": "dynamic_per_token_int8",
            "weight_schemes": int_roles, **({"group_size": group} if recipe.uses("w4a8") else {}),
            "scale_dtype": "float32", "int4_packing": "two per int8, low nibble = even element",
        }
    return conf


def run_convert(args) -> int:
    t_start = time.perf_counter()
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise CliError("--workers must be >= 1", EXIT_USAGE)
    dst = Path(args.dst)

    if args.src is None:  # verify-only mode on an existing conversion
        if not args.verify:
            raise CliError("pass --src (and --format or --recipe), or --verify alone to check an existing --dst",
                           EXIT_USAGE)
        if not (dst / MANIFEST).is_file():
            raise CliError(f"{dst}: no {MANIFEST}; not a complete dsv4 conversion")
        manifest = _read_json(dst / MANIFEST)
        n = verify_dir(dst, manifest, workers)
        log(f"verified {len(manifest['files'])} output and {len(manifest['source']['files'])} source files "
            f"({n / 1e9:.2f} GB) against {dst / MANIFEST}")
        _emit(args, {"dst": str(dst), "status": "verified"})
        return 0

    # ---- validate everything before touching dst --------------------------------------------------------
    recipe, fmt = _resolve_recipe(args)
    src = Path(args.src)
    if not src.is_dir():
        raise CliError(f"--src {src}: not a directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CliError(f"--dst {dst} must not be the source directory or inside it")
    if args.ep < 1 or args.tp < 1:
        raise CliError("--ep and --tp must be >= 1", EXIT_USAGE)
    shard_size = parse_size(args.shard_size) if args.shard_size is not None else DEFAULT_SHARD
    group = args.group_size if args.group_size is not None else recipe.group_size
    if recipe.uses("w4a8"):
        if group is None:
            raise CliError(f"recipe {recipe.path} uses w4a8 but sets no group_size; pass --group-size", EXIT_USAGE)
        if group <= 0 or group % 2:
            raise CliError(f"--group-size must be a positive even integer, got {group}", EXIT_USAGE)
    else:
        group = None
    cfg = load_config(src)
    raw_config = _read_json(src / "config.json")
    if cfg.n_routed_experts % args.ep:
        raise CliError(f"--ep {args.ep} does not divide n_routed_experts={cfg.n_routed_experts}")
    layout = Layout(args.ep, args.tp, cfg.n_routed_experts)
    ckpt = Checkpoint(src)
    sources, unused = scan_source(cfg, ckpt)
    plan = plan_conversion(cfg, sources, recipe, layout, group, shard_size)
    identity = conversion_identity(fmt, recipe, group, layout, shard_size, src, ckpt, cfg)

    # ---- destination: fresh, resumable, complete or conflicting ----------------------------------------
    journal_shards: dict[str, dict] = {}
    journal_status: dict[str, str] = {}
    if dst.exists() and not dst.is_dir():
        raise CliError(f"--dst {dst}: exists and is not a directory")
    if (dst / MANIFEST).is_file():
        manifest = _read_json(dst / MANIFEST)
        if manifest.get("identity") != identity:
            diff = _describe_diff(manifest.get("identity", {}), identity)
            raise CliError(f"--dst {dst} already holds a different conversion ({diff}); nothing was written: "
                           f"choose another --dst or remove it")
        log(f"{dst}: this conversion is already complete ({MANIFEST} present)")
        if args.verify:
            n = verify_dir(dst, manifest, workers)
            log(f"verified {len(manifest['files'])} output and {len(manifest['source']['files'])} source files "
                f"({n / 1e9:.2f} GB)")
        _emit(args, {"dst": str(dst), "status": "complete", "format": fmt})
        return 0
    if (dst / JOURNAL).is_file():
        prev = _read_json(dst / JOURNAL)
        if prev.get("identity") != identity:
            raise CliError(f"--dst {dst} holds an unfinished different conversion "
                           f"({_describe_diff(prev.get('identity', {}), identity)}); nothing was written")
        if not args.resume:
            raise CliError(f"--dst {dst} holds an unfinished run of this conversion; pass --resume to finish it")
        journal_shards = dict(prev.get("shards") or {})
        journal_status = dict(prev.get("status") or {})
    elif dst.is_dir() and any(dst.iterdir()):
        raise CliError(f"--dst {dst} is not empty and holds no dsv4 conversion; choose an empty or new directory")

    for note in unused[:1]:
        log(f"note: {len(unused)} source tensors are not used by the model and are not converted (e.g. {note!r})")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--dst {dst}: cannot create ({e.strerror})") from None
    for stale in dst.rglob("*.tmp"):  # left by a killed run of this conversion (dst is ours: checked above)
        stale.unlink()
    journal = Journal(dst, identity)
    # --resume: a shard is reused only if its file still has the size and sha256 recorded when it finished
    def intact(sh: Shard) -> bool:
        rec, p = journal_shards.get(sh.relpath), dst / sh.relpath
        return bool(rec) and p.is_file() and p.stat().st_size == rec["size"] and sha256_file(p)[1] == rec["sha256"]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        kept = list(pool.map(intact, plan.shards))
    for sh, ok in zip(plan.shards, kept, strict=True):
        if ok:
            sh.done = True
            journal.shards[sh.relpath] = journal_shards[sh.relpath]
    reused = sum(kept)
    if args.resume and journal_shards:
        log(f"resume: {reused} of {len(plan.shards)} shards verified and kept, "
            f"{len(plan.shards) - reused} to write")
    journal.status = journal_status
    journal.save()

    aux = [f for f in AUX_FILES if (src / f).is_file()]
    src_files = sorted(ckpt.files) + ["config.json"] + ([INDEX] if (src / INDEX).is_file() else []) + aux
    hasher = _SourceHasher(src, src_files)
    hasher.start()
    reader = SourceReader()
    try:
        stats = _execute(plan, dst, reader, workers, group, journal)
        src_hashes = hasher.result()
    except BaseException:
        hasher.stop()
        raise
    finally:
        reader.close()

    # ---- small files, then the manifest last ------------------------------------------------------------
    out_conf = _output_config(raw_config, fmt, recipe, group)
    small: dict[str, Any] = {}
    n_ranks = 1 if layout.single else layout.world
    for r in range(n_ranks):
        rank = layout.rank(r)
        wanted = set(rank["parts"]) if not layout.single else {""}
        wm = {}
        for sh in plan.shards:
            if sh.part in wanted:
                for e in sh.entries:
                    wm[e.name] = sh.relpath if layout.single else f"../{sh.relpath}"
        idx_rel = INDEX if layout.single else rank["index"]
        meta = {"total_size": sum(sh.nbytes for sh in plan.shards if sh.part in wanted), "format": fmt}
        if not layout.single:
            meta.update({k: rank[k] for k in ("rank", "tp_rank", "ep_rank", "experts")})
            meta.update({"ep": layout.ep, "tp": layout.tp, "world_size": layout.world})
            small[f"rank-{r:05d}/config.json"] = out_conf
        small[idx_rel] = {"metadata": meta, "weight_map": dict(sorted(wm.items()))}
    small["config.json"] = out_conf
    small[RESOLVED] = _resolved_doc(cfg, src, fmt, recipe, group, layout, plan, stats, raw_config)
    files: dict[str, dict] = {rel: journal.shards[rel] for rel in sorted(journal.shards)}
    for rel, obj in small.items():
        write_json_atomic(dst / rel, obj)
        files[rel] = dict(zip(("size", "sha256"), sha256_file(dst / rel), strict=True))
    for f in aux:  # small tokenizer / generation files, copied as they are
        try:
            data = (src / f).read_bytes()
            tmp = dst / (f + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst / f)
        except OSError as e:
            raise CliError(f"{src / f}: cannot copy to {dst} ({e.strerror})") from None
        files[f] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "tool": "dsv4-ascend convert", "tool_version": _tool_version(), "format": fmt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: getattr(args, k) for k in ("src", "dst", "format", "recipe", "group_size", "ep", "tp",
                                               "workers", "shard_size", "resume", "verify")},
        "identity": identity,
        "source": {"dir": str(src.resolve()), "files": src_hashes},
        "files": dict(sorted(files.items())),
        "exactness": stats["exactness"],
    }
    write_json_atomic(dst / MANIFEST, manifest)
    dt = time.perf_counter() - t_start
    out_bytes = sum(f["size"] for f in files.values())
    ex = stats["exactness"]
    log(f"converted {len(plan.tensors)} tensors ({stats['src_bytes'] / 1e9:.3f} GB read) to {fmt} in {dt:.1f}s "
        f"({stats['src_bytes'] / 1e9 / max(dt, 1e-9):.2f} GB/s); wrote {len(files)} files, {out_bytes / 1e9:.3f} GB "
        f"to {dst}; bf16/f32 tensors: {ex['exact']} exact, {ex['rounded']} rounded; {ex['quantized']} quantized")
    if args.verify:
        n = verify_dir(dst, manifest, workers)
        log(f"verified {len(files)} output and {len(src_hashes)} source files ({n / 1e9:.2f} GB)")
    _emit(args, {"dst": str(dst), "status": "converted", "format": fmt, "files": len(files), "bytes": out_bytes,
                 "seconds": round(dt, 3), "exactness": ex})
    return 0


def _emit(args, obj: dict) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj))
    else:
        print(f"{obj['status']}: {obj['dst']}" + (f" ({obj['format']})" if obj.get("format") else ""))


class _SourceHasher(threading.Thread):
    """sha256 of every source file, concurrently with the conversion (hashlib releases the GIL)."""

    def __init__(self, src: Path, files: list[str]):
        super().__init__(daemon=True, name="source-hasher")
        self.src, self.files = src, files
        self._halt = threading.Event()
        self._out: dict[str, dict] = {}
        self._err: BaseException | None = None

    def run(self) -> None:
        try:
            for f in self.files:
                size, sha = sha256_file(self.src / f, self._halt)
                self._out[f] = {"size": size, "sha256": sha}
        except BaseException as e:  # reported by result()
            self._err = e

    def stop(self) -> None:
        self._halt.set()

    def result(self) -> dict[str, dict]:
        self.join()
        if isinstance(self._err, OSError):
            raise CliError(f"{self.src}: cannot hash source file ({self._err})")
        if self._err is not None:
            raise self._err
        return self._out


class _Writer(threading.Thread):
    """Appends converted tensors, in plan order, to each part's open shard; hashes as it writes; records each
    finished shard in the journal. A thread of its own so that while a write blocks on the disk (the kernel
    throttles writers once dirty pages pile up) the workers keep converting into a byte-bounded queue.
    Owns the journal while running (the main thread only queues)."""

    def __init__(self, plan: Plan, dst: Path, journal: Journal, max_bytes: int, interrupt_after: int):
        super().__init__(name="shard-writer", daemon=True)
        self.plan, self.dst, self.journal = plan, dst, journal
        self.max_bytes, self.interrupt_after = max_bytes, interrupt_after
        self.cv = threading.Condition()
        self.items: deque = deque()
        self.queued = 0
        self.closed = self.halt = False
        self.error: BaseException | None = None
        self.open_files: dict[str, ShardFile] = {}
        self.pending: dict[tuple[str, str], deque] = {}  # (part, tensor) -> row pieces not yet writable
        self.todo: dict[str, deque] = {}  # part -> its shards still to write, in order
        for sh in plan.shards:
            if not sh.done:
                self.todo.setdefault(sh.part, deque()).append(sh)
        self.finished = 0

    # -- main thread --
    def put(self, job: Job, outs: list, status: str) -> None:
        nbytes = sum(a.nbytes for _, _, a in outs)
        with self.cv:
            # wait for room (one item always fits in an empty queue); timeouts keep Ctrl-C responsive
            while self.queued and self.queued + nbytes > self.max_bytes and self.error is None:
                self.cv.wait(0.2)
            self.check()
            self.items.append((job, outs, status, nbytes))
            self.queued += nbytes
            self.cv.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        while self.is_alive():
            self.join(0.2)
        self.check()

    def stop(self) -> None:
        with self.cv:
            self.halt = True
            self.cv.notify_all()
        while self.is_alive():
            self.join(0.2)

    # -- writer thread --
    def run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.items and not self.closed and not self.halt:
                        self.cv.wait()
                    if self.halt or not self.items:
                        return
                    job, outs, status, nbytes = self.items.popleft()
                self._write(job, outs, status)
                del outs
                with self.cv:
                    self.queued -= nbytes
                    self.cv.notify_all()
        except BaseException as e:  # reported to the main thread by check()
            with self.cv:
                self.error = e
                self.cv.notify_all()
        finally:
            if self.error is not None or self.halt:
                for f in self.open_files.values():
                    f.abort()
                self.open_files.clear()

    def _write(self, job: Job, outs: list, status: str) -> None:
        name = job.tensor.src.name
        prev = self.journal.status.get(name)
        self.journal.status[name] = "rounded" if "rounded" in (prev, status) else status
        for o, row0, a in outs:
            if self.plan.shard_of[(o.part, o.name)].done:
                continue  # this output's shard was kept by --resume
            self.pending.setdefault((o.part, o.name), deque()).append((row0, a))
            self._drain(o.part)

    def _drain(self, part: str) -> None:
        """Write what the part's current entry can take. Pieces of a later entry wait in `pending`: only a
        weight's scale does (it follows the weight in the file), so that buffer stays small."""
        while True:
            f = self.open_files.get(part)
            if f is None:
                todo = self.todo[part]
                if not todo or not self.pending.get((part, todo[0].entries[0].name)):
                    return  # a shard is opened when its first tensor's first rows arrive
                f = self.open_files[part] = ShardFile(self.dst, todo[0])
            q = self.pending.get((part, f.current.name))
            if not q:
                return
            row0, a = q.popleft()
            f.write(f.current, row0, a)
            if f.complete:
                size, sha = f.finish()
                del self.open_files[part]
                sh = self.todo[part].popleft()
                sh.done = True
                self.journal.record(sh.relpath, size, sha)
                self.finished += 1
                if self.interrupt_after and self.finished >= self.interrupt_after:
                    raise KeyboardInterrupt  # the test hook: surfaces in the main thread via check()


def _execute(plan: Plan, dst: Path, reader: SourceReader, workers: int, group: int | None,
             journal: Journal) -> dict:
    """Run the jobs in plan order through a thread pool with a bounded look-ahead; stream into shards."""
    from tqdm import tqdm

    todo = [j for j in plan.jobs if any(not plan.shard_of[(o.part, o.name)].done for o in j.outputs)]
    total = sum(j.nbytes for j in todo)
    window = workers + 2  # jobs being converted ahead of the writer queue
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert")
    writer = _Writer(plan, dst, journal, WRITE_QUEUE_BYTES, int(os.environ.get(INTERRUPT_ENV, "0") or 0))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr, disable=None,
               dynamic_ncols=True)
    inflight: deque = deque()
    it = iter(todo)
    n_done = 0

    def fill() -> None:
        while len(inflight) < window:
            j = next(it, None)
            if j is None:
                return
            inflight.append((j, pool.submit(convert_job, j, reader, group)))

    writer.start()
    try:
        fill()
        while inflight:
            job, fut = inflight.popleft()
            outs, status = fut.result()
            fill()
            writer.put(job, outs, status)
            del outs
            n_done += 1
            bar.update(job.nbytes)
            bar.set_postfix_str(f"{n_done}/{len(todo)} jobs", refresh=False)
        writer.finish()
        missing = [sh.relpath for sh in plan.shards if not sh.done]
        if missing or writer.open_files:
            raise AssertionError(f"shards not completed: {missing[:3]}")
    except BaseException:
        writer.stop()  # aborts open shards: their .tmp files are removed; the journal stays consistent
        for _, fut in inflight:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    journal.save()
    # over every tensor, including those of shards a --resume kept (their status is in the journal)
    exactness = Counter(journal.status[t.src.name] for t in plan.tensors)
    rounded = [t.src.name for t in plan.tensors if journal.status[t.src.name] == "rounded"][:10]
    return {"src_bytes": total, "exactness": {"exact": exactness["exact"], "rounded": exactness["rounded"],
                                              "quantized": exactness["quantized"], "kept": exactness["kept"],
                                              "rounded_examples": rounded}}


def _resolved_doc(cfg: ModelConfig, src: Path, fmt: str, recipe: Recipe, group: int | None, layout: Layout,
                  plan: Plan, stats: dict, raw_config: dict) -> dict:
    """`dsv4_convert.json`: model summary, the recipe used, per-scheme totals and the parallel layout."""
    by_scheme: dict[str, dict[str, int]] = {}
    src_formats: Counter = Counter()
    for j in plan.tensors:
        d = by_scheme.setdefault(j.scheme, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += sum(o.nbytes for o in j.outputs)
        src_formats[j.src.fmt or j.src.weight.tag] += 1
    splits = {j.src.name: {"axis": j.split[0], "style": j.split[1], "slices": layout.tp}
              for j in plan.tensors if j.split is not None}
    parts: dict[str, list[str]] = {}
    for sh in plan.shards:
        parts.setdefault(sh.part or ".", []).append(sh.relpath)
    ranks = [layout.rank(r) for r in range(layout.world)] if not layout.single else \
        [{"rank": 0, "tp_rank": 0, "ep_rank": 0, "experts": [0, cfg.n_routed_experts], "parts": ["."],
          "index": INDEX}]
    return {
        "format": fmt,
        "model": {"source": str(src.resolve()), "model_type": raw_config.get("model_type"),
                  "hidden_size": cfg.dim, "layers": cfg.n_layers,
                  "mtp_layers": cfg.n_mtp_layers if any(j.src.name.startswith("mtp.") for j in plan.tensors) else 0,
                  "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.n_activated_experts,
                  "vocab_size": cfg.vocab_size, "tensors": len(plan.tensors)},
        "recipe": {"path": recipe.path, "format": recipe.format, "description": recipe.description,
                   "group_size": group, "roles": recipe.roles},
        "source_formats": dict(sorted(src_formats.items())),
        "output": {"tensors": sum(len(j.outputs) for j in plan.tensors), "bytes": sum(sh.nbytes for sh in plan.shards),
                   "shards": len(plan.shards), "by_scheme": by_scheme},
        "exactness": stats["exactness"],
        "parallel": {
            "ep": layout.ep, "tp": layout.tp, "world_size": layout.world,
            "rule": "rank r holds TP slice r % tp and EP slice r // (world_size / ep); experts of EP slice e are "
                    "[e * E / ep, (e + 1) * E / ep)",
            "parts": parts, "ranks": ranks, "tp_split": splits,
        },
    }


__all__ = ["MANIFEST", "RESOLVED", "JOURNAL", "SCHEMES", "TP_RULES", "Layout", "Recipe", "load_recipe",
           "recipe_path", "run_convert", "scan_source", "plan_conversion", "verify_dir"]
