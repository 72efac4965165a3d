"""Expert parallelism over torch.distributed (gloo on CPU): the MoE exchange strategies, the MC2 stand-in,
multi-rank generation against the single-process reference, and the launcher's fault handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from common.generate import SamplingParams, generate  # noqa: E402
from common.loading import load_model  # noqa: E402
from common.model import Model  # noqa: E402
from common.presets import random_weights  # noqa: E402
from ops.contract import ExpertWeights  # noqa: E402
from ops.numpy_ref import NumpyBackend  # noqa: E402
from tools.testing.hf_bridge import save_official  # noqa: E402

from .conftest import small_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("allgather", "alltoall", "dispatch_combine")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
MAX_NEW = 6


def _has_torch_backend() -> bool:
    try:
        import ascend.torch_backend  # noqa: F401
    except ImportError:
        return False
    return True


def dsv4(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ---- the model: 8 routed experts, an eos that one sequence hits early --------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = small_config(n_routed_experts=8)
    weights = random_weights(cfg, seed=3)
    # make the second token of prompt 1's continuation the eos: that sequence stops while the others go on
    free = generate(Model(cfg, weights, NumpyBackend()), PROMPTS, SamplingParams(MAX_NEW, stop_on_eos=False))
    eos = free.output_ids[1][1]
    cfg = small_config(n_routed_experts=8, eos_token_id=eos)
    d = tmp_path_factory.mktemp("ep-model")
    save_official(cfg, dict(weights), d)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    lm = load_model(str(model_dir), log=lambda m: None)
    res = generate(Model(lm.cfg, lm.weights, NumpyBackend()), PROMPTS, SamplingParams(MAX_NEW),
                   keep_prompt_logits=True)
    assert "eos" in res.finish_reasons and "length" in res.finish_reasons  # the lockstep sees an early finish
    return res


@pytest.mark.parametrize("backend", ["cpu", pytest.param("torch", marks=pytest.mark.skipif(
    not _has_torch_backend(), reason="ascend.torch_backend is not importable"))])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_multi_rank_generation_matches_single_process(model_dir, reference, world, backend):
    """1, 2 and 4 ranks (with 4: one rank owns no prompt), every strategy: same greedy tokens and prompt logits."""
    from tools.generate_dist import generate_multi

    strategies = STRATEGIES if world > 1 else ("auto",)  # one rank holds every expert: nothing to exchange
    runs = generate_multi(str(model_dir), PROMPTS, SamplingParams(MAX_NEW), nproc=world, backend=backend,
                          moe_comm=strategies, keep_prompt_logits=True, timeout=30, run_timeout=200)
    assert [r.strategy for r in runs] == list(strategies)
    for r in runs:
        res = r.result
        assert r.nproc == world and r.backend == backend
        assert res.prompt_ids == reference.prompt_ids
        assert res.output_ids == reference.output_ids, r.strategy
        assert res.finish_reasons == reference.finish_reasons, r.strategy
        assert res.decode_steps == reference.decode_steps
        for got, want in zip(res.prompt_logits, reference.prompt_logits, strict=True):
            assert got.shape == want.shape
            assert rel_err(got, want) < 1e-4, (r.strategy, rel_err(got, want))
        # every MoE layer call went through the requested exchange (a single rank has nothing to exchange)
        assert r.moe_calls == ({"local": r.moe_calls.get("local", -1)} if world == 1 else
                               {r.strategy: r.moe_calls.get(r.strategy, -1)})
        assert sum(r.moe_calls.values()) == (1 + res.decode_steps) * 4  # 4 layers, prefill + decode steps


def test_sampling_with_seed_matches_single_process(model_dir):
    """Temperature sampling with a seed: each sequence gets the single-process draws (see ascend.distributed)."""
    from tools.generate_dist import generate_multi

    params = SamplingParams(MAX_NEW, temperature=0.9, top_k=50, top_p=0.95, seed=11, stop_on_eos=False)
    lm = load_model(str(model_dir), log=lambda m: None)
    want = generate(Model(lm.cfg, lm.weights, NumpyBackend()), PROMPTS, params)
    (run,) = generate_multi(str(model_dir), PROMPTS, params, nproc=2, moe_comm=["alltoall"], timeout=30,
                            run_timeout=120)
    assert run.result.output_ids == want.output_ids
    assert run.result.stats["seed"] == 11


# ---- the exchange strategies and the MC2 stand-in, against direct computations -------------------------------

E, D, I_FF, K, LIMIT = 8, 32, 16, 3, 5.0
EMPTY_EXPERT = 5  # no token routes here: an expert (and with 4 ranks, part of a rank) that receives zero rows
TOKENS = {2: [4, 0], 4: [3, 0, 6, 1]}  # rank 1 has no tokens


def _experts(rng: np.random.Generator) -> tuple[list, list, list]:
    w1 = [rng.standard_normal((I_FF, D), dtype=np.float32) * 0.3 for _ in range(E)]
    w3 = [rng.standard_normal((I_FF, D), dtype=np.float32) * 0.3 for _ in range(E)]
    w2 = [rng.standard_normal((D, I_FF), dtype=np.float32) * 0.3 for _ in range(E)]
    return w1, w3, w2


def _tokens(src: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank `src`'s MoE inputs (every rank can rebuild every other rank's): x, weights, distinct ids."""
    g = np.random.default_rng(100 + src)
    allowed = np.array([e for e in range(E) if e != EMPTY_EXPERT])
    ids = np.array([g.permutation(allowed)[:K] for _ in range(n)], dtype=np.int64).reshape(n, K)
    return (g.standard_normal((n, D), dtype=np.float32), g.random((n, K), dtype=np.float32) + 0.1, ids)


def _check(report: dict, name: str, fn) -> None:
    try:
        fn()
        report[name] = "ok"
    except Exception as e:  # recorded per check so one failure does not hide the others
        import traceback

        report[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"


def _exchange_worker(report_dir: str) -> None:
    """Runs on every rank: each strategy and the stand-in ops against direct single-rank computations."""
    import torch

    from ascend.distributed import init_distributed
    from ascend.ep import EPBackend, ExpertParallel, expert_slice
    from ascend.standins import mc2

    rank, world, _ = init_distributed("cpu", 20)
    report: dict[str, str] = {}
    ep = ExpertParallel.create("allgather", "A2", "cpu")
    w1, w3, w2 = _experts(np.random.default_rng(0))
    full = ExpertWeights(w1, w3, w2, E)
    first, count = expert_slice(E, world, rank)
    local = ExpertWeights(w1[first:first + count], w3[first:first + count], w2[first:first + count], E, first, count)
    ref = NumpyBackend()
    counts = TOKENS[world]
    x, w, ids = _tokens(rank, counts[rank])

    # each check runs all its collectives before asserting: a failed assertion on one rank must not leave
    # the ranks in different collectives (gloo aborts on mismatched ones)
    for strategy in STRATEGIES:
        def run(strategy=strategy):
            ep.strategy = strategy
            got = EPBackend(NumpyBackend(), ep).moe_experts(x, w, ids, local, LIMIT)
            # every rank idle at once: nothing to exchange, an empty result
            empty = EPBackend(NumpyBackend(), ep).moe_experts(x[:0], w[:0], ids[:0], local, LIMIT)
            want = ref.moe_experts(x, w, ids, full, LIMIT)
            assert got.shape == want.shape == (counts[rank], D)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert empty.shape == (0, D)
            assert ep.stats[strategy] == 1  # the idle call exchanged nothing
        _check(report, f"strategy-{strategy}", run)

    # ---- MC2 stand-in ------------------------------------------------------------------------------------
    name = mc2.register_group(ep.mc2_group)
    nloc = E // world
    bs_all = [max(c, 1) for c in counts]  # the ops need BS > 0
    srcs = [_tokens(s, bs_all[s]) for s in range(world)]
    xt = torch.from_numpy(srcs[rank][0])
    idt = torch.from_numpy(srcs[rank][2]).to(torch.int32)
    scales = torch.from_numpy(srcs[rank][1])
    gbs = max(bs_all) * world
    kw = dict(group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=E, expert_shard_type=0,
              shared_expert_rank_num=0, global_bs=gbs)
    # expected receive side: local expert major, then source rank, then the source's (token, k) order
    rows, row_expert, per = [], [], np.zeros((nloc, world), dtype=np.int64)
    for le in range(nloc):
        e = rank * nloc + le
        for s in range(world):
            sx, _, sids = srcs[s]
            for j in range(sids.size):
                if sids.reshape(-1)[j] == e:
                    rows.append(sx[j // K])
                    row_expert.append(e)
                    per[le, s] += 1
    n = len(rows)

    def dispatch_grouping():
        ex, dyn, assist, tok_nums, recv, _tp, exp_scales = mc2.npu_moe_distribute_dispatch_v2(
            x=xt, expert_ids=idt, quant_mode=0, expert_token_nums_type=1, expert_scales=scales, **kw)
        # the combine: rows scaled by (expert id + 1) come back weighted by expert_scales and summed over k
        y = ex.clone()
        y[:n] *= torch.tensor(row_expert, dtype=torch.float32)[:, None] + 1
        out = mc2.npu_moe_distribute_combine_v2(expand_x=y, expert_ids=idt, assist_info_for_combine=assist,
                                                ep_send_counts=recv, expert_scales=scales, expand_scales=exp_scales,
                                                **kw)
        _, _, _, cum, _, _, _ = mc2.npu_moe_distribute_dispatch_v2(x=xt, expert_ids=idt, expert_token_nums_type=0,
                                                                    **kw)
        assert ex.shape == (gbs * min(nloc, K), D) and dyn.numel() == 0  # the schema returns a Tensor, never None
        np.testing.assert_array_equal(ex[:n].numpy(), np.array(rows).reshape(n, D))
        assert not ex[n:].any()
        assert tok_nums.dtype == torch.int64 and tok_nums.tolist() == per.sum(1).tolist()
        assert cum.tolist() == np.cumsum(per.sum(1)).tolist()
        assert recv.tolist() == np.cumsum(per.reshape(-1)).tolist()
        assert assist.shape == (ex.shape[0] * 128,)
        assert exp_scales is not None and exp_scales.shape == (ex.shape[0],)
        want = (scales.numpy() * (srcs[rank][2] + 1)).sum(1)[:, None] * srcs[rank][0]
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    _check(report, "mc2-dispatch-grouping", dispatch_grouping)

    def v1_roundtrip():
        ex, _, expand_idx, tok_nums, recv, _, _ = mc2.npu_moe_distribute_dispatch(x=xt, expert_ids=idt, **kw)
        out = mc2.npu_moe_distribute_combine(expand_x=ex, expert_ids=idt, expand_idx=expand_idx,
                                             ep_send_counts=recv, expert_scales=scales, **kw)
        assert expand_idx.shape == (idt.numel(),)
        np.testing.assert_allclose(out.numpy(), scales.numpy().sum(1)[:, None] * srcs[rank][0], rtol=1e-5, atol=1e-5)
    _check(report, "mc2-v1-roundtrip", v1_roundtrip)

    def dynamic_quant():
        ex, dyn, *_ = mc2.npu_moe_distribute_dispatch_v2(x=xt, expert_ids=idt, quant_mode=2, **kw)
        assert ex.dtype == torch.int8 and dyn.shape == (ex.shape[0],)
        want = np.array(rows).reshape(n, D)
        back = ex[:n].float().numpy() * dyn[:n, None].numpy()
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(back - want) <= 0.5 * step + 1e-6)
    _check(report, "mc2-dynamic-quant", dynamic_quant)

    def active_mask():
        mask = torch.ones(bs_all[rank], dtype=torch.bool)
        mask[-1] = rank % 2 == 1  # odd ranks keep all their tokens, even ranks drop their last one
        ex, _, assist, _, recv, _, _ = mc2.npu_moe_distribute_dispatch_v2(x=xt, expert_ids=idt, x_active_mask=mask,
                                                                          **kw)
        out = mc2.npu_moe_distribute_combine_v2(expand_x=ex, expert_ids=idt, assist_info_for_combine=assist,
                                                ep_send_counts=recv, expert_scales=scales, x_active_mask=mask, **kw)
        want = scales.numpy().sum(1)[:, None] * srcs[rank][0] * mask.numpy()[:, None]
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    _check(report, "mc2-active-mask", active_mask)

    def refuses_together():
        # rank 1 passes BS = 0 (documented 0 < BS): it raises ValueError, the others learn it and raise too
        bad = xt[:0] if rank == 1 else xt
        bad_ids = idt[:0] if rank == 1 else idt
        with pytest.raises(ValueError if rank == 1 else RuntimeError, match="BS must be > 0" if rank == 1 else
                           "rank 1"):
            mc2.npu_moe_distribute_dispatch_v2(x=bad, expert_ids=bad_ids, **kw)
    _check(report, "mc2-refuses-on-all-ranks", refuses_together)

    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def exchange_report(request, tmp_path_factory) -> tuple[int, dict[int, dict]]:
    from ascend.distributed import launch

    world = request.param
    d = tmp_path_factory.mktemp(f"exchange-{world}")
    launch(world, _exchange_worker, (str(d),), timeout=150)
    return world, {r: json.loads((d / f"rank{r}.json").read_text()) for r in range(world)}


@pytest.mark.parametrize("check", [f"strategy-{s}" for s in STRATEGIES] + [
    "mc2-dispatch-grouping", "mc2-v1-roundtrip", "mc2-dynamic-quant", "mc2-active-mask", "mc2-refuses-on-all-ranks"])
def test_exchange(exchange_report, check):
    world, reports = exchange_report
    for rank, rep in reports.items():
        assert rep[check] == "ok", f"world {world} rank {rank}: {rep[check]}"


def test_standin_is_importable_alone():
    code = ("import sys; import ascend.standins.mc2 as m; "
            "assert 'torch_npu' not in sys.modules and 'ascend.ep' not in sys.modules; "
            "print(m.npu_moe_distribute_dispatch_v2.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "npu_moe_distribute_dispatch_v2" in p.stdout, p.stderr


# ---- the command line ---------------------------------------------------------------------------------------

def test_cli_nproc_auto_matches_single_process(model_dir):
    """`--nproc 2 --moe-comm auto`: a 300-token prompt exceeds the A2 dispatch/combine limit (256 tokens per
    rank), so the prefill runs all-to-all and the decode dispatch/combine; output equals one process."""
    long = ",".join(str(2 + (i * 7) % 150) for i in range(300))
    args = ["generate", "--model", str(model_dir), "--prompt-ids", f"{long};20,21,22", "--max-new-tokens", "4",
            "--json", "--ignore-eos"]
    one = dsv4(*args)
    assert one.returncode == 0, one.stderr
    two = dsv4(*args, "--nproc", "2", "--moe-comm", "auto", "--dist-timeout", "30")
    assert two.returncode == 0, two.stderr
    lines = [ln for ln in two.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # one result, printed once
    a, b = json.loads(one.stdout), json.loads(lines[0])
    assert set(a) <= set(b)
    for key in ("prompt_ids", "output_ids", "finish_reason", "model", "backend"):
        assert a[key] == b[key], key
    assert b["nproc"] == 2
    assert set(b["moe_comm_calls"]) == {"alltoall", "dispatch_combine"}
    assert b["moe_comm_calls"]["alltoall"] == 4  # the prefill, one call per layer


def test_cli_logits_out_four_ranks(model_dir, tmp_path):
    """One prompt on four ranks (three idle): prompt logits and tokens equal the single-process run."""
    args = ["generate", "--model", str(model_dir), "--prompt-ids", "3,4,5,6,7,8,9,10,11", "--max-new-tokens", "3",
            "--json"]
    one = dsv4(*args, "--logits-out", str(tmp_path / "one.npy"))
    four = dsv4(*args, "--logits-out", str(tmp_path / "four.npy"), "--nproc", "4", "--moe-comm", "alltoall")
    assert one.returncode == 0 and four.returncode == 0, four.stderr
    assert json.loads(one.stdout)["output_ids"] == json.loads(four.stdout)["output_ids"]
    a, b = np.load(tmp_path / "one.npy"), np.load(tmp_path / "four.npy")
    assert a.shape == b.shape == (9, 160)
    assert rel_err(b, a) < 1e-4


def test_under_torchrun_each_process_is_one_rank(model_dir):
    """An external torchrun starts the ranks; rank 0 prints the one result."""
    args = ["generate", "--model", str(model_dir), "--prompt-ids", "5,6,7;8,9,10,11", "--max-new-tokens", "3",
            "--json", "--moe-comm", "dispatch_combine"]
    one = dsv4(*args)
    full = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                        "c10d", "--rdzv-endpoint", "localhost:0", "-m", "tools.cli", *args], capture_output=True,
                       text=True, env=full, timeout=180)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout
    out = json.loads(lines[0])
    assert out["nproc"] == 2 and out["output_ids"] == json.loads(one.stdout)["output_ids"]


def test_world_size_not_dividing_experts_is_refused(model_dir):
    p = dsv4("generate", "--model", str(model_dir), "--prompt-ids", "5,6", "--nproc", "3")
    assert p.returncode == 2
    assert "8 routed experts" in p.stderr and "--nproc 3" in p.stderr
    assert "loaded" not in p.stderr and "Traceback" not in p.stderr  # refused before any rank started


def test_rank_dying_mid_decode_fails_fast(model_dir):
    # the launcher reacts to the death, not to the collective timeout: with a timeout far longer than the
    # subprocess's own bound (dsv4(..., timeout=...)), waiting for it would end in TimeoutExpired, not here
    p = dsv4("generate", "--model", str(model_dir), "--prompt-ids", "5,6,7;8,9", "--max-new-tokens", "6",
             "--ignore-eos", "--nproc", "2", "--dist-timeout", "3600", env={"DSV4_FAULT_INJECT": "rank:1,step:2"})
    assert p.returncode != 0
    assert "dsv4 generate: error: rank 1 was killed by signal SIGKILL" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout == ""


def test_hung_rank_hits_the_collective_timeout(model_dir):
    p = dsv4("generate", "--model", str(model_dir), "--prompt-ids", "5,6,7;8,9", "--max-new-tokens", "6",
             "--ignore-eos", "--nproc", "2", "--dist-timeout", "3", "--moe-comm", "dispatch_combine",
             env={"DSV4_FAULT_INJECT": "rank:1,step:2,hang:1"})
    assert p.returncode != 0
    assert "rank 0: error:" in p.stderr and "--dist-timeout" in p.stderr, p.stderr
    assert "rank 0 exited with code 75 (a collective failed); stopped rank 1" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
