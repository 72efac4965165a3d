"""The CPU reference against transformers' DeepseekV4ForCausalLM (independent implementation, exact mode).

Random models (every tensor randomised) are saved in both namings, loaded back through our loader,
and compared on prompt logits (prefill) and on a greedy continuation through prefill + decode.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ascend.backends import get_backend  # noqa: E402
from common.generate import SamplingParams, generate  # noqa: E402
from common.loading import load_model  # noqa: E402
from common.model import Model  # noqa: E402
from tools.testing import hf_bridge  # noqa: E402

from .conftest import small_config  # noqa: E402

REL_TOL = 1e-4
NAMINGS = ["official", "hf-modules", "hf-saved"]
NEW_TOKENS = 24

CONFIGS = {
    # every kind, hash + routed MoE, hc_mult 4, YaRN, window 8, CSA 4 with top-3 of many groups, HCA 16
    "all-kinds-hc4-yarn": dict(over={}, prompt=70),
    # hc_mult 2, HCA first, no YaRN, hash on layer 0 only, window 16, longer prompt
    "hc2-hca-first": dict(over=dict(hc_mult=2, num_hidden_layers=3, compress_ratios=[8, 4, 0], num_hash_layers=1,
                                    sliding_window=16, rope_scaling=None, index_topk=5, num_experts_per_tok=3),
                          prompt=100),
    # the released per-head widths: head_dim 512, rope 64, window 128, CSA 4, HCA 128, hc_mult 4
    "real-widths": dict(over=dict(num_hidden_layers=3, compress_ratios=[0, 4, 128], head_dim=512,
                                  qk_rope_head_dim=64, num_attention_heads=2, o_groups=2, sliding_window=128,
                                  index_head_dim=128, index_n_heads=16, index_topk=16, num_hash_layers=1),
                        prompt=300),
}


def _hf_reference(hf, ids: list[int], n_new: int):
    """transformers: prompt logits, then greedy decode one token at a time through its cache."""
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = hf(x, use_cache=True)
        prompt_logits = out.logits[0].float().numpy()
        past = out.past_key_values
        tok = int(prompt_logits[-1].argmax())
        tokens, step_logits = [tok], []
        for _ in range(n_new - 1):
            out = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            lg = out.logits[0, -1].float().numpy()
            step_logits.append(lg)
            tok = int(lg.argmax())
            tokens.append(tok)
    return prompt_logits, tokens, np.stack(step_logits)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    cfg = small_config(**spec["over"])
    hf = hf_bridge.build_random_hf_model(cfg, seed=7)
    ids = np.random.default_rng(3).integers(2, cfg.vocab_size, spec["prompt"]).tolist()
    ref = _hf_reference(hf, ids, NEW_TOKENS)
    root = tmp_path_factory.mktemp(request.param)
    # three namings: DeepSeek's release names, transformers' module names, and what its save_pretrained writes
    hf_bridge.save_official(cfg, hf_bridge.hf_state_to_official(cfg, hf.state_dict()), root / "official")
    hf_bridge.save_hf_modules(hf, root / "hf-modules")
    hf.save_pretrained(root / "hf-saved", safe_serialization=True)
    return dict(name=request.param, cfg=cfg, ids=ids, ref=ref, root=root)


@pytest.mark.parametrize("naming", NAMINGS)
def test_prompt_logits_and_greedy_match_transformers(case, naming):
    lm = load_model(str(case["root"] / naming))
    assert lm.cfg.attn_kinds == case["cfg"].attn_kinds
    assert lm.cfg.hash_layers == case["cfg"].hash_layers
    m = Model(lm.cfg, lm.weights, get_backend("cpu"))
    ref_logits, ref_tokens, ref_steps = case["ref"]

    res = generate(m, [case["ids"]], SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False),
                   keep_prompt_logits=True)
    err = _rel(res.prompt_logits[0], ref_logits)
    agree = sum(a == b for a, b in zip(res.output_ids[0], ref_tokens, strict=False))
    print(f"{case['name']}/{naming}: prompt logits max-abs {np.abs(res.prompt_logits[0] - ref_logits).max():.3g}, "
          f"rel {err:.3g}; greedy agreement {agree}/{NEW_TOKENS}")
    assert err < REL_TOL
    assert res.output_ids[0] == ref_tokens

    # decode-step logits along the same token path
    cache = m.new_cache()
    m.forward([cache], [case["ids"]])
    steps = [m.forward([cache], [[t]]).logits[0][0] for t in ref_tokens[:-1]]
    assert _rel(np.stack(steps), ref_steps) < REL_TOL


@pytest.mark.parametrize("naming", NAMINGS[1:])
def test_naming_schemes_load_identical_weights(case, naming):
    a = load_model(str(case["root"] / "official")).weights
    b = load_model(str(case["root"] / naming)).weights
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
