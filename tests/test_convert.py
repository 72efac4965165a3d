"""`dsv4 convert`: release checkpoints in (FP8 + ue8m0 with FP4 experts, Base-style FP8 + float32 scales,
transformers naming), bf16 / W8A8 / W4A8 out; expert / tensor-parallel layouts; manifest, --verify, --resume
and bad input. The command runs in a subprocess like a user's; results are loaded back through the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from common.checkpoint import INDEX, Checkpoint
from common.generate import SamplingParams, generate
from common.loading import load_model
from common.model import Model
from common.presets import random_weights
from common.safetensors_io import SafetensorsFile, write_safetensors
from ops import quant
from ops.numpy_ref import NumpyBackend
from tools.testing.release_format import write_release

from .conftest import small_config

MANIFEST = "dsv4_manifest.json"
BF16 = np.dtype(ml_dtypes.bfloat16)
# every attention kind, hash + routed MoE, an MTP layer; FP4 blocks (32) and W4A8 groups (32) fit K = 64
CFG = dict(moe_intermediate_size=64, num_nextn_predict_layers=1, compress_ratios=[0, 4, 16, 4, 0])
GROUP = "32"


def dsv4(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), **(env or {}))
    p = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    if check and p.returncode:
        raise AssertionError(f"dsv4 {args} exited {p.returncode}: {p.stderr}")
    return p


def _fails(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def _hashes(d: Path) -> dict[str, str]:
    """sha256 of every file under d except the run-specific manifest and journal."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, "dsv4_progress.json")}


class QuantBackend(NumpyBackend):
    """The CPU backend, making sure W8A8/W4A8 weight objects reach `linear` as objects (which runs their
    integer kernels) rather than as 0-d object arrays, whatever NumpyBackend.from_numpy does with them."""

    def from_numpy(self, a):
        return a if isinstance(a, (quant.W8A8Weight, quant.W4A8Weight)) else super().from_numpy(a)


@pytest.fixture(scope="module")
def cfg():
    return small_config(**CFG)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def release(cfg, root) -> Path:
    """DeepSeek release layout: FP8 e4m3 + ue8m0 128x128 block scales, routed experts packed FP4."""
    d = root / "release"
    write_release(cfg, dict(random_weights(cfg, seed=6)), d, shards=3)
    return d


@pytest.fixture(scope="module")
def release_base(cfg, root) -> Path:
    """Base-style release: FP8 experts, float32 block scales."""
    d = root / "release-base"
    write_release(cfg, dict(random_weights(cfg, seed=12)), d, shards=2, expert_dtype="fp8", scale_dtype="f32")
    return d


@pytest.fixture(scope="module")
def converted(release, root) -> dict[str, Path]:
    out = {}
    for fmt, extra in (("bf16", ()), ("w8a8", ()), ("w4a8", ("--group-size", GROUP))):
        out[fmt] = root / f"out-{fmt}"
        dsv4("convert", "--src", str(release), "--dst", str(out[fmt]), "--format", fmt, *extra, check=True)
    return out


def _prompt(cfg, n: int = 40) -> list[int]:
    return np.random.default_rng(5).integers(2, cfg.vocab_size, n).tolist()


def _prompt_logits(model_dir: Path, ids: list[int]) -> tuple[np.ndarray, object]:
    lm = load_model(str(model_dir), log=lambda m: None)
    m = Model(lm.cfg, lm.weights, QuantBackend())
    return m.forward([m.new_cache()], [ids], all_logits=True).logits[0], lm


# ---- 2. the release files against the transformers oracle ------------------------------------------

def test_release_generate_matches_transformers_on_dequantized_weights(cfg, release):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tools.testing.hf_bridge import hf_model_from_weights

    lm = load_model(str(release), log=lambda m: None)
    assert lm.weights.mtp_enabled
    hf = hf_model_from_weights(cfg, {k: np.array(v) for k, v in lm.weights.items()})  # writable copies for torch
    ids, n_new = _prompt(cfg), 16
    res = generate(Model(lm.cfg, lm.weights, NumpyBackend()), [ids],
                   SamplingParams(max_new_tokens=n_new, stop_on_eos=False), keep_prompt_logits=True)
    with torch.inference_mode():
        out = hf(torch.tensor([ids]), use_cache=True)
        ref = out.logits[0].float().numpy()
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens = [tok]
        for _ in range(n_new - 1):
            out = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(tok)
    rel = float(np.abs(res.prompt_logits[0] - ref).max() / np.abs(ref).max())
    print(f"release (FP8 ue8m0 + FP4 experts) vs transformers on its dequantized weights: prompt logits rel {rel:.3g}, "
          f"greedy {sum(a == b for a, b in zip(res.output_ids[0], tokens, strict=True))}/{n_new}")
    assert rel < 1e-4
    assert res.output_ids[0] == tokens


# ---- 3. bf16 is bit-exact to the release's dequantization --------------------------------------------

def test_bf16_conversion_is_bit_exact(release, converted):
    a = load_model(str(release), log=lambda m: None).weights
    b = load_model(str(converted["bf16"]), log=lambda m: None).weights
    assert sorted(a) == sorted(b) and b.mtp_enabled
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    idx = json.loads((converted["bf16"] / INDEX).read_text())
    ck = Checkpoint(converted["bf16"])
    assert {ck.info(n).dtype for n in idx["weight_map"]} == {"BF16", "F32", "I64"}
    man = json.loads((converted["bf16"] / MANIFEST).read_text())
    assert man["exactness"]["rounded"] == 0 and man["exactness"]["exact"] > 0
    # the converted directory works with `dsv4 generate` unchanged. Logits agree to float32 rounding, not
    # bit for bit: the loader's float32 tensors are zero-copy views at different byte alignments in the two
    # files and BLAS kernels round alignment-dependently (fresh copies of both weight sets give 0 difference)
    ids = ",".join(map(str, range(5, 25)))
    logits, tokens = {}, {}
    for name, d in (("release", release), ("bf16", converted["bf16"])):
        f = d.parent / f"logits-{name}.npy"
        p = dsv4("generate", "--model", str(d), "--prompt-ids", ids, "--max-new-tokens", "8", "--json",
                 "--ignore-eos", "--logits-out", str(f), check=True)
        logits[name], tokens[name] = np.load(f), json.loads(p.stdout)["output_ids"]
    assert np.abs(logits["release"] - logits["bf16"]).max() < 1e-5 * np.abs(logits["release"]).max()
    assert tokens["release"] == tokens["bf16"]


def test_bf16_of_base_checkpoint_is_reported_rounded(release_base, root):
    dst = root / "base-bf16"
    p = dsv4("convert", "--src", str(release_base), "--dst", str(dst), "--format", "bf16", check=True)
    ex = json.loads((dst / MANIFEST).read_text())["exactness"]
    assert ex["rounded"] > 0 and ex["rounded_examples"], ex
    assert f"{ex['rounded']} rounded" in p.stderr
    a = load_model(str(release_base), log=lambda m: None).weights
    b = load_model(str(dst), log=lambda m: None).weights
    ck = Checkpoint(dst)
    for k in a:  # bf16 storage of the dequantized Base weight (rounded), float32 / int tables unchanged
        want = a[k].astype(BF16).astype(np.float32) if ck.info(k).dtype == "BF16" else a[k]
        np.testing.assert_array_equal(b[k], want, err_msg=k)


def test_transformers_naming_source(cfg, root):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tools.testing import hf_bridge

    hf = hf_bridge.build_random_hf_model(cfg, seed=4)
    src, dst = root / "hf-src", root / "hf-bf16"
    hf_bridge.save_hf_modules(hf, src)  # fused experts gate_up_proj [E, 2I, d] / down_proj [E, d, I], float32
    dsv4("convert", "--src", str(src), "--dst", str(dst), "--format", "bf16", check=True)
    want = hf_bridge.hf_state_to_official(cfg, hf.state_dict())
    got = load_model(str(dst), log=lambda m: None).weights
    assert set(got) == {k for k in want if not k.startswith("mtp.")}
    ck = Checkpoint(dst)
    for k, w in got.items():
        exp = want[k].astype(np.int64) if k.endswith("tid2eid") else want[k].astype(np.float32)
        if ck.info(k).dtype == "BF16":
            exp = exp.astype(BF16).astype(np.float32)
        np.testing.assert_array_equal(w, exp, err_msg=k)


# ---- 4. W8A8 / W4A8: integer weights running through the model -------------------------------------

def test_w8a8_w4a8_load_as_integer_weights_and_track_bf16(cfg, release, converted):
    ids = _prompt(cfg, 48)
    ref, _ = _prompt_logits(converted["bf16"], ids)
    release_w = load_model(str(release), log=lambda m: None).weights
    cos = {}
    for fmt in ("w8a8", "w4a8"):
        lg, lm = _prompt_logits(converted[fmt], ids)
        w = lm.weights
        expert_t = quant.W8A8Weight if fmt == "w8a8" else quant.W4A8Weight
        assert isinstance(w["layers.2.ffn.experts.5.w2.weight"], expert_t)
        assert isinstance(w["mtp.0.ffn.experts.1.w1.weight"], expert_t)
        for k in ("layers.0.attn.wq_a.weight", "layers.1.attn.indexer.wq_b.weight", "mtp.0.e_proj.weight",
                  "layers.3.ffn.shared_experts.w2.weight"):
            assert isinstance(w[k], quant.W8A8Weight), k
        for k in ("layers.0.attn.wo_a.weight", "head.weight", "layers.2.ffn.gate.weight",
                  "layers.1.attn.compressor.wkv.weight", "layers.0.hc_attn_fn"):
            assert isinstance(w[k], np.ndarray), k
        if fmt == "w4a8":
            assert w["layers.2.ffn.experts.5.w2.weight"].group_size == int(GROUP)
        # the stored integers are exactly ops.quant's encoding of the dequantized release weight
        for k in ("layers.0.attn.wq_b.weight", "layers.3.ffn.experts.7.w1.weight"):
            q = quant.quantize_weight(release_w[k], w[k].fmt, **({"group_size": int(GROUP)}
                                                                  if w[k].fmt == "w4a8" else {}))
            np.testing.assert_array_equal(w[k].qweight, q.qweight, err_msg=k)
            np.testing.assert_array_equal(w[k].scale, q.scale, err_msg=k)
        c = (lg * ref).sum(-1) / (np.linalg.norm(lg, axis=-1) * np.linalg.norm(ref, axis=-1))
        top1 = float((lg.argmax(-1) == ref.argmax(-1)).mean())
        cos[fmt] = float(c.mean())
        print(f"{fmt} vs bf16 conversion: logit cosine mean {c.mean():.5f} (min {c.min():.5f}), "
              f"top-1 agreement {top1:.3f} over {len(ids)} prompt positions")
        # and `dsv4 generate` runs the converted directory as it is
        f = converted[fmt].parent / f"logits-{fmt}.npy"
        dsv4("generate", "--model", str(converted[fmt]), "--prompt-ids", ",".join(map(str, ids)),
             "--max-new-tokens", "2", "--json", "--logits-out", str(f), check=True)
        assert np.abs(np.load(f) - lg).max() <= 1e-5 * np.abs(lg).max()
    # Measured over release seeds 4-8 and 11 (d=64 random models are noisy; MoE routing is discrete):
    # w8a8 mean cosine 0.991-0.999, w4a8 (FP4 experts re-quantized to int4, groups of 32) 0.953-0.972
    assert cos["w8a8"] >= 0.99
    assert 0.93 <= cos["w4a8"] < cos["w8a8"]


def test_w4a8_default_group_must_divide_k(release, root):
    dst = root / "w4a8-g128"
    _fails(dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w4a8"),
           "layers.0.ffn.experts.0.w1.weight", "group size 128", "--group-size")
    assert not dst.exists()


# ---- 5. expert / tensor-parallel layouts, manifest and --verify ---------------------------------------

def test_expert_parallel_conversion_runs_on_its_ranks(cfg, release, converted, root):
    """Each rank maps only its own slice of a --ep 2 conversion; tokens equal the unsplit conversion's."""
    dst = root / "w8a8-ep2-run"
    dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w8a8", "--ep", "2", check=True)
    ids = ",".join(map(str, _prompt(cfg, 20)))
    args = ("generate", "--prompt-ids", f"{ids};5,6,7", "--max-new-tokens", "8", "--ignore-eos", "--json")
    want = json.loads(dsv4(*args, "--model", str(converted["w8a8"]), check=True).stdout)["output_ids"]
    for extra in ((), ("--nproc", "2", "--moe-comm", "alltoall")):
        got = json.loads(dsv4(*args, "--model", str(dst), *extra, check=True).stdout)["output_ids"]
        assert got == want, extra
    _fails(dsv4(*args, "--model", str(dst), "--nproc", "4"), "converted for 2 expert-parallel ranks")


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_layout(cfg, release, converted, root, ep):
    dst = root / f"w8a8-ep{ep}"
    dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w8a8", "--ep", str(ep),
         "--shard-size", "64KiB", check=True)
    E = cfg.n_routed_experts
    full = Checkpoint(converted["w8a8"])
    resolved = json.loads((dst / "dsv4_convert.json").read_text())
    assert resolved["parallel"]["ep"] == ep and resolved["parallel"]["world_size"] == ep
    assert not list(dst.glob("*.safetensors"))
    for r in range(ep):
        rank_dir = dst / f"rank-{r:05d}"
        index = json.loads((rank_dir / INDEX).read_text())
        lo, hi = r * E // ep, (r + 1) * E // ep
        assert index["metadata"]["experts"] == [lo, hi]
        assert resolved["parallel"]["ranks"][r]["experts"] == [lo, hi]
        ck = Checkpoint(rank_dir)  # the index is valid: every file exists and holds what it lists
        experts = {n for n in ck if ".ffn.experts." in n}
        held = {int(n.split(".ffn.experts.")[1].split(".")[0]) for n in experts}
        assert held == set(range(lo, hi)), (r, held)
        # exactly the full conversion's tensors: all dense ones plus this rank's experts (weights and scales)
        want = {n for n in full
                if ".ffn.experts." not in n or lo <= int(n.split(".ffn.experts.")[1].split(".")[0]) < hi}
        assert set(ck) == want
        for f in {index["weight_map"][n] for n in experts}:
            assert f.startswith(f"../ep-{r:05d}/"), f
        for n in (f"layers.3.ffn.experts.{lo}.w2.weight", "layers.0.attn.wq_b.weight", "embed.weight"):
            np.testing.assert_array_equal(ck.get(n), full.get(n), err_msg=n)
        assert json.loads((rank_dir / "config.json").read_text()) == json.loads((dst / "config.json").read_text())
    man = json.loads((dst / MANIFEST).read_text())
    for rel, rec in man["files"].items():
        data = (dst / rel).read_bytes()
        assert len(data) == rec["size"] and hashlib.sha256(data).hexdigest() == rec["sha256"], rel
    for rel, rec in man["source"]["files"].items():
        assert hashlib.sha256((release / rel).read_bytes()).hexdigest() == rec["sha256"], rel
    assert {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()} == \
        set(man["files"]) | {MANIFEST, "dsv4_progress.json"}
    assert "verified" in dsv4("convert", "--dst", str(dst), "--verify", check=True).stderr
    # one flipped byte in one shard: --verify names that file
    victim = sorted(dst.glob("ep-00001/*.safetensors"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    _fails(dsv4("convert", "--dst", str(dst), "--verify"), str(victim), "does not match")


def test_tensor_parallel_slices_concatenate_to_the_full_conversion(cfg, release, converted, root):
    dst = root / "w4a8-tp2-ep2"
    dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w4a8", "--group-size", GROUP,
         "--tp", "2", "--ep", "2", check=True)
    full = Checkpoint(converted["w4a8"])
    splits = json.loads((dst / "dsv4_convert.json").read_text())["parallel"]["tp_split"]
    assert splits["layers.0.attn.wo_b.weight"]["axis"] == 1 and splits["head.weight"]["axis"] == 0
    assert splits["layers.1.attn.wo_a.weight"]["axis"] == 0 and "layers.0.attn.wq_a.weight" not in splits
    ranks = [Checkpoint(dst / f"rank-{r:05d}") for r in range(2)]
    for name, rule in splits.items():
        for n in (name, name[: -len(".weight")] + ".scale"):
            if n not in full:
                continue
            parts = [ck.get(n) for ck in ranks]
            if parts[0].ndim > rule["axis"]:
                np.testing.assert_array_equal(np.concatenate(parts, axis=rule["axis"]), full.get(n), err_msg=n)
            else:  # per-output-channel scale of a row-parallel weight: replicated
                for p in parts:
                    np.testing.assert_array_equal(p, full.get(n), err_msg=n)
    # rank 1 holds tp slice 1 and experts [4, 8)
    idx = json.loads((dst / "rank-00001" / INDEX).read_text())
    assert idx["weight_map"]["layers.0.attn.wq_b.weight"].startswith("../tp-00001/")
    assert idx["weight_map"]["layers.0.ffn.experts.4.w1.weight"].startswith("../ep-00001/")
    assert "layers.0.ffn.experts.3.w1.weight" not in idx["weight_map"]


@pytest.mark.parametrize("fmt,extra", [("w4a8", ("--group-size", GROUP, "--tp", "2", "--ep", "2")),
                                       ("bf16", ())])
def test_row_range_jobs_write_the_same_bytes(cfg, release, tmp_path, monkeypatch, fmt, extra):
    """Big tensors are converted as several row-range jobs streamed into the shard; with tiny job, chunk and
    writer-queue sizes every tensor here is split that way, and the files must not change by a byte."""
    from tools import cli
    from tools import convert as convert_cmd
    from tools.convert import files as convert_files

    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    args = ["convert", "--src", str(release), "--format", fmt, *extra, "--shard-size", "40KiB"]
    dsv4(*args, "--dst", str(whole), check=True)
    monkeypatch.setattr(convert_files, "JOB_ELEMS", 1500)
    monkeypatch.setattr(convert_files, "CHUNK_ELEMS", 700)
    monkeypatch.setattr(convert_files, "WRITE_QUEUE_BYTES", 4096)
    sources, _ = convert_cmd.scan_source(cfg, Checkpoint(release))
    tp = 2 if "--tp" in extra else 1
    layout = convert_cmd.Layout(2 if "--ep" in extra else 1, tp, cfg.n_routed_experts)
    plan = convert_cmd.plan_conversion(cfg, sources, convert_cmd.load_recipe(convert_cmd.recipe_path(fmt)), layout,
                                       int(GROUP) if fmt == "w4a8" else None, 1 << 30)
    assert len(plan.jobs) > 2 * len(plan.tensors)
    # with --tp 2, a TP slice of an FP8 tensor starts inside a 128-row block (wq_b: 128 rows, slices of 64)
    assert any(j.r0 % 128 and j.tensor.src.fmt == "fp8" for j in plan.jobs) == (tp > 1)
    assert cli.main([*args, "--dst", str(pieces)]) == 0
    assert _hashes(whole) == _hashes(pieces)


# ---- 6. --resume ------------------------------------------------------------------------------------------

def test_resume_after_interrupt_and_after_damage(release, root):
    args = ["--src", str(release), "--format", "w8a8", "--ep", "2", "--shard-size", "48KiB"]
    clean = root / "resume-clean"
    dsv4("convert", *args, "--dst", str(clean), check=True)
    want = _hashes(clean)
    n_shards = sum(1 for k in want if k.endswith(".safetensors"))
    assert n_shards >= 8

    # a real KeyboardInterrupt after 3 shards (test hook in convert_cmd): exit 130, no manifest, no .tmp
    dst = root / "resume-run"
    p = dsv4("convert", *args, "--dst", str(dst), env={"DSV4_CONVERT_INTERRUPT_AFTER_SHARDS": "3"})
    assert p.returncode == 130, p.stderr
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert not (dst / MANIFEST).exists() and not list(dst.rglob("*.tmp"))
    assert len(json.loads((dst / "dsv4_progress.json").read_text())["shards"]) == 3
    _fails(dsv4("convert", *args, "--dst", str(dst)), "--resume")
    p = dsv4("convert", *args, "--dst", str(dst), "--resume", "--verify", check=True)
    assert f"3 of {n_shards} shards verified and kept" in p.stderr
    assert _hashes(dst) == want

    # manifest deleted, one shard deleted, another corrupted: both are redone, the rest kept
    (dst / MANIFEST).unlink()
    shards = sorted(dst.rglob("*.safetensors"))
    shards[1].unlink()
    data = bytearray(shards[4].read_bytes())
    data[-1] ^= 0xFF
    shards[4].write_bytes(bytes(data))
    p = dsv4("convert", *args, "--dst", str(dst), "--resume", check=True)
    assert f"{n_shards - 2} of {n_shards} shards verified and kept" in p.stderr
    assert _hashes(dst) == want
    ex = json.loads((dst / MANIFEST).read_text())["exactness"]
    assert ex == json.loads((clean / MANIFEST).read_text())["exactness"]


# ---- 7. bad input: one-line error naming the culprit, no manifest ----------------------------------------

def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(src, d)
    return d


def test_truncated_source_shard(release, tmp_path):
    src = _copy(release, tmp_path)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    dst = tmp_path / "out"
    _fails(dsv4("convert", "--src", str(src), "--dst", str(dst), "--format", "w8a8"), shard.name, "truncated")
    assert not (dst / MANIFEST).exists()


def test_scale_shape_mismatch(release, tmp_path):
    src = _copy(release, tmp_path)
    index = json.loads((src / INDEX).read_text())
    name = "layers.1.attn.wkv.scale"
    shard = src / index["weight_map"][name]
    f = SafetensorsFile(shard)
    tensors = {k: np.array(f.get(k)) for k in f.tensors}
    f.close()
    tensors[name] = np.concatenate([tensors[name], tensors[name]], axis=1)
    write_safetensors(shard, tensors)
    dst = tmp_path / "out"
    _fails(dsv4("convert", "--src", str(src), "--dst", str(dst), "--format", "bf16"),
           "layers.1.attn.wkv.weight", "scale shape", shard.name)
    assert not (dst / MANIFEST).exists()


def test_index_naming_missing_file(release, tmp_path):
    src = _copy(release, tmp_path)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["layers.0.attn.wq_a.weight"] = "model-00007-of-00009.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    dst = tmp_path / "out"
    _fails(dsv4("convert", "--src", str(src), "--dst", str(dst), "--format", "w8a8"),
           "model-00007-of-00009.safetensors")
    assert not (dst / MANIFEST).exists()


def test_dst_holding_another_conversion(release, converted, tmp_path):
    dst = converted["w8a8"]
    before = (dst / MANIFEST).read_bytes()
    files = _hashes(dst)
    _fails(dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w4a8", "--group-size", GROUP),
           "different conversion", "format")
    _fails(dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w8a8", "--ep", "2"),
           "different conversion", "ep")
    assert (dst / MANIFEST).read_bytes() == before and _hashes(dst) == files
    p = dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w8a8", "--verify", check=True)
    assert "already complete" in p.stderr and "verified" in p.stderr
    assert (dst / MANIFEST).read_bytes() == before
    other = tmp_path / "not-ours"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    _fails(dsv4("convert", "--src", str(release), "--dst", str(other), "--format", "w8a8"), "not empty")
    assert not (other / MANIFEST).exists()


def test_bad_layouts_fail_before_writing(release, tmp_path):
    dst = tmp_path / "out"
    _fails(dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w8a8", "--ep", "3"),
           "--ep 3", "n_routed_experts=8")
    _fails(dsv4("convert", "--src", str(release), "--dst", str(dst), "--format", "w8a8", "--tp", "3"),
           "--tp 3", "head.weight", "does not split")
    assert not dst.exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r["roles"].update(experts="w8a8"), "roles.experts: unknown role"),
    (lambda r: r["roles"].update(expert="int3"), "roles.expert: unknown scheme 'int3'"),
    (lambda r: r["roles"].update(norm="w8a8"), "roles.norm: scheme 'w8a8' applies only to linear weights"),
    (lambda r: r["roles"].update(hash_table="bf16"), "roles.hash_table"),
    (lambda r: r["roles"].pop("router"), "roles.router is missing"),
    (lambda r: r.update(group_size=33), "group_size"),
    (lambda r: r.update(colour="blue"), "unknown field 'colour'"),
])
def test_recipe_validation(release, tmp_path, edit, needle):
    import yaml

    from tools.convert import recipe_path

    recipe = yaml.safe_load(recipe_path("w4a8").read_text())
    edit(recipe)
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    dst = tmp_path / "out"
    _fails(dsv4("convert", "--src", str(release), "--dst", str(dst), "--recipe", str(f), "--group-size", GROUP),
           str(f), needle)
    assert not dst.exists()


def test_custom_recipe_and_inspect(release, tmp_path):
    import yaml

    from tools.convert import recipe_path

    recipe = yaml.safe_load(recipe_path("w8a8").read_text())
    recipe.update(format="w8a8-head")
    recipe["roles"]["head"] = "w8a8"
    f = tmp_path / "head.yaml"
    f.write_text(yaml.safe_dump(recipe))
    dst = tmp_path / "out"
    dsv4("convert", "--src", str(release), "--dst", str(dst), "--recipe", str(f), check=True)
    assert isinstance(load_model(str(dst), log=lambda m: None).weights["head.weight"], quant.W8A8Weight)
    info = json.loads(dsv4("inspect", "--model", str(dst), "--json", check=True).stdout)
    conv = info["conversion"]
    assert conv["format"] == "w8a8-head" and conv["complete"] and conv["recipe"]["roles"]["head"] == "w8a8"
    assert info["checkpoint"]["quant_formats"]["w8a8"] == sum(1 for n in Checkpoint(dst) if n.endswith(".scale"))
    text = dsv4("inspect", "--model", str(dst), check=True).stdout
    assert "converted  w8a8-head (complete)" in text and "manifest" in text
