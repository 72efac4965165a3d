"""Prefill + decode (and any chunking, and batching) equal a full recompute; MTP likewise."""

from __future__ import annotations

import numpy as np
import pytest

from ascend.backends import get_backend
from common.generate import SamplingParams, generate
from common.model import Model
from common.presets import random_weights

from .conftest import small_config

TOL = 1e-5


def _model(**over) -> Model:
    cfg = small_config(**over)
    return Model(cfg, random_weights(cfg, seed=5), get_backend("cpu"))


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model() -> Model:
    return _model(num_nextn_predict_layers=1, compress_ratios=[0, 4, 16, 4, 0])


@pytest.mark.parametrize("chunks", [
    [37],                              # one prefill
    [1] * 37,                          # token-by-token decode from the start
    [5, 1, 1, 1, 29],                  # prefill, decode, then a long chunk across window and groups
    [3, 4, 9, 16, 1, 4],               # chunk boundaries on and off compression-group edges
    [20, 1, 1, 1, 1, 1, 1, 1, 1, 9],
])
def test_chunked_equals_full(model, chunks):
    ids = np.random.default_rng(0).integers(2, model.cfg.vocab_size, sum(chunks)).tolist()
    full = model.forward([model.new_cache()], [ids], all_logits=True).logits[0]
    cache, parts, a = model.new_cache(), [], 0
    for n in chunks:
        parts.append(model.forward([cache], [ids[a:a + n]], all_logits=True).logits[0])
        a += n
    assert cache.pos == len(ids)
    assert _rel(np.concatenate(parts), full) < TOL


def test_batch_of_different_lengths_equals_single_runs(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, model.cfg.vocab_size, n).tolist() for n in (3, 40, 17, 9)]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    batched = generate(model, prompts, params, keep_prompt_logits=True)
    for i, p in enumerate(prompts):
        single = generate(model, [p], params, keep_prompt_logits=True)
        assert batched.output_ids[i] == single.output_ids[0]
        assert _rel(batched.prompt_logits[i], single.prompt_logits[0]) < TOL


def test_mtp_incremental_equals_full(model):
    assert model.mtp_enabled
    ids = np.random.default_rng(2).integers(2, model.cfg.vocab_size, 30).tolist()
    main = model.new_cache()
    out = model.forward([main], [ids[:-1]], all_logits=True, keep_hidden=True)
    full = model.mtp_forward([main], out.hidden, [ids[1:]], all_logits=True)[0]
    assert full.shape == (len(ids) - 1, model.cfg.vocab_size)
    c2 = model.new_cache()
    parts = []
    for a, b in [(0, 10), (10, 11), (11, 12), (12, 29)]:
        o = model.forward([c2], [ids[a:b]], all_logits=True, keep_hidden=True)
        parts.append(model.mtp_forward([c2], o.hidden, [ids[a + 1:b + 1]], all_logits=True)[0])
    assert _rel(np.concatenate(parts), full) < TOL
    assert c2.mtp_pos == c2.pos == len(ids) - 1


def test_mtp_is_off_without_weights():
    m = _model()
    with pytest.raises(RuntimeError, match="no MTP weights"):
        m.mtp_forward([m.new_cache()], None, [[3]])


def test_generation_stops_on_eos_and_max_tokens(model):
    eos = model.cfg.eos_token_id[0]
    ids = [5, 6, 7]
    greedy = generate(model, [ids], SamplingParams(max_new_tokens=40, stop_on_eos=False)).output_ids[0]
    assert len(greedy) == 40
    res = generate(model, [ids], SamplingParams(max_new_tokens=40))
    if eos in greedy:
        assert res.output_ids[0] == greedy[: greedy.index(eos) + 1]
        assert res.finish_reasons[0] == "eos"
    else:
        assert res.finish_reasons[0] == "length"


def test_sampling_seed_is_reproducible(model):
    p = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.8, top_k=20, seed=11, stop_on_eos=False)
    a = generate(model, [[4, 5, 6]], p).output_ids[0]
    b = generate(model, [[4, 5, 6]], p).output_ids[0]
    c = generate(model, [[4, 5, 6]], SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.8, top_k=20,
                                                    seed=12, stop_on_eos=False)).output_ids[0]
    assert a == b
    assert a != c


def test_generate_with_chunked_prefill_equals_one_prefill(model):
    rng = np.random.default_rng(9)
    prompts = [rng.integers(2, model.cfg.vocab_size, n).tolist() for n in (23, 5, 40)]
    params = SamplingParams(max_new_tokens=4, stop_on_eos=False)
    one = generate(model, prompts, params, keep_prompt_logits=True)
    chunked = generate(model, prompts, params, keep_prompt_logits=True, prefill_chunk=7)
    assert chunked.output_ids == one.output_ids
    for a, b in zip(chunked.prompt_logits, one.prompt_logits, strict=True):
        assert _rel(a, b) < TOL
