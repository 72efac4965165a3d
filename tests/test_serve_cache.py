"""`dsv4 serve` bounds memory by the paged cache manager's blocks: the admission budget's peak-block arithmetic
against the real manager driven through prefill chunks and decode, and an in-process server with a small
--cache-tokens (built by the same functions `dsv4 serve` uses) that makes the extra requests wait."""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
import types

import httpx
import openai
import pytest
import uvicorn

from ascend.backends import get_backend
from common.config import load_preset
from common.generate import SamplingParams, generate
from common.loading import load_model
from common.model import Model
from common.paged_cache import (
    CacheFull,
    PagedCacheManager,
    _blocks,
    kind_block_size,
    layer_kinds,
    peak_blocks,
    sequence_peak_blocks,
)
from tools.serve.budget import SERVE_BLOCK_SIZE, BlockBudget, serve_pools
from tools.serve.runner import DistributedRunner, LocalRunner

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def model_with(lm, pools: dict[str, int]) -> Model:
    return Model(lm.cfg, lm.weights, get_backend("cpu"), mtp=False, block_size=SERVE_BLOCK_SIZE, num_blocks=pools)


def watch_peaks(mgr: PagedCacheManager, seen: dict[str, int], on_trim=None) -> None:
    """Record the blocks in use at each trim: the moment after a forward's allocations, before sliding kinds shrink."""
    trim = mgr.trim

    def hooked(seq, group):
        for k, n in mgr.blocks_in_use().items():
            seen[k] = max(seen.get(k, 0), n)
        if on_trim is not None:
            on_trim()
        trim(seq, group)

    mgr.trim = hooked


@pytest.mark.parametrize("preset", ["tiny-chat", "bench-small"])
def test_peak_blocks_equals_the_maximum_over_every_call_position(preset):
    """The shortcut (positions below window/groups + one period) against all positions p of [0, L)."""
    cfg = load_preset(preset)[0]
    kinds = {k.name: k for i in range(cfg.n_layers) for k in layer_kinds(cfg, i)}
    for bs in (16, 128):
        for length in (1, 17, 33, 100, 300):
            for chunk in (1, 7, 16, 64, 512):
                for name, k in kinds.items():
                    b = kind_block_size(k, bs, 16)
                    if k.by == "entry":  # never trimmed: the entries of the whole sequence
                        brute = _blocks(0, length // k.ratio, b)
                    else:
                        brute = max(_blocks(k.live_rows(p, cfg.window)[0], p + min(chunk, length - p), b)
                                    for p in range(length))
                    assert peak_blocks(k, length, chunk, cfg.window, b) == brute, (name, length, chunk)


def schedule(length: int, chunk: int, decode: int) -> list[int]:
    """Call sizes of an engine-like run: the prompt in chunks of `chunk`, then `decode` single tokens."""
    prompt = length - decode
    return [min(chunk, prompt - a) for a in range(0, prompt, chunk)] + [1] * decode


@pytest.mark.parametrize("lengths,chunk", [((40,), 1), ((77,), 8), ((130,), 64), ((61,), 512),
                                           ((50, 93, 20), 16), ((130, 7, 64), 48)])
def test_reserved_peak_covers_the_manager_and_exactly_the_pool_suffices(lm, lengths, chunk):
    """Sequences run together (every call holds one chunk of each) in pools of exactly the sum of their
    reserved peaks: no CacheFull, and the blocks in use never exceed the reservations."""
    cfg = lm.cfg
    need = [sequence_peak_blocks(cfg, n, chunk, SERVE_BLOCK_SIZE) for n in lengths]
    pools = {k: sum(d[k] for d in need) for k in need[0]}
    model = model_with(lm, pools)
    assert [model.caches.peak_blocks(n, chunk) for n in lengths] == need  # the manager's view is the same
    seen: dict[str, int] = {}
    watch_peaks(model.caches, seen)
    plans = [schedule(n, chunk, min(8, n // 4)) for n in lengths]
    caches = [model.new_cache() for _ in lengths]
    tok = 2
    for step in range(max(len(p) for p in plans)):
        live = [(c, p[step]) for c, p in zip(caches, plans, strict=True) if step < len(p)]
        ids = []
        for _, n in live:
            ids.append(list(range(tok, tok + n)))
            tok = 2 + (tok + n) % 1000
        model.forward([c for c, _ in live], ids)  # raises CacheFull if the reservation were short
    assert [c.pos for c in caches] == list(lengths)
    assert all(seen[k] <= pools[k] for k in pools), (seen, pools)
    for c in caches:
        model.caches.release(c)
    assert not any(model.caches.blocks_in_use().values())


def worst_schedule(kind, length: int, chunk: int, window: int, bs: int) -> list[int]:
    """A call-size split of `length` tokens that reaches `kind`'s peak (chunks of <= `chunk` up to the worst
    position, then the largest call there; entry kinds peak at the end of any split)."""
    if not kind.sliding:
        return schedule(length, chunk, 0)
    best, at = -1, 0
    for p in range(length):
        n = _blocks(kind.live_rows(p, window)[0], p + min(chunk, length - p), bs)
        if n > best:
            best, at = n, p
    return schedule(at, chunk, 0) + [min(chunk, length - at)]


@pytest.mark.parametrize("length,chunk", [(77, 8), (130, 64), (45, 1)])
def test_one_block_less_is_refused_up_front_and_would_hit_cache_full(lm, length, chunk):
    """The reservation is tight: with one block less of any kind the budget refuses the request (400), and the
    manager, driven through that kind's worst split, indeed runs out."""
    cfg = lm.cfg
    need = sequence_peak_blocks(cfg, length, chunk, SERVE_BLOCK_SIZE)
    for kind, n in need.items():
        pools = dict(need, **{kind: n - 1})
        model = model_with(lm, pools)
        budget = BlockBudget(model.caches, chunk, 1, 1000)
        why = budget.too_large(length)
        assert why is not None and f"{n} {kind} blocks" in why and "--cache-tokens" in why
        for m in (1, length // 3, length - 1):  # shorter requests: refused exactly when some kind does not fit
            fits = all(v <= pools[q] for q, v in sequence_peak_blocks(cfg, m, chunk, SERVE_BLOCK_SIZE).items())
            assert (budget.too_large(m) is None) == fits
        k = model.caches.kinds[kind]
        cache = model.new_cache()
        with pytest.raises(CacheFull, match=kind):
            for n_call in worst_schedule(k, length, chunk, cfg.window, model.caches.kind_bs(kind)):
                model.forward([cache], [[5] * n_call])
        model.caches.release(cache)


def test_budget_accounts_per_rank_and_owner_prefers_a_rank_with_room(lm):
    cfg = lm.cfg
    pools = serve_pools(cfg, 200, 100, 16, 2)
    mgr = PagedCacheManager(cfg, get_backend("cpu"), block_size=SERVE_BLOCK_SIZE, num_blocks=pools)
    budget = BlockBudget(mgr, 16, world=2, cache_tokens=200)
    runner = DistributedRunner(types.SimpleNamespace(B=None), 0, 2, None)
    loads = [0, 0]
    owners = []
    for sid in range(6):  # each rank holds two sequences of 100 tokens (+ slack below one more)
        rooms = budget.ranks_with_room(100)
        if not rooms:
            break
        owner = runner.owner_for(loads, rooms)
        budget.allocate(sid, 100, owner)
        loads[owner] += 1
        owners.append(owner)
    assert owners == [0, 1, 0, 1]
    budget.release(0)
    assert budget.ranks_with_room(100) == [0]
    assert runner.owner_for([1, 0], [0]) == 0  # the less loaded rank 1 has no room
    st = budget.stats()
    assert st["cache_used_tokens"] == 300 and st["cache_capacity_tokens"] == 400
    assert st["cache_blocks"]["swa"]["reserved"] == [budget.need(100)["swa"], 2 * budget.need(100)["swa"]]
    assert 0 < st["cache_usage_ratio"] <= 1
    with pytest.raises(RuntimeError, match="no room"):
        budget.allocate(9, 100, 1)


def test_budget_grows_a_reservation_and_a_decoding_one_drops_its_prefill_chunk(lm):
    cfg = lm.cfg
    chunk = 64
    pools = serve_pools(cfg, 400, 200, chunk, 2)
    mgr = PagedCacheManager(cfg, get_backend("cpu"), block_size=SERVE_BLOCK_SIZE, num_blocks=pools)
    budget = BlockBudget(mgr, chunk, cache_tokens=400)

    def reserved() -> dict[str, int]:
        return {k: b["reserved"][0] for k, b in budget.stats()["cache_blocks"].items()}

    budget.allocate(1, 40, 0)
    assert reserved() == budget.need(40)
    assert budget.grow(1, 40, 100) and reserved() == budget.need(40)  # covered already: unchanged
    assert budget.grow(1, 41, 100) and reserved() == budget.need(100)  # grows ahead
    assert budget.stats()["cache_used_tokens"] == 100
    decode = budget.need(100, 1)
    assert decode["swa"] < budget.need(100)["swa"]  # the window without a 64-row chunk on top
    assert budget.grow(1, 60, 120, decoding=True) and reserved() == decode  # first decode call: gives back
    assert all(decode[k] == budget.need(100)[k] for k in decode if not k.startswith(("swa", "state", "idx_state")))
    # a rank without room for the growth: False, the reservation as it was
    budget.allocate(2, 200, 0)
    short = {k: pools[k] - n for k, n in reserved().items()}
    big = next(n for n in range(100, 2000, 16) if any(budget.need(n, 1)[k] - decode[k] > short[k] for k in short))
    assert not budget.grow(1, big, big, decoding=True) and reserved() == {k: decode[k] + budget.need(200)[k]
                                                                         for k in decode}


# ---- a server with a small --cache-tokens -------------------------------------------------------------------

class GatedRunner(LocalRunner):
    """A LocalRunner whose steps wait for `gate` (open by default): a test closes it, sends its requests and
    opens it once the engine holds them all, so that they meet full pools whatever the machine's load."""

    def __init__(self, model):
        super().__init__(model)
        self.gate = threading.Event()
        self.gate.set()

    def step(self, plan):
        assert self.gate.wait(120), "the test never opened the gate"
        return super().step(plan)


@contextlib.contextmanager
def cli_built_server(lm, **flags):
    """`dsv4 serve`'s own build_model / build_engine on a port of this process (the HTTP layer of the CLI)."""
    from tools.serve.api import create_app
    from tools.serve.cli import build_engine, build_model, job_from_args

    args = argparse.Namespace(model=MODEL, backend="cpu", dtype=None, device="cpu", soc=None, moe_comm="auto",
                              host="127.0.0.1", port=0, max_num_seqs=4, max_model_len=512, max_batched_tokens=16,
                              max_waiting=None, cache_tokens=None, block_size=SERVE_BLOCK_SIZE, api_key=None,
                              served_model_name=None, dist_timeout=60.0, nproc=None)
    for k, v in flags.items():
        setattr(args, k, v)
    job = job_from_args(args)
    logs: list[str] = []
    model = build_model(job, lm, get_backend("cpu"), logs.append)
    engine, scfg = build_engine(job, model, lm.tokenizer, GatedRunner(model))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, lm.tokenizer, scfg), log_level="warning"))
    engine.start()
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    port = sock.getsockname()[1]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                    break
            time.sleep(0.1)
        yield port, engine, model, logs
    finally:
        server.should_exit = True
        th.join(30)
        engine.stop()
        sock.close()


class Watch:
    """Checked at every trim (engine thread, inside a forward: nothing else moves the reservations): blocks in use
    within the reservations, these within the pools; the most blocks, running and waiting sequences seen."""

    def __init__(self, engine, model):
        self.engine, self.mgr = engine, model.caches
        self.pools = dict(model.caches.capacity)
        self.seen: dict[str, int] = {}
        self.over: list[str] = []
        self.most = {"running": 0, "waiting": 0}
        watch_peaks(model.caches, self.seen, self._check)

    def _check(self) -> None:
        st = self.engine.stats()
        for k, b in st["cache_blocks"].items():
            if self.mgr.blocks_in_use()[k] > sum(b["reserved"]) or sum(b["reserved"]) > b["pool"]:
                self.over.append(k)
        for k in self.most:
            self.most[k] = max(self.most[k], st[k])

    def assert_bounded(self) -> None:
        assert not self.over and all(self.seen[k] <= self.pools[k] for k in self.seen)


def gated_burst(engine, ask, n: int) -> list[list[int]]:
    """ask(0..n-1) from n threads; the engine's steps wait until all n requests reached it, so that they meet
    full pools whatever the machine's load. -> each request's token ids."""
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = ask(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    engine.runner.gate.clear()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and engine.stats()["running"] + engine.stats()["waiting"] < n:
        time.sleep(0.02)
    engine.runner.gate.set()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return [results.get(i) for i in range(n)]


def test_small_cache_tokens_makes_requests_wait_and_bounds_memory(lm):
    prompts = [[0, 7 + i, 400 + 11 * i, 33] for i in range(4)]
    max_tokens = 56  # 60 tokens of context each: two fit the pools of --cache-tokens 64, the others wait
    ref = Model(lm.cfg, lm.weights, get_backend("cpu"))
    expect = [generate(ref, [p], SamplingParams(max_new_tokens=max_tokens, stop_on_eos=False)).output_ids[0]
              for p in prompts]
    with cli_built_server(lm, cache_tokens=64) as (port, engine, model, logs):
        assert any("cache pool for 64 tokens of context" in m and "MiB" in m for m in logs), logs
        watch = Watch(engine, model)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120.0, max_retries=0)

        def ask(i: int) -> list[int]:
            return c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].token_ids

        assert gated_burst(engine, ask, 4) == expect
        assert watch.most["running"] == 2 and watch.most["waiting"] >= 1, watch.most  # two at a time, two waited
        watch.assert_bounded()
        pools = watch.pools
        assert dict(model.caches.capacity) == pools  # fixed: never grew
        deadline = time.monotonic() + 30  # the finished sequences' blocks go back with the engine's next plan
        while time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
            if 'dsv4_cache_blocks_in_use{kind="swa",rank="0"} 0' in text:
                break
            time.sleep(0.05)
        assert "dsv4_cache_used_tokens 0" in text and "dsv4_cache_bytes_in_use 0" in text, text
        assert f'dsv4_cache_blocks_pool{{kind="swa"}} {pools["swa"]}' in text
        # a request whose own peak exceeds the whole pool: 400, OpenAI body naming --cache-tokens
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30.0,
                       json={"model": MODEL, "prompt": [0, 5, 6, 7], "max_tokens": 400})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "--cache-tokens 64" in err["message"], err
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt=[0, 5, 6, 7], max_tokens=400)


def test_printed_pool_bytes_are_plans_accounting(lm):
    """The start-up bytes (the manager's storages) equal what `dsv4 plan`'s accounting (CacheFormat, float32 for
    the CPU reference) gives for the same blocks."""
    from common.paged_cache import cache_format
    from tools.serve.budget import describe_pools

    cfg = lm.cfg
    pools = serve_pools(cfg, 1000, 300, 32, 3)
    mgr = PagedCacheManager(cfg, get_backend("cpu"), block_size=SERVE_BLOCK_SIZE, num_blocks=pools)
    fmt = cache_format(cfg, "float32")
    expect = sum(n * mgr.kind_bs(k) * fmt.row_bytes(cfg, mgr.kinds[k]) * len(mgr.kind_layers[k])
                 for k, n in pools.items())
    assert sum(n * mgr.block_bytes(k) for k, n in pools.items()) == expect
    assert describe_pools(mgr, 1000).endswith(f"; {expect / 2**20:.1f} MiB")
    assert BlockBudget(mgr, 32, 1, 1000).stats()["cache_bytes_total"] == expect


def test_block_size_flag_shapes_the_pools_and_serves_the_same_tokens(lm):
    """--block-size 32: every kind's blocks are 32 rows (the compressor state pages keep theirs), the pools are
    sized for it, and greedy replies still equal `dsv4 generate`."""
    from tools.errors import EXIT_USAGE, CliError

    prompts = [[0, 9, 410, 33, 7], [0, 12, 5]]
    ref = Model(lm.cfg, lm.weights, get_backend("cpu"))
    expect = [generate(ref, [p], SamplingParams(max_new_tokens=40, stop_on_eos=False)).output_ids[0] for p in prompts]
    with cli_built_server(lm, block_size=32) as (port, engine, model, logs):
        mgr = model.caches
        assert mgr.bs == 32 and mgr.kind_bs("swa") == 32
        assert dict(mgr.capacity) == serve_pools(lm.cfg, 4 * 512, 512, 16, 4, 32)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120.0, max_retries=0)
        got = [c.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].token_ids for p in prompts]
        assert got == expect
    for bad in (24, 0, 2048):
        with pytest.raises(CliError, match="--block-size must be a multiple of 16") as e, \
                cli_built_server(lm, block_size=bad):
            pass
        assert e.value.code == EXIT_USAGE


def test_preemption_admits_more_and_resumes_exactly(lm, capfd):
    """Reservations grow with the context (8 tokens ahead here), so four requests run where their worst cases fit
    two; when a rank runs out, the newest are preempted and recomputed later. Every reply, greedy, seeded
    sampling and with penalties, equals the request run without contention, and the blocks in use never exceed the
    reservations nor these the pools."""
    prompts = [[0, 7 + i, 400 + 11 * i, 33] for i in range(4)]
    max_tokens = 56  # 60 tokens of context: the worst cases of two fill the pools of --cache-tokens 64
    extra = [{}, {}, {"temperature": 1.0, "seed": 7},
             {"presence_penalty": 0.5, "frequency_penalty": 0.5, "extra_body": {"repetition_penalty": 1.2}}]
    with cli_built_server(lm, cache_tokens=64) as (port, engine, model, logs):
        engine.reserve_ahead = 8
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=180.0, max_retries=0)

        def ask(i: int) -> list[int]:
            kw = {"temperature": 0, **extra[i]}
            kw["extra_body"] = {"ignore_eos": True, **kw.get("extra_body", {})}
            return c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens,
                                        **kw).choices[0].token_ids

        alone = [ask(i) for i in range(4)]  # one at a time: no preemption
        assert metric_value(port, "dsv4_requests_preempted_total") == 0
        ref = Model(lm.cfg, lm.weights, get_backend("cpu"))
        for i, sp in ((0, {}), (2, {"temperature": 1.0, "seed": 7})):  # the server's replies are generate's
            assert alone[i] == generate(ref, [prompts[i]], SamplingParams(max_new_tokens=max_tokens,
                                                                        stop_on_eos=False, **sp)).output_ids[0]
        watch = Watch(engine, model)
        assert gated_burst(engine, ask, 4) == alone
        assert watch.most["running"] > 2, watch.most  # more than the worst cases allow ran at once
        assert metric_value(port, "dsv4_requests_preempted_total") >= 1
        assert "dsv4 serve: preempted request" in capfd.readouterr().err  # the operator sees it in the log
        watch.assert_bounded()


def metric_value(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])
