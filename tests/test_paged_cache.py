"""The paged cache manager: block tables per kind, sliding release, admission, prefix reuse, byte accounting."""

from __future__ import annotations

import numpy as np
import pytest

from ascend.backends import get_backend
from common.config import CSA
from common.model import Model
from common.paged_cache import NULL_BLOCK, CacheFull, PagedCacheManager, cache_format, layer_kinds, sequence_bytes
from common.presets import random_weights

from .conftest import small_config


@pytest.fixture(scope="module")
def model() -> Model:
    cfg = small_config(compress_ratios=[0, 4, 16, 4])
    return Model(cfg, random_weights(cfg, seed=5), get_backend("cpu"))


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tables_follow_the_kernels_layout_and_sliding_release(model):
    cfg, mgr = model.cfg, model.caches
    cache = model.new_cache()
    n = 37
    model.forward([cache], [list(range(2, 2 + n))])
    bs = mgr.bs
    for i in range(cfg.n_layers):
        assert mgr.cache(i, "swa").shape[1:] == (bs, 1, cfg.head_dim)  # PA_ND [blocks, block_size, 1, D]
        r = cfg.compress_ratios[i]
        if r:
            c = 2 if cfg.attn_kinds[i] == CSA else 1
            assert mgr.cache(i, f"state{r}").shape[1:] == (bs, 2 * c * cfg.head_dim)  # [kv_state | score_state]
    swa = cache.tables[("main", "swa")]
    # the window (8) at length 37 needs positions 30..36: blocks 1 and 2; block 0 went back to the pool
    assert swa[0] == NULL_BLOCK and swa[1] != NULL_BLOCK and swa[2] != NULL_BLOCK
    assert len(cache.tables[("main", "kv4")]) == 1 and cache.tables[("main", "kv4")][0] != NULL_BLOCK
    st = cache.tables[("main", "state4")]  # overlapping compressor: open group 9 and group 8 -> positions 32..36
    assert st[:2] == [NULL_BLOCK, NULL_BLOCK] and st[2] != NULL_BLOCK
    st16 = cache.tables[("main", "state16")]  # open group 2 of ratio 16 starts at 32
    assert st16[:2] == [NULL_BLOCK, NULL_BLOCK] and st16[2] != NULL_BLOCK
    used = mgr.bytes_in_use()
    assert used["kv4"] == 2 * bs * 4 * cfg.head_dim  # two CSA layers share the table, one block each
    mgr.release(cache)
    assert all(v == 0 for v in mgr.bytes_in_use().values())


def test_compressed_entries_in_the_cache_equal_a_recompute(model):
    """Entries written across chunk boundaries equal those of one prefill (the state cache carries groups)."""
    ids = np.random.default_rng(3).integers(2, model.cfg.vocab_size, 45).tolist()
    a, b = model.new_cache(), model.new_cache()
    model.forward([a], [ids])
    for lo, hi in ((0, 3), (3, 10), (10, 11), (11, 45)):
        model.forward([b], [ids[lo:hi]])
    mgr = model.caches
    for i in range(model.cfg.n_layers):
        r = model.cfg.compress_ratios[i]
        if not r:
            continue
        for k in ([f"kv{r}", f"idx{r}"] if model.cfg.attn_kinds[i] == CSA else [f"kv{r}"]):
            rows = np.arange(45 // r)
            ga = mgr.cache(i, k).reshape(-1, mgr.cache(i, k).shape[-1])[mgr.slots(a, "main", k, rows)]
            gb = mgr.cache(i, k).reshape(-1, mgr.cache(i, k).shape[-1])[mgr.slots(b, "main", k, rows)]
            assert _rel(gb, ga) < 1e-5, (i, k)


def test_fixed_budget_admission_and_cache_full():
    cfg = small_config()
    mgr = PagedCacheManager(cfg, get_backend("cpu"), block_size=16, num_blocks=3)
    seq = mgr.new_sequence()
    need = mgr.blocks_needed(None, 40)
    assert need["swa"] == 3 and need["kv4"] == 1 and need["state4"] == 3
    assert mgr.can_allocate(None, 40) and not mgr.can_allocate(None, 60)
    mgr.allocate(seq, "main", 40)
    assert mgr.free_blocks()["swa"] == 0
    with pytest.raises(CacheFull, match="swa"):
        mgr.allocate(mgr.new_sequence(), "main", 1)
    seq.pos = 40
    mgr.trim(seq, "main")  # the window (8) keeps positions 33..39: block 2 only
    assert mgr.free_blocks()["swa"] == 2
    mgr.release(seq)
    assert mgr.free_blocks()["swa"] == 3


def test_released_handles_return_their_blocks(model):
    import gc

    free = dict(model.caches.free_blocks())
    c = model.new_cache()
    model.forward([c], [[5, 6, 7]])
    del c
    gc.collect()
    assert model.caches.free_blocks() == free


def test_whole_block_prefix_reuse_equals_full_recompute(model):
    mgr = model.caches
    unit = mgr.prefix_unit()  # lcm(16, 16*4, 16*16) = 256 tokens
    assert unit == 256
    rng = np.random.default_rng(4)
    prefix = rng.integers(2, model.cfg.vocab_size, unit + 5).tolist()
    tail = rng.integers(2, model.cfg.vocab_size, 7).tolist()
    src = model.new_cache()
    model.forward([src], [prefix[:unit]])
    dst = model.new_cache()
    assert mgr.share_prefix(src, dst, len(prefix)) == unit
    # the shared compressed blocks are referenced twice; the copied window / state blocks are new
    assert dst.tables[("main", "kv4")][0] == src.tables[("main", "kv4")][0]
    assert dst.tables[("main", "swa")][-1] != src.tables[("main", "swa")][-1]
    got = model.forward([dst], [prefix[unit:] + tail], all_logits=True).logits[0]
    model.forward([src], [[9, 9, 9]])  # the source goes on independently
    full = model.forward([model.new_cache()], [prefix + tail], all_logits=True).logits[0]
    assert _rel(got, full[unit:]) < 1e-5
    assert mgr.share_prefix(src, model.new_cache(), 10) == 0  # under one unit: nothing reused


def test_scheduler_prefix_lookup(model):
    """register_prefix / reuse_prefix: a later request with the same system prompt starts from its blocks."""
    mgr = model.caches
    rng = np.random.default_rng(6)
    system = rng.integers(2, model.cfg.vocab_size, 256 + 3).tolist()
    a = model.new_cache()
    model.forward([a], [system])
    mgr.register_prefix(a, system)
    b = model.new_cache()
    req = system + [7, 8]
    n = mgr.reuse_prefix(b, req)
    assert n == 256
    got = model.forward([b], [req[n:]], all_logits=True).logits[0]
    full = model.forward([model.new_cache()], [req], all_logits=True).logits[0]
    assert _rel(got, full[n:]) < 1e-5
    assert mgr.reuse_prefix(model.new_cache(), [3] * 300) == 0  # unknown prefix


def test_sequence_bytes_matches_the_managers_accounting(model):
    """`sequence_bytes` (what plan reads) and the live manager count the same blocks."""
    cfg, mgr = model.cfg, model.caches
    c = model.new_cache()
    n = 300
    model.forward([c], [list(np.arange(n) % (cfg.vocab_size - 2) + 2)])
    used = {}
    for (_, kind), table in c.tables.items():
        used[kind] = (sum(b != NULL_BLOCK for b in table) * mgr.kind_bs(kind) * mgr.row_bytes(kind)
                      * len(mgr.kind_layers[kind]))
    want = sequence_bytes(cfg, cache_format(cfg, "float32"), n, block_size=mgr.bs, state_block_size=mgr.state_bs)
    assert {k: v["bytes"] for k, v in want.items()} == used
    assert [k.name for k in layer_kinds(cfg, 1)] == ["swa", "kv4", "state4", "idx4", "idx_state4"]


def test_block_size_limits():
    with pytest.raises(ValueError, match="multiple of 16"):
        PagedCacheManager(small_config(), get_backend("cpu"), block_size=24)
