"""The real op schemas the port calls, kept with their source and version (the one place for them).

<library>.yaml holds, per op, the owner's schema string verbatim, the file and line it was read from, and (torch_npu)
the per-version differences; `python -m ascend.schemas.regenerate` rewrites them from the sources. Reading them
needs no torch (doctor and versions use this module on machines without it); ascend/standins/schema.py turns
them into torch.library ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent
LIBRARIES = ("torch_npu", "vllm_ascend", "cann_recipes")


@dataclass(frozen=True)
class OpSchema:
    library: str  # torch_npu / vllm_ascend / cann_recipes
    namespace: str  # the real torch.ops namespace (npu, _C_ascend, custom)
    name: str
    schema: str  # the owner's schema string, verbatim
    source: str  # "<package or repo>@<version or commit> <path>:<line>"
    version: str  # torch_npu version or git commit the schema was read from


@functools.cache
def _doc(library: str) -> dict[str, Any]:
    import yaml

    if library not in LIBRARIES:
        raise KeyError(f"no schema library {library!r}; known: {', '.join(LIBRARIES)}")
    return yaml.safe_load((SCHEMA_DIR / f"{library}.yaml").read_text())


def schema_version(library: str) -> str:
    """The version (torch_npu) or commit (git sources) the kept schemas were read from."""
    src = _doc(library)["source"]
    return str(src.get("version") or src.get("commit"))


def op_names(library: str) -> tuple[str, ...]:
    return tuple(_doc(library)["ops"])


def schema_versions(library: str, name: str) -> dict[str, dict[str, Any]]:
    """Per-version differences of an op's schema: version -> {"schema": ...} or {"absent": True}."""
    return dict(_doc(library)["ops"][name].get("versions", {}))


def get_schema(library: str, name: str, version: str | None = None) -> OpSchema | None:
    """The op's schema as the given library version ships it (None: absent there). version None = the primary."""
    doc = _doc(library)
    entry = doc["ops"].get(name)
    if entry is None:
        raise KeyError(f"{library} schema of {name!r} is not kept in ascend/schemas/{library}.yaml")
    src = doc["source"]
    primary = str(src.get("version") or src.get("commit"))
    origin = src.get("package") or src.get("repo")
    schema, line = entry["schema"], entry["line"]
    if version is not None and version != primary:
        per = entry.get("versions", {}).get(version)
        if per is not None:
            if per.get("absent"):
                return None
            schema, line = per["schema"], per["line"]
        primary = version
    return OpSchema(library, doc["namespace"], name, schema, f"{origin}@{primary} {entry['path']}:{line}", primary)
