"""Resolve `--model DIR|PRESET` into a config, weights and an optional tokenizer."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, Weights, load_weights
from .config import PRESET_DIR, ConfigError, ModelConfig, is_preset, model_config  # noqa: F401  (is_preset re-exported)
from .converted import CONVERT_INFO  # its `parallel` section describes a split layout


@dataclass
class LoadedModel:
    cfg: ModelConfig
    weights: Weights
    tokenizer: Any | None
    source: str
    checkpoint: Checkpoint | None = None


def load_tokenizer(path: Path) -> Any | None:
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ConfigError(f"{path}: cannot read tokenizer ({e})") from None


def preset_tokenizer(name: str | None) -> Any | None:
    """A preset's `tokenizer:` entry: a file in configs/models, or `deepseek-v4` for the release tokenizer."""
    if not name:
        return None
    from .chat import V4_TOKENIZER, load_v4_tokenizer

    if name == V4_TOKENIZER:
        try:
            return load_v4_tokenizer()
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    return load_tokenizer(PRESET_DIR / name)



def split_indexes(model_dir: Path, rank: int | None, world: int | None) -> list[Path] | None:
    """The index files to read from a `dsv4 convert --ep N` output: one rank's (multi-rank run) or every
    rank's (single process); None for an unsplit directory."""
    info_path = model_dir / CONVERT_INFO
    if not info_path.is_file():
        return None
    try:
        doc = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{info_path}: not valid JSON ({e})") from None
    par = (doc.get("parallel") if isinstance(doc, dict) else None) or {}

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{info_path}: parallel{what}")

    if not isinstance(par, dict):
        raise bad(f": must be an object, got {type(par).__name__}")
    ranks = par.get("ranks") or []
    world_size, tp = par.get("world_size", 1), par.get("tp", 1)
    for k, v in (("world_size", world_size), ("tp", tp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f".{k}: {v!r} is not a positive integer")
    if not isinstance(ranks, list) or not all(isinstance(r, dict) and isinstance(r.get("index"), str)
                                              for r in ranks):
        raise bad(".ranks: must be a list of objects with an 'index' path")
    if world_size <= 1 or not ranks:
        return None
    if tp > 1:
        raise ConfigError(f"{model_dir}: converted with --tp {tp}; this runtime runs attention data-parallel "
                          f"and loads only --tp 1 conversions")
    if rank is None:
        return [model_dir / r["index"] for r in ranks]
    if world != len(ranks):
        raise ConfigError(f"{model_dir}: converted for {len(ranks)} expert-parallel ranks (--ep {par.get('ep')}), "
                          f"this run has {world}")
    return [model_dir / ranks[rank]["index"]]


def load_model(spec: str, log=None, experts: range | None = None, rank: int | None = None,
               world: int | None = None, float_dtype: str = "float32") -> LoadedModel:
    """Config, weights and tokenizer for a directory or preset; `experts` keeps only that slice of the
    routed experts (an expert-parallel rank's share). A `dsv4 convert --ep N` output is read through
    rank `rank`'s index when given (each rank maps only its own experts), else through all of them.
    `float_dtype` is the form floating weights are handed over in (float32 for the NumPy reference; a device
    dtype keeps bf16 / int8 / int4 as stored, see `checkpoint.load_weights`)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg, preset = model_config(spec, need_weights=True)
    if preset is not None:
        from .presets import random_weights

        weights = random_weights(cfg, int(preset.get("seed", 0)), with_mtp=True, float_dtype=float_dtype,
                                 experts=experts)
        tokenizer = preset_tokenizer(preset.get("tokenizer"))
        return LoadedModel(cfg, weights, tokenizer, f"preset {spec} (random weights, seed {preset.get('seed', 0)})")
    ckpt = Checkpoint(spec, split_indexes(Path(spec), rank, world))
    weights = load_weights(cfg, ckpt, log, experts, float_dtype)
    return LoadedModel(cfg, weights, load_tokenizer(Path(spec) / "tokenizer.json"), str(spec), ckpt)
