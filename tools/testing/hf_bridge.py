"""Bridge to transformers' DeepseekV4ForCausalLM, the independent implementation used as an oracle.

Builds the transformers config from a ModelConfig, moves weights both ways through `common.names`,
and writes checkpoints in either naming. Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common import names
from common.checkpoint import INDEX
from common.config import CSA, HCA, SWA, ModelConfig
from common.safetensors_io import write_safetensors

_KIND_TO_HF = {SWA: "sliding_attention", CSA: "compressed_sparse_attention", HCA: "heavily_compressed_attention"}


def official_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """config.json in DeepSeek's spelling (compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling)."""
    n_hash = sum(cfg.hash_layers[: cfg.n_layers])
    if list(cfg.hash_layers[:n_hash]) != [True] * n_hash:
        raise ValueError("DeepSeek's spelling needs the hash layers first (num_hash_layers)")
    d = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_dim, "q_lora_rank": cfg.q_lora_rank, "o_lora_rank": cfg.o_lora_rank,
        "o_groups": cfg.o_groups, "moe_intermediate_size": cfg.moe_inter_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc", "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.route_scale,
        "num_hash_layers": n_hash, "swiglu_limit": cfg.swiglu_limit, "hidden_act": "silu",
        "sliding_window": cfg.window, "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "num_nextn_predict_layers": cfg.n_mtp_layers, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id),
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "compress_ratios": list(cfg.compress_ratios),
    }
    if cfg.yarn is not None:
        y = cfg.yarn
        d["rope_scaling"] = {"type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                             "original_max_position_embeddings": y.original_max_position_embeddings}
    return d


def hf_config(cfg: ModelConfig):
    """A transformers DeepseekV4Config in its own spelling (layer_types, compress_rates, rope_parameters)."""
    from transformers import DeepseekV4Config

    n = cfg.n_layers
    rates = {}
    for k, r in zip(cfg.attn_kinds[:n], cfg.compress_ratios[:n], strict=True):
        if k != SWA:
            hk = _KIND_TO_HF[k]
            if rates.setdefault(hk, r) != r:
                raise ValueError(f"transformers supports one compress rate per attention kind; "
                                 f"{hk} has {rates[hk]} and {r}")
    rope: dict[str, Any] = {}
    if cfg.yarn is not None:
        y = cfg.yarn
        rope = {"rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                "original_max_position_embeddings": y.original_max_position_embeddings}
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=n, num_attention_heads=cfg.n_heads, num_key_value_heads=1, head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.n_activated_experts,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts, scoring_func=cfg.score_func,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.route_scale,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        layer_types=[_KIND_TO_HF[k] for k in cfg.attn_kinds[:n]],
        compress_rates={**{"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}, **rates},
        compress_rope_theta=cfg.compress_rope_theta, hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps, mlp_layer_types=["hash_moe" if h else "moe" for h in cfg.hash_layers[:n]],
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, num_nextn_predict_layers=0, rms_norm_eps=cfg.norm_eps,
        bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_id), tie_word_embeddings=False,
        partial_rotary_factor=cfg.rope_dim / cfg.head_dim, rope_parameters=rope or None,
    )


def hf_state_to_official(cfg: ModelConfig, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers state dict (torch tensors) -> official per-expert tensors (numpy, same dtype)."""
    out: dict[str, np.ndarray] = {}
    I = cfg.moe_inter_dim
    for k, v in state.items():
        a = v.detach().cpu().numpy()
        fused = names.hf_fused_experts(k)
        if fused is not None:
            layer, which = fused
            for e in range(a.shape[0]):
                p = f"layers.{layer}"
                if which == "gate_up_proj":
                    out[names.expert_name(p, e, "w1")] = a[e, :I]
                    out[names.expert_name(p, e, "w3")] = a[e, I:]
                else:
                    out[names.expert_name(p, e, "w2")] = a[e]
            continue
        off = names.hf_to_official(k)
        if off is not None:
            out[off] = a
    return out


def official_to_hf_state(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official tensors -> transformers state dict (numpy), fusing experts; MTP tensors are dropped."""
    out: dict[str, np.ndarray] = {}
    E = cfg.n_routed_experts
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        gu = [np.concatenate([weights[names.expert_name(p, e, "w1")], weights[names.expert_name(p, e, "w3")]])
              for e in range(E)]
        out[names.HF_GATE_UP.replace("{L}", str(i))] = np.stack(gu)
        out[names.HF_DOWN.replace("{L}", str(i))] = np.stack([weights[names.expert_name(p, e, "w2")]
                                                              for e in range(E)])
    for k, v in weights.items():
        hf = names.official_to_hf(k)
        if hf is not None:
            out[hf] = v
    return out


def randomize_(model, seed: int) -> None:
    """Give every parameter and routing buffer of a transformers model non-trivial random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(p.shape)
            if "inv_freq" in name:
                continue
            if leaf == "tid2eid":
                keys = torch.rand((shape[0], cfg.n_routed_experts), generator=g)
                p.copy_(torch.argsort(keys, dim=1)[:, : shape[1]])
            elif leaf == "e_score_correction_bias":
                p.copy_(0.3 * torch.randn(shape, generator=g))
            elif "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(shape, generator=g))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1.0 + 0.3 * torch.randn(shape, generator=g))
            elif leaf in ("base", "hc_base", "position_bias", "sinks"):
                p.copy_(0.7 * torch.randn(shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(shape, generator=g) / shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(shape, generator=g))


def build_random_hf_model(cfg: ModelConfig, seed: int = 0):
    import torch
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    randomize_(model, seed)
    return model


def hf_model_from_weights(cfg: ModelConfig, weights: dict[str, np.ndarray]):
    """A transformers model holding exactly `weights` (for benchmarks against the same model)."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(hf_config(cfg))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official_to_hf_state(cfg, weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # rotary buffers are computed, not stored: rebuild them on the CPU
    for mod in model.modules():
        if type(mod).__name__ == "DeepseekV4RotaryEmbedding":
            fresh = type(mod)(model.config)
            for lt in fresh.layer_types:
                for suffix in ("inv_freq", "original_inv_freq"):
                    setattr(mod, f"{lt}_{suffix}", getattr(fresh, f"{lt}_{suffix}"))
    real_missing = [m for m in missing if "inv_freq" not in m]
    if real_missing or unexpected:
        raise RuntimeError(f"state mismatch: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    return model.float().eval()


def save_hf_modules(model, out_dir: str | Path) -> None:
    """A single-file checkpoint under transformers' module names (state_dict keys) and its own config spelling."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if "inv_freq" not in k}
    write_safetensors(out / "model.safetensors", state, {"format": "pt"})
    model.config.to_json_file(str(out / "config.json"))


def save_official(cfg: ModelConfig, tensors: dict[str, np.ndarray], out_dir: str | Path, shards: int = 2) -> None:
    """Write a checkpoint in DeepSeek's naming and spelling, sharded with an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s * per:(s + 1) * per]}
        write_safetensors(out / fname, part, {"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(official_config_dict(cfg), indent=1))


