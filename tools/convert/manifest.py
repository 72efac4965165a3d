"""Step 5: the small files, `dsv4_convert.json`, and the manifest `dsv4_manifest.json` (written last); --verify."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.checkpoint import INDEX
from common.config import ModelConfig
from common.recipes import Recipe

from ..errors import CliError, log
from .files import MANIFEST, sha256_file
from .journal import check_file_records
from .plan import Layout, Plan


def check_manifest(path: Path, manifest: dict) -> None:
    """The fields --verify trusts have the types `dsv4 convert` writes; a CliError names the first that does not."""
    check_file_records(path, "files", manifest.get("files"))
    source = manifest.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("dir"), str):
        raise CliError(f"{path}: field 'source' must be {{\"dir\": path, \"files\": {{...}}}}, got {source!r}")
    check_file_records(path, "source.files", source.get("files"))


def verify_dir(dst: Path, manifest: dict, workers: int) -> int:
    """Re-hash every output file and every source file listed in the manifest; error naming a mismatch.
    A source directory that no longer exists is skipped with a note (converted models outlive releases)."""
    check_manifest(dst / MANIFEST, manifest)
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
