"""`dsv4 convert` throughput and peak memory on a multi-GB release-format checkpoint (figures, no assertions).

Builds, in a temporary directory, a DeepSeek-release-layout checkpoint (FP8 e4m3 + ue8m0 block scales,
routed experts packed FP4 + ue8m0 per-32 scales, bf16 / float32 elsewhere) of at least `--size-gb` GB,
streaming it tensor by tensor to shards (random codes and scales: the converter's work does not depend on
the values). Then measures a plain copy of the same files (shutil.copyfile, with and without fsync: the
converter fsyncs each finished shard) and runs `dsv4 convert` to each format in a subprocess, reporting
source GB/s, the converter's CPU seconds (source GB per CPU-second does not depend on other load on the
machine) and its peak RSS (os.wait4 rusage of that child alone). Temp dirs are removed.

    python benchmarks/bench_convert.py                       # >= 2 GB source, bf16 + w8a8
    python benchmarks/bench_convert.py --size-gb 0.5 --formats bf16,w8a8,w4a8 --workers 1,2
    python benchmarks/bench_convert.py --dir /big/tmp --keep  # where to put the files; keep them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

from common import names
from common.checkpoint import INDEX
from common.config import PRESET_DIR, ModelConfig, config_from_dict
from tools.convert import OutTensor, Shard, ShardFile
from tools.testing.hf_bridge import official_config_dict

ROOT = Path(__file__).resolve().parent.parent
SHARD_BYTES = 1 << 30


def bench_config(target_bytes: int) -> ModelConfig:
    """bench-small's per-head widths with wide experts; layers added until the release is >= target."""
    raw = yaml.safe_load((PRESET_DIR / "bench-small.yaml").read_text())["model"]
    raw.update(hidden_size=2048, moe_intermediate_size=2048, n_routed_experts=64, q_lora_rank=1024,
               num_hash_layers=1)
    for n in range(2, 200):
        raw.update(num_hidden_layers=n, compress_ratios=[0] + [4 if i % 2 else 128 for i in range(1, n)])
        cfg = config_from_dict(dict(raw), "bench-convert")
        if sum(t.nbytes for t in release_layout(cfg)) >= target_bytes:
            return cfg
    raise ValueError("target size too large")


def release_layout(cfg: ModelConfig) -> list[OutTensor]:
    """Every stored tensor of the release (name, dtype tag, shape), in the model's order."""
    out = []
    for name, (N, *rest), _ in names.expected_tensors(cfg, with_mtp=False):
        storage = names.RELEASE_STORAGE[names.role(name)]
        shape = (N, *rest)
        if storage == "fp8":
            K = rest[0]
            out += [OutTensor(name, "", "F8_E4M3", shape),
                    OutTensor(names.scale_name(name), "", "F8_E8M0", (-(-N // 128), -(-K // 128)))]
        elif storage == "fp4":
            K = rest[0]
            out += [OutTensor(name, "", "I8", (N, K // 2)),
                    OutTensor(names.scale_name(name), "", "F8_E8M0", (N, K // 32))]
        else:
            out.append(OutTensor(name, "", {"bf16": "BF16", "f32": "F32", "int": "I64"}[storage], shape))
    return out


def random_tensor(o: OutTensor, rng: np.random.Generator, n_experts: int) -> np.ndarray:
    n = int(np.prod(o.shape))
    if o.tag == "F8_E4M3":
        b = rng.integers(0, 256, n, dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] = 0x38  # e4m3fn NaN codes -> 1.0
        return b.view(ml_dtypes.float8_e4m3fn).reshape(o.shape)
    if o.tag == "F8_E8M0":  # powers of two around 2^-10
        return rng.integers(112, 122, n, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).reshape(o.shape)
    if o.tag == "I8":  # packed e2m1 codes: every byte is valid
        return rng.integers(-128, 128, n, dtype=np.int8).reshape(o.shape)
    if o.tag == "I64":
        return rng.integers(0, n_experts, o.shape, dtype=np.int64)
    x = rng.standard_normal(o.shape, dtype=np.float32) * np.float32(0.02)
    return x.astype(ml_dtypes.bfloat16) if o.tag == "BF16" else x


def write_source(cfg: ModelConfig, out: Path, seed: int = 0) -> int:
    """Stream the release to ~1 GB shards one tensor at a time (memory: one tensor)."""
    layout = release_layout(cfg)
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for o in layout:
        if groups[-1] and size + o.nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(o)
        size += o.nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    out.mkdir(parents=True)
    for i, entries in enumerate(groups):
        sh = Shard(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", "", entries)
        f = ShardFile(out, sh)
        for o in entries:
            f.write(o, 0, random_tensor(o, rng, cfg.n_routed_experts))
            weight_map[o.name] = sh.relpath
        f.finish()
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    conf = official_config_dict(cfg)
    conf.update(torch_dtype="bfloat16", expert_dtype="fp4",
                quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "scale_fmt": "ue8m0", "weight_block_size": [128, 128]})
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def copy_throughput(src: Path, dst: Path, fsync: bool, trials: int = 3) -> float:
    """Median GB/s of copying the source shards (the disk of a shared VM is noisy: several trials)."""
    rates = []
    for _ in range(trials):
        dst.mkdir()
        t = time.perf_counter()
        n = 0
        for p in sorted(src.glob("*.safetensors")):
            shutil.copyfile(p, dst / p.name)
            if fsync:
                fd = os.open(dst / p.name, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            n += p.stat().st_size
        rates.append(n / (time.perf_counter() - t) / 1e9)
        shutil.rmtree(dst)
        os.sync()
    return float(np.median(rates))


def run_convert(src: Path, dst: Path, fmt: str, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "tools.cli", "convert", "--src", str(src), "--dst", str(dst), "--format", fmt,
           "--json"] + (["--workers", str(workers)] if workers else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:  # files: no pipe to fill up
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over every child so far)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {err}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(seconds_wall=dt, cpu_seconds=ru.ru_utime + ru.ru_stime, peak_rss_mb=ru.ru_maxrss / 1024,
               log=err.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="minimum source checkpoint size (GB)")
    ap.add_argument("--formats", default="bf16,w8a8", help="comma-separated formats to convert to")
    ap.add_argument("--workers", default="", help="comma-separated worker counts (default: the command's)")
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated source checkpoint")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    free = shutil.disk_usage(base).free
    print(f"temp dir {base}: {free / 1e9:.1f} GB free; cpus {os.cpu_count()}")
    try:
        cfg = bench_config(int(args.size_gb * 1e9))
        src = base / "src"
        t = time.perf_counter()
        src_bytes = write_source(cfg, src)
        os.sync()  # no writeback of the fresh source during the measurements
        print(f"source: {cfg.n_layers} layers, d={cfg.dim}, {cfg.n_routed_experts} experts x I={cfg.moe_inter_dim} "
              f"(FP4), vocab {cfg.vocab_size}: {src_bytes / 1e9:.2f} GB in "
              f"{len(list(src.glob('*.safetensors')))} shards, written in {time.perf_counter() - t:.1f}s")
        copy = copy_throughput(src, base / "copy", fsync=False)
        copy_sync = copy_throughput(src, base / "copy", fsync=True)
        print(f"plain copy (shutil.copyfile, page cache warm, median of 3): {copy:.2f} GB/s; with fsync per file: "
              f"{copy_sync:.2f} GB/s")
        print(f"{'format':8s} {'workers':>7s} {'seconds':>8s} {'src GB/s':>9s} {'vs copy':>8s} {'vs copy+fsync':>13s} "
              f"{'out GB':>7s} {'out GB/s':>8s} {'cpu s':>6s} {'GB/cpu-s':>8s} {'peak RSS MB':>11s} {'load avg':>8s}")
        for fmt in args.formats.split(","):
            for w in [int(x) for x in args.workers.split(",") if x] or [None]:
                dst = base / f"out-{fmt}"
                r = run_convert(src, dst, fmt, w)
                gbs = src_bytes / r["seconds_wall"] / 1e9
                load = os.getloadavg()[0]  # other processes on the machine skew the figures
                print(f"{fmt:8s} {w or 'default':>7} {r['seconds_wall']:8.1f} {gbs:9.2f} {gbs / copy:8.2f} "
                      f"{gbs / copy_sync:13.2f} {r['bytes'] / 1e9:7.2f} {r['bytes'] / 1e9 / r['seconds_wall']:8.2f} "
                      f"{r['cpu_seconds']:6.1f} {src_bytes / 1e9 / r['cpu_seconds']:8.3f} "
                      f"{r['peak_rss_mb']:11.0f} {load:8.2f}")
                print(f"         {r['log']}")
                shutil.rmtree(dst)
                os.sync()
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
