"""Regenerate the real op schemas kept in ascend/schemas/*.yaml from their owners' sources.

    python -m ascend.schemas.regenerate \
        --torch-npu-wheel /work/wt/cache/torch_npu/torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl \
        [--torch-npu-wheel OLDER_WHEEL ...] \
        --vllm-ascend-git /work/.mirror/vllm-project+vllm-ascend/repo \
        --cann-recipes-git /work/.mirror/hicann+cann-recipes-infer/repo

Wheels come from `pip download --no-deps torch-npu==X`; the git directories from any clone (bare is fine).
Only the ops already listed in the YAML files are refreshed (add one with --add library:op). The first wheel
given is the primary torch_npu version; each further wheel adds a per-version entry for every op whose
schema differs there (or is absent). Nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TORCH_NPU_YAMLS = ("torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml",
                   "torch_npu/csrc/aten/npu_native_functions.yaml")
VLLM_BINDING = "csrc/torch_binding.cpp"
CANN_BINDING = "ops/ascendc/torch_ops_extension/custom_ops/csrc/ops_def_registration.cpp"
_FUNC = re.compile(r"^\s*-?\s*func:\s*(\S+?)\((.*)$")


def _wheel_schemas(wheel: Path) -> tuple[str, dict[str, dict]]:
    """(torch_npu version, {op: {schema, path, line}}) from the wheel's native-function YAMLs."""
    out: dict[str, dict] = {}
    with zipfile.ZipFile(wheel) as z:
        version = re.search(r"__version__\s*=\s*'([^']+)'", z.read("torch_npu/version.py").decode()).group(1)
        for path in TORCH_NPU_YAMLS:
            for i, line in enumerate(z.read(path).decode().splitlines(), 1):
                m = _FUNC.match(line)
                if m:
                    name = m.group(1).split(".")[0]
                    if "." in m.group(1):  # overloads (x.Tensor) are not what the Python API calls by name
                        continue
                    schema = line.split("func:", 1)[1].strip()
                    out.setdefault(name, {"schema": schema, "path": path, "line": i})
    return version, out


def _c_string_calls(text: str, opener: str) -> list[tuple[int, str]]:
    """(line, concatenated string literal) of every `opener(` "..." "..." `)` call in C++ source."""
    out = []
    for m in re.finditer(re.escape(opener) + r"\s*\(", text):
        i, parts = m.end(), []
        while i < len(text):
            c = text[i]
            if c == '"':
                j, buf = i + 1, []
                while text[j] != '"':
                    if text[j] == "\\":
                        buf.append(text[j + 1])
                        j += 2
                    else:
                        buf.append(text[j])
                        j += 1
                parts.append("".join(buf))
                i = j + 1
            elif text.startswith("//", i):
                i = text.index("\n", i)
            elif c == ")" or c == ",":
                break
            else:
                i += 1
        if parts:
            out.append((text.count("\n", 0, m.start()) + 1, " ".join("".join(parts).split())))
    return out


def _git(gitdir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(gitdir), *args], check=True, capture_output=True,
                          text=True).stdout


def _binding_schemas(gitdir: Path, path: str, opener: str) -> tuple[str, dict[str, dict]]:
    commit = _git(gitdir, "rev-parse", "HEAD").strip()
    text = _git(gitdir, "show", f"HEAD:{path}")
    out = {}
    for line, schema in _c_string_calls(text, opener):
        name = schema.split("(", 1)[0].strip()
        out[name] = {"schema": schema, "path": path, "line": line}
    return commit, out


def _refresh(doc: dict, found: dict[str, dict], source: dict) -> list[str]:
    missing = []
    doc["source"] = source
    for name, entry in doc["ops"].items():
        new = found.get(name)
        if new is None:
            missing.append(name)
            continue
        entry.update(schema=new["schema"], path=new["path"], line=new["line"])
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-npu-wheel", action="append", type=Path, default=[])
    ap.add_argument("--vllm-ascend-git", type=Path)
    ap.add_argument("--cann-recipes-git", type=Path)
    ap.add_argument("--add", action="append", default=[], help="library:op to start keeping (e.g. torch_npu:npu_foo)")
    a = ap.parse_args(argv)
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(HERE.glob("*.yaml"))}
    for item in a.add:
        lib, _, op = item.partition(":")
        docs[lib]["ops"].setdefault(op, {})
    missing: list[str] = []
    if a.torch_npu_wheel:
        version, found = _wheel_schemas(a.torch_npu_wheel[0])
        older = [_wheel_schemas(w)[0] for w in a.torch_npu_wheel[1:]]
        missing += _refresh(docs["torch_npu"], found, {"package": "torch-npu", "version": version,
                                                       "how": "pip download --no-deps torch-npu==" + version,
                                                       "differences_from": older})
        for older in a.torch_npu_wheel[1:]:
            v, old = _wheel_schemas(older)
            for name, entry in docs["torch_npu"]["ops"].items():
                per = {k: e for k, e in entry.get("versions", {}).items() if k != v}
                o = old.get(name)
                if o is None:
                    per[v] = {"absent": True}
                elif o["schema"] != entry["schema"]:
                    per[v] = {"schema": o["schema"], "line": o["line"]}
                if per:
                    entry["versions"] = dict(sorted(per.items()))
    if a.vllm_ascend_git:
        commit, found = _binding_schemas(a.vllm_ascend_git, VLLM_BINDING, "ops.def")
        missing += _refresh(docs["vllm_ascend"], found, {"repo": "vllm-project/vllm-ascend", "commit": commit})
    if a.cann_recipes_git:
        commit, found = _binding_schemas(a.cann_recipes_git, CANN_BINDING, "m.def")
        missing += _refresh(docs["cann_recipes"], found, {"repo": "hicann/cann-recipes-infer", "commit": commit})
    if missing:
        print(f"error: not found in the sources: {', '.join(missing)}", file=sys.stderr)
        return 2
    for lib, doc in docs.items():
        (HERE / f"{lib}.yaml").write_text(HEADER + yaml.safe_dump(doc, sort_keys=False, width=10_000))
    return 0


HEADER = ("# Real op schemas, generated by `python -m ascend.schemas.regenerate` (by hand: only add ops).\n"
          "# Stand-ins are defined from these strings (ascend/standins/schema.py).\n")

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, zipfile.BadZipFile, KeyError, subprocess.CalledProcessError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
