"""Multi-rank generation from the tools' side: what one rank does (`run_rank`) and the Python face
`generate_multi` (also used by `dsv4 compare --nproc`). `dsv4 generate --nproc N` (tools/generate_cmd.py) builds
a `Job` and launches `run_rank` on every rank.

The ranks run `common.generate.generate` with `ascend.distributed.DataParallelRanks` hooks over an
`ascend.ep.EPBackend` around the compute backend.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend.distributed import (
    DEFAULT_TIMEOUT,
    LOAD_TIMEOUT,
    DataParallelRanks,
    detect_soc,
    init_distributed,
    launch,
    shutdown_distributed,
)
from common.config import model_config
from common.generate import generate
from common.loading import load_tokenizer, preset_tokenizer
from common.parallel import expert_slice, expert_split_error


def probe_model(spec: str) -> tuple[Any, Any, str]:
    """Config, tokenizer and a description of a model without reading its weights (the launcher checks
    the expert split and builds the prompts before starting any rank)."""
    cfg, preset = model_config(spec, need_weights=True)
    if preset is not None:
        return cfg, preset_tokenizer(preset.get("tokenizer")), f"preset {spec}"
    return cfg, load_tokenizer(Path(spec) / "tokenizer.json"), str(spec)


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
    dtype: str = "float32"  # torch backend activation / weight dtype (--dtype)


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

    from ascend.backends import get_backend
    from ascend.ep import EPBackend, ExpertParallel, collective
    from common.loading import load_model
    from common.model import Model

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
        lm = load_model(job.model, say, experts=range(first, first + count), rank=rank, world=world,
                        float_dtype=job.dtype)
        opts = {"soc": soc, "dtype": job.dtype} if job.backend == "torch" else {}
        backend = get_backend(job.backend, device=job.device, **opts)
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
        ranks = DataParallelRanks(rank, world, ctrl)
        results = []
        for strategy in job.moe_comm:
            ep.strategy = strategy
            ep.stats.clear()
            res = generate(model, job.prompts, job.params, job.keep_prompt_logits, ranks=ranks)
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
        shutdown_distributed()


def generate_multi(model: str, prompts: list[list[int]], params: Any, nproc: int, backend: str = "cpu",
                   device: str = "cpu", moe_comm: Sequence[str] = ("auto",), soc: str | None = None,
                   keep_prompt_logits: bool = False, timeout: float = DEFAULT_TIMEOUT,
                   run_timeout: float | None = None, record_ops: str | None = None,
                   dtype: str = "float32") -> list[RunResult]:
    """Spawn `nproc` local ranks, generate once per strategy in `moe_comm` (one model load), return rank 0's
    results. The Python face of `dsv4 generate --nproc N`."""
    from ascend.ep import MOE_COMM_CHOICES

    bad = [s for s in moe_comm if s not in MOE_COMM_CHOICES]
    if bad:
        raise ValueError(f"unknown MoE communication strategy {bad[0]!r}; choose from {MOE_COMM_CHOICES}")
    cfg = probe_model(model)[0]
    err = expert_split_error(cfg.n_routed_experts, nproc)
    if err:
        raise ValueError(err)
    with tempfile.TemporaryDirectory(prefix="dsv4-ranks-") as tmp:
        job = Job(model, [list(map(int, p)) for p in prompts], params, backend, device, list(moe_comm), soc,
                  keep_prompt_logits, timeout, str(Path(tmp) / "rank0.pkl"), record_ops, dtype)
        launch(nproc, run_rank, (job,), timeout=run_timeout)
        with open(job.result_path, "rb") as f:
            return pickle.load(f)
