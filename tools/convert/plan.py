"""Step 2: the parallel layout and every output tensor, part and shard, decided before any data is read."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import names
from common.checkpoint import INDEX
from common.config import ModelConfig
from common.parallel import expert_owner, expert_slice, tp_rule
from common.recipes import SCHEMES, Recipe
from common.safetensors_io import DTYPES
from ops import quant

from ..errors import CliError
from . import files
from .validate import Source

_EXPERT_ID = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(?:weight|scale)$")  # and its scale


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
        """[first, end) of EP slice `ep_rank` (common.parallel.expert_slice)."""
        first, count = expert_slice(self.n_experts, self.ep, ep_rank)
        return first, first + count

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
            return f"ep-{expert_owner(int(m.group(1)), self.n_experts, self.ep):05d}"
        if tp_slice is not None:
            return f"tp-{tp_slice:05d}"
        return "shared"


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
    step = max(br, files.JOB_ELEMS // K // br * br)
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


def _check_scheme(s: Source, role: str, scheme: Any, group: int | None) -> None:
    if scheme.kinds != s.kind:
        raise CliError(f"tensor {s.name!r} (role {role}) cannot use scheme {scheme.name!r}")
    if scheme.linear_only and len(s.shape) != 2:
        raise CliError(f"tensor {s.name!r} (role {role}) is not a 2-D weight; scheme {scheme.name!r} needs one")
    if scheme.name == "w4a8":
        K = s.shape[1]
        if group is None or K % group:
            raise CliError(f"tensor {s.name!r}: W4A8 group size {group} does not divide its input width {K}; "
                           f"pass --group-size with a divisor of {K}")


def _tp_outputs(cfg: ModelConfig, s: Source, specs: list, rule: tuple, layout: Layout) -> list[OutTensor]:
    """The TP slices of one tensor's outputs (whole heads / groups per slice, checked)."""
    axis, _style, unit_attr = rule
    unit = getattr(cfg, unit_attr) if unit_attr else 1
    full = s.shape[axis]
    if full % (layout.tp * unit):
        raise CliError(f"--tp {layout.tp}: tensor {s.name!r} dimension {axis} ({full}) does not split into "
                       f"{layout.tp} slices of whole {unit_attr or 'rows'} ({unit})")
    for n, _tag, shp in specs:
        if len(shp) > axis and shp[axis] % layout.tp:
            raise CliError(f"--tp {layout.tp}: stored tensor {n!r} {list(shp)} does not split along axis "
                           f"{axis} (for W4A8 the slice width must be a multiple of the group size)")
    outputs = []
    for t in range(layout.tp):
        for n, tag, shp in specs:
            sl = tuple(d // layout.tp if i == axis else d for i, d in enumerate(shp)) if len(shp) > axis else shp
            outputs.append(OutTensor(n, layout.part_of(n, t), tag, sl))
    return outputs


def _shards(tensors: list[TensorPlan], shard_size: int, plan: Plan) -> None:
    """Per part, in plan order, greedily up to shard_size (a bigger tensor gets a shard of its own)."""
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


def plan_conversion(cfg: ModelConfig, sources: list[Source], recipe: Recipe, layout: Layout, group: int | None,
                    shard_size: int) -> Plan:
    """Decide every output tensor (dtype, shape, part, shard) before reading any data; validate splits."""
    tensors: list[TensorPlan] = []
    for s in sources:
        role = names.role(s.name)
        scheme = SCHEMES[recipe.roles[role]]
        _check_scheme(s, role, scheme, group)
        specs = scheme.specs(s.name, s.shape, s.weight.tag, group or 0)
        rule = tp_rule(s.name) if layout.tp > 1 else None
        if rule is None:
            outputs = [OutTensor(n, layout.part_of(n, None), tag, shp) for n, tag, shp in specs]
            split = None
        else:
            outputs = _tp_outputs(cfg, s, specs, rule, layout)
            split = (rule[0], rule[1])
        tensors.append(TensorPlan(s, role, scheme.name, specs, split, outputs))
    plan = Plan(tensors, [j for t in tensors for j in _jobs_of(t, layout.tp)], [])
    _shards(tensors, shard_size, plan)
    return plan
