"""`dsv4 serve`: load the model (one process, or N expert-parallel ranks), start the engine, serve HTTP.

Multi-rank (--nproc N, or one rank under torchrun): rank 0 runs the engine and the HTTP server, every rank runs
the same steps (tools/serve/runner.py). Ranks are launched and joined with ascend/distributed.py (`launch`,
`init_distributed`, `run_guarded`), experts split and exchanged with ascend/ep.py. A rank that dies or stops
answering makes rank 0's next collective fail within --dist-timeout (the idle engine steps an empty plan every
second, so this holds without traffic too): /health turns 503, the server stops and exits non-zero.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .budget import SERVE_BLOCK_SIZE

EXIT_SERVE_FAILED = 1  # the engine failed (a rank died or stopped answering) or a rank exited non-zero
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ServeJob:
    """Everything a rank needs (picklable: it crosses the spawn boundary)."""

    model: str
    backend: str = "cpu"
    dtype: str = "float32"
    device: str = "cpu"
    soc: str | None = None
    moe_comm: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 16
    max_model_len: int | None = None
    max_batched_tokens: int = 512
    max_waiting: int | None = None
    cache_tokens: int | None = None
    block_size: int = SERVE_BLOCK_SIZE
    api_key: str | None = None
    served_model_name: str | None = None
    timeout: float = 60.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_compute_backend(job: ServeJob) -> Any:
    """The backend through the one registry (`ascend.backends.get_backend`); job.dtype was resolved by
    `generate_cmd.resolve_dtype` (float32 unless the backend is torch)."""
    from ascend.backends import get_backend

    opts = {"dtype": job.dtype} if job.backend == "torch" else {}
    soc = job.soc if job.backend in ("torch", "mindspore") else None
    return get_backend(job.backend, device=job.device, soc=soc, **opts)


def serve_limits(job: ServeJob, cfg: Any) -> tuple[int, int]:
    """max_model_len and --cache-tokens (default: room for max_num_seqs sequences of max_model_len)."""
    max_len = job.max_model_len or min(cfg.max_position_embeddings, 4096)
    return max_len, job.cache_tokens or job.max_num_seqs * max_len


def build_model(job: ServeJob, lm: Any, backend: Any, say: Any = _log, **kw: Any) -> Any:
    """The served Model with fixed cache pools sized from --cache-tokens (the same on every rank); MTP layers
    are not run by the engine, so they get no caches."""
    from common.model import Model

    from .budget import describe_pools, serve_pools

    max_len, cache = serve_limits(job, lm.cfg)
    pools = serve_pools(lm.cfg, cache, max_len, job.max_batched_tokens, job.max_num_seqs, job.block_size)
    try:
        model = Model(lm.cfg, lm.weights, backend, mtp=False, block_size=job.block_size, num_blocks=pools, **kw)
    except MemoryError as e:
        from tools.errors import EXIT_USAGE, CliError

        raise CliError(f"--cache-tokens {cache}: the cache pools {pools} do not fit in memory ({e}); "
                       f"lower --cache-tokens, --max-num-seqs or --max-model-len", EXIT_USAGE) from None
    say(f"dsv4 serve: {describe_pools(model.caches, cache)}")
    return model


def build_engine(job: ServeJob, model: Any, tokenizer: Any, runner: Any) -> tuple[Any, Any]:
    from .api import ServeConfig
    from .budget import BlockBudget
    from .engine import Engine

    cfg = model.cfg
    max_len, cache = serve_limits(job, cfg)
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, (list, tuple, set)) else [cfg.eos_token_id]
    budget = BlockBudget(model.caches, job.max_batched_tokens, runner.world, cache, runner.blocks_in_use)
    engine = Engine(runner, budget, tokenizer, [e for e in eos if e is not None],
                    job.max_num_seqs, max_len, job.max_batched_tokens, job.max_waiting, log=_log)
    scfg = ServeConfig(job.served_model_name or _default_name(job.model), max_len, cfg.vocab_size, cfg.bos_token_id,
                       job.api_key)
    return engine, scfg


def _default_name(model: str) -> str:
    return os.path.basename(os.path.normpath(model)) or model


def serve_http(engine: Any, tokenizer: Any, scfg: Any, host: str, port: int) -> int:
    """Run the HTTP server until SIGINT/SIGTERM (-> 0) or an engine failure (-> EXIT_SERVE_FAILED)."""
    import uvicorn

    from .api import create_app

    app = create_app(engine, tokenizer, scfg)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        from tools.errors import CliError

        raise CliError(f"--host {host} --port {port}: cannot listen ({e.strerror})") from None
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                           access_log=False))

    def stop(sig: int, frame: Any) -> None:
        server.should_exit = True

    # our handlers stay installed after uvicorn restores them and re-raises the signal it caught: exit cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    def watchdog() -> None:
        while not server.should_exit:
            if engine.failed is not None:
                server.should_exit = True
                return
            time.sleep(0.2)

    engine.start()
    threading.Thread(target=watchdog, name="dsv4-watchdog", daemon=True).start()
    bound = sock.getsockname()
    _log(f"dsv4 serve: model {scfg.served_model_name!r} on http://{host}:{bound[1]} "
         f"(max_num_seqs {engine.max_num_seqs}, max_model_len {scfg.max_model_len})")
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    if engine.failed is not None:
        _log(f"dsv4 serve: stopped: {engine.failed}")
        return EXIT_SERVE_FAILED
    _log("dsv4 serve: stopped")
    return 0


def job_from_args(args: Any) -> ServeJob:
    from common.paged_cache import check_block_size
    from tools.errors import EXIT_USAGE, CliError
    from tools.generate_cmd import resolve_dtype

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be in [0, 65535]", EXIT_USAGE)
    if args.max_num_seqs < 1:
        raise CliError("--max-num-seqs must be >= 1", EXIT_USAGE)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise CliError("--max-model-len must be >= 2", EXIT_USAGE)
    if args.max_batched_tokens < 1:
        raise CliError("--max-batched-tokens must be >= 1", EXIT_USAGE)
    if args.dist_timeout <= 0:
        raise CliError("--dist-timeout must be > 0 seconds", EXIT_USAGE)
    if args.max_waiting is not None and args.max_waiting < 1:
        raise CliError("--max-waiting must be >= 1", EXIT_USAGE)
    if args.cache_tokens is not None and args.cache_tokens < 2:
        raise CliError("--cache-tokens must be >= 2", EXIT_USAGE)
    try:
        check_block_size(args.block_size, "--block-size")
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("DSV4_API_KEY")
    return ServeJob(args.model, args.backend, resolve_dtype(args), args.device, args.soc, args.moe_comm, args.host,
                    args.port, args.max_num_seqs, args.max_model_len, args.max_batched_tokens, args.max_waiting,
                    args.cache_tokens, args.block_size, api_key or None, args.served_model_name, args.dist_timeout)


def run_serve(args: Any) -> int:
    from tools.generate_cmd import wants_distributed

    job = job_from_args(args)
    if wants_distributed(args):
        return run_serve_distributed(args, job)
    from common.loading import load_model
    from ops import BackendUnavailable
    from tools.errors import CliError

    from .runner import LocalRunner

    try:
        backend = make_compute_backend(job)
    except BackendUnavailable as e:
        raise CliError(str(e)) from None
    t0 = time.perf_counter()
    lm = load_model(job.model, _log, float_dtype=job.dtype)
    _log(f"loaded {lm.source} in {time.perf_counter() - t0:.2f}s: backend {backend.name}")
    model = build_model(job, lm, backend)
    engine, scfg = build_engine(job, model, lm.tokenizer, LocalRunner(model))
    return serve_http(engine, lm.tokenizer, scfg, job.host, job.port)


# ---- multi-rank --------------------------------------------------------------------------------------------

def serve_rank(job: ServeJob) -> None:
    """One rank of a multi-rank server (spawned by `launch`, or started by torchrun)."""
    from datetime import timedelta

    import torch.distributed as dist

    from ascend.distributed import LOAD_TIMEOUT, detect_soc, init_distributed, shutdown_distributed
    from ascend.ep import EPBackend, ExpertParallel, collective
    from common.loading import load_model
    from common.parallel import expert_slice
    from tools.generate_dist import probe_model

    from .runner import DistributedRunner, worker_loop

    rank, world, _ = init_distributed(job.device, job.timeout)
    say = _log if rank == 0 else (lambda m: None)
    if rank != 0:  # rank 0 decides when to stop and tells the others (a signal here would break a collective)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, f: None)
    try:
        cfg, tokenizer, _ = probe_model(job.model)
        first, count = expert_slice(cfg.n_routed_experts, world, rank)
        soc = job.soc or detect_soc(job.device)
        ep = ExpertParallel.create(job.moe_comm, soc, job.device)
        # the plan/token exchange is bounded by --dist-timeout (new_group's default is 30 minutes)
        ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=job.timeout))
        lm = load_model(job.model, say, experts=range(first, first + count), rank=rank, world=world,
                        float_dtype=job.dtype)
        backend = make_compute_backend(job)
        model = build_model(job, lm, EPBackend(backend, ep), say, expert_range=(first, count))
        collective("model-loaded barrier", dist.monitored_barrier, group=ctrl,
                   timeout=timedelta(seconds=max(LOAD_TIMEOUT, job.timeout)), wait_all_ranks=True)
        say(f"loaded {lm.source} on {world} ranks, {count} routed experts per rank, MoE comm {job.moe_comm}")
        if rank == 0:
            engine, scfg = build_engine(job, model, lm.tokenizer, DistributedRunner(model, 0, world, ctrl))
            code = serve_http(engine, lm.tokenizer, scfg, job.host, job.port)
            if code:
                from ascend.ep import CollectiveError

                raise CollectiveError(engine.failed or "the engine failed")
        else:
            worker_loop(model, rank, world, ctrl)
    finally:
        shutdown_distributed()


def run_serve_distributed(args: Any, job: ServeJob) -> int:
    from ascend.distributed import RankFailed, launch, run_guarded
    from common.parallel import expert_split_error
    from tools.errors import EXIT_USAGE, CliError
    from tools.generate_cmd import launch_world
    from tools.generate_dist import probe_model

    torchrun, world = launch_world(args)
    cfg = probe_model(job.model)[0]
    err = expert_split_error(cfg.n_routed_experts, world)
    if err:
        raise CliError(f"--nproc {world}: {err}", EXIT_USAGE)
    if torchrun:
        return run_guarded(int(os.environ["RANK"]), serve_rank, job)
    # the launcher: SIGTERM stops the ranks as Ctrl-C does (launch's cleanup), never orphans them
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launch(world, serve_rank, (job,))
    except RankFailed as e:
        raise CliError(str(e), EXIT_SERVE_FAILED) from None
    except KeyboardInterrupt:
        _log("dsv4 serve: stopped the ranks")
    return 0
