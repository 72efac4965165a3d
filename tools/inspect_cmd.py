"""`dsv4 inspect`: architecture, parameter counts and the formats found in a checkpoint (headers only)."""

from __future__ import annotations

import json
from collections import Counter
from math import prod

from common import names
from common.checkpoint import Checkpoint
from common.config import load_config, load_preset
from common.loading import is_preset


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
        "mtp_tensors": sum(1 for n in ckpt if n.startswith("mtp.") or n.startswith("model.mtp.")),
    }


def run_inspect(args) -> int:
    if is_preset(args.model):
        cfg, preset = load_preset(args.model)
        fmt = None
        source = f"preset {args.model}" + (" (random weights)" if preset.get("random_weights") else " (shape only)")
        with_mtp = cfg.n_mtp_layers > 0
    else:
        cfg = load_config(args.model)
        ckpt = Checkpoint(args.model)
        fmt = checkpoint_formats(ckpt)
        source = str(args.model)
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
    return 0
