"""Issue 14 (one place per fact, a CLI that agrees with the README) and the issue-13 bad inputs of generate,
compare, plan, convert and config.json: each is refused before any work with exit 2 or 3 and a message naming
the flag, file, field or tensor; nothing half-written is left behind."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, config_from_dict, model_config
from common.presets import random_weights
from tools.testing.hf_bridge import official_config_dict, save_official

from .conftest import small_config

ROOT = Path(__file__).resolve().parent.parent


def dsv4(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def refused(p: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = small_config()
    d = tmp_path_factory.mktemp("house") / "model"
    save_official(cfg, dict(random_weights(cfg, seed=3)), d, shards=2)
    return d


def _with_config(src: Path, dst: Path, **edits) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(edits)
    (dst / "config.json").write_text(json.dumps(raw))  # json writes NaN / Infinity literals, as a bad file may
    return dst


# ---- config.json ------------------------------------------------------------------------------------------------

BASE = official_config_dict(small_config())


@pytest.mark.parametrize("edit,needle", [
    (dict(rms_norm_eps=math.nan), "rms_norm_eps"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
    (dict(rope_scaling=dict(type="yarn", factor=-4, original_max_position_embeddings=64)), "'factor'"),
    (dict(rope_scaling=dict(type="yarn", factor=math.inf, original_max_position_embeddings=64)), "'factor'"),
    (dict(bos_token_id=10**6), "bos_token_id"),
    (dict(compress_ratios="0404"), "compress_ratios' must be a list"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(routed_scaling_factor=math.nan), "routed_scaling_factor"),
])
def test_config_values_are_checked(edit, needle):
    with pytest.raises(ConfigError, match="config.json") as e:
        config_from_dict({**BASE, **edit}, "m/config.json")
    assert needle in str(e.value)


def test_config_errors_reach_the_cli(model_dir, tmp_path):
    bad = _with_config(model_dir, tmp_path / "nan", rms_norm_eps=math.nan)
    refused(dsv4("generate", "--model", str(bad), "--max-new-tokens", "1"), 3, "config.json", "rms_norm_eps")


def test_prompt_beyond_max_position_embeddings_is_refused_up_front(model_dir, tmp_path):
    short = _with_config(model_dir, tmp_path / "short", max_position_embeddings=8)
    refused(dsv4("generate", "--model", str(short), "--prompt-ids", "1,2,3,4,5,6,7,8,9,10", "--max-new-tokens", "1"),
            2, "max_position_embeddings (8)")
    # the prompt fits, the generation does not
    refused(dsv4("generate", "--model", str(short), "--prompt-ids", "1,2,3", "--max-new-tokens", "6"), 2,
            "--max-new-tokens 6", "max_position_embeddings (8)")
    assert dsv4("generate", "--model", str(short), "--prompt-ids", "1,2,3", "--max-new-tokens", "5").returncode == 0


def test_one_resolver_for_preset_or_directory(tmp_path):
    cfg, preset = model_config("tiny")
    assert preset is not None and preset.get("random_weights")
    with pytest.raises(ConfigError, match="shape only and has no weights"):
        model_config("v4-flash", need_weights=True)
    with pytest.raises(ConfigError, match="not a directory"):
        model_config(str(tmp_path / "nowhere"))


def test_partial_conversion_says_what_it_is(model_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(model_dir, unfinished)
    (unfinished / "dsv4_progress.json").write_text("{}")
    refused(dsv4("generate", "--model", str(unfinished)), 3, "unfinished `dsv4 convert` output", "--resume")
    headless = tmp_path / "headless"
    shutil.copytree(model_dir, headless)
    (headless / "config.json").unlink()
    refused(dsv4("inspect", str(headless)), 3, "no config.json, although it holds weights", ".safetensors")


# ---- generate -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,code,needle", [
    (("--temperature", "nan"), 2, "--temperature must be a finite number"),
    (("--temperature", "inf"), 2, "--temperature must be a finite number"),
    (("--seed", "-1"), 2, "--seed must be in"),
    (("--prompt", "", "--no-bos"), 2, "--prompt: no tokens"),
    (("--device", "npu"), 3, "--device npu needs an Ascend backend"),
    (("--device", "npu", "--nproc", "2"), 3, "--device npu needs an Ascend backend"),
])
def test_generate_bad_arguments(args, code, needle):
    refused(dsv4("generate", "--model", "tiny", "--max-new-tokens", "2", *args), code, needle)


@pytest.mark.parametrize("flag", ["--logits-out", "--record-ops"])
def test_outputs_are_checked_before_generation(tmp_path, flag):
    missing = tmp_path / "no-such-dir" / "out.npy"
    refused(dsv4("generate", "--model", "tiny", "--max-new-tokens", "2", flag, str(missing)), 2,
            flag, "does not exist")
    refused(dsv4("generate", "--model", "tiny", "--max-new-tokens", "2", flag, str(tmp_path)), 2, "is a directory")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        refused(dsv4("generate", "--model", "tiny", "--max-new-tokens", "2", flag, str(ro / "x")), 2, "cannot write")


def test_a_failed_logits_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from tools.errors import CliError
    from tools.generate_cmd import save_npy

    def full_disk(path, arr):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(CliError, match="No space left"):
        save_npy(str(tmp_path / "logits.npy"), np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_recording_leaves_no_temp_file(tmp_path, monkeypatch):
    from ops.numpy_ref import NumpyBackend
    from ops.recording import RecordingBackend

    rec = RecordingBackend(NumpyBackend(), "cpu")
    rec.records["x"] = np.zeros(3, dtype=np.float32)

    def full_disk(path, **arrays):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError):
        rec.save(tmp_path / "ops.npz")
    assert list(tmp_path.iterdir()) == [] and not rec.saved


def test_generate_refuses_to_run_past_max_position_embeddings():
    from common.generate import SamplingParams, generate
    from common.model import Model
    from ops.numpy_ref import NumpyBackend

    cfg = small_config(max_position_embeddings=8)
    model = Model(cfg, random_weights(cfg, seed=1), NumpyBackend())
    with pytest.raises(ValueError, match=r"max_position_embeddings \(8\)"):
        generate(model, [[1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=4))
    assert len(generate(model, [[1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=3)).output_ids[0]) <= 3


# ---- compare ---------------------------------------------------------------------------------------------------

def test_compare_takes_prompt_and_steps_from_the_dump(tmp_path):
    rec = tmp_path / "rec.npz"
    assert dsv4("generate", "--model", "tiny", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "2", "--ignore-eos",
                "--record-ops", str(rec)).returncode == 0
    p = dsv4("compare", "--model", "tiny", "--a", f"dump:{rec}", "--b", "cpu", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["summary"]
    assert s["prompt_len"] == 4 and s["greedy_agree"] and s["max_rel"] == 0
    text = dsv4("compare", "--model", "tiny", "--a", f"dump:{rec}", "--b", "cpu").stdout
    assert "prompt 4 tokens, 1 decode step(s)" in text


def test_compare_refuses_a_dump_that_is_not_one(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive at all")
    refused(dsv4("compare", "--model", "tiny", "--a", f"dump:{junk}", "--b", "cpu"), 3, str(junk), "not a .npz")
    other = tmp_path / "other.npz"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("x.txt", "hello")
    refused(dsv4("compare", "--model", "tiny", "--a", f"dump:{other}", "--b", "cpu"), 3, str(other))


# ---- the CLI as the README writes it -------------------------------------------------------------------------

def test_version_and_positional_inspect():
    p = dsv4("--version")
    assert p.returncode == 0 and p.stdout.startswith("dsv4 ")
    a, b = dsv4("inspect", "tiny", "--json"), dsv4("inspect", "--model", "tiny", "--json")
    assert a.returncode == 0 and json.loads(a.stdout) == json.loads(b.stdout)
    refused(dsv4("inspect"), 2, "inspect takes one model")
    for cmd in ("inspect", "compare"):
        assert "--json" in dsv4(cmd, "--help").stdout and "JSON" in dsv4(cmd, "--help").stdout


def test_plan_recommends_what_the_runtime_runs():
    out = json.loads(dsv4("plan", "--model", "v4-flash", "--cluster", "atlas800-a3-1node", "--format", "w4a8",
                          "--json").stdout)
    rec = out["recommended"]["layout"]
    assert rec["runnable"] and rec["attn_tp"] == 1 and rec["expert_replicas"] == 1
    assert any(not c["layout"]["runnable"] for c in out["candidates"])  # still shown, marked
    p = dsv4("plan", "--model", "v4-flash", "--cluster", "atlas800-a3-1node", "--format", "w4a8", "--tp", "8")
    assert p.returncode == 0 and "not runnable by this runtime" in p.stdout
    refused(dsv4("plan", "--model", "v4-flash", "--cluster", "atlas800-a3-1node", "--format", "w4a8", "--tp", "0"),
            2, "--tp must be a positive integer")


def test_plan_and_convert_read_recipes_with_one_loader():
    from common import recipes
    from tools import plan_cmd
    from tools.convert import command

    assert plan_cmd.load_recipe is recipes.bundled_recipe and command.load_recipe is recipes.load_recipe
    with pytest.raises(ConfigError, match="unknown format 'int3'"):
        recipes.bundled_recipe("int3")


# ---- convert ---------------------------------------------------------------------------------------------------

def test_convert_refuses_non_finite_weights(tmp_path):
    cfg = small_config()
    w = dict(random_weights(cfg, seed=4))
    name = "layers.1.attn.wq_b.weight"
    w[name] = w[name].copy()
    w[name][3, :5] = np.nan
    w[name][7, 0] = np.inf
    save_official(cfg, w, tmp_path / "src", shards=1)
    dst = tmp_path / "out"
    refused(dsv4("convert", "--src", str(tmp_path / "src"), "--dst", str(dst), "--format", "w8a8"), 3,
            repr(name), "6 non-finite values")
    assert not (dst / "dsv4_manifest.json").exists() and not list(dst.rglob("*.tmp"))


@pytest.fixture(scope="module")
def w8a8(model_dir, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("w8a8") / "out"
    p = dsv4("convert", "--src", str(model_dir), "--dst", str(dst), "--format", "w8a8")
    assert p.returncode == 0, p.stderr
    return dst


def test_convert_refuses_to_quantize_twice(w8a8, tmp_path):
    refused(dsv4("convert", "--src", str(w8a8), "--dst", str(tmp_path / "w4"), "--format", "w4a8"), 3,
            "already quantized (w8a8)", "quantize twice")
    assert not (tmp_path / "w4").exists()
    # dequantizing is exact and allowed
    assert dsv4("convert", "--src", str(w8a8), "--dst", str(tmp_path / "bf16"), "--format", "bf16").returncode == 0


def test_resume_over_a_foreign_journal(model_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "dsv4_progress.json").write_text(json.dumps({"job": 7, "done": ["a"]}))
    refused(dsv4("convert", "--src", str(model_dir), "--dst", str(dst), "--format", "bf16", "--resume"), 3,
            "dsv4_progress.json", "not a dsv4 convert journal")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["files"].update({"config.json": {"size": "12", "sha256": "ab"}}), "files['config.json']"),
    (lambda m: m.update(files=["config.json"]), "field 'files'"),
    (lambda m: m.update(source="elsewhere"), "field 'source'"),
])
def test_verify_on_a_mistyped_manifest(w8a8, tmp_path, edit, needle):
    dst = tmp_path / "copy"
    shutil.copytree(w8a8, dst)
    man = json.loads((dst / "dsv4_manifest.json").read_text())
    edit(man)
    (dst / "dsv4_manifest.json").write_text(json.dumps(man))
    refused(dsv4("convert", "--dst", str(dst), "--verify"), 3, "dsv4_manifest.json", needle)
