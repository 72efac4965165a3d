"""`dsv4 compare`: recordings line up op by op, dumps round-trip, and the first divergence is found."""

from __future__ import annotations

import json

import numpy as np

from common.model import Model
from common.presets import random_weights
from ops.numpy_ref import NumpyBackend
from ops.recording import RecordingBackend, compare_records, load_recording

from .conftest import small_config
from .test_cli import dsv4


class _Perturbed(NumpyBackend):
    """The reference with one layer's attention output nudged: a stand-in for a broken kernel."""

    def __init__(self, layer: str):
        self.layer, self.scope = layer, ""

    def enter_scope(self, name: str) -> None:
        self.scope = name

    def sparse_attn_sharedkv(self, *args, **kwargs):
        out, lse = super().sparse_attn_sharedkv(*args, **kwargs)
        return (out * np.float32(1.01) if self.scope == self.layer else out), lse


def _run(backend, cfg, w, ids):
    rec = RecordingBackend(backend)
    m = Model(cfg, w, rec)
    m.forward([m.new_cache()], [ids])
    return rec


def test_first_divergence_is_the_perturbed_layer():
    cfg = small_config()
    w = random_weights(cfg, seed=2)
    ids = list(range(2, 40))
    a = _run(NumpyBackend(), cfg, w, ids)
    b = _run(_Perturbed("layers.2.attn"), cfg, w, ids)
    assert list(a.records) == list(b.records)  # same graph -> same keys in the same order
    rows = compare_records(b.records, a.records)
    first = next(r for r in rows if r["rel"] > 1e-4)
    assert first["scope"] == "f1.layers.2.attn" and first["op"].startswith("sparse_attn_sharedkv")
    assert all(r["rel"] == 0 for r in rows[: rows.index(first)])


def test_dump_roundtrip_and_cli_flags_a_tampered_dump(tmp_path):
    dump = tmp_path / "run.npz"
    p = dsv4("compare", "--model", "tiny", "--b", "cpu", "--steps", "1", "--save-b", str(dump), check=True)
    assert "no op over tolerance" in p.stdout
    recs, header = load_recording(dump)
    assert header["backend"] == "cpu" and len(recs) > 100
    # tamper with one layer's MoE output in the first forward, as a faulty NPU kernel would
    key = next(k for k in recs if k.startswith("f1.layers.1.ffn/moe_experts"))
    recs[key] = recs[key] + np.float32(0.5)
    rec = RecordingBackend(NumpyBackend())
    rec.records = recs
    tampered = tmp_path / "tampered.npz"
    rec.save(tampered, {k: v for k, v in header.items() if k not in ("keys", "label", "backend")})
    p = dsv4("compare", "--model", "tiny", "--a", f"dump:{tampered}", "--b", "cpu", "--steps", "1", "--json",
             check=True)
    out = json.loads(p.stdout)
    assert out["summary"]["first_divergence"]["scope"] == "f1.layers.1.ffn"
    assert out["summary"]["first_divergence"]["op"].startswith("moe_experts")


def test_dump_for_another_prompt_is_refused(tmp_path):
    dump = tmp_path / "run.npz"
    dsv4("compare", "--model", "tiny", "--b", "cpu", "--steps", "0", "--prompt-ids", "5,6,7", "--save-b", str(dump),
         check=True)
    p = dsv4("compare", "--model", "tiny", "--a", f"dump:{dump}", "--b", "cpu", "--prompt-ids", "5,6,8")
    assert p.returncode != 0 and "recorded for prompt" in p.stderr


def test_multi_rank_run_compares_with_the_reference(tmp_path):
    dump = tmp_path / "ep.npz"
    p = dsv4("compare", "--model", "tiny", "--b", "cpu", "--nproc", "2", "--moe-comm", "alltoall", "--steps", "1",
             "--save-b", str(dump), "--json", check=True)
    out = json.loads(p.stdout)
    assert out["summary"]["first_divergence"] is None and out["summary"]["greedy_agree"]
    assert out["summary"]["max_rel"] < 1e-4
    recs, header = load_recording(dump)
    assert header["nproc"] == 2 and header["moe_comm"] == "alltoall"
    assert any("/moe_experts" in k for k in recs)


def test_generate_record_ops_dump_compares(tmp_path):
    dump = tmp_path / "gen.npz"
    dsv4("generate", "--model", "tiny", "--backend", "torch", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "2",
         "--record-ops", str(dump), check=True)
    p = dsv4("compare", "--model", "tiny", "--a", f"dump:{dump}", "--b", "cpu", "--prompt-ids", "5,6,7,8",
             "--steps", "1", "--json", check=True)
    out = json.loads(p.stdout)
    assert out["summary"]["a"] == "torch" and out["summary"]["first_divergence"] is None
