"""Multi-rank `dsv4 generate`: attention data parallel + MoE expert parallel over torch.distributed.

Layout: rank r of W owns prompts r, r+W, r+2W, ... (round robin) with their caches, runs attention, norms
and the shared expert for them, and holds routed experts [r*E/W, (r+1)*E/W) (loaded alone, as `dsv4
convert --ep W` splits them). The MoE token exchange is `ascend.ep.EPBackend` around the compute backend.

Lockstep: MoE layers are collectives, so every rank runs the same number of forward calls: one prefill,
then decode steps while ANY rank still has an active sequence (decided by an all_reduce of the per-prompt
active flags); a rank with nothing left runs zero-token forwards. Sampling reproduces
`common.generate.generate`: every rank seeds the same generator and draws, at each step, the uniforms the
single-process run draws for the whole active batch, keeping those of its own sequences. Greedy output
therefore equals the single-process output; with a seed and temperature > 0 each sequence receives the
same random draws as in the single-process run, so it samples the same tokens unless a draw falls within
float rounding of a probability boundary (MoE partial sums are added in a different order across ranks).
This needs the backend's `sample` to draw `rng.random(rows)` once per call, as the NumPy reference does.

Launch: `--nproc N` spawns N local ranks with multiprocessing's spawn context. The launcher hosts the
TCPStore itself (port 0: no port race) and hands it to the ranks the way torchrun's agent does
(MASTER_ADDR / MASTER_PORT + TORCHELASTIC_USE_AGENT_STORE), so a rank initialises exactly as under
torchrun (`env://`). Spawning rather than re-executing torchrun keeps the launcher in control of its
children: it watches their sentinels, and when one exits non-zero or dies it stops the others and reports
that rank and its exit code. Under an external torchrun (RANK / WORLD_SIZE in the environment) the
command runs as one rank and rank 0 prints the result.

Faults: collectives time out after `--dist-timeout` seconds; a rank whose collective fails prints one
line and exits with EXIT_COLLECTIVE. Test hook (for the fault-handling tests only):
DSV4_FAULT_INJECT="rank:R,step:S[,exit:C][,hang:1]" makes rank R die abruptly before decode step S
(step 0 = before the prefill): SIGKILL by default, os._exit(C) with `exit:C`; `hang:1` makes it stop
answering instead, so the other ranks run into the collective timeout.

This module imports torch only inside functions: the single-process CLI must not need it.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULT_ENV = "DSV4_FAULT_INJECT"
EXIT_FAILED = 1  # the launcher's exit code when a rank failed
EXIT_COLLECTIVE = 75  # a rank whose collective failed (usually because another rank died first)
DEFAULT_TIMEOUT = 60.0
STOP_GRACE = 3.0  # seconds the launcher waits after SIGTERM before SIGKILL
LOAD_TIMEOUT = 1800.0  # seconds ranks wait for each other to finish loading weights


class RankFailed(RuntimeError):
    """A rank exited non-zero or was killed; the launcher stopped the others."""

    def __init__(self, rank: int, code: int | None, detail: str = ""):
        self.rank, self.code = rank, code
        if code is None:
            what = "did not finish"
        elif code < 0:
            try:
                what = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with code {code}"
            if code == EXIT_COLLECTIVE:
                what += " (a collective failed)"
        super().__init__(f"rank {rank} {what}{detail}")


class SetupError(RuntimeError):
    """A rank cannot start: the device runtime or a backend is missing."""


def in_torchrun() -> bool:
    """True when this process was started as one rank by torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_distributed(args: Any) -> bool:
    """`dsv4 generate` takes the multi-rank path for --nproc other than 1 (0 or less is refused there)."""
    return getattr(args, "nproc", 1) != 1 or in_torchrun()


# ---- one rank ------------------------------------------------------------------------------------

def init_distributed(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int, int]:
    """Join the process group from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo on cpu, hccl on npu after binding the rank to its card. -> (rank, world, local_rank)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "npu":
        try:
            import torch_npu
        except Exception as e:  # ImportError, or OSError / RuntimeError from a missing or broken CANN
            raise SetupError(f"--device npu needs torch_npu and CANN ({type(e).__name__}: {e})") from None
        torch_npu.npu.set_device(local_rank)
        backend = "hccl"
    else:
        backend = "gloo"
        # ranks share the node's cores: keep torch's intra-op pool to this rank's share
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return rank, world, local_rank


def detect_soc(device: str) -> str:
    """The SoC family of this rank's NPU (A2 when it cannot be told, and on a CPU)."""
    if device == "npu":
        from . import soc as soc_table

        try:
            import torch_npu

            found = soc_table.soc_of_chip(torch_npu.npu.get_device_name())
        except Exception:  # the runtime may refuse the query; A2 limits are the strictest
            found = None
        return found or soc_table.A2
    return "A2"


def make_backend(name: str, device: str, soc: str | None = None) -> Any:
    """The compute backend: `cpu` = NumPy reference; `torch` = ascend.torch_backend.TorchBackend on `device`
    (torch_npu on an NPU, its CPU stand-ins otherwise); any other name through ops.get_backend."""
    from ops import BackendUnavailable, get_backend

    if name != "torch":
        return get_backend(name)
    try:
        from ascend.torch_backend import TorchBackend
    except ImportError as e:
        raise BackendUnavailable(f"--backend torch needs ascend/torch_backend.py ({e})") from None
    import inspect

    params = inspect.signature(TorchBackend).parameters
    kw = {k: v for k, v in (("device", device), ("soc", soc)) if k in params}
    return TorchBackend(**kw)


class _SharedDraws:
    """Stands in for the sampler's numpy Generator: hands the sampler this rank's share of the uniforms
    that the single-process run draws for the whole batch."""

    def __init__(self, u: Any):
        self.u = u

    def random(self, size: Any = None) -> Any:
        if self.u is None or size != len(self.u):
            raise RuntimeError(f"the backend's sampler asked for rng.random({size!r}); multi-rank sampling "
                               f"reproduces single-process draws only for samplers that draw one uniform per row")
        return self.u


def _parse_fault(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    try:
        spec = {k.strip(): int(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected rank:R,step:S[,exit:C][,hang:1]") from None
    if "rank" not in spec or "step" not in spec or set(spec) - {"rank", "step", "exit", "hang"}:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected rank:R,step:S[,exit:C][,hang:1]")
    return spec


def _maybe_fault(fault: dict[str, int] | None, rank: int, step: int) -> None:
    if fault and fault["rank"] == rank and fault["step"] == step:
        if fault.get("hang"):
            print(f"{FAULT_ENV}: rank {rank} hangs before decode step {step}", file=sys.stderr, flush=True)
            while True:  # until the launcher (or torchrun) kills it
                time.sleep(60)
        print(f"{FAULT_ENV}: rank {rank} dies before decode step {step}", file=sys.stderr, flush=True)
        if "exit" in fault:
            os._exit(fault["exit"])
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RankContext:
    """What the lockstep loop needs from the process group."""

    rank: int
    world: int
    ctrl: Any  # a gloo group for control-plane traffic (flags, seed, results), also on NPU machines


def generate_dp(model: Any, prompts: Sequence[Sequence[int]], params: Any, ctx: RankContext,
                keep_prompt_logits: bool = False, on_step: Callable[[int], None] | None = None) -> Any:
    """Data-parallel generation in lockstep; returns the whole batch's GenerationResult on rank 0 (None on
    the others). Per-sequence results equal `common.generate.generate` on one process (see module doc)."""
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    from common.generate import GenerationResult, advance

    from .ep import collective

    B, rank, world = model.B, ctx.rank, ctx.world
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n = len(prompts)
    mine = [i for i in range(n) if i % world == rank]
    fault = _parse_fault(os.environ.get(FAULT_ENV))

    # one seed for all ranks: rank 0 draws it when none is given
    seed_t = torch.tensor([params.seed if params.seed is not None else
                           (random.SystemRandom().randrange(2**32) if rank == 0 else 0)], dtype=torch.int64)
    if params.seed is None:
        collective("seed broadcast", dist.broadcast, seed_t, 0, group=ctx.ctrl)
    seed = int(seed_t[0])
    rng = np.random.default_rng(seed)
    eos = set(model.cfg.eos_token_id) if params.stop_on_eos else set()
    caches = {i: model.new_cache() for i in mine}
    outputs: dict[int, list[int]] = {i: [] for i in mine}
    reasons = {i: "length" for i in mine}
    sampling = params.temperature > 0

    def sample(logits: list[Any], active_global: list[int], local: list[int]) -> Any:
        u = rng.random(len(active_global)) if sampling else None  # the single-process draws, whole batch
        if not local:
            return []
        if u is not None:
            pos = {s: j for j, s in enumerate(active_global)}
            u = u[[pos[s] for s in local]]
        return B.sample(B.cat(logits), params.temperature, params.top_k, params.top_p, _SharedDraws(u))

    _maybe_fault(fault, rank, 0)
    t0 = time.perf_counter()
    out = model.forward([caches[i] for i in mine], [prompts[i] for i in mine], all_logits=keep_prompt_logits)
    prompt_logits = {i: B.to_numpy(lg) for i, lg in zip(mine, out.logits, strict=True)} if keep_prompt_logits \
        else None
    nxt = sample([lg[-1:] for lg in out.logits], list(range(n)), mine) if params.max_new_tokens else []
    t1 = time.perf_counter()

    active = list(mine)
    steps = 0
    while params.max_new_tokens:
        active = advance(outputs, reasons, active, nxt, eos, params.max_new_tokens)
        flags = torch.zeros(n, dtype=torch.int64)
        flags[active] = 1
        collective("active-sequence all_reduce", dist.all_reduce, flags, group=ctx.ctrl)
        active_global = torch.nonzero(flags).flatten().tolist()
        if not active_global:
            break
        _maybe_fault(fault, rank, steps + 1)
        out = model.forward([caches[s] for s in active], [[outputs[s][-1]] for s in active])
        nxt = sample(out.logits, active_global, active)
        steps += 1
        if on_step:
            on_step(steps)
    t2 = time.perf_counter()

    part = {"outputs": outputs, "reasons": reasons, "logits": prompt_logits}
    parts: list[Any] = [None] * world if rank == 0 else None
    collective("result gather", dist.gather_object, part, parts, dst=0, group=ctx.ctrl)
    if rank != 0:
        return None
    all_out: dict[int, list[int]] = {}
    all_reasons: dict[int, str] = {}
    all_logits: dict[int, Any] = {}
    for p in parts:
        all_out.update(p["outputs"])
        all_reasons.update(p["reasons"])
        if p["logits"] is not None:
            all_logits.update(p["logits"])
    return GenerationResult(prompts, [all_out[i] for i in range(n)], [all_reasons[i] for i in range(n)],
                            [all_logits[i] for i in range(n)] if keep_prompt_logits else None,
                            t1 - t0, t2 - t1, steps, {"seed": seed})


@dataclass
class Job:
    """One multi-rank generation request (picklable: it crosses the spawn boundary)."""

    model: str
    prompts: list[list[int]]
    params: Any  # common.generate.SamplingParams
    backend: str = "cpu"
    device: str = "cpu"
    moe_comm: list[str] = field(default_factory=lambda: ["auto"])  # strategies to run, one generation each
    soc: str | None = None
    keep_prompt_logits: bool = False
    timeout: float = DEFAULT_TIMEOUT
    result_path: str | None = None  # rank 0 pickles its results here (spawned ranks)
    record_ops: str | None = None  # rank 0 records every op output of its first prompt to this .npz


@dataclass
class RunResult:
    strategy: str
    result: Any  # GenerationResult of the whole batch
    moe_calls: dict[str, int]  # strategy actually used -> MoE layer calls on rank 0
    source: str
    backend: str
    nproc: int


def run_rank(job: Job, log: Callable[[str], None] | None = None) -> list[RunResult] | None:
    """Everything one rank does: join the group, load its expert slice, build the EP backend and run the
    lockstep generation once per requested strategy. Rank 0 returns (and, given result_path, pickles)
    the results; the other ranks return None."""
    from datetime import timedelta

    import torch.distributed as dist

    from common.loading import load_model
    from common.model import Model

    from .ep import EPBackend, ExpertParallel, collective, expert_slice

    rank, world, _ = init_distributed(job.device, job.timeout)
    say = (log or (lambda m: print(m, file=sys.stderr, flush=True))) if rank == 0 else (lambda m: None)
    try:
        cfg = probe_model(job.model)[0]
        first, count = expert_slice(cfg.n_routed_experts, world, rank)
        soc = job.soc or detect_soc(job.device)
        # groups before loading: new_group is collective, and ranks finish loading at different times
        ep = ExpertParallel.create(job.moe_comm[0], soc, job.device)
        ctrl = dist.new_group(backend="gloo")
        t0 = time.perf_counter()
        lm = load_model(job.model, say, experts=range(first, first + count), rank=rank, world=world)
        backend = make_backend(job.backend, job.device, soc)
        ep_backend = EPBackend(backend, ep)
        recorder = None
        if job.record_ops and rank == 0:
            from ops.recording import RecordingBackend

            recorder = RecordingBackend(ep_backend, job.backend)
        model = Model(lm.cfg, lm.weights, recorder or ep_backend, expert_range=(first, count))
        # loading may take far longer than a collective should: wait for the slowest rank here, with its own
        # bound, so --dist-timeout only has to cover the generation's collectives
        collective("model-loaded barrier", dist.monitored_barrier, group=ctrl,
                   timeout=timedelta(seconds=max(LOAD_TIMEOUT, job.timeout)), wait_all_ranks=True)
        say(f"loaded {lm.source} in {time.perf_counter() - t0:.2f}s on {world} ranks: {cfg.n_layers} layers, "
            f"backend {backend.name}, {count} routed experts per rank, MoE comm {'/'.join(job.moe_comm)} ({soc})")
        ctx = RankContext(rank, world, ctrl)
        results = []
        for strategy in job.moe_comm:
            ep.strategy = strategy
            ep.stats.clear()
            res = generate_dp(model, job.prompts, job.params, ctx, job.keep_prompt_logits)
            if recorder is not None and not recorder.saved:
                recorder.save(job.record_ops, {"prompt_ids": job.prompts[0], "output_ids": res.output_ids[0],
                                               "model": str(job.model), "nproc": world, "moe_comm": strategy})
            if rank == 0:
                results.append(RunResult(strategy, res, dict(ep.stats), lm.source, backend.name, world))
        if rank == 0 and job.result_path:
            tmp = job.result_path + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(results, f)
            os.replace(tmp, job.result_path)
        return results if rank == 0 else None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def probe_model(spec: str) -> tuple[Any, Any, str]:
    """Config, tokenizer and a description of a model without reading its weights (the launcher checks
    the expert split and builds the prompts before starting any rank)."""
    from common.config import ConfigError, load_config, load_preset
    from common.loading import is_preset, load_tokenizer, preset_tokenizer

    if is_preset(spec):
        cfg, preset = load_preset(spec)
        if not preset.get("random_weights"):
            raise ConfigError(f"preset {spec!r} describes the released model's shape only and has no weights; "
                              f"pass --model with a checkpoint directory")
        return cfg, preset_tokenizer(preset.get("tokenizer")), f"preset {spec}"
    cfg = load_config(spec)
    return cfg, load_tokenizer(Path(spec) / "tokenizer.json"), str(spec)


# ---- the launcher ----------------------------------------------------------------------------------

def _bootstrap(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    """Entry of a spawned rank: the torchrun environment, then `fn(*args)`; failures become one line and
    an exit code (os._exit: no atexit / process-group teardown that could block on dead peers)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    code = run_guarded(rank, fn, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_guarded(rank: int, fn: Callable, *args: Any) -> int:
    """Run a rank body; -> exit code. Collective failures and user errors print one line; anything else
    (a bug) prints its traceback."""
    from common.config import ConfigError
    from common.safetensors_io import CheckpointError
    from ops import BackendUnavailable
    from tools.errors import EXIT_INPUT, CliError

    from .ep import CollectiveError

    def say(msg: str) -> None:
        print(f"dsv4 generate: rank {rank}: error: {msg}", file=sys.stderr, flush=True)

    try:
        fn(*args)
        return 0
    except CollectiveError as e:
        say(f"{e} (another rank failed, or none answered within the --dist-timeout)")
        return EXIT_COLLECTIVE
    except CliError as e:
        say(str(e))
        return e.code
    except (ConfigError, CheckpointError, ValueError, BackendUnavailable, SetupError) as e:
        say(str(e))
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception:
        say("unexpected failure:")
        traceback.print_exc()
        return EXIT_FAILED


def launch(world: int, fn: Callable, args: tuple = (), timeout: float | None = None,
           log: Callable[[str], None] | None = None) -> None:
    """Run `fn(*args)` on `world` spawned local ranks (torchrun environment set). Returns when all exit 0;
    raises RankFailed naming the first failing rank after stopping the others. `timeout` bounds the
    whole run (None = no bound; the ranks' collective timeout still applies)."""
    import multiprocessing as mp
    import multiprocessing.connection as mpc
    from datetime import timedelta

    import torch.distributed as dist

    # the launcher hosts the rendezvous store, as torchrun's agent does; port 0 = any free port
    store = dist.TCPStore("127.0.0.1", 0, world, True, timedelta(seconds=timeout or DEFAULT_TIMEOUT),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    old = os.environ.get("OMP_NUM_THREADS")
    share = max(1, (os.cpu_count() or 1) // world)
    os.environ["OMP_NUM_THREADS"] = str(min(int(old), share) if old and old.isdigit() else share)
    procs = []
    try:
        for r in range(world):
            p = ctx.Process(target=_bootstrap, args=(r, world, store.port, fn, args), name=f"dsv4-rank{r}")
            p.start()
            procs.append(p)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {p.sentinel: r for r, p in enumerate(procs)}
    failed: list[tuple[int, int | None]] = []
    try:
        while pending and not failed:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = mpc.wait(list(pending), timeout=wait)
            if not ready:
                failed.append((min(pending.values()), None))
                break
            for s in ready:
                r = pending.pop(s)
                procs[r].join()
                if procs[r].exitcode != 0:
                    failed.append((r, procs[r].exitcode))
        if failed and pending:
            # the others usually fail within moments (a peer vanished from their collectives); collect them
            # briefly so the report names the rank that failed first, not one that saw the failure
            end = time.monotonic() + 1.0
            while pending and time.monotonic() < end:
                for s in mpc.wait(list(pending), timeout=max(0.0, end - time.monotonic())):
                    r = pending.pop(s)
                    procs[r].join()
                    if procs[r].exitcode != 0:
                        failed.append((r, procs[r].exitcode))
    finally:
        stopped = _stop(procs)
        del store
    if failed:
        primary = next((f for f in failed if f[1] != EXIT_COLLECTIVE), failed[0])
        others = [r for r, _ in failed if r != primary[0]]
        detail = f"; stopped rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))}" if stopped else ""
        if others:
            detail = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed)" + detail
        raise RankFailed(primary[0], primary[1], detail)


def _stop(procs: list) -> list[int]:
    """SIGTERM every live rank, SIGKILL what is still alive after STOP_GRACE seconds; -> the ranks stopped."""
    live = [p for p in procs if p.is_alive()]
    for p in live:
        p.terminate()
    end = time.monotonic() + STOP_GRACE
    for p in live:
        p.join(max(0.0, end - time.monotonic()))
    for p in live:
        if p.is_alive():
            p.kill()
            p.join(5.0)
    return [procs.index(p) for p in live]


def generate_multi(model: str, prompts: list[list[int]], params: Any, nproc: int, backend: str = "cpu",
                   device: str = "cpu", moe_comm: Sequence[str] = ("auto",), soc: str | None = None,
                   keep_prompt_logits: bool = False, timeout: float = DEFAULT_TIMEOUT,
                   run_timeout: float | None = None, record_ops: str | None = None) -> list[RunResult]:
    """Spawn `nproc` local ranks, generate once per strategy in `moe_comm` (one model load), return rank 0's
    results. The Python face of `dsv4 generate --nproc N`."""
    from .ep import MOE_COMM_CHOICES, expert_split_error

    bad = [s for s in moe_comm if s not in MOE_COMM_CHOICES]
    if bad:
        raise ValueError(f"unknown MoE communication strategy {bad[0]!r}; choose from {MOE_COMM_CHOICES}")
    cfg = probe_model(model)[0]
    err = expert_split_error(cfg.n_routed_experts, nproc)
    if err:
        raise ValueError(err)
    with tempfile.TemporaryDirectory(prefix="dsv4-ranks-") as tmp:
        job = Job(model, [list(map(int, p)) for p in prompts], params, backend, device, list(moe_comm), soc,
                  keep_prompt_logits, timeout, str(Path(tmp) / "rank0.pkl"), record_ops)
        launch(nproc, run_rank, (job,), timeout=run_timeout)
        with open(job.result_path, "rb") as f:
            return pickle.load(f)


# ---- `dsv4 generate --nproc N` / under torchrun -------------------------------------------------------

def run_generate_distributed(args: Any) -> int:
    from tools.errors import EXIT_USAGE, CliError, log
    from tools.generate_cmd import emit_result, make_prompts, result_dict, sampling_params

    from .ep import expert_split_error

    params = sampling_params(args)
    if args.dist_timeout <= 0:
        raise CliError("--dist-timeout must be > 0 seconds", EXIT_USAGE)
    torchrun = in_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
    if torchrun and args.nproc not in (1, world):
        raise CliError(f"--nproc {args.nproc} disagrees with torchrun's WORLD_SIZE={world}", EXIT_USAGE)
    if world < 1:
        raise CliError("--nproc must be >= 1", EXIT_USAGE)
    if args.device == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise CliError("--device npu needs torch_npu (and CANN); it is not installed here")
    cfg, tokenizer, _ = probe_model(args.model)
    err = expert_split_error(cfg.n_routed_experts, world)
    if err:
        raise CliError(f"--nproc {world}: {err}", EXIT_USAGE)
    if Path(args.model).is_dir():  # a `dsv4 convert --ep N` output must be run on N ranks: check before spawning
        from common.loading import split_indexes

        split_indexes(Path(args.model), 0, world)
    try:
        _parse_fault(os.environ.get(FAULT_ENV))
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    prompts = make_prompts(args, cfg, tokenizer)
    job = Job(args.model, prompts, params, args.backend, args.device, [args.moe_comm], args.soc,
              bool(args.logits_out), args.dist_timeout, record_ops=args.record_ops)

    if torchrun:
        holder: dict[str, Any] = {}
        code = run_guarded(int(os.environ["RANK"]), lambda: holder.update(results=run_rank(job, log)))
        if code:
            return code
        results = holder.get("results")
    else:
        with tempfile.TemporaryDirectory(prefix="dsv4-ranks-") as tmp:
            job.result_path = str(Path(tmp) / "rank0.pkl")
            try:
                launch(world, run_rank, (job,))
            except RankFailed as e:
                raise CliError(str(e), EXIT_FAILED) from None
            with open(job.result_path, "rb") as f:
                results = pickle.load(f)
    if not results:  # ranks other than 0 under torchrun print nothing
        return 0
    r = results[0]
    out = result_dict(r.source, r.backend, r.result, tokenizer)
    out.update(nproc=r.nproc, moe_comm_calls=r.moe_calls)
    emit_result(args, out, r.result, tokenizer)
    log(f"{r.nproc} ranks, MoE layer calls by strategy on rank 0: {r.moe_calls}")
    return 0
