"""A model directory's safetensors (single file or sharded with an index), read into official names.

`Checkpoint` maps every tensor lazily; `load_weights` checks names and shapes against the config and
returns floating arrays keyed by official name: float32 for the NumPy reference (float32 tensors stay
zero-copy views of the file map, bf16/fp16 are widened once), or a device dtype (`float_dtype` bfloat16 /
float16: tensors stored in it stay zero-copy views, release FP8/FP4 is dequantized one tensor at a time
straight to it, and the roles the release keeps in float32 stay float32, see `names.device_dtype`). Fused
transformers expert tensors become per-expert views.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import names
from .config import ModelConfig
from .safetensors_io import CheckpointError, SafetensorsFile, TensorInfo

INDEX = "model.safetensors.index.json"


class Checkpoint:
    def __init__(self, model_dir: str | Path, indexes: list[Path] | None = None):
        """`indexes`: read these index files (e.g. the per-rank indexes of a split conversion) instead of
        the directory's own; their shard paths are relative to each index's folder."""
        self.dir = Path(model_dir)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if indexes is None and (self.dir / INDEX).is_file():
            indexes = [self.dir / INDEX]
        if indexes:
            for index in indexes:
                self._read_index(Path(index))
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no *.safetensors files and no {INDEX}")
            for fname in shards:
                f = SafetensorsFile(self.dir / fname)
                self.files[fname] = f
                for tname in f.tensors:
                    if tname in self.where:
                        raise CheckpointError(f"{self.dir}: tensor {tname!r} appears in both "
                                              f"{self.where[tname]} and {fname}")
                    self.where[tname] = fname
        self.hf_naming = any(names.is_hf_name(n) for n in self.where)

    def _read_index(self, index: Path) -> None:
        if index.exists() and not index.is_file():
            raise CheckpointError(f"{index}: not a regular file")
        try:
            doc = json.loads(index.read_text())
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (not valid JSON: {e})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            got = "missing" if not isinstance(doc, dict) or "weight_map" not in doc else \
                f"a JSON {type(weight_map).__name__}"
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file ({got})")
        for tname, rel in weight_map.items():
            if not isinstance(rel, str) or not rel:
                raise CheckpointError(f"{index}: weight_map[{tname!r}]: {rel!r} is not a shard file name")
            path = index.parent / rel
            fname = os.path.relpath(path, self.dir)
            if fname not in self.files:
                if path.exists() and not path.is_file():
                    raise CheckpointError(f"{index}: names shard {rel!r}, which is not a regular file")
                if not path.is_file():
                    raise CheckpointError(f"{index}: names shard {rel!r}, which does not exist in {index.parent}")
                self.files[fname] = SafetensorsFile(path)
            if tname not in self.files[fname].tensors:
                raise CheckpointError(f"{index}: tensor {tname!r} is listed in {rel}, which does not hold it")
            if self.where.get(tname, fname) != fname:
                raise CheckpointError(f"{index}: tensor {tname!r} is also in {self.where[tname]}")
            self.where[tname] = fname

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].tensors[name]

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.where)


def _float32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.float32 else a.astype(np.float32)


def count_nonfinite(a: np.ndarray) -> int:
    """How many NaN / Inf values `a` holds. One float64 sum decides the common case: a float32/bf16 tensor
    of finite values cannot sum to Inf in float64, and any NaN or Inf makes the sum non-finite, so the
    element-wise count (a bool array the size of the tensor) runs only for a tensor that has some."""
    if a.size == 0 or a.dtype.kind in "iub":
        return 0
    try:
        if np.isfinite(np.sum(a, dtype=np.float64)):
            return 0
    except (TypeError, ValueError):  # a dtype numpy cannot sum
        return 0
    f = a if a.dtype.kind == "f" else a.astype(np.float32)
    return int(f.size - np.count_nonzero(np.isfinite(f)))


def check_finite(a: np.ndarray, where: object, name: str) -> None:
    bad = count_nonfinite(a)
    if bad:
        raise CheckpointError(f"{where}: tensor {name!r} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                              f"(NaN/Inf) of {a.size}; the checkpoint is corrupt")


def float_dtype_np(dtype: str) -> np.dtype:
    """The numpy dtype of a float dtype name (float32, bfloat16, float16)."""
    from .safetensors_io import DTYPES

    return DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]]


def as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` in the named float dtype, with no copy when it is stored that way."""
    want = float_dtype_np(dtype)
    return a if a.dtype == want else a.astype(want)


class Weights(dict):
    """Official name -> array. Routed experts are stored per expert under their official names."""

    mtp_enabled: bool = False


def resolve_names(ckpt: Checkpoint) -> dict[str, tuple[str, object]]:
    """official name -> (checkpoint name, selector). selector: None, or (expert, 'w1'|'w3'|'w2') in a fused tensor."""
    out: dict[str, tuple[str, object]] = {}
    for cname in ckpt:
        if not ckpt.hf_naming or cname.startswith("mtp."):
            out[cname] = (cname, None)
            continue
        fused = names.hf_fused_experts(cname)
        if fused is not None:
            layer, kind = fused
            E = ckpt.info(cname).shape[0]
            for e in range(E):
                for w in (("w1", "w3") if kind == "gate_up_proj" else ("w2",)):
                    out[names.expert_name(f"layers.{layer}", e, w)] = (cname, (e, w))
            continue
        off = names.hf_to_official(cname)
        if off is not None:
            out[off] = (cname, None)
    return out


def lookup(ckpt: Checkpoint, resolved: dict[str, tuple[str, object]], name: str) -> tuple[str, object]:
    """(checkpoint name, selector) of an expected tensor; a missing one is an error naming both spellings."""
    if name not in resolved:
        hf = names.official_to_hf(name) if ckpt.hf_naming else None
        raise CheckpointError(f"{ckpt.dir}: missing tensor {name!r}" + (f" (transformers name {hf!r})" if hf else ""))
    return resolved[name]


def _quantized(ckpt: Checkpoint, name: str, cname: str, scname: str, shape: tuple[int, ...],
               float_dtype: str = "float32"):
    """A weight stored with a sibling scale: release FP8/FP4 are dequantized here (to `float_dtype`; the
    float32 intermediate is this one tensor's); converted W8A8/W4A8 stay integer objects that run with the
    NPU's arithmetic."""
    from ops import quant

    info, sinfo = ckpt.info(cname), ckpt.info(scname)
    check_finite(ckpt.get(cname), info.file, cname)  # FP8 storage can encode NaN; int8 / packed FP4 cannot
    check_finite(ckpt.get(scname), sinfo.file, scname)
    try:
        fmt, kw = quant.detect_format(info.dtype, info.shape, sinfo.dtype, sinfo.shape, shape)
        obj = quant.from_storage(fmt, ckpt.get(cname), ckpt.get(scname), **kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{info.file}: tensor {name!r}: {e}") from None
    return as_float(obj.dequantize(), float_dtype) if fmt in quant.RELEASE_FORMATS else obj


def load_weights(cfg: ModelConfig, ckpt: Checkpoint, log=None, experts: range | None = None,
                 float_dtype: str = "float32") -> Weights:
    """Check every expected tensor exists with the right shape; return weights by official name.

    Floating tensors become float32 arrays (zero-copy when stored as float32), or with `float_dtype`
    bfloat16 / float16 the device form of `names.device_dtype`; quantized ones are read through `ops.quant`
    (see `_quantized`).
    """
    if float_dtype not in names.FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {', '.join(names.FLOAT_DTYPES)}, got {float_dtype!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    resolved = resolve_names(ckpt)
    w = Weights()
    mtp_present = any(n.startswith("mtp.") for n in resolved)
    w.mtp_enabled = cfg.n_mtp_layers > 0 and mtp_present
    fused_cache: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def shown(name: str, cname: str) -> str:
        return name if cname == name else f"{name} (stored as {cname})"

    for name, shape, kind in names.expected_tensors(cfg, with_mtp=w.mtp_enabled, experts=experts):
        cname, sel = lookup(ckpt, resolved, name)
        used.add(cname)
        info = ckpt.info(cname)
        if sel is None:
            sname = names.scale_name(name)
            if sname in resolved:
                used.add(resolved[sname][0])
                w[name] = _quantized(ckpt, name, cname, resolved[sname][0], shape,
                                     names.device_dtype(name, float_dtype))
                continue
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor {shown(name, cname)} has shape {list(info.shape)}, "
                                      f"expected {list(shape)}")
            arr = ckpt.get(cname)
            if kind == "f" and info.dtype not in ("F64", "F32", "F16", "BF16"):
                raise CheckpointError(f"{info.file}: tensor {shown(name, cname)} is stored as {info.dtype} "
                                      f"without a scale tensor {sname!r}")
            if kind == "f":
                check_finite(arr, info.file, shown(name, cname))
            w[name] = arr.astype(np.int64) if kind == "i" else as_float(arr, names.device_dtype(name, float_dtype))
            continue
        e, which = sel
        I, d = cfg.moe_inter_dim, cfg.dim
        want = (cfg.n_routed_experts, 2 * I, d) if which in ("w1", "w3") else (cfg.n_routed_experts, d, I)
        if info.shape != want:
            raise CheckpointError(f"{info.file}: tensor {cname!r} has shape {list(info.shape)}, expected {list(want)}")
        if cname not in fused_cache:
            check_finite(ckpt.get(cname), info.file, cname)
            fused_cache[cname] = as_float(ckpt.get(cname), names.device_dtype(name, float_dtype))
        full = fused_cache[cname]
        w[name] = full[e, :I] if which == "w1" else full[e, I:] if which == "w3" else full[e]

    for n in [n for n in w if n.endswith("gate.tid2eid")]:
        t = w[n]
        bad = t[(t < 0) | (t >= cfg.n_routed_experts)] if t.size else t
        if bad.size:
            raise CheckpointError(f"{ckpt.dir}: tensor {n!r} routes to expert {int(bad.flat[0])} outside "
                                  f"[0, {cfg.n_routed_experts}) ({bad.size} such entr{'ies' if bad.size > 1 else 'y'})")
    unused = [c for c in ckpt if c not in used]
    if experts is not None:  # other ranks' experts are expected to go unused
        unused = [c for c in unused if names.parse_expert(names.hf_to_official(c) or c) is None
                  and names.hf_fused_experts(c) is None and not c.endswith(".scale")]
    if unused and not (w.mtp_enabled is False and all(c.startswith(("mtp.", "model.mtp.")) for c in unused)):
        log(f"note: {len(unused)} checkpoint tensors are not used by the model (e.g. {unused[:3]})")
    if cfg.n_mtp_layers and not w.mtp_enabled:
        log("note: config declares MTP layers but the checkpoint has no mtp.* tensors; MTP is off")
    return w
