"""`dsv4 kernels`: our Triton-Ascend kernels, the SoCs they compile for, and their on-chip memory use.

Each kernel instance of a shape set (flash-slice, v4-flash, v4-pro) is compiled to HIVM for each SoC through
ascend.kernels.compile (cached, so reruns are quick). Exit 1 when any instance fails to compile or overflows the
unified buffer / L0C; without triton-ascend / ascendnpu-ir the kernels are listed as "toolchain missing" (exit 0).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tqdm import tqdm

from .errors import EXIT_USAGE, CliError


def kernels_report(socs: list[str], shape_sets: list[str]) -> dict[str, Any]:
    from ascend.kernels import KERNELS, available
    from ascend.kernels import tiles as TL

    report: dict[str, Any] = {"kernels": {k: {"contract_op": v[1], "computes": v[2]} for k, v in KERNELS.items()},
                              "socs": socs, "shape_sets": shape_sets, "results": []}
    toolchain = None
    if available():
        try:
            from ascend.kernels.compile import tools

            tools()
        except Exception as e:  # ascendnpu-ir missing: listing only
            toolchain = str(e)
    else:
        toolchain = "triton-ascend not installed (pip install -e .[kernels] in its own venv; README 'Our kernels')"
    report["toolchain_error"] = toolchain
    jobs = [(ss, inst, k, sh, soc) for ss in shape_sets for inst, k, sh in TL.instances(ss) for soc in socs]
    if toolchain is None:
        from ascend.kernels import kernel_module
        from ascend.kernels.compile import compile_kernel
    for ss, inst, k, sh, soc in tqdm(jobs, desc="compile", unit="kernel", file=sys.stderr,
                                     disable=not sys.stderr.isatty()):
        row = {"kernel": inst, "source": k, "soc": soc, "shape_set": ss, "tiles": TL.tiles(k, soc)}
        if toolchain is not None:
            row.update(status="toolchain missing")
        else:
            res = compile_kernel(inst, *kernel_module(k).compile_spec(sh, TL.tiles(k, soc)), soc)
            row.update({f: res.get(f) for f in ("status", "chip", "ub_bytes", "ub_limit", "l0c_bytes", "l0c_limit",
                                                "mix_mode", "cached", "seconds", "error", "constants")})
        report["results"].append(row)
    report["ok"] = toolchain is None and all(r["status"] == "ok" for r in report["results"])
    return report


def _text(r: dict[str, Any]) -> str:
    lines = []
    for k, v in r["kernels"].items():
        lines.append(f"{k:<18} -> serves {v['contract_op']}: {v['computes']}")
    if r["toolchain_error"]:
        lines.append(f"compile check: {r['toolchain_error']}")
    lines.append("")
    lines.append(f"{'kernel':<18} {'soc':<4} {'shapes':<11} {'status':<9} {'UB KiB (limit)':>16} {'L0C KiB':>8}  tiles")
    for x in r["results"]:
        ub = f"{x['ub_bytes'] / 1024:.1f} ({x['ub_limit'] // 1024})" if x.get("ub_bytes") is not None else "-"
        l0c = f"{x['l0c_bytes'] / 1024:.1f}" if x.get("l0c_bytes") is not None else "-"
        tiles = ",".join(f"{k}={v}" for k, v in x["tiles"].items())
        lines.append(f"{x['kernel']:<18} {x['soc']:<4} {x['shape_set']:<11} {x['status']:<9} {ub:>16} {l0c:>8}  "
                     f"{tiles}")
        if x.get("error") and x["status"] != "ok":
            lines.append(f"    {x['error'].splitlines()[0][:200]}")
    return "\n".join(lines)


def run_kernels(args) -> int:
    import os

    from ascend.kernels import tiles as TL

    # compiling needs triton's real frontend: drop the interpreter switch before any kernel module is imported
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and "triton.language" in sys.modules:
        raise CliError("TRITON_INTERPRET=1 is set and triton is already loaded; run `dsv4 kernels` without it",
                       EXIT_USAGE)

    socs = [args.soc] if args.soc else list(TL.SOCS)
    if args.model and args.model not in TL.SHAPE_SETS:
        raise CliError(f"--model {args.model!r}: shape sets are {', '.join(TL.SHAPE_SETS)}", EXIT_USAGE)
    sets = [args.model] if args.model else list(TL.SHAPE_SETS)
    r = kernels_report(socs, sets)
    print(json.dumps(r, indent=1) if args.json else _text(r))
    return 0 if r["ok"] or r["toolchain_error"] else 1
