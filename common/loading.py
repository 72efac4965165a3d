"""Resolve `--model DIR|PRESET` into a config, weights and an optional tokenizer."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, Weights, load_weights
from .config import PRESET_DIR, ConfigError, ModelConfig, load_config, load_preset, preset_names


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


def is_preset(spec: str) -> bool:
    return not Path(spec).exists() and spec in preset_names()


CONVERT_INFO = "dsv4_convert.json"  # written by `dsv4 convert`; its `parallel` section describes a split layout


def split_indexes(model_dir: Path, rank: int | None, world: int | None) -> list[Path] | None:
    """The index files to read from a `dsv4 convert --ep N` output: one rank's (multi-rank run) or every
    rank's (single process); None for an unsplit directory."""
    info_path = model_dir / CONVERT_INFO
    if not info_path.is_file():
        return None
    try:
        par = json.loads(info_path.read_text()).get("parallel") or {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{info_path}: not valid JSON ({e})") from None
    ranks = par.get("ranks") or []
    if int(par.get("world_size", 1)) <= 1 or not ranks:
        return None
    if int(par.get("tp", 1)) > 1:
        raise ConfigError(f"{model_dir}: converted with --tp {par['tp']}; this runtime runs attention data-parallel "
                          f"and loads only --tp 1 conversions")
    if rank is None:
        return [model_dir / r["index"] for r in ranks]
    if world != len(ranks):
        raise ConfigError(f"{model_dir}: converted for {len(ranks)} expert-parallel ranks (--ep {par.get('ep')}), "
                          f"this run has {world}")
    return [model_dir / ranks[rank]["index"]]


def load_model(spec: str, log=None, experts: range | None = None, rank: int | None = None,
               world: int | None = None) -> LoadedModel:
    """Config, weights and tokenizer for a directory or preset; `experts` keeps only that slice of the
    routed experts (an expert-parallel rank's share). A `dsv4 convert --ep N` output is read through
    rank `rank`'s index when given (each rank maps only its own experts), else through all of them."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if is_preset(spec):
        cfg, preset = load_preset(spec)
        if not preset.get("random_weights"):
            raise ConfigError(f"preset {spec!r} describes the released model's shape only and has no weights; "
                              f"pass --model with a checkpoint directory")
        from .presets import random_weights

        weights = random_weights(cfg, int(preset.get("seed", 0)), with_mtp=True)
        if experts is not None:
            from .names import parse_expert

            for k in [k for k in weights if (pe := parse_expert(k)) is not None and pe[1] not in experts]:
                del weights[k]
        tokenizer = preset_tokenizer(preset.get("tokenizer"))
        return LoadedModel(cfg, weights, tokenizer, f"preset {spec} (random weights, seed {preset.get('seed', 0)})")
    cfg = load_config(spec)
    ckpt = Checkpoint(spec, split_indexes(Path(spec), rank, world))
    weights = load_weights(cfg, ckpt, log, experts)
    return LoadedModel(cfg, weights, load_tokenizer(Path(spec) / "tokenizer.json"), str(spec), ckpt)
