"""`dsv4 doctor`: what this machine has for Ascend, and which lowering each contract op will use.

Prints the SoC (detected, or simulated with --soc), CANN, torch / torch_npu, the CANN custom-op packages,
and for every contract op the variant the torch backend selects from the SoC table for the call shapes of
--model (default v4-flash), with the reason each other variant was skipped. Always exits 0: a machine with
nothing installed is a valid answer.
"""

from __future__ import annotations

import json
from typing import Any

from ascend import soc as S

from .errors import EXIT_USAGE, CliError


def doctor_report(soc: str | None = None, model: str = "v4-flash", dtype: str = "float32",
                  providers: list[str] | None = None) -> dict[str, Any]:
    """The doctor's findings as plain data."""
    from ascend.device import detect

    info = detect()
    if soc is not None and soc not in S.SOCS:
        raise CliError(f"--soc {soc!r}: known SoCs are {', '.join(S.SOCS)}", EXIT_USAGE)
    chosen_soc = soc or info.soc or S.A2
    report: dict[str, Any] = {
        "soc": chosen_soc,
        "soc_source": "simulated (--soc)" if soc else ("detected" if info.soc else "simulated (default)"),
        "soc_description": S.SOCS[chosen_soc],
        "chip": info.chip,
        "npu_count": info.npu_count,
        "cann_version": info.cann_version,
        "cann_home": info.cann_home,
        "torch": info.torch_version,
        "torch_npu": info.torch_npu_version,
        "torch_npu_error": info.torch_npu_error,
        "custom_packages": info.custom_packages,
        "kernels": "torch_npu" if info.has_npu else "stand-ins (ascend.npu_standin, ascend.custom_standin)",
        "model": model,
        "dtype": dtype,
        "ops": {},
    }
    if info.torch_version is None:
        report["ops_error"] = "torch is not installed: pip install -e .[torch]"
        return report
    from ascend.torch_backend import CONTRACT_OPS, LOWERINGS, UNTABLED, TorchBackend, model_calls
    from common.loading import is_preset

    if is_preset(model):
        from common.config import load_preset

        cfg, _ = load_preset(model)
    else:
        from common.config import load_config

        cfg = load_config(model)
    from ascend.kernels import available as kernels_available

    # our Triton-Ascend kernels are a provider wherever triton-ascend is installed (the plan is for the NPU)
    backend = TorchBackend(device="npu" if info.has_npu else "cpu", soc=chosen_soc, providers=providers, dtype=dtype,
                           kernels="triton" if providers is None and kernels_available() else None)
    report["providers"] = sorted(backend.providers)
    calls = model_calls(cfg, dtype)
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
    return report


def _text(r: dict[str, Any]) -> str:
    lines = [
        f"SoC          {r['soc']} ({r['soc_source']}): {r['soc_description']}" + (f", chip {r['chip']}" if r["chip"]
                                                                                   else ""),
        f"CANN         {r['cann_version'] or 'not found'}" + (f" ({r['cann_home']})" if r["cann_home"] else ""),
        f"torch        {r['torch'] or 'not installed'}",
        f"torch_npu    {r['torch_npu'] or 'not installed'}"
        + (f" ({r['torch_npu_error']})" if r["torch_npu_error"] not in (None, "not installed") else ""),
        f"NPUs         {r['npu_count']}",
    ]
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
    lines.append(f"providers    {', '.join(r['providers'])}; call shapes of {r['model']}, dtype {r['dtype']}")
    lines.append("")
    for op, entry in r["ops"].items():
        for t, e in entry.items():
            label = op if t == op else f"{op} [{t}]"
            lines.append(f"{label:<34} -> {e['chosen']}")
            for v in e["variants"]:
                if v["status"] == "skipped" and v["reason"] != "a preferred variant was chosen":
                    lines.append(f"{'':<38}skipped {v['variant']}: {v['reason']}")
    return "\n".join(lines)


def run_doctor(args) -> int:
    r = doctor_report(soc=args.soc, model=args.model, dtype=args.dtype)
    print(json.dumps(r, indent=2) if args.json else _text(r))
    return 0
