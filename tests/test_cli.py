"""`dsv4` end to end through a subprocess: output contracts, and bad input -> clear error + non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.presets import random_weights
from common.safetensors_io import SafetensorsFile, write_safetensors
from tools.testing.hf_bridge import official_config_dict, save_official

from .conftest import small_config


def dsv4(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    if check and p.returncode:
        raise AssertionError(f"dsv4 {args} exited {p.returncode}: {p.stderr}")
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = small_config(num_nextn_predict_layers=1, compress_ratios=[0, 4, 16, 4, 0])
    d = tmp_path_factory.mktemp("ckpt")
    save_official(cfg, dict(random_weights(cfg, seed=3)), d, shards=3)
    return d


def test_generate_tiny_preset_json():
    p = dsv4("generate", "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "5", "--json", check=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("prompt_ids", "output_ids", "text", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in out
    assert out["prompt_ids"][0] == 0  # BOS prepended
    assert len(out["output_ids"]) <= 5
    assert "loaded preset tiny" in p.stderr


def test_generate_checkpoint_logits_out_and_greedy_determinism(ckpt, tmp_path):
    f = tmp_path / "logits.npy"
    a = dsv4("generate", "--model", str(ckpt), "--prompt-ids", "5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22",
             "--max-new-tokens", "6", "--json", "--ignore-eos", "--logits-out", str(f), check=True)
    logits = np.load(f)
    assert logits.shape == (18, 160) and logits.dtype == np.float32
    out = json.loads(a.stdout)
    assert "text" not in out  # no tokenizer in this directory
    assert out["output_ids"][0] == int(logits[-1].argmax())
    b = dsv4("generate", "--model", str(ckpt), "--prompt-ids", "5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22",
             "--max-new-tokens", "6", "--json", "--ignore-eos", check=True)
    assert json.loads(b.stdout)["output_ids"] == out["output_ids"]


def test_generate_batch_of_prompts(ckpt):
    p = dsv4("generate", "--model", str(ckpt), "--prompt-ids", "5,6,7;8,9", "--max-new-tokens", "3", "--json",
             "--ignore-eos", check=True)
    out = json.loads(p.stdout)
    assert len(out["output_ids"]) == 2 and all(len(o) == 3 for o in out["output_ids"])


def test_inspect_checkpoint_and_preset(ckpt):
    p = dsv4("inspect", "--model", str(ckpt), "--json", check=True)
    info = json.loads(p.stdout)
    assert info["architecture"]["attention_kinds"] == {"CSA": 2, "HCA": 1, "SWA": 1}
    assert info["checkpoint"]["naming"] == "official"
    assert info["checkpoint"]["mtp_tensors"] > 0
    assert info["parameters"]["active_per_token"] < info["parameters"]["total"]
    p = dsv4("inspect", "--model", "v4-flash", check=True)
    assert "284.33B" in p.stdout  # DeepSeek publishes 284B total for V4-Flash


# ---- bad input ------------------------------------------------------------------------------

def _copy(ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    return d


def _fails(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_directory_without_config(tmp_path):
    _fails(dsv4("generate", "--model", str(tmp_path), "--prompt-ids", "1"), "no config.json")


def test_unknown_model_name():
    _fails(dsv4("generate", "--model", "no-such-thing", "--prompt-ids", "1"), "no-such-thing")


def test_preset_without_weights():
    _fails(dsv4("generate", "--model", "v4-flash", "--prompt-ids", "1"), "no weights")


def test_truncated_shard(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    shard = sorted(d.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _fails(dsv4("generate", "--model", str(d), "--prompt-ids", "1"), shard.name, "truncated")


def test_tensor_of_wrong_shape(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "layers.1.attn.wkv.weight"
    shard = d / index["weight_map"][name]
    f = SafetensorsFile(shard)
    tensors = {k: np.array(f.get(k)) for k in f.tensors}
    f.close()
    tensors[name] = tensors[name][:, :-1]
    write_safetensors(shard, tensors)
    _fails(dsv4("generate", "--model", str(d), "--prompt-ids", "1"), name, "shape")


def test_missing_tensor_and_index_naming_missing_file(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    idx_path = d / "model.safetensors.index.json"
    index = json.loads(idx_path.read_text())
    index["weight_map"]["layers.0.attn.wq_a.weight"] = "model-00009-of-00009.safetensors"
    idx_path.write_text(json.dumps(index))
    _fails(dsv4("generate", "--model", str(d), "--prompt-ids", "1"), "model-00009-of-00009.safetensors")
    del index["weight_map"]["layers.0.attn.wq_a.weight"]
    idx_path.write_text(json.dumps(index))
    p = dsv4("generate", "--model", str(d), "--prompt-ids", "1")
    _fails(p, "missing tensor", "layers.0.attn.wq_a.weight")


@pytest.mark.parametrize("patch,needle", [
    ({"compress_ratios": [0, 4, 16, -4, 0]}, "compress_ratios[3]"),
    ({"layer_types": ["sliding_attention", "compressed_sparse_attention", "sparse_attention",
                      "compressed_sparse_attention"]}, "layer_types[2]"),
    ({"compress_rates": {"very_compressed_attention": 64}}, "very_compressed_attention"),
    ({"hidden_sise": 64}, "hidden_sise"),
    ({"o_groups": 3}, "o_groups"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
])
def test_bad_config_fields(ckpt, tmp_path, patch, needle):
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(patch)
    if "compress_rates" in patch:
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    _fails(dsv4("generate", "--model", str(d), "--prompt-ids", "1"), needle)


def test_prompt_ids_out_of_vocabulary(ckpt):
    _fails(dsv4("generate", "--model", str(ckpt), "--prompt-ids", "5,160"), "160", "vocabulary")
    _fails(dsv4("generate", "--model", str(ckpt), "--prompt-ids", "5,x"), "--prompt-ids")


def test_text_prompt_without_tokenizer(ckpt):
    _fails(dsv4("generate", "--model", str(ckpt), "--prompt", "hi"), "tokenizer")


def test_config_spelling_roundtrip():
    cfg = small_config()
    from common.config import config_from_dict

    assert config_from_dict(official_config_dict(cfg)) == cfg
