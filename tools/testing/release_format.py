"""Write checkpoints in DeepSeek's release layout from float weights (tests and benchmarks build their own).

Storage per tensor role comes from `common.names.RELEASE_STORAGE`: FP8 e4m3 with 128x128 block `.scale`
(ue8m0, or float32 for Base-style checkpoints), routed experts as packed FP4 with a ue8m0 scale per 32
inputs (or FP8 for Base), bf16 for embeddings / norms / router / compressors, float32 for mHC, sinks,
ape and router bias.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from common import names
from common.checkpoint import INDEX
from common.config import ModelConfig
from common.safetensors_io import write_safetensors
from ops import quant

BF16 = np.dtype(ml_dtypes.bfloat16)


def release_tensors(name: str, w: np.ndarray, expert_dtype: str = "fp4",
                    scale_dtype: str = "ue8m0") -> Iterator[tuple[str, np.ndarray]]:
    """The stored tensor(s) for one official float tensor: the weight, and its `.scale` when quantized."""
    storage = names.RELEASE_STORAGE[names.role(name)]
    if storage == "fp4" and expert_dtype == "fp8":
        storage = "fp8"
    if storage == "fp8":
        fmt = "float32" if scale_dtype == "f32" else "ue8m0"
        w8, s = quant.quant_fp8_block(np.asarray(w, np.float32), scale_fmt=fmt)
        yield name, w8
        yield names.scale_name(name), s
    elif storage == "fp4":
        packed, s = quant.quant_fp4(np.asarray(w, np.float32))
        yield name, packed
        yield names.scale_name(name), s
    elif storage == "bf16":
        yield name, np.asarray(w, np.float32).astype(BF16)
    elif storage == "int":
        yield name, np.asarray(w).astype(np.int64)
    else:
        yield name, np.asarray(w, np.float32)


def write_release(cfg: ModelConfig, weights: dict[str, np.ndarray], out_dir: str | Path, shards: int = 2,
                  expert_dtype: str = "fp4", scale_dtype: str = "ue8m0") -> dict[str, str]:
    """Quantize and write `weights` (official names, float) as a sharded release checkpoint; returns the map."""
    from tools.testing.hf_bridge import official_config_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(weights)
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part: dict[str, np.ndarray] = {}
        for k in keys[s * per:(s + 1) * per]:
            part.update(release_tensors(k, weights[k], expert_dtype, scale_dtype))
        write_safetensors(out / fname, part, {"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    conf = official_config_dict(cfg)
    conf["torch_dtype"] = "bfloat16"
    conf["expert_dtype"] = expert_dtype
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "scale_fmt": "ue8m0" if scale_dtype == "ue8m0" else None,
                                   "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return weight_map
