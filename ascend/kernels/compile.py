"""The compile check: drive triton-ascend's compiler stages without CANN, for A2, A3 and 950.

TTIR from triton-ascend's frontend -> linalg with its bundled `triton-adapter-opt` (the pass list of
triton/backends/ascend/compiler.py `ttir_to_linalg`, triton-ascend 3.2.0) -> `bishengir-compile` (ascendnpu-ir
1.2.0; `-a5` binaries for 950) with `--save-temps`, which leaves `module.hivm.opt.mlir`: tiling done and
unified-buffer / L0C addresses assigned. The final binary needs CANN's `hivmc`, absent here, so a compile counts
as passing when the HIVM module was written and the only error is the missing `hivmc`; "ub overflow" /
"cc overflow" (or any other error) fails it. On-chip use is read back from the HIVM module: every
`hivm.hir.pointer_cast(<addr>...) : memref<shape x type, #hivm.address_space<ub|cc>>` allocates
[addr, addr + bytes); the use is the highest end. Results are cached under DSV4_KERNEL_CACHE (default
<repo>/.kernel-cache, gitignored), keyed by a hash of the kernel source, shape, tiles, chip and tool versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# SoC family -> chip name bishengir-compile takes (shared/spec/kernel_toolchain.md "Chips that worked")
CHIPS = {"A2": "Ascend910B3", "A3": "Ascend910_9392", "950": "Ascend950PR_9599"}
# on-chip limits in bytes: UB 192 KiB on A2/A3, ~248 KiB on 950; L0C 128 KiB (kernel_toolchain.md "Limits seen")
UB_BYTES = {"A2": 192 * 1024, "A3": 192 * 1024, "950": 248 * 1024}
L0C_BYTES = {"A2": 128 * 1024, "A3": 128 * 1024, "950": 128 * 1024}
_BITS = {"f32": 32, "f16": 16, "bf16": 16, "i8": 8, "i1": 8, "i16": 16, "i32": 32, "i64": 64, "f64": 64, "ui8": 8}
_ADAPTER_PASSES = [
    "--discrete-mask-access-conversion=compile-on-910-95={a5} force-simt-template=false",
    "--triton-to-annotation",
    "--triton-to-unstructure=compile-on-910-95={a5} force-simt-template=false",
    "--triton-to-hivm",
    "--triton-to-hfusion",
    "--triton-to-llvm",
    "--bubble-up-operation",
    "--triton-to-linalg=global-kernel=false named-ops=true enable-nd2nz-on-vector=false "
    "enable-select-analysis={a5} compile-on-910-95={a5}",
]


def cache_dir() -> Path:
    env = os.environ.get("DSV4_KERNEL_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".kernel-cache"


def tools() -> dict[str, str]:
    """Paths of triton-adapter-opt and the bishengir-compile binaries (raises if a package is missing)."""
    import ascendnpuir
    import triton.backends.ascend as tba

    adapter = Path(tba.__file__).parent / "triton-adapter-opt"
    bindir = Path(ascendnpuir.__file__).parent / "bin"
    out = {"adapter": str(adapter), "bishengir": str(bindir / "bishengir-compile"),
           "bishengir-a5": str(bindir / "bishengir-compile-a5")}
    for k, p in out.items():
        if not Path(p).is_file():
            raise FileNotFoundError(f"{k}: {p} not found (pip install triton-ascend==3.2.0 ascendnpu-ir==1.2.0)")
    return out


def _versions() -> str:
    return ",".join(f"{p}={importlib.metadata.version(p)}" for p in ("triton-ascend", "ascendnpu-ir"))


def ttir(kernel: Any, signature: dict, constants: dict, soc: str) -> str:
    """The kernel's optimised TTIR for `soc` (triton-ascend frontend + make_ttir; no device, no CANN)."""
    from triton._C.libtriton import ir
    from triton.backends.ascend.compiler import AscendBackend, make_ttir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    be = AscendBackend(GPUTarget("npu", CHIPS[soc], 0))
    opts = be.parse_options({"compile_on_910_95": soc == "950"})
    # runtime arguments only: constexprs are bound through `constants`
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constants}}, constants=constants)
    ctx = ir.context()
    ir.load_dialects(ctx)
    be.load_dialects(ctx)
    mod = src.make_ir(opts, be.get_codegen_implementation(), be.get_module_map(), ctx)
    return str(make_ttir(mod, {}, opts))


def on_chip_use(hivm: str) -> dict[str, int]:
    """Highest allocated byte per on-chip space (ub, cc = L0C, cbuf = L1, ca/cb = L0A/L0B) in a HIVM module.

    Addresses are SSA constants of the function holding the pointer_cast (`arith.constant N : i64` on A2/A3,
    `llvm.mlir.constant(N : i64)` in 950's register-based output), so the module is read one function at a time.
    """
    use: dict[str, int] = {}
    cpat = re.compile(r"(%[\w]+) = (?:arith\.constant (-?\d+) : i64|llvm\.mlir\.constant\((-?\d+) : i64\))")
    ppat = re.compile(r"hivm\.hir\.pointer_cast\(([^)]*)\)[^:]*:\s*memref<([^,>]*?)x?([a-z]+\d+)[,>][^#]*"
                      r"#hivm\.address_space<(\w+)>")
    for body in hivm.split("func.func @")[1:]:
        consts = {m.group(1): int(m.group(2) or m.group(3)) for m in cpat.finditer(body)}
        for m in ppat.finditer(body):
            args, dims, ety, space = m.group(1), m.group(2), m.group(3), m.group(4)
            n = 1
            for d in dims.split("x"):
                if d.isdigit():
                    n *= int(d)
            nbytes = n * _BITS.get(ety, 32) // 8
            for a in (s.strip() for s in args.split(",") if s.strip()):
                if a in consts:
                    use[space] = max(use.get(space, 0), consts[a] + nbytes)
    return use


def compile_kernel(name: str, kernel: Any, signature: dict, constants: dict, soc: str, *, keep: Path | None = None,
                   use_cache: bool = True) -> dict[str, Any]:
    """Compile one kernel instance for `soc`; a result dict (status ok / overflow / error, ub / l0c bytes)."""
    src = inspect.getsource(inspect.getmodule(kernel.fn if hasattr(kernel, "fn") else kernel))
    key = hashlib.sha256(json.dumps([src, signature, constants, soc, CHIPS[soc], _versions()],
                                    sort_keys=True).encode()).hexdigest()[:24]
    cpath = cache_dir() / f"{name}-{soc}-{key}.json"
    if use_cache and cpath.is_file():
        res = json.loads(cpath.read_text())
        res["cached"] = True
        return res
    t0 = time.perf_counter()
    res: dict[str, Any] = {"kernel": name, "soc": soc, "chip": CHIPS[soc], "constants": constants, "key": key,
                           "ub_limit": UB_BYTES[soc], "l0c_limit": L0C_BYTES[soc]}
    tl_paths = tools()
    a5 = "true" if soc == "950" else "false"
    with tempfile.TemporaryDirectory(prefix="dsv4-kc-") as tmp:
        tmpd = Path(tmp)
        try:
            (tmpd / "kernel.ttir.mlir").write_text(ttir(kernel, signature, constants, soc))
        except Exception as e:  # frontend errors (bad constexpr, unsupported op) are compile failures
            return _finish(res, "error", f"ttir: {type(e).__name__}: {e}", t0, cpath, use_cache)
        cmd = [tl_paths["adapter"], str(tmpd / "kernel.ttir.mlir"), *[p.format(a5=a5) for p in _ADAPTER_PASSES],
               "-o", str(tmpd / "kernel.linalg.mlir")]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            return _finish(res, "error", "triton-adapter-opt: " + _errors(p.stderr), t0, cpath, use_cache)
        linalg = (tmpd / "kernel.linalg.mlir").read_text()
        mix = re.search(r'mix_mode\s*=\s*"([^"]+)"', linalg)
        res["mix_mode"] = mix.group(1) if mix else None
        # triton-ascend strips mix_mode before bishengir-compile (compiler.py _parse_linalg_metadata)
        (tmpd / "kernel.linalg.mlir").write_text(re.sub(r', mix_mode\s*=\s*"[^"]*"', "", linalg))
        temps = tmpd / "temps"
        temps.mkdir()
        comp = tl_paths["bishengir-a5" if soc == "950" else "bishengir"]
        opts = ["--enable-hfusion-compile=true", "--enable-hivm-compile=true", "--enable-triton-kernel-compile=true"]
        if soc != "950":  # triton-ascend's A2/A3 defaults (NPUOptions multibuffer / auto_bind_sub_block)
            opts += ["--enable-auto-multi-buffer=true", "--enable-auto-bind-sub-block=true"]
        cmd = [comp, str(tmpd / "kernel.linalg.mlir"), f"--target={CHIPS[soc]}", *opts, f"--save-temps={temps}",
               "-o", str(temps / "kernel")]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        hivm_path = temps / "module.hivm.opt.mlir"
        errs = _errors(p.stderr + p.stdout)
        if keep is not None:
            shutil.copytree(tmpd, keep, dirs_exist_ok=True)
        # bishengir-compile retries a UB overflow without code motion / multi-buffering ("[NOTE] ... compilation
        # then succeeded"); what remains an overflow is reported as "... overflow, requires N bits while M bits"
        res["notes"] = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.startswith("[NOTE]")]
        if re.search(r"(ub|cc|l1|cbuf) overflow, requires", errs, re.I):
            return _finish(res, "overflow", errs, t0, cpath, use_cache)
        if not hivm_path.is_file() or (p.returncode and not _only_hivmc_missing(errs)):
            return _finish(res, "error", errs or f"exit {p.returncode}, no HIVM module", t0, cpath, use_cache)
        hivm = hivm_path.read_text()
        use = on_chip_use(hivm)
        res["ub_bytes"] = use.get("ub", 0)
        res["l0c_bytes"] = use.get("cc", 0)
        res["l1_bytes"] = use.get("cbuf", 0)
        res["cube"] = "_mix_aic" in hivm or "AIC>" in hivm
    status = "ok"
    if res["ub_bytes"] > res["ub_limit"] or res["l0c_bytes"] > res["l0c_limit"]:
        status = "overflow"
    return _finish(res, status, "" if status == "ok" else "on-chip use above the SoC limit", t0, cpath, use_cache)


def _errors(text: str) -> str:
    lines = [ln for ln in text.splitlines() if any(w in ln.lower() for w in ("error", "overflow", "assert"))
             and not ln.startswith("[NOTE]")]
    return "\n".join(lines[:12])


def _only_hivmc_missing(errs: str) -> bool:
    bad = [ln for ln in errs.splitlines() if "error" in ln.lower() and "hivmc" not in ln
           and "BiShengIR pipeline" not in ln]
    return not bad


def _finish(res: dict, status: str, error: str, t0: float, cpath: Path, use_cache: bool) -> dict:
    res["status"] = status
    res["error"] = error
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["cached"] = False
    if use_cache:
        cpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = cpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, cpath)
    return res
