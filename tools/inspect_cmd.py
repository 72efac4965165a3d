"""`dsv4 inspect`: architecture, parameter counts and the formats found in a checkpoint (headers only)."""

from __future__ import annotations

import json
from collections import Counter
from math import prod
from pathlib import Path

from common import names
from common.checkpoint import Checkpoint
from common.config import model_config


def param_counts(cfg, with_mtp: bool) -> dict[str, int]:
    """Main-model parameters (total, and used per token: all but the routed experts a token skips); MTP apart."""
    main = routed = mtp = 0
    for name, shape, _ in names.expected_tensors(cfg, with_mtp=with_mtp):
        n = prod(shape)
        if name.startswith("mtp."):
            mtp += n
            continue
        main += n
        if ".ffn.experts." in name:
            routed += n
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    active = main - routed + cfg.n_layers * cfg.n_activated_experts * per_expert
    embed = cfg.vocab_size * cfg.dim
    return {"total": main, "active_per_token": active, "active_per_token_excluding_embedding": active - embed,
            "routed_experts": routed, "embedding": embed, "mtp": mtp}


def _layer_summary(cfg) -> str:
    """Runs of identical layer kinds, e.g. `0-1 SWA, 2 CSA, 3 HCA, ...`; hash-routed layers marked with *."""
    tags = [cfg.attn_kinds[i].upper() + ("*" if cfg.hash_layers[i] else "") for i in range(cfg.n_layers)]
    parts, i = [], 0
    while i < len(tags):
        j = i
        while j + 1 < len(tags) and tags[j + 1] == tags[i]:
            j += 1
        parts.append(f"{i}-{j} {tags[i]}" if j > i else f"{i} {tags[i]}")
        i = j + 1
    return ", ".join(parts) + ("  (* = hash-routed MoE)" if any(cfg.hash_layers) else "")


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _quant_formats(ckpt: Checkpoint) -> dict[str, int]:
    """Weights stored with a sibling scale, counted by `ops.quant` format (fp8, fp4, w8a8, w4a8-gN, ...)."""
    from ops import quant

    out: Counter = Counter()
    for n in ckpt:
        base = n[: -len(".scale")] if n.endswith(".scale") else n[: -len(".weight_scale_inv")] \
            if n.endswith(".weight_scale_inv") else None
        if base is None or base + ".weight" not in ckpt:
            continue
        w, s = ckpt.info(base + ".weight"), ckpt.info(n)
        for logical in ((w.shape[0], w.shape[-1]), (w.shape[0], 2 * w.shape[-1])):  # plain or packed 4-bit
            try:
                fmt, kw = quant.detect_format(w.dtype, w.shape, s.dtype, s.shape, logical)
            except ValueError:
                continue
            out[fmt + (f"-g{kw['group_size']}" if "group_size" in kw else "")] += 1
            break
    return dict(sorted(out.items()))


def conversion_info(model_dir: Path) -> dict | None:
    """What `dsv4 convert` recorded in a converted directory (dsv4_convert.json, dsv4_manifest.json)."""
    from tools.convert import JOURNAL, MANIFEST, RESOLVED

    res, man = model_dir / RESOLVED, model_dir / MANIFEST
    if not res.is_file() and not man.is_file():
        return None
    doc = json.loads(res.read_text()) if res.is_file() else {}
    manifest = json.loads(man.read_text()) if man.is_file() else None
    files = (manifest or {}).get("files", {})
    par = doc.get("parallel", {})
    return {
        "format": doc.get("format") or (manifest or {}).get("format"),
        "complete": manifest is not None, "unfinished": manifest is None and (model_dir / JOURNAL).is_file(),
        "recipe": doc.get("recipe"), "output": doc.get("output"), "exactness": doc.get("exactness"),
        "source_formats": doc.get("source_formats"),
        "parallel": {k: par.get(k) for k in ("ep", "tp", "world_size", "ranks")},
        "manifest": None if manifest is None else {
            "tool_version": manifest.get("tool_version"), "created": manifest.get("created"),
            "files": len(files), "bytes": sum(f["size"] for f in files.values()),
            "source_files": len(manifest.get("source", {}).get("files", {})), "source": manifest["source"].get("dir")},
    }


def checkpoint_formats(ckpt: Checkpoint) -> dict:
    dtypes: Counter = Counter()
    bytes_by: Counter = Counter()
    scales = 0
    for n in ckpt:
        info = ckpt.info(n)
        dtypes[info.dtype] += 1
        bytes_by[info.dtype] += info.nbytes
        scales += n.endswith(".scale") or n.endswith("weight_scale_inv")
    return {
        "naming": "transformers" if ckpt.hf_naming else "official",
        "files": sorted(ckpt.files),
        "tensors": sum(dtypes.values()),
        "bytes": ckpt.total_bytes(),
        "dtypes": {k: {"tensors": v, "bytes": bytes_by[k]} for k, v in sorted(dtypes.items())},
        "scale_tensors": scales,
        "quant_formats": _quant_formats(ckpt),
        "mtp_tensors": sum(1 for n in ckpt if n.startswith("mtp.") or n.startswith("model.mtp.")),
    }


def run_inspect(args) -> int:
    conv = None
    cfg, preset = model_config(args.model)
    if preset is not None:
        fmt = None
        source = f"preset {args.model}" + (" (random weights)" if preset.get("random_weights") else " (shape only)")
        with_mtp = cfg.n_mtp_layers > 0
    else:
        conv = conversion_info(Path(args.model))
        ckpt_dir = Path(args.model)
        if conv and not list(ckpt_dir.glob("*.safetensors")) and (ckpt_dir / "rank-00000").is_dir():
            ckpt_dir = ckpt_dir / "rank-00000"  # expert/tensor-parallel layout: show what rank 0 loads
        ckpt = Checkpoint(ckpt_dir)
        fmt = checkpoint_formats(ckpt)
        source = str(args.model) + (f" (rank 0 view: {ckpt_dir.name})" if ckpt_dir != Path(args.model) else "")
        with_mtp = cfg.n_mtp_layers > 0 and fmt["mtp_tensors"] > 0
    counts = param_counts(cfg, with_mtp)
    kinds = Counter(cfg.attn_kinds[: cfg.n_layers])
    info = {
        "source": source,
        "architecture": {
            "hidden_size": cfg.dim, "layers": cfg.n_layers, "mtp_layers": cfg.n_mtp_layers if with_mtp else 0,
            "heads": cfg.n_heads, "head_dim": cfg.head_dim, "rope_dim": cfg.rope_dim, "hc_mult": cfg.hc_mult,
            "window": cfg.window, "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.n_activated_experts,
            "shared_experts": cfg.n_shared_experts, "hash_layers": sum(cfg.hash_layers), "vocab_size": cfg.vocab_size,
            "yarn": None if cfg.yarn is None else vars(cfg.yarn),
            "attention_kinds": {k.upper(): v for k, v in sorted(kinds.items())},
        },
        "layers": cfg.describe_layers() if with_mtp else cfg.describe_layers()[: cfg.n_layers],
        "parameters": counts,
        "checkpoint": fmt,
        "conversion": conv,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    a = info["architecture"]
    print(f"model      {source}")
    print(f"shape      d={a['hidden_size']} layers={a['layers']} (+{a['mtp_layers']} MTP) "
          f"heads={a['heads']}x{a['head_dim']} "
          f"rope={a['rope_dim']} hc_mult={a['hc_mult']} window={a['window']} vocab={a['vocab_size']}")
    print(f"moe        {a['routed_experts']} routed experts, top-{a['experts_per_token']}, "
          f"{a['shared_experts']} shared, {a['hash_layers']} hash-routed layers")
    print("attention  " + ", ".join(f"{k} x{v}" for k, v in a["attention_kinds"].items())
          + (f"; YaRN x{cfg.yarn.factor:g} on compressed layers" if cfg.yarn else ""))
    print(f"params     total {_human(counts['total'])}, active per token {_human(counts['active_per_token'])} "
          f"({_human(counts['active_per_token_excluding_embedding'])} without the embedding)")
    if counts["mtp"]:
        print(f"mtp        {_human(counts['mtp'])} parameters in {a['mtp_layers']} layer(s), not counted above")
    print("layers     " + _layer_summary(cfg))
    if fmt:
        print(f"checkpoint {fmt['naming']} naming, {len(fmt['files'])} file(s), {fmt['tensors']} tensors, "
              f"{fmt['bytes'] / 2**30:.2f} GiB, {fmt['scale_tensors']} scale tensors")
        for k, v in fmt["dtypes"].items():
            print(f"  {k:8s} {v['tensors']:6d} tensors  {v['bytes'] / 2**20:10.1f} MiB")
        if fmt["quant_formats"]:
            print("quantized  " + ", ".join(f"{k} x{v}" for k, v in fmt["quant_formats"].items())
                  + "  (weights with a scale tensor)")
    if conv:
        p, r = conv["parallel"], conv["recipe"] or {}
        state = "complete" if conv["complete"] else "UNFINISHED (no manifest)" if conv["unfinished"] else "no manifest"
        print(f"converted  {conv['format']} ({state}), recipe {r.get('path')}"
              + (f", group size {r['group_size']}" if r.get("group_size") else ""))
        if r.get("roles"):
            by: dict[str, list[str]] = {}
            for role, scheme in r["roles"].items():
                by.setdefault(scheme, []).append(role)
            for scheme, roles in by.items():
                print(f"  {scheme:5s} {', '.join(roles)}")
        print(f"parallel   ep={p.get('ep')} tp={p.get('tp')} world={p.get('world_size')}"
              + "".join(f"\n  rank {k['rank']}: experts [{k['experts'][0]}, {k['experts'][1]}) index {k['index']}"
                        for k in (p.get("ranks") or [])[:8]))
        if conv["exactness"]:
            e = conv["exactness"]
            print(f"exactness  {e['exact']} exact, {e['rounded']} rounded to bf16, {e['quantized']} quantized, "
                  f"{e['kept']} kept")
        if conv["manifest"]:
            m = conv["manifest"]
            print(f"manifest   {m['files']} files, {m['bytes'] / 2**30:.2f} GiB, {m['source_files']} source files "
                  f"hashed, tool {m['tool_version']}, {m['created']}")
    return 0
