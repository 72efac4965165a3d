"""Resolve `--model DIR|PRESET` into a config, weights and an optional tokenizer."""

from __future__ import annotations

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


def is_preset(spec: str) -> bool:
    return not Path(spec).exists() and spec in preset_names()


def load_model(spec: str, log=None, experts: range | None = None) -> LoadedModel:
    """Config, weights and tokenizer for a directory or preset; `experts` keeps only that slice of the
    routed experts (an expert-parallel rank's share)."""
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
        tok = preset.get("tokenizer")
        tokenizer = load_tokenizer(PRESET_DIR / tok) if tok else None
        return LoadedModel(cfg, weights, tokenizer, f"preset {spec} (random weights, seed {preset.get('seed', 0)})")
    cfg = load_config(spec)
    ckpt = Checkpoint(spec)
    weights = load_weights(cfg, ckpt, log, experts)
    return LoadedModel(cfg, weights, load_tokenizer(Path(spec) / "tokenizer.json"), str(spec), ckpt)
