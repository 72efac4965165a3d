"""The journal `dsv4_progress.json` (what `--resume` trusts) and a conversion's identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.checkpoint import Checkpoint
from common.config import ModelConfig
from common.recipes import Recipe

from ..errors import CliError
from .files import JOURNAL, write_json_atomic
from .plan import Layout


class Journal:
    """`dsv4_progress.json`: the conversion's identity and every completed shard (size, sha256)."""

    def __init__(self, dst: Path, identity: dict):
        self.path = dst / JOURNAL
        self.identity = identity
        self.shards: dict[str, dict] = {}
        # per source tensor: exact / rounded / quantized / kept, so a resumed run can report tensors it skipped
        self.status: dict[str, str] = {}

    def save(self) -> None:
        write_json_atomic(self.path, {"identity": self.identity, "shards": self.shards, "status": self.status})

    def record(self, relpath: str, size: int, sha: str) -> None:
        self.shards[relpath] = {"size": size, "sha256": sha}
        self.save()


# ==== destination state, identity, manifest, verify ========================================================

def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def conversion_identity(args_fmt: str, recipe: Recipe, group: int | None, layout: Layout, shard_size: int,
                        src: Path, ckpt: Checkpoint, cfg: ModelConfig) -> dict:
    """What makes two conversions the same: a destination holding a different one is never touched."""
    return _jsonable({
        "format": args_fmt, "recipe": recipe.roles, "group_size": group, "ep": layout.ep, "tp": layout.tp,
        "shard_size": shard_size, "source": str(src.resolve()),
        "source_files": {f: (ckpt.dir / f).stat().st_size for f in sorted(ckpt.files)},
        "model": cfg.to_dict(),
    })


def _describe_diff(old: dict, new: dict) -> str:
    diffs = []
    for k in ("format", "source", "recipe", "group_size", "ep", "tp", "shard_size", "model", "source_files"):
        if old.get(k) != new.get(k):
            if k in ("recipe", "model", "source_files"):
                diffs.append(f"{k} differs")
            else:
                diffs.append(f"{k}: it has {old.get(k)!r}, this run asks for {new.get(k)!r}")
    return "; ".join(diffs) or "identity differs"


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CliError(f"{path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise CliError(f"{path}: expected a JSON object")
    return d


def _is_record(rec: Any) -> bool:
    """{"size": int >= 0, "sha256": 64 hex digits}: how the journal and the manifest describe a file."""
    return (isinstance(rec, dict) and isinstance(rec.get("size"), int) and not isinstance(rec["size"], bool)
            and rec["size"] >= 0 and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in rec["sha256"]))


def check_file_records(path: Path, what: str, records: Any) -> dict[str, dict]:
    """A {relative path: {size, sha256}} map read from `path`, or a CliError naming the bad entry."""
    if not isinstance(records, dict):
        raise CliError(f"{path}: field {what!r} must map file names to {{size, sha256}}, got {type(records).__name__}")
    for rel, rec in records.items():
        if not _is_record(rec):
            raise CliError(f"{path}: {what}[{rel!r}] must be {{\"size\": bytes, \"sha256\": hex digest}}, got {rec!r}")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CliError(f"{path}: {what}[{rel!r}] is not a path inside the directory")
    return records


def read_journal(path: Path) -> dict:
    """The journal of an unfinished run, checked to be one `dsv4 convert` wrote (identity, shards, status)."""
    d = _read_json(path)
    if not isinstance(d.get("identity"), dict) or set(d) - {"identity", "shards", "status"}:
        raise CliError(f"{path}: not a dsv4 convert journal (expected fields identity, shards, status); "
                       f"remove it or choose another --dst")
    check_file_records(path, "shards", d.get("shards") or {})
    status = d.get("status") or {}
    if not isinstance(status, dict) or not all(isinstance(v, str) for v in status.values()):
        raise CliError(f"{path}: field 'status' must map tensor names to exact / rounded / quantized / kept")
    return {"identity": d["identity"], "shards": d.get("shards") or {}, "status": status}
