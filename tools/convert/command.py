"""`dsv4 convert`: the command, as the steps validate, plan, encode, write, journal, manifest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import names
from common.checkpoint import INDEX, Checkpoint
from common.config import load_config
from common.recipes import SCHEMES, Recipe, bundled_formats, load_recipe, recipe_path

from ..errors import EXIT_USAGE, CliError, log
from .files import AUX_FILES, DEFAULT_SHARD, JOURNAL, MANIFEST, RESOLVED, sha256_file, write_json_atomic
from .journal import Journal, _describe_diff, _read_json, conversion_identity, read_journal
from .manifest import _resolved_doc, _tool_version, check_manifest, verify_dir
from .plan import Layout, Shard, plan_conversion
from .validate import SourceReader, scan_source
from .write import _execute, _SourceHasher


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


@dataclass
class Request:
    """A validated conversion: everything decided from arguments and headers before the destination is touched."""

    src: Path
    dst: Path
    fmt: str
    recipe: Recipe
    group: int | None
    layout: Layout
    shard_size: int
    workers: int
    cfg: Any
    raw_config: dict
    ckpt: Checkpoint
    unused: list[str]
    plan: Any
    identity: dict


def _workers(args) -> int:
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise CliError("--workers must be >= 1", EXIT_USAGE)
    return workers


def _verify_only(args, dst: Path, workers: int) -> int:
    if not args.verify:
        raise CliError("pass --src (and --format or --recipe), or --verify alone to check an existing --dst",
                       EXIT_USAGE)
    if not (dst / MANIFEST).is_file():
        raise CliError(f"{dst}: no {MANIFEST}; not a complete dsv4 conversion")
    manifest = _read_json(dst / MANIFEST)
    check_manifest(dst / MANIFEST, manifest)
    n = verify_dir(dst, manifest, workers)
    log(f"verified {len(manifest['files'])} output and {len(manifest['source']['files'])} source files "
        f"({n / 1e9:.2f} GB) against {dst / MANIFEST}")
    _emit(args, {"dst": str(dst), "status": "verified"})
    return 0


def _group_size(args, recipe: Recipe) -> int | None:
    group = args.group_size if args.group_size is not None else recipe.group_size
    if not recipe.uses("w4a8"):
        return None
    if group is None:
        raise CliError(f"recipe {recipe.path} uses w4a8 but sets no group_size; pass --group-size", EXIT_USAGE)
    if group <= 0 or group % 2:
        raise CliError(f"--group-size must be a positive even integer, got {group}", EXIT_USAGE)
    return group


def _refuse_requantizing(src: Path, recipe: Recipe, fmt: str, sources: list) -> None:
    """An int8 / int4 source (a `dsv4 convert` output) re-encoded to an integer format would compound two
    roundings; dequantizing it (bf16 / f32) is exact and allowed."""
    for s in sources:
        scheme = recipe.roles[names.role(s.name)]
        if s.fmt in ("w8a8", "w4a8") and SCHEMES[scheme].linear_only:
            raise CliError(f"--src {src}: tensor {s.name!r} is already quantized ({s.fmt}); converting it to "
                           f"{scheme} ({fmt}) would quantize twice. Convert from the original checkpoint "
                           f"instead (or to bf16 / f32)")


def _validate(args, dst: Path, workers: int) -> Request:
    recipe, fmt = _resolve_recipe(args)
    src = Path(args.src)
    if not src.is_dir():
        raise CliError(f"--src {src}: not a directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CliError(f"--dst {dst} must not be the source directory or inside it")
    if args.ep < 1 or args.tp < 1:
        raise CliError("--ep and --tp must be >= 1", EXIT_USAGE)
    shard_size = parse_size(args.shard_size) if args.shard_size is not None else DEFAULT_SHARD
    group = _group_size(args, recipe)
    cfg = load_config(src)
    raw_config = _read_json(src / "config.json")
    if cfg.n_routed_experts % args.ep:
        raise CliError(f"--ep {args.ep} does not divide n_routed_experts={cfg.n_routed_experts}")
    layout = Layout(args.ep, args.tp, cfg.n_routed_experts)
    ckpt = Checkpoint(src)
    sources, unused = scan_source(cfg, ckpt)
    _refuse_requantizing(src, recipe, fmt, sources)
    plan = plan_conversion(cfg, sources, recipe, layout, group, shard_size)
    identity = conversion_identity(fmt, recipe, group, layout, shard_size, src, ckpt, cfg)
    return Request(src, dst, fmt, recipe, group, layout, shard_size, workers, cfg, raw_config, ckpt, unused, plan,
                   identity)


def _complete(args, req: Request) -> int:
    """The destination already holds a complete conversion: the same one (done; --verify re-checks) or not."""
    manifest = _read_json(req.dst / MANIFEST)
    if manifest.get("identity") != req.identity:
        diff = _describe_diff(manifest.get("identity", {}), req.identity)
        raise CliError(f"--dst {req.dst} already holds a different conversion ({diff}); nothing was written: "
                       f"choose another --dst or remove it")
    log(f"{req.dst}: this conversion is already complete ({MANIFEST} present)")
    if args.verify:
        n = verify_dir(req.dst, manifest, req.workers)
        log(f"verified {len(manifest['files'])} output and {len(manifest['source']['files'])} source files "
            f"({n / 1e9:.2f} GB)")
    _emit(args, {"dst": str(req.dst), "status": "complete", "format": req.fmt})
    return 0


def _previous_run(args, req: Request) -> tuple[dict[str, dict], dict[str, str]]:
    """(shards, tensor status) an unfinished run of this conversion recorded; empty for a new destination."""
    dst = req.dst
    if (dst / JOURNAL).is_file():
        prev = read_journal(dst / JOURNAL)
        if prev["identity"] != req.identity:
            raise CliError(f"--dst {dst} holds an unfinished different conversion "
                           f"({_describe_diff(prev['identity'], req.identity)}); nothing was written")
        if not args.resume:
            raise CliError(f"--dst {dst} holds an unfinished run of this conversion; pass --resume to finish it")
        return dict(prev["shards"]), dict(prev["status"])
    if dst.is_dir() and any(dst.iterdir()):
        raise CliError(f"--dst {dst} is not empty and holds no dsv4 conversion; choose an empty or new directory")
    return {}, {}


def _open_journal(args, req: Request, shards: dict[str, dict], status: dict[str, str]) -> Journal:
    """Create dst, drop stale temp files, keep the shards an interrupted run finished (re-hashed), save."""
    dst = req.dst
    for note in req.unused[:1]:
        log(f"note: {len(req.unused)} source tensors are not used by the model and are not converted "
            f"(e.g. {note!r})")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--dst {dst}: cannot create ({e.strerror})") from None
    for stale in dst.rglob("*.tmp"):  # left by a killed run of this conversion (dst is ours: checked above)
        stale.unlink()
    journal = Journal(dst, req.identity)

    # --resume: a shard is reused only if its file still has the size and sha256 recorded when it finished
    def intact(sh: Shard) -> bool:
        rec, p = shards.get(sh.relpath), dst / sh.relpath
        return bool(rec) and p.is_file() and p.stat().st_size == rec["size"] and sha256_file(p)[1] == rec["sha256"]

    with ThreadPoolExecutor(max_workers=req.workers) as pool:
        kept = list(pool.map(intact, req.plan.shards))
    for sh, ok in zip(req.plan.shards, kept, strict=True):
        if ok:
            sh.done = True
            journal.shards[sh.relpath] = shards[sh.relpath]
    if args.resume and shards:
        log(f"resume: {sum(kept)} of {len(req.plan.shards)} shards verified and kept, "
            f"{len(req.plan.shards) - sum(kept)} to write")
    journal.status = status
    journal.save()
    return journal


def _convert(req: Request, journal: Journal, aux: list[str]) -> tuple[dict, dict[str, dict]]:
    """Stream every tensor into its shard while the source files are hashed alongside."""
    src = req.src
    src_files = sorted(req.ckpt.files) + ["config.json"] + ([INDEX] if (src / INDEX).is_file() else []) + aux
    hasher = _SourceHasher(src, src_files)
    hasher.start()
    reader = SourceReader()
    try:
        stats = _execute(req.plan, req.dst, reader, req.workers, req.group, journal)
        src_hashes = hasher.result()
    except BaseException:
        hasher.stop()
        raise
    finally:
        reader.close()
    return stats, src_hashes


def _small_files(req: Request, stats: dict) -> dict[str, Any]:
    """Per-rank indexes and configs, the top-level config and dsv4_convert.json."""
    layout, plan = req.layout, req.plan
    out_conf = _output_config(req.raw_config, req.fmt, req.recipe, req.group)
    small: dict[str, Any] = {}
    for r in range(1 if layout.single else layout.world):
        rank = layout.rank(r)
        wanted = set(rank["parts"]) if not layout.single else {""}
        wm = {e.name: sh.relpath if layout.single else f"../{sh.relpath}"
              for sh in plan.shards if sh.part in wanted for e in sh.entries}
        meta = {"total_size": sum(sh.nbytes for sh in plan.shards if sh.part in wanted), "format": req.fmt}
        if not layout.single:
            meta.update({k: rank[k] for k in ("rank", "tp_rank", "ep_rank", "experts")})
            meta.update({"ep": layout.ep, "tp": layout.tp, "world_size": layout.world})
            small[f"rank-{r:05d}/config.json"] = out_conf
        small[INDEX if layout.single else rank["index"]] = {"metadata": meta, "weight_map": dict(sorted(wm.items()))}
    small["config.json"] = out_conf
    small[RESOLVED] = _resolved_doc(req.cfg, req.src, req.fmt, req.recipe, req.group, layout, plan, stats,
                                    req.raw_config)
    return small


def _write_outputs(args, req: Request, journal: Journal, stats: dict, src_hashes: dict, aux: list[str]) -> dict:
    """The small files, the copied tokenizer files, then the manifest LAST; -> the manifest."""
    src, dst = req.src, req.dst
    files: dict[str, dict] = {rel: journal.shards[rel] for rel in sorted(journal.shards)}
    for rel, obj in _small_files(req, stats).items():
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
        "tool": "dsv4-ascend convert", "tool_version": _tool_version(), "format": req.fmt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: getattr(args, k) for k in ("src", "dst", "format", "recipe", "group_size", "ep", "tp",
                                               "workers", "shard_size", "resume", "verify")},
        "identity": req.identity,
        "source": {"dir": str(src.resolve()), "files": src_hashes},
        "files": dict(sorted(files.items())),
        "exactness": stats["exactness"],
    }
    write_json_atomic(dst / MANIFEST, manifest)
    return manifest


def run_convert(args) -> int:
    t_start = time.perf_counter()
    workers = _workers(args)
    dst = Path(args.dst)
    if args.src is None:  # verify-only mode on an existing conversion
        return _verify_only(args, dst, workers)
    req = _validate(args, dst, workers)  # everything checked before dst is touched
    if dst.exists() and not dst.is_dir():
        raise CliError(f"--dst {dst}: exists and is not a directory")
    if (dst / MANIFEST).is_file():
        return _complete(args, req)
    journal = _open_journal(args, req, *_previous_run(args, req))
    aux = [f for f in AUX_FILES if (req.src / f).is_file()]
    stats, src_hashes = _convert(req, journal, aux)
    manifest = _write_outputs(args, req, journal, stats, src_hashes, aux)
    files = manifest["files"]
    dt = time.perf_counter() - t_start
    out_bytes = sum(f["size"] for f in files.values())
    ex = stats["exactness"]
    log(f"converted {len(req.plan.tensors)} tensors ({stats['src_bytes'] / 1e9:.3f} GB read) to {req.fmt} in "
        f"{dt:.1f}s ({stats['src_bytes'] / 1e9 / max(dt, 1e-9):.2f} GB/s); wrote {len(files)} files, "
        f"{out_bytes / 1e9:.3f} GB to {dst}; bf16/f32 tensors: {ex['exact']} exact, {ex['rounded']} rounded; "
        f"{ex['quantized']} quantized")
    if args.verify:
        n = verify_dir(dst, manifest, workers)
        log(f"verified {len(files)} output and {len(src_hashes)} source files ({n / 1e9:.2f} GB)")
    _emit(args, {"dst": str(dst), "status": "converted", "format": req.fmt, "files": len(files),
                 "bytes": out_bytes, "seconds": round(dt, 3), "exactness": ex})
    return 0


def _emit(args, obj: dict) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj))
    else:
        print(f"{obj['status']}: {obj['dst']}" + (f" ({obj['format']})" if obj.get("format") else ""))
