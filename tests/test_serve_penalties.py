"""Penalties, logit_bias and min_tokens of `dsv4 serve`: the processing against transformers' own logits processors
(repetition penalty, sequence bias, min new tokens) and a hand-written frequency / presence formula, then through
the HTTP API on the tiny-chat model against a plain greedy loop that applies that same independent processing."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from common.chat import encode_text, load_v4_tokenizer
from tools.serve import api
from tools.serve.api import ApiError
from tools.serve.engine import Options
from tools.serve.penalties import History, Penalties, apply_penalties

from .test_serve import CFG, MODEL, ScriptedRunner, app_server, fixed_pools

EOS_ID = 1  # the eos id app_server gives its engine


@pytest.fixture(scope="module")
def tok():
    return load_v4_tokenizer()


def reference(z: np.ndarray, prompt: list[int], out: list[int], rep: float = 1.0, freq: float = 0.0,
              pres: float = 0.0, bias: dict[int, float] | None = None, min_tokens: int = 0,
              stops: tuple[int, ...] = ()) -> np.ndarray:
    """vLLM's order (min_tokens, logit_bias, repetition, frequency, presence) from independent pieces."""
    ids = torch.tensor([prompt + out])
    s = torch.from_numpy(np.array(z, dtype=np.float32))[None]
    if min_tokens and stops:
        s = MinNewTokensLengthLogitsProcessor(len(prompt), min_tokens, list(stops))(ids, s)
    if bias:
        s = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(ids, s)
    if rep != 1.0:
        s = RepetitionPenaltyLogitsProcessor(rep)(ids, s)
    z = s[0].numpy().copy()
    if out:
        counts = np.bincount(out, minlength=z.shape[0]).astype(np.float32)
        seen = counts > 0
        z[seen] -= np.float32(freq) * counts[seen]
        z[seen] -= np.float32(pres)
    return z


@pytest.mark.parametrize("case", [
    dict(rep=1.3), dict(rep=0.7), dict(freq=0.5), dict(pres=-0.8), dict(freq=1.5, pres=2.0, rep=1.1),
    dict(bias={3: 100.0, 17: -5.5, 999: 0.25}), dict(min_tokens=5, stops=(1, 4)), dict(min_tokens=2, stops=(1,)),
    dict(rep=1.2, freq=-0.3, pres=0.4, bias={5: 2.0}, min_tokens=4, stops=(1, 2)),
])
def test_processing_equals_transformers_processors(case):
    rng = np.random.default_rng(0)
    V = 1000
    prompt = rng.integers(0, V, 40).tolist()
    h = History()
    h.fed(prompt[:25])
    h.fed(prompt[25:])  # prefill in two chunks
    p = Penalties(case.get("pres", 0.0), case.get("freq", 0.0), case.get("rep", 1.0),
                  tuple(sorted(case.get("bias", {}).items())), case.get("min_tokens", 0), case.get("stops", ()))
    assert p.active
    out: list[int] = []
    for _ in range(6):
        z = (rng.standard_normal(V) * 4).astype(np.float32)
        got = apply_penalties(z, p, h)
        want = reference(z, prompt, out, **case)
        np.testing.assert_array_equal(got, want)
        tok = int(rng.integers(0, 12)) if out else 7  # repeats among a few ids
        h.fed([tok] if out else [])  # decode items feed the last sampled token back: not a prompt token
        h.sampled(tok)
        out.append(tok)


def test_neutral_request_has_no_processing():
    assert Options().penalties({1}) is None
    assert Options(max_new_tokens=5, min_tokens=3, stop_on_eos=False).penalties(set()) is None  # nothing to mask
    assert Options(max_new_tokens=5, min_tokens=3).penalties({1}).min_tokens_stop == (1,)
    assert Options(stop_token_ids=[9], min_tokens=2).penalties({1}).min_tokens_stop == (1, 9)


@pytest.mark.parametrize("body,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"), ({"logit_bias": {"1000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "big"}}, "logit_bias"), ({"logit_bias": [5]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
])
def test_bad_values_are_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        api._options(body, CFG, 10, None, None)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_options_checks_hold_without_the_api():
    for kw in ({"presence_penalty": float("nan")}, {"repetition_penalty": float("inf")},
               {"logit_bias": {3: 200.0}}, {"max_new_tokens": 2, "min_tokens": 3}):
        with pytest.raises(ValueError, match=next(iter(kw)) if "max_new_tokens" not in kw else "min_tokens"):
            Options(**kw)


@pytest.fixture(scope="module")
def model():
    from ascend.backends import get_backend
    from common.loading import load_model
    from common.model import Model
    from tools.serve.budget import SERVE_BLOCK_SIZE

    lm = load_model(MODEL)
    return Model(lm.cfg, lm.weights, get_backend("cpu"), block_size=SERVE_BLOCK_SIZE, num_blocks=fixed_pools(4, 512))


def greedy_reference(model, prompt: list[int], max_tokens: int, **case) -> list[int]:
    """A plain greedy loop over the model with the independent processing; stops at EOS like the engine."""
    cache = model.new_cache()
    try:
        out: list[int] = []
        lg = model.forward([cache], [prompt]).logits[0]
        while len(out) < max_tokens:
            z = reference(model.B.to_numpy(lg)[-1], prompt, out, stops=(EOS_ID,), **case)
            tok = int(np.argmax(z))
            if tok == EOS_ID:
                break
            out.append(tok)
            lg = model.forward([cache], [[tok]]).logits[0]
        return out
    finally:
        model.caches.release(cache)


def test_served_penalties_equal_the_reference_loop(model, tok):
    from tools.serve.runner import LocalRunner

    prompt = [0, 5, 9, 5, 9, 77, 301, 77]
    # the tiny model never repeats a token on its own: a bias makes it, and the penalties then bite
    cases = [dict(bias={77: 5.0}, freq=2.0, pres=2.0), dict(bias={77: 5.0, 12: 4.8}, freq=0.3, pres=-0.2, rep=1.2),
             dict(bias={77: 9.0}, rep=2.0), dict(freq=2.0, min_tokens=3, bias={EOS_ID: 6.0})]
    expect = [greedy_reference(model, prompt, 10, **c) for c in cases]
    plain, biased = greedy_reference(model, prompt, 10), greedy_reference(model, prompt, 10, bias={77: 5.0})
    assert all(e != plain for e in expect) and expect[0] != biased  # the comparisons below have teeth
    assert biased.count(77) > 1 and expect[0].count(77) == 1 and len(expect[3]) == 3
    with app_server(LocalRunner(model), tok, manager=model.caches) as (port, _):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120.0, max_retries=0)
        for case, want in zip(cases, expect, strict=True):
            extra = {"repetition_penalty": case.get("rep", 1.0), "min_tokens": case.get("min_tokens", 0)}
            r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                     presence_penalty=case.get("pres", 0.0), frequency_penalty=case.get("freq", 0.0),
                                     logit_bias={str(t): b for t, b in case.get("bias", {}).items()},
                                     extra_body=extra)
            assert r.choices[0].token_ids == want, case
        # logit_bias forces a token; min_tokens holds off an EOS that a bias makes certain
        r = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=4, temperature=0, logit_bias={"77": 100})
        assert r.choices[0].token_ids == [77] * 4
        r = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=8, temperature=0,
                                 logit_bias={str(EOS_ID): 100})
        assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "stop"
        r = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=8, temperature=0,
                                 logit_bias={str(EOS_ID): 100}, extra_body={"min_tokens": 3})
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
        assert EOS_ID not in r.choices[0].token_ids


def test_no_stop_string_before_min_tokens(tok):
    """A stop string inside the first min_tokens tokens does not end the reply (vLLM); a later one does."""
    script = encode_text(tok, "Hi there. Hi again.")
    n_first = len(encode_text(tok, "Hi"))
    with app_server(ScriptedRunner(script), tok) as (port, _):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60.0, max_retries=0)
        r = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=len(script), stop=["Hi"])
        assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
        r = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=len(script), stop=["Hi"],
                                 extra_body={"min_tokens": n_first + 1})
        assert r.choices[0].text == "Hi there. " and r.choices[0].finish_reason == "stop"
        text = "".join(ch.choices[0].text for ch in c.completions.create(  # streamed: the same text arrives
            model=MODEL, prompt=[0, 5], max_tokens=len(script), stop=["Hi"], stream=True,
            extra_body={"min_tokens": n_first + 1}) if ch.choices)
        assert text == "Hi there. "


def test_history_of_a_resumed_sequence_equals_the_uninterrupted_one():
    """After a preemption the executor is fed prompt + reply so far: past n_prompt those tokens count as reply."""
    prompt, reply = [3, 4, 4, 9], [7, 7, 2]
    p = Penalties(0.5, 0.25, 1.3, ((2, 1.0),), 6, (1,))
    h = History()
    h.fed(prompt)
    for t in reply:
        h.sampled(t)
        h.fed([t])  # decode feeds it back
    r = History(len(prompt))
    r.fed(prompt[:3])
    r.fed(prompt[3:] + reply)  # recompute in two chunks
    z = np.linspace(-3, 3, 12, dtype=np.float32)
    assert (r.n_out, r.counts) == (h.n_out, h.counts)
    np.testing.assert_array_equal(apply_penalties(z, p, r), apply_penalties(z, p, h))
