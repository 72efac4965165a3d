"""Shared fixtures: small model configs and random models in both checkpoint namings."""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.config import ModelConfig, config_from_dict

# keep BLAS and torch to the CI machine's two cores
os.environ.setdefault("OMP_NUM_THREADS", "2")


def small_config(**over) -> ModelConfig:
    """A few-layer V4 with every attention kind; small widths so tests run in seconds."""
    raw = dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
        qk_rope_head_dim=8, q_lora_rank=32, o_lora_rank=16, o_groups=2, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.5, num_hash_layers=2,
        swiglu_limit=10.0, sliding_window=8, index_n_heads=16, index_head_dim=16, index_topk=3, hc_mult=4,
        hc_sinkhorn_iters=20, compress_ratios=[0, 4, 16, 4], num_nextn_predict_layers=0,
        rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=64, beta_fast=32, beta_slow=1),
        eos_token_id=1, bos_token_id=0,
    )
    raw.update(over)
    return config_from_dict(raw, "test-config")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
