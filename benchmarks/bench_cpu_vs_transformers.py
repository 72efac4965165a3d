"""CPU benchmark: our NumPy backend vs transformers' DeepseekV4ForCausalLM holding the same weights.

Prints prefill and decode throughput of both, their ratio against the port's targets, the greedy-token
agreement, and how close decode comes to the machine's memory-bandwidth limit (decode of one token
has to stream every weight it touches once). It prints figures only and never fails on timings.

    python benchmarks/bench_cpu_vs_transformers.py                      # bench-small, P=512, N=32
    python benchmarks/bench_cpu_vs_transformers.py --preset tiny --prompt-len 64 --new-tokens 8
    python benchmarks/bench_cpu_vs_transformers.py --json > bench.json  # figures as JSON, text on stderr
    python benchmarks/bench_cpu_vs_transformers.py --profile 15         # + cProfile top entries of ours
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import glob
import json
import math
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TextIO

import numpy as np
import torch
import transformers

from ascend.backends import get_backend
from common.config import CSA, HCA, ModelConfig
from common.generate import SamplingParams, generate
from common.loading import load_model
from common.model import Model
from common.names import expected_tensors, parse_expert
from tools.testing.hf_bridge import hf_model_from_weights

TARGET_DECODE = 1.5  # ours/transformers decode tokens/s the port aims for
TARGET_PREFILL = 1.0
WARMUP_PROMPT = 160  # > the HCA ratio (128) so the warm-up also runs the compressors' emit path
WARMUP_NEW = 4
BW_REPEATS = 7
NOISY_CORES = 0.1  # other processes' average load above which the figures are flagged


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    tokens: list[int]


# ---- environment ---------------------------------------------------------------------------------
def blas_threads() -> int | None:
    """OpenBLAS threads NumPy will use (None if the BLAS is not a recognisable OpenBLAS)."""
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for lib in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                return int(fn())
    return None


def rss_kib() -> int | None:
    """Current resident set size (Linux /proc); the peak comes from getrusage at the end."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process) from /proc; None off Linux.

    The difference between the two CPU figures is what other processes ran during a phase: on a
    shared box with as many BLAS / OpenMP threads as cores, one busy neighbour can slow a spinning
    thread team by 10x or more, so a phase with neighbours is flagged rather than silently reported.
    """
    try:
        hz = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # user nice system irq softirq steal
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # comm (field 2) may hold spaces
        own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15), all threads
        return time.perf_counter(), busy / hz, own / hz
    except (OSError, ValueError, IndexError):
        return None


def other_cores(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """Average number of cores other processes kept busy between two snapshots."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


# ---- memory bandwidth ----------------------------------------------------------------------------
def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # first call pays lazy thread-pool start-up, not memory traffic
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(mib: int, repeats: int = BW_REPEATS) -> dict[str, Any]:
    """Read bandwidth (GB/s, 1e9 bytes) of a few kernels over one float32 array much larger than any cache.
    The arrays are freed on return, before the models are built.

    The limit is the best read-only figure: decode's weight streaming is read-only and runs on all
    cores (BLAS gemv, torch), so the single-threaded NumPy sum alone would understate the machine.
    """
    n = mib * 2**20 // 4
    a = np.ones(n, dtype=np.float32)  # np.ones writes every page, so page faults are not timed
    nbytes = a.nbytes
    mat = a.reshape(-1, 4096)
    vec = np.ones(4096, dtype=np.float32)
    ta = torch.from_numpy(a)
    read_tests: dict[str, Callable[[], Any]] = {
        "numpy sum (1 thread)": lambda: np.add.reduce(a),
        "BLAS sgemv W@x (as decode)": lambda: mat @ vec,
        "torch sum (all threads)": lambda: ta.sum(),
    }
    tests = {k: nbytes / _best_seconds(fn, repeats) / 1e9 for k, fn in read_tests.items()}
    b = np.empty_like(a)
    # a copy moves the bytes twice (read + write, STREAM's convention); informative, not the limit
    copy = 2 * nbytes / _best_seconds(lambda: np.copyto(b, a), repeats) / 1e9
    limit_name = max(tests, key=tests.__getitem__)
    return {"array_mib": mib, "repeats": repeats, "read_gbps": tests, "copy_rw_gbps": copy,
            "limit_name": limit_name, "limit_gbps": tests[limit_name]}


# ---- bytes one decode token reads ----------------------------------------------------------------
def decode_weight_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Weight bytes streamed per decode token, by group: every tensor once, but one embedding row,
    one tid2eid row and only `n_activated_experts` routed experts per MoE layer (all experts of a
    layer have the same size, so which ones are visited does not change the count)."""
    groups = dict.fromkeys(("embedding row", "head", "attention", "mHC + norms", "router", "shared experts",
                            "routed experts"), 0)
    k = cfg.n_activated_experts
    for name, shape, kind in expected_tensors(cfg, with_mtp=False):
        size = math.prod(shape)
        if name == "embed.weight":
            groups["embedding row"] += shape[1] * 4
        elif kind == "i":  # tid2eid: the token's row of int64 expert ids
            groups["router"] += shape[1] * 8
        elif ".ffn.experts." in name:
            parsed = parse_expert(name)
            if parsed is not None and parsed[1] < k:
                groups["routed experts"] += size * 4
        elif name == "head.weight":
            groups["head"] += size * 4
        elif ".attn." in name:  # projections, compressor, indexer, sinks
            groups["attention"] += size * 4
        elif ".ffn.gate." in name:
            groups["router"] += size * 4
        elif ".shared_experts." in name:
            groups["shared experts"] += size * 4
        else:  # hc_* mixing tensors, attn/ffn/final norms
            groups["mHC + norms"] += size * 4
    return groups


def cache_bytes_at(cfg: ModelConfig, pos: int) -> int:
    """Least KV-cache bytes a decode token at `pos` must read (window rows, HCA entries, CSA indexer keys
    plus its top-k entries). Not part of the bound, printed to show it is small next to the weights."""
    total = 0
    for i in range(cfg.n_layers):
        kind, r = cfg.attn_kinds[i], cfg.compress_ratios[i]
        total += min(pos + 1, cfg.window) * cfg.head_dim * 4
        n = (pos + 1) // r if r else 0
        if kind == HCA:
            total += n * cfg.head_dim * 4
        elif kind == CSA:
            total += n * cfg.index_head_dim * 4 + min(n, cfg.index_topk) * cfg.head_dim * 4
    return total


# ---- the two implementations ---------------------------------------------------------------------
def run_ours(model: Model, prompt: list[int], n_new: int) -> Run:
    res = generate(model, [prompt], SamplingParams(max_new_tokens=n_new, stop_on_eos=False))
    return Run(res.prefill_seconds, res.decode_seconds, [int(t) for t in res.output_ids[0]])


def run_hf(hf: Any, prompt: list[int], n_new: int) -> Run:
    """Greedy with the same split as generate(): prefill = forward + first token, decode = n_new - 1 steps.

    A hand-written loop of single-token forwards measures the model rather than generate()'s
    bookkeeping. logits_to_keep=1 in prefill, as generate() does: our prefill also computes only the
    last row's logits, and the full [P, vocab] head would add P x vocab x dim MACs to transformers only.
    """
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        cache = out.past_key_values
        toks = [nxt]
        for _ in range(n_new - 1):
            out = hf(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            toks.append(nxt)
        t2 = time.perf_counter()
    return Run(t1 - t0, t2 - t1, toks)


def timed_runs(fn: Callable[[list[int], int], Run], prompt: list[int], n_new: int,
               repeats: int) -> tuple[list[Run], float | None]:
    """Warm-up then `repeats` timed runs; also the average cores other processes used meanwhile."""
    fn(prompt[:WARMUP_PROMPT], WARMUP_NEW)  # warm-up: thread pools, allocator, lazy init
    before = cpu_snapshot()
    runs = [fn(prompt, n_new) for _ in range(repeats)]
    return runs, other_cores(before, cpu_snapshot())


def summarize(runs: list[Run], prompt_len: int, n_new: int, others: float | None) -> dict[str, Any]:
    """Median (headline) and best of the repeats; decode tok/s counts the n_new - 1 decode steps."""
    pre = [r.prefill_s for r in runs]
    dec = [r.decode_s for r in runs]
    steps = n_new - 1
    return {
        "prefill_s": pre, "decode_s": dec,
        "prefill_tps": prompt_len / statistics.median(pre), "prefill_tps_best": prompt_len / min(pre),
        "decode_tps": steps / statistics.median(dec), "decode_tps_best": steps / min(dec),
        "decode_ms_per_token": 1e3 * statistics.median(dec) / steps,
        "tokens": runs[0].tokens,
        "runs_identical": all(r.tokens == runs[0].tokens for r in runs),  # greedy must be deterministic
        "other_processes_cores": others,
    }


# ---- profile -------------------------------------------------------------------------------------
def _top_entries(prof: cProfile.Profile, top: int) -> dict[str, Any]:
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        where = func if file == "~" else f"{'/'.join(file.split(os.sep)[-2:])}:{line}({func})"
        rows.append({"function": where, "ncalls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    return {"total_s": st.total_tt, "top": rows[:top]}  # type: ignore[attr-defined]


def profile_ours(model: Model, prompt: list[int], n_new: int, top: int) -> dict[str, Any]:
    """cProfile one prefill forward and the n_new - 1 decode forwards of ours, separately (greedy)."""
    B = model.B
    caches = [model.new_cache()]
    prof = cProfile.Profile()
    prof.enable()
    out = model.forward(caches, [prompt])
    prof.disable()
    result = {"prefill": _top_entries(prof, top)}
    nxt = int(np.argmax(B.to_numpy(out.logits[0])[-1]))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_new - 1):
        out = model.forward(caches, [[nxt]])
        nxt = int(np.argmax(B.to_numpy(out.logits[0])[-1]))
    prof.disable()
    result["decode"] = _top_entries(prof, top)
    return result


# ---- report --------------------------------------------------------------------------------------
def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


def print_report(r: dict[str, Any], out: TextIO) -> None:
    def say(s: str = "") -> None:
        print(s, file=out)

    a, m, env = r["args"], r["model"], r["env"]
    ours, hf = r["ours"], r["transformers"]
    say(f"DeepSeek-V4 CPU benchmark: ours (NumPy backend) vs transformers {env['transformers']} "
        f"(torch {env['torch']}), same weights")
    say(f"model: preset {a['preset']}, {m['params'] / 1e6:.1f}M params ({m['weight_bytes'] / 1e9:.2f} GB float32), "
        f"{m['n_layers']} layers [{', '.join(m['attn_kinds'])}], dim {m['dim']}, vocab {m['vocab']}, "
        f"top-{m['experts_per_tok']} of {m['experts']} experts")
    say(f"machine: {env['cpu_count']} cores, threads torch {env['torch_threads']}, BLAS {env['blas_threads']}; "
        f"numpy {env['numpy']}, python {env['python']}; transformers experts impl {env['hf_experts_impl']}; "
        f"load avg (1 min) {env['loadavg_1m_before']:.2f} before, {env['loadavg_1m_after']:.2f} after")
    say(f"run: prompt {a['prompt_len']} tokens, {a['new_tokens']} new tokens (greedy, {a['new_tokens'] - 1} decode "
        f"steps); one warm-up each, then {a['repeats']} timed runs; figures are MEDIANS (best in brackets)")
    b = r["build_s"]
    say(f"build: weights (random init) {b['weights']:.2f} s, ours Model() {b['ours']:.3f} s, "
        f"transformers model {b['transformers']:.2f} s")
    say()
    say(f"{'':18}{'ours':>20}{'transformers':>20}{'ours/tf':>10}   target")
    for key, label, target in (("prefill_tps", "prefill tok/s", TARGET_PREFILL),
                               ("decode_tps", "decode tok/s", TARGET_DECODE)):
        ratio = r["ratios"][key]
        cells = [f"{d[key]:.1f} ({d[key + '_best']:.1f})" for d in (ours, hf)]
        say(f"{label:18}{cells[0]:>20}{cells[1]:>20}{ratio:>9.2f}x   >= {target:.1f}x {_verdict(ratio, target)}")
    say(f"{'prefill s':18}{statistics.median(ours['prefill_s']):>20.3f}{statistics.median(hf['prefill_s']):>20.3f}")
    say(f"{'decode ms/token':18}{ours['decode_ms_per_token']:>20.1f}{hf['decode_ms_per_token']:>20.1f}")
    ag = r["agreement"]
    line = f"greedy agreement: {ag['leading_identical']}/{ag['n']} identical leading tokens"
    if ag["leading_identical"] < ag["n"]:
        i = ag["leading_identical"]
        line += f" (first difference at {i}: ours {ours['tokens'][i]}, transformers {hf['tokens'][i]})"
    if not (ours["runs_identical"] and hf["runs_identical"]):
        line += f"; NOTE runs not deterministic (ours {ours['runs_identical']}, transformers {hf['runs_identical']})"
    say(line)
    busy = [(name, d["other_processes_cores"]) for name, d in (("ours", ours), ("transformers", hf))]
    if all(v is not None for _, v in busy):
        text = ", ".join(f"{name} {v:.2f}" for name, v in busy)
        noisy = any(v > NOISY_CORES for _, v in busy)
        say(f"other processes during the timed runs (avg cores busy): {text}"
            + ("   WARNING: shared CPU, figures unreliable; rerun on an idle machine" if noisy else ""))
    say()
    bw = r["bandwidth"]
    say(f"memory bandwidth ({bw['array_mib']} MiB float32 array, best of {bw['repeats']}, GB = 1e9 bytes):")
    for k, v in bw["read_gbps"].items():
        say(f"  {k:30}{v:7.1f} GB/s" + ("   <- limit (best read test)" if k == bw["limit_name"] else ""))
    say(f"  {'numpy copy (read + write)':30}{bw['copy_rw_gbps']:7.1f} GB/s   (not used)")
    d = r["decode_bound"]
    groups = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in d["weight_bytes_by_group"].items())
    say(f"decode weight bytes/token: {d['bytes_per_token'] / 1e6:.1f} MB ({groups} MB)")
    say(f"  KV cache read at position {d['cache_pos']}: >= {d['cache_bytes'] / 1e6:.2f} MB (not in the bound)")
    say(f"decode bound: {bw['limit_gbps']:.1f} GB/s / {d['bytes_per_token'] / 1e6:.1f} MB = "
        f"{d['bound_tps']:.1f} tok/s; ours {d['ours_pct']:.1f}% of it, transformers {d['hf_pct']:.1f}%")
    say()
    mem = r["memory"]
    stages = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in mem["rss_kib_after"].items() if v is not None)
    say(f"peak RSS {mem['peak_rss_kib'] / 2**20:.2f} GiB (ru_maxrss {mem['peak_rss_kib']} KiB, before the bandwidth "
        f"test's scratch arrays); RSS after: {stages} GiB")
    if "profile" in r:
        for phase, p in r["profile"].items():
            say()
            say(f"cProfile of ours, {phase} (total {p['total_s']:.3f} s under the profiler; sorted by tottime):")
            say(f"  {'tottime':>8} {'%':>5} {'cumtime':>8} {'ncalls':>7}  function")
            for e in p["top"]:
                pct = 100 * e["tottime"] / p["total_s"] if p["total_s"] else 0.0
                say(f"  {e['tottime']:8.3f} {pct:5.1f} {e['cumtime']:8.3f} {e['ncalls']:7d}  {e['function']}")


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-small", help="random-weight preset (bench-small, tiny)")
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens P (default 512)")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens N, >= 2 (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (default 3)")
    ap.add_argument("--bw-mib", type=int, default=1024, help="bandwidth test array size in MiB (default 1024)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="also cProfile ours' prefill and decode and print the top K entries")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout (text goes to stderr)")
    args = ap.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.bw_mib < 16:
        ap.error("need --prompt-len >= 1, --new-tokens >= 2, --repeats >= 1, --bw-mib >= 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text_out = sys.stderr if args.json else sys.stdout
    # same thread budget for both: torch explicitly, OpenBLAS (NumPy) uses every core by default
    torch.set_num_threads(os.cpu_count() or 1)
    rss: dict[str, int | None] = {"start": rss_kib()}
    load_before = os.getloadavg()  # other processes on the same cores skew every figure; show it

    def progress(msg: str) -> None:
        print(f"... {msg}", file=sys.stderr, flush=True)

    progress(f"building preset {args.preset}")
    t0 = time.perf_counter()
    lm = load_model(args.preset)
    t1 = time.perf_counter()
    cfg = lm.cfg
    model = Model(cfg, lm.weights, get_backend("cpu"))
    t2 = time.perf_counter()
    rss["ours built"] = rss_kib()
    hf = hf_model_from_weights(cfg, lm.weights)
    t3 = time.perf_counter()
    rss["transformers built"] = rss_kib()
    hf_impl = getattr(hf.config, "_experts_implementation", None)  # which MoE kernel transformers dispatches to

    n_params = sum(int(v.size) for k, v in lm.weights.items() if not k.startswith("mtp."))
    rng = np.random.default_rng(args.seed)
    # ids >= 2 keep clear of bos/eos; the hash layer routes by token id, so random ids spread experts
    prompt = [int(t) for t in rng.integers(2, cfg.vocab_size, args.prompt_len)]

    progress(f"ours: warm-up + {args.repeats} runs")
    ours_runs, ours_others = timed_runs(partial(run_ours, model), prompt, args.new_tokens, args.repeats)
    rss["ours runs"] = rss_kib()
    progress(f"transformers: warm-up + {args.repeats} runs")
    hf_runs, hf_others = timed_runs(partial(run_hf, hf), prompt, args.new_tokens, args.repeats)
    rss["transformers runs"] = rss_kib()

    ours = summarize(ours_runs, args.prompt_len, args.new_tokens, ours_others)
    theirs = summarize(hf_runs, args.prompt_len, args.new_tokens, hf_others)
    lead = 0
    for x, y in zip(ours["tokens"], theirs["tokens"], strict=True):
        if x != y:
            break
        lead += 1

    profile = None
    if args.profile:
        progress("profiling ours")
        profile = profile_ours(model, prompt, args.new_tokens, args.profile)

    # peak RSS of the benchmark proper, before the bandwidth test adds its scratch arrays (ru_maxrss:
    # KiB on Linux); the bandwidth test runs last, with the models freed, so the peak is the models'
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del model, hf, lm
    progress("measuring memory bandwidth")
    bw = measure_bandwidth(args.bw_mib)

    groups = decode_weight_bytes(cfg)
    per_token = sum(groups.values())
    bound = bw["limit_gbps"] * 1e9 / per_token
    cache_pos = args.prompt_len + args.new_tokens // 2
    result: dict[str, Any] = {
        "args": {"preset": args.preset, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "repeats": args.repeats, "seed": args.seed, "statistic": "median"},
        "env": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "blas_threads": blas_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
                "numpy": np.__version__, "python": platform.python_version(),
                "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0],
                "hf_experts_impl": hf_impl},
        "model": {"params": n_params, "weight_bytes": n_params * 4, "n_layers": cfg.n_layers,
                  "attn_kinds": list(cfg.attn_kinds[:cfg.n_layers]), "dim": cfg.dim, "vocab": cfg.vocab_size,
                  "experts": cfg.n_routed_experts, "experts_per_tok": cfg.n_activated_experts},
        "build_s": {"weights": t1 - t0, "ours": t2 - t1, "transformers": t3 - t2},
        "ours": ours,
        "transformers": theirs,
        "ratios": {"prefill_tps": ours["prefill_tps"] / theirs["prefill_tps"],
                   "decode_tps": ours["decode_tps"] / theirs["decode_tps"]},
        "targets": {"prefill_tps": TARGET_PREFILL, "decode_tps": TARGET_DECODE},
        "agreement": {"leading_identical": lead, "n": args.new_tokens},
        "bandwidth": bw,
        "decode_bound": {"weight_bytes_by_group": groups, "bytes_per_token": per_token, "bound_tps": bound,
                         "ours_pct": 100 * ours["decode_tps"] / bound, "hf_pct": 100 * theirs["decode_tps"] / bound,
                         "cache_pos": cache_pos, "cache_bytes": cache_bytes_at(cfg, cache_pos)},
    }
    result["passed"] = {k: result["ratios"][k] >= result["targets"][k] for k in result["ratios"]}

    if profile is not None:
        result["profile"] = profile
    result["memory"] = {"peak_rss_kib": peak_kib, "rss_kib_after": rss,
                        "peak_rss_kib_with_bandwidth_test": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    print_report(result, text_out)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
