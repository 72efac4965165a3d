"""`dsv4 doctor`: what this machine has for Ascend, and which lowering each contract op will use.

Prints the SoC (detected, or simulated with --soc), CANN, torch / torch_npu, MindSpore, the CANN custom-op
packages, each against the versions the port supports (ascend/versions.py), and for every contract op the
variant the torch backend selects from the SoC table for the call shapes of --model (default v4-flash), with the
reason each other variant was skipped, plus the expert-parallel exchange for --ep ranks and why MC2 was or was
not taken. Always exits 0: a machine with nothing installed is a valid answer.
"""

from __future__ import annotations

import json
from typing import Any

from ascend import soc as S

from .errors import EXIT_USAGE, CliError


def doctor_report(soc: str | None = None, model: str = "v4-flash", dtype: str = "float32",
                  providers: list[str] | None = None, ep: int = 8, tokens_per_rank: int = 64) -> dict[str, Any]:
    """The doctor's findings as plain data."""
    from ascend import versions
    from ascend.device import detect

    info = detect()
    if soc is not None and soc not in S.SOCS:
        raise CliError(f"--soc {soc!r}: known SoCs are {', '.join(S.SOCS)}", EXIT_USAGE)
    chosen_soc = soc or info.soc or S.A2
    report: dict[str, Any] = {
        "soc": chosen_soc,
        "soc_source": "simulated: --soc" if soc else ("detected" if info.soc else "simulated: default"),
        "soc_description": S.SOCS[chosen_soc],
        "chip": info.chip,
        "npu_count": info.npu_count,
        "cann_version": info.cann_version,
        "cann_home": info.cann_home,
        "torch": info.torch_version,
        "torch_npu": info.torch_npu_version,
        "torch_npu_error": info.torch_npu_error,
        "torch_npu_schema_mismatches": info.torch_npu_schema_mismatches,
        "mindspore": info.mindspore_version,
        "custom_packages": info.custom_packages,
        "versions": versions.summary({"torch_npu": info.torch_npu_version, "cann": info.cann_version,
                                      "mindspore": info.mindspore_version,
                                      "vllm_ascend": _dist_version("vllm_ascend" if "vllm_ascend" in
                                                                   info.custom_packages else None)}),
        "kernels": "torch_npu" if info.has_npu else "stand-ins (ascend.standins: torch_npu, vllm_ascend, mc2)",
        "model": model,
        "dtype": dtype,
        "ops": {},
    }
    if info.torch_version is None:
        report["ops_error"] = "torch is not installed: pip install -e .[torch]"
        return report
    from ascend.torch_backend import CONTRACT_OPS, LOWERINGS, UNTABLED, TorchBackend, index_call, model_calls
    from common.config import model_config

    cfg, _ = model_config(model)
    from ascend.kernels import available as kernels_available

    # our Triton-Ascend kernels are a provider wherever triton-ascend is installed (the plan is for the NPU),
    # unless --providers names the providers explicitly
    kernels = "triton" if providers is None and kernels_available() else None
    if providers is None and soc is not None and not info.has_npu:
        from ascend.torch_backend import simulated_providers

        providers = simulated_providers("cpu", soc, None)  # planning a SoC on a CPU: as deployed there
        report["providers_source"] = "simulated deployment (torch_npu + vllm-ascend custom ops); --providers to change"
    backend = TorchBackend(device="npu" if info.has_npu else "cpu", soc=chosen_soc, providers=providers, dtype=dtype,
                           kernels=kernels)
    report["providers"] = sorted(backend.providers)
    report["torch_npu_schemas"] = backend.torch_npu_version
    report["moe_comm"] = {"ep": ep, "tokens_per_rank": tokens_per_rank, "hidden": cfg.dim,
                          "topk": cfg.n_activated_experts, "experts": cfg.n_routed_experts, "frameworks": {}}
    for fw, provs in (("torch", set(backend.providers)), ("mindspore", {S.MINDSPORE, S.COMPOSED})):
        strategy, rows = S.explain_moe_comm(chosen_soc, provs, ep, tokens_per_rank, cfg.dim, cfg.n_activated_experts,
                                            cfg.n_routed_experts)
        report["moe_comm"]["frameworks"][fw] = {
            "strategy": strategy,
            "variants": [{k: r[k] for k in ("variant", "status", "reason")} for r in rows
                         if r["variant"].split(":")[0] in provs]}
    calls = model_calls(cfg, dtype)
    # the index cache holds int8 keys only where the int8 indexer kernel is the variant (as the model asks)
    calls["lightning_indexer"] = index_call(cfg, dtype, backend.index_key_dtype(cfg))
    plan = backend.plan(calls)
    for op, table_ops in CONTRACT_OPS.items():
        entry: dict[str, Any] = {}
        for t in table_ops:
            if t in LOWERINGS:
                variants = plan[t]
                chosen = next((v["variant"] for v in variants if v["status"] == "chosen"), None)
                entry[t] = {"chosen": chosen, "call": calls.get(t, {}), "variants": variants}
            else:
                entry[t] = {"chosen": UNTABLED[t], "call": {}, "variants": [],
                            "note": "no SoC-table entry: plain torch ops on every SoC"}
        report["ops"][op] = entry
    # the primitives the kernel-granularity attention ops compose: reached only where such an op is composed
    for prim, users in PRIMITIVE_OF.items():
        composed_users = [u for u in users if (report["ops"][u][u]["chosen"] or "").startswith("composed")]
        report["ops"][prim][prim]["note"] = (f"inside the composed {', '.join(composed_users)}" if composed_users
                                             else f"not reached: {', '.join(users)} runs a kernel")
    return report


# contract primitive -> the kernel-granularity ops whose composed path calls it (ops/attention_kernels.py)
PRIMITIVE_OF = {"compress": ("compressor",), "indexer_topk": ("lightning_indexer",),
                "sparse_attention": ("sparse_attn_sharedkv",)}


def _dist_version(package: str | None) -> str | None:
    if package is None:
        return None
    try:
        from importlib.metadata import version

        return version(package.replace("_", "-"))
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return None


def _text(r: dict[str, Any]) -> str:
    lines = [
        f"SoC          {r['soc']} ({r['soc_source']}): {r['soc_description']}" + (f", chip {r['chip']}" if r["chip"]
                                                                                   else ""),
        f"CANN         {r['cann_version'] or 'not found'}" + (f" ({r['cann_home']})" if r["cann_home"] else ""),
        f"torch        {r['torch'] or 'not installed'}",
        f"torch_npu    {r['torch_npu'] or 'not installed'}"
        + (f" ({r['torch_npu_error']})" if r["torch_npu_error"] not in (None, "not installed") else ""),
        *(f"{'':<13}schema differs: {m}" for m in r["torch_npu_schema_mismatches"]),
        f"MindSpore    {r['mindspore'] or 'not installed'}",
        f"NPUs         {r['npu_count']}",
    ]
    for name, v in r["versions"].items():
        if name == "schemas":
            lines.append("checked      " + ", ".join(f"{k} {val[:12]}" for k, val in v["supported"].items()))
            continue
        sup = v["supported"] if isinstance(v["supported"], str) else ", ".join(v["supported"])
        state = "not found" if v["found"] is None else ("ok" if v["ok"] else "UNSUPPORTED")
        lines.append(f"{'':<13}{name}: {v['found'] or '-'} ({state}; supported: {sup})")
    if r["custom_packages"]:
        for pkg, p in r["custom_packages"].items():
            found = ", ".join(p["kernels"]) or "no kernels found"
            lines.append(f"custom ops   {pkg} (torch.ops.{p['namespace']}): {found}"
                         + (f" [{p['error']}]" if p.get("error") else ""))
    else:
        lines.append("custom ops   none installed (vllm_ascend, custom_ops)")
    lines.append(f"kernels      {r['kernels']}")
    if "ops_error" in r:
        lines.append(f"ops          {r['ops_error']}")
        return "\n".join(lines)
    lines.append(f"providers    {', '.join(r['providers'])}; call shapes of {r['model']}, dtype {r['dtype']}; "
                 f"torch_npu schemas {r['torch_npu_schemas']}")
    lines.append("")
    for op, entry in r["ops"].items():
        for t, e in entry.items():
            label = op if t == op else f"{op} [{t}]"
            prim = f" ({e['note']})" if t in PRIMITIVE_OF else ""
            lines.append(f"{label:<34} -> {e['chosen']}{prim}")
            for v in e["variants"]:
                if v["status"] == "skipped" and v["reason"] != "a preferred variant was chosen":
                    lines.append(f"{'':<38}skipped {v['variant']}: {v['reason']}")
    m = r["moe_comm"]
    lines.append("")
    lines.append(f"MoE exchange for ep {m['ep']}, {m['tokens_per_rank']} tokens/rank, hidden {m['hidden']}, "
                 f"top-{m['topk']} of {m['experts']} experts:")
    for fw, f in m["frameworks"].items():
        lines.append(f"{'  ' + fw:<34} -> {f['strategy']}")
        for v in f["variants"]:
            if v["status"] == "skipped" and v["reason"] != "a preferred variant was chosen":
                lines.append(f"{'':<38}skipped {v['variant']}: {v['reason']}")
    return "\n".join(lines)


def run_doctor(args) -> int:
    from tools.generate_cmd import parse_providers

    r = doctor_report(soc=args.soc, model=args.model, dtype=args.dtype, ep=getattr(args, "ep", 8),
                      tokens_per_rank=getattr(args, "tokens_per_rank", 64),
                      providers=parse_providers(getattr(args, "providers", None)))
    print(json.dumps(r, indent=2) if args.json else _text(r))
    return 0
