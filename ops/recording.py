"""A backend proxy that records every op's output under the model scope that produced it.

`common.model.Model` names its scopes (`embed`, `layers.3.attn`, `layers.3.ffn`, `head`, ...) through
`enter_scope`; each recorded key is `<scope>/<op>#<n>[.<output>]`, n counting calls of that op in the
scope within one forward. Two backends running the same graph therefore produce the same keys, which
is what `dsv4 compare` lines up. Recordings are plain numpy and save to / load from `.npz`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# ops whose outputs are data worth comparing; plumbing (zeros, cat, arange, ...) is not recorded
RECORDED_OPS = (
    "embedding", "rms_norm", "linear", "grouped_linear", "rope", "hc_pre", "hc_post", "hc_head", "compress",
    "indexer_topk", "sparse_attention", "moe_gate", "moe_experts", "swiglu_mlp", "compressor", "lightning_indexer",
    "sparse_attn_sharedkv",
)
# outputs that are index sets: compared as sets, not element by element
INDEX_OUTPUTS = ("indexer_topk", "moe_gate.1", "lightning_indexer.0")


class RecordingBackend:
    def __init__(self, inner: Any, label: str = ""):
        self.inner = inner
        self.name = getattr(inner, "name", "?")
        self.label = label or self.name
        self.records: dict[str, np.ndarray] = {}
        self._scope = "model"
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._forward = 0
        self.saved = False

    def enter_scope(self, name: str) -> None:
        if name == "embed":  # a new forward call starts
            self._forward += 1
            self._counts.clear()
        self._scope = f"f{self._forward}.{name}"
        inner = getattr(self.inner, "enter_scope", None)
        if inner is not None:
            inner(name)

    def __getattr__(self, attr: str) -> Any:
        fn = getattr(self.inner, attr)
        if attr not in RECORDED_OPS:
            return fn

        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            n = self._counts[(self._scope, attr)]
            self._counts[(self._scope, attr)] += 1
            key = f"{self._scope}/{attr}#{n}"
            if isinstance(out, tuple):
                for i, o in enumerate(out):
                    self.records[f"{key}.{i}"] = np.array(self.inner.to_numpy(o))
            else:
                self.records[key] = np.array(self.inner.to_numpy(out))
            return out

        return recorded

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {f"r{i}": v for i, v in enumerate(self.records.values())}
        header = {"keys": list(self.records), "label": self.label, "backend": self.name, **(meta or {})}
        try:
            np.savez(tmp, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
            tmp.replace(path)
        except BaseException:  # a full disk or Ctrl-C: leave no partial temp file behind
            tmp.unlink(missing_ok=True)
            raise
        self.saved = True


def load_recording(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """A saved recording; ValueError (naming the file) for anything that is not one."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a .npz (zip) archive")
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(bytes(z["__header__"]).decode())
        recs = {k: z[f"r{i}"] for i, k in enumerate(header["keys"])}
    return recs, header


def _is_index(key: str) -> bool:
    op = key.split("/", 1)[1].split("#")[0]
    suffix = key.rsplit(".", 1)[-1] if "." in key.rsplit("#", 1)[-1] else ""
    return op in INDEX_OUTPUTS or (suffix and f"{op}.{suffix}" in INDEX_OUTPUTS)


def compare_records(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[dict]:
    """One row per key present in both, in call order: max-abs, relative (to b's max-abs), cosine.

    Index outputs (top-k choices) compare as sets per row: `rel` is the fraction of rows whose sets differ.
    """
    rows = []
    for key, x in a.items():
        if key not in b:
            continue
        y = b[key]
        row = {"key": key, "scope": key.split("/", 1)[0], "op": key.split("/", 1)[1], "shape": list(x.shape)}
        if x.shape != y.shape:
            row.update(max_abs=float("inf"), rel=float("inf"), cosine=float("nan"), note="shape differs")
        elif _is_index(key):
            xs, ys = np.sort(x.reshape(x.shape[0], -1), -1), np.sort(y.reshape(y.shape[0], -1), -1)
            differ = float(np.mean(np.any(xs != ys, axis=-1))) if x.size else 0.0
            row.update(max_abs=differ, rel=differ, cosine=1.0 - differ, note="index sets")
        else:
            xf, yf = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            diff = float(np.max(np.abs(xf - yf))) if xf.size else 0.0
            scale = float(np.max(np.abs(yf))) if yf.size else 0.0
            nx, ny = np.linalg.norm(xf), np.linalg.norm(yf)
            cos = float(xf @ yf / (nx * ny)) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
            row.update(max_abs=diff, rel=diff / scale if scale > 0 else diff, cosine=cos, note="")
        rows.append(row)
    return rows
