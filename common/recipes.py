"""Quantization recipes (`configs/quant/*.yaml`): a storage scheme for every tensor role (`common.names.ROLES`).

One strict loader, read by `dsv4 convert` (which writes the schemes) and `dsv4 plan` / `dsv4 deploy` (which count
their bytes): a recipe one accepts, the others accept.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

from ops import quant

from . import names
from .config import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs" / "quant"
BF16 = np.dtype(ml_dtypes.bfloat16)


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


def _check_role(where: str, r: str, s: str) -> None:
    """Role `r` may take scheme `s`: a known role, a known scheme, of the role's kind (float / integer table),
    integer formats only on weights the model multiplies through Backend.linear."""
    if r not in names.ROLES:
        raise ConfigError(f"recipe {where}: roles.{r}: unknown role (known: {', '.join(names.ROLES)})")
    if s not in SCHEMES:
        raise ConfigError(f"recipe {where}: roles.{r}: unknown scheme {s!r} (known: {', '.join(SCHEMES)})")
    sch = SCHEMES[s]
    want_kind = "i" if r in INT_ROLES else "f"
    if sch.kinds != want_kind:
        allowed = [k for k, v in SCHEMES.items() if v.kinds == want_kind]
        raise ConfigError(f"recipe {where}: roles.{r}: scheme {s!r} does not apply to "
                          f"{'integer tables' if want_kind == 'i' else 'floating tensors'} "
                          f"(use {' or '.join(allowed)})")
    if sch.linear_only and r not in names.LINEAR_ROLES:
        raise ConfigError(f"recipe {where}: roles.{r}: scheme {s!r} applies only to linear weights "
                          f"({', '.join(sorted(names.LINEAR_ROLES))})")


def _read_doc(where: str, path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"recipe {where}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {where}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"recipe {where}: expected a mapping with keys {', '.join(RECIPE_KEYS)}")
    for k in doc:
        if k not in RECIPE_KEYS:
            raise ConfigError(f"recipe {where}: unknown field {k!r} (known: {', '.join(RECIPE_KEYS)})")
    return doc


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe: every role of `common.names.ROLES` mapped to a scheme it can take."""
    path = Path(path)
    where = str(path)
    doc = _read_doc(where, path)
    fmt = doc.get("format")
    if not isinstance(fmt, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", fmt):
        raise ConfigError(f"recipe {where}: field 'format' must be a name like w8a8, got {fmt!r}")
    roles = doc.get("roles")
    if not isinstance(roles, dict):
        raise ConfigError(f"recipe {where}: field 'roles' must map each tensor role to a scheme")
    for r, s in roles.items():
        _check_role(where, r, s)
    missing = [r for r in names.ROLES if r not in roles]
    if missing:
        raise ConfigError(f"recipe {where}: roles.{missing[0]} is missing (every role needs a scheme: "
                          f"{', '.join(missing)})")
    g = doc.get("group_size")
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2):
        raise ConfigError(f"recipe {where}: field 'group_size' must be a positive even integer, got {g!r}")
    return Recipe(fmt, {r: roles[r] for r in names.ROLES}, g, where, str(doc.get("description") or ""))


def bundled_recipe(fmt: str) -> Recipe:
    """The bundled recipe `configs/quant/FMT.yaml` (`--format FMT`), validated like any other."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", fmt) or not recipe_path(fmt).is_file():
        raise ConfigError(f"--format: unknown format {fmt!r} (recipes in configs/quant: "
                          f"{', '.join(bundled_formats())})")
    return load_recipe(recipe_path(fmt))
