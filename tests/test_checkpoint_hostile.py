"""Loading hostile or corrupt model directories: non-finite weights refused at load (tensor named, values
counted), malformed index files, a FIFO where a shard should be, tid2eid naming the bad expert id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from common.checkpoint import INDEX, count_nonfinite
from common.loading import load_model
from common.presets import random_weights
from common.safetensors_io import CheckpointError, write_safetensors
from tools.testing.hf_bridge import official_config_dict, official_to_hf_state, save_official

from .conftest import small_config

ROOT = Path(__file__).resolve().parent.parent


def dsv4(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def cfg():
    return small_config()


@pytest.fixture(scope="module")
def weights(cfg):
    return dict(random_weights(cfg, seed=7))


def load_fails(model: Path, *needles: str) -> None:
    with pytest.raises(CheckpointError) as e:
        load_model(str(model), log=lambda m: None)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_count_nonfinite_over_dtypes():
    a = np.ones(1000, np.float32)
    assert count_nonfinite(a) == 0
    a[[3, 7, 900]] = [np.nan, np.inf, -np.inf]
    assert count_nonfinite(a) == 3
    # the largest finite float32 values do not overflow the float64 sum: no false alarm
    assert count_nonfinite(np.full(10**5, np.finfo(np.float32).max, np.float32)) == 0
    b = np.ones(8, ml_dtypes.bfloat16)
    b[2] = np.nan
    assert count_nonfinite(b) == 1
    e = np.ones(8, ml_dtypes.float8_e4m3fn)
    e[[0, 1]] = np.nan
    assert count_nonfinite(e) == 2
    assert count_nonfinite(np.arange(10, dtype=np.int64)) == 0


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_nan_and_inf_weights_are_refused_at_load(tmp_path, cfg, weights, dtype):
    w = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in weights.items()}
    name = "layers.1.attn.wq_a.weight"
    bad = np.array(w[name], dtype=np.float32)
    bad.flat[[0, 5, 9]] = [np.nan, np.inf, np.nan]
    w[name] = bad.astype(dtype)
    save_official(cfg, w, tmp_path)
    load_fails(tmp_path, name, "3 non-finite values")
    p = dsv4("generate", "--model", str(tmp_path), "--prompt-ids", "5,6", "--max-new-tokens", "1")
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr
    assert name in p.stderr and "3 non-finite values" in p.stderr


def test_nan_in_a_fused_transformers_expert_tensor(tmp_path, cfg, weights):
    hf = official_to_hf_state(cfg, weights)
    fused = next(k for k in hf if k.endswith("experts.gate_up_proj"))
    arr = np.array(hf[fused], dtype=np.float32)
    arr.flat[11] = np.inf
    hf[fused] = arr
    write_safetensors(tmp_path / "model.safetensors", {k: np.asarray(v) for k, v in hf.items()})
    (tmp_path / "config.json").write_text(json.dumps(official_config_dict(cfg)))
    load_fails(tmp_path, fused, "1 non-finite value")


def test_finite_weights_still_load(tmp_path, cfg, weights):
    save_official(cfg, weights, tmp_path)
    lm = load_model(str(tmp_path), log=lambda m: None)
    np.testing.assert_array_equal(lm.weights["layers.1.attn.wq_a.weight"], weights["layers.1.attn.wq_a.weight"])


@pytest.mark.parametrize("weight_map, needle", [
    (["model-00001-of-00002.safetensors"], "weight_map must be an object"),
    ({"embed.weight": 3}, "weight_map['embed.weight']: 3 is not a shard file name"),
    ({"embed.weight": None}, "is not a shard file name"),
    ("x", "weight_map must be an object"),
])
def test_malformed_index_is_named(tmp_path, cfg, weights, weight_map, needle):
    save_official(cfg, weights, tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    load_fails(tmp_path, INDEX, needle)
    p = dsv4("generate", "--model", str(tmp_path), "--prompt-ids", "5")
    assert p.returncode == 3 and "Traceback" not in p.stderr and needle in p.stderr, p.stderr


def test_index_that_is_a_json_list(tmp_path, cfg, weights):
    save_official(cfg, weights, tmp_path)
    (tmp_path / INDEX).write_text("[1, 2]")
    load_fails(tmp_path, INDEX, "weight_map must be an object", "missing")


def test_a_fifo_where_a_shard_should_be(tmp_path, cfg, weights):
    save_official(cfg, weights, tmp_path)
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    load_fails(tmp_path, shard.name, "not a regular file")


def test_tid2eid_error_names_the_bad_value(tmp_path, cfg, weights):
    w = dict(weights)
    name = next(k for k in w if k.endswith("gate.tid2eid"))
    t = np.array(w[name])
    t.flat[4] = -3
    w[name] = t
    save_official(cfg, w, tmp_path)
    load_fails(tmp_path, name, "routes to expert -3", "1 such entry")


@pytest.mark.parametrize("doc, needle", [
    ([1], None),  # not an object: no parallel layout recorded
    ({"parallel": [1]}, "parallel: must be an object"),
    ({"parallel": {"world_size": "2", "ranks": []}}, "parallel.world_size: '2'"),
    ({"parallel": {"world_size": 2, "tp": 1, "ranks": [1, 2]}}, "parallel.ranks"),
])
def test_malformed_conversion_record(tmp_path, cfg, weights, doc, needle):
    from common.config import ConfigError
    from common.converted import CONVERT_INFO
    from common.loading import split_indexes

    save_official(cfg, weights, tmp_path)
    (tmp_path / CONVERT_INFO).write_text(json.dumps(doc))
    if needle is None:
        assert split_indexes(tmp_path, 0, 2) is None
        return
    with pytest.raises(ConfigError) as e:
        split_indexes(tmp_path, 0, 2)
    assert needle in str(e.value) and CONVERT_INFO in str(e.value)
