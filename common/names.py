"""The tensor-name map: official DeepSeek names <-> transformers names, and the expected shape of each.

Official names are canonical inside the port. Every reader and writer goes through this module.
transformers fuses routed experts into `mlp.experts.gate_up_proj` [E, 2I, d] (w1 rows then w3 rows) and
`mlp.experts.down_proj` [E, d, I]; those map to per-expert official tensors as views.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from .config import CSA, SWA, ModelConfig

# (official template, transformers template); {L} = layer prefix index
_PAIRS: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"),
    ("hc_head_fn", "model.hc_head.hc_fn"),
    ("hc_head_base", "model.hc_head.hc_base"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
    ("layers.{L}.attn_norm.weight", "model.layers.{L}.input_layernorm.weight"),
    ("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight"),
    ("layers.{L}.hc_attn_fn", "model.layers.{L}.attn_hc.fn"),
    ("layers.{L}.hc_attn_base", "model.layers.{L}.attn_hc.base"),
    ("layers.{L}.hc_attn_scale", "model.layers.{L}.attn_hc.scale"),
    ("layers.{L}.hc_ffn_fn", "model.layers.{L}.ffn_hc.fn"),
    ("layers.{L}.hc_ffn_base", "model.layers.{L}.ffn_hc.base"),
    ("layers.{L}.hc_ffn_scale", "model.layers.{L}.ffn_hc.scale"),
    ("layers.{L}.attn.wq_a.weight", "model.layers.{L}.self_attn.q_a_proj.weight"),
    ("layers.{L}.attn.q_norm.weight", "model.layers.{L}.self_attn.q_a_norm.weight"),
    ("layers.{L}.attn.wq_b.weight", "model.layers.{L}.self_attn.q_b_proj.weight"),
    ("layers.{L}.attn.wkv.weight", "model.layers.{L}.self_attn.kv_proj.weight"),
    ("layers.{L}.attn.kv_norm.weight", "model.layers.{L}.self_attn.kv_norm.weight"),
    ("layers.{L}.attn.wo_a.weight", "model.layers.{L}.self_attn.o_a_proj.weight"),
    ("layers.{L}.attn.wo_b.weight", "model.layers.{L}.self_attn.o_b_proj.weight"),
    ("layers.{L}.attn.attn_sink", "model.layers.{L}.self_attn.sinks"),
    ("layers.{L}.attn.compressor.wkv.weight", "model.layers.{L}.self_attn.compressor.kv_proj.weight"),
    ("layers.{L}.attn.compressor.wgate.weight", "model.layers.{L}.self_attn.compressor.gate_proj.weight"),
    ("layers.{L}.attn.compressor.ape", "model.layers.{L}.self_attn.compressor.position_bias"),
    ("layers.{L}.attn.compressor.norm.weight", "model.layers.{L}.self_attn.compressor.kv_norm.weight"),
    ("layers.{L}.attn.indexer.wq_b.weight", "model.layers.{L}.self_attn.compressor.indexer.q_b_proj.weight"),
    ("layers.{L}.attn.indexer.weights_proj.weight",
     "model.layers.{L}.self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("layers.{L}.attn.indexer.compressor.wkv.weight", "model.layers.{L}.self_attn.compressor.indexer.kv_proj.weight"),
    ("layers.{L}.attn.indexer.compressor.wgate.weight",
     "model.layers.{L}.self_attn.compressor.indexer.gate_proj.weight"),
    ("layers.{L}.attn.indexer.compressor.ape", "model.layers.{L}.self_attn.compressor.indexer.position_bias"),
    ("layers.{L}.attn.indexer.compressor.norm.weight",
     "model.layers.{L}.self_attn.compressor.indexer.kv_norm.weight"),
    ("layers.{L}.ffn.gate.weight", "model.layers.{L}.mlp.gate.weight"),
    ("layers.{L}.ffn.gate.bias", "model.layers.{L}.mlp.gate.e_score_correction_bias"),
    ("layers.{L}.ffn.gate.tid2eid", "model.layers.{L}.mlp.gate.tid2eid"),
    ("layers.{L}.ffn.shared_experts.w1.weight", "model.layers.{L}.mlp.shared_experts.gate_proj.weight"),
    ("layers.{L}.ffn.shared_experts.w2.weight", "model.layers.{L}.mlp.shared_experts.down_proj.weight"),
    ("layers.{L}.ffn.shared_experts.w3.weight", "model.layers.{L}.mlp.shared_experts.up_proj.weight"),
]

HF_GATE_UP = "model.layers.{L}.mlp.experts.gate_up_proj"
HF_DOWN = "model.layers.{L}.mlp.experts.down_proj"
EXPERT = "layers.{L}.ffn.experts.{E}.{W}.weight"

_HF_TO_OFF = [(re.compile("^" + re.escape(h).replace(r"\{L\}", r"(\d+)") + "$"), o) for o, h in _PAIRS]
_OFF_TO_HF = {o: h for o, h in _PAIRS}
_HF_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_OFF_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def is_hf_name(name: str) -> bool:
    return name.startswith("model.") or name == "lm_head.weight"


# Renames DeepSeek's convert.py accepts, and the one transformers' save_pretrained writes for the main
# attention's kv_norm (it reverses its own `.norm.` -> `.kv_norm.` rule on save).
_ALIASES = [
    (re.compile(r"\.self_attn\."), ".attn."),
    (re.compile(r"\.mlp\."), ".ffn."),
    (re.compile(r"\.weight_scale_inv$"), ".scale"),
    (re.compile(r"\.e_score_correction_bias$"), ".bias"),
    (re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight"),
]
_OFFICIAL_ROOTS = ("layers.", "mtp.", "embed.", "head.", "norm.", "hc_head_")


def hf_to_official(name: str) -> str | None:
    """Official name for a transformers module name, or for the `model.`-prefixed official-style names that
    transformers' save_pretrained writes (fused experts are handled by the loader); None if unknown."""
    for rx, off in _HF_TO_OFF:
        m = rx.match(name)
        if m:
            return off.replace("{L}", m.group(1)) if m.groups() else off
    base = name[len("model."):] if name.startswith("model.") else name
    for rx, repl in _ALIASES:
        base = rx.sub(repl, base)
    return base if base.startswith(_OFFICIAL_ROOTS) else None


def hf_fused_experts(name: str) -> tuple[int, str] | None:
    """(layer, 'gate_up_proj'|'down_proj') for a fused transformers expert tensor."""
    m = _HF_EXPERTS.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def official_to_hf(name: str) -> str | None:
    """The transformers name of a plain official tensor (None for per-expert and MTP tensors)."""
    m = _LAYER.match(name)
    key = f"layers.{{L}}.{m.group(2)}" if m else name
    hf = _OFF_TO_HF.get(key)
    if hf is None:
        return None
    return hf.replace("{L}", m.group(1)) if m else hf


def expert_name(layer_prefix: str, e: int, w: str) -> str:
    return f"{layer_prefix}.ffn.experts.{e}.{w}.weight"


def parse_expert(name: str) -> tuple[int, int, str] | None:
    m = _OFF_EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def layer_prefix(cfg: ModelConfig, layer: int) -> str:
    """Main layers are `layers.i`, MTP layers `mtp.j`."""
    return f"layers.{layer}" if layer < cfg.n_layers else f"mtp.{layer - cfg.n_layers}"


def expected_tensors(cfg: ModelConfig, with_mtp: bool = True,
                     experts: range | None = None) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(official name, logical shape, kind) for every tensor the model reads.

    kind: 'f' for floating weights, 'i' for integer tables. Shapes are the dequantized shapes.
    `experts` limits the routed experts to a slice (an expert-parallel rank's share).
    """
    d, c, hc = cfg.dim, cfg.head_dim, cfg.hc_mult
    mix = (2 + hc) * hc
    yield "embed.weight", (cfg.vocab_size, d), "f"
    yield "head.weight", (cfg.vocab_size, d), "f"
    yield "norm.weight", (d,), "f"
    yield "hc_head_fn", (hc, hc * d), "f"
    yield "hc_head_base", (hc,), "f"
    yield "hc_head_scale", (1,), "f"
    n = cfg.n_total_layers if with_mtp else cfg.n_layers
    for i in range(n):
        p = layer_prefix(cfg, i)
        kind, r = cfg.attn_kinds[i], cfg.compress_ratios[i]
        yield f"{p}.attn_norm.weight", (d,), "f"
        yield f"{p}.ffn_norm.weight", (d,), "f"
        for s in ("attn", "ffn"):
            yield f"{p}.hc_{s}_fn", (mix, hc * d), "f"
            yield f"{p}.hc_{s}_base", (mix,), "f"
            yield f"{p}.hc_{s}_scale", (3,), "f"
        yield f"{p}.attn.wq_a.weight", (cfg.q_lora_rank, d), "f"
        yield f"{p}.attn.q_norm.weight", (cfg.q_lora_rank,), "f"
        yield f"{p}.attn.wq_b.weight", (cfg.n_heads * c, cfg.q_lora_rank), "f"
        yield f"{p}.attn.wkv.weight", (c, d), "f"
        yield f"{p}.attn.kv_norm.weight", (c,), "f"
        yield f"{p}.attn.wo_a.weight", (cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * c // cfg.o_groups), "f"
        yield f"{p}.attn.wo_b.weight", (d, cfg.o_groups * cfg.o_lora_rank), "f"
        yield f"{p}.attn.attn_sink", (cfg.n_heads,), "f"
        if kind != SWA:
            coff = 2 if kind == CSA else 1
            yield f"{p}.attn.compressor.wkv.weight", (coff * c, d), "f"
            yield f"{p}.attn.compressor.wgate.weight", (coff * c, d), "f"
            yield f"{p}.attn.compressor.ape", (r, coff * c), "f"
            yield f"{p}.attn.compressor.norm.weight", (c,), "f"
        if kind == CSA:
            ic = cfg.index_head_dim
            yield f"{p}.attn.indexer.wq_b.weight", (cfg.index_n_heads * ic, cfg.q_lora_rank), "f"
            yield f"{p}.attn.indexer.weights_proj.weight", (cfg.index_n_heads, d), "f"
            yield f"{p}.attn.indexer.compressor.wkv.weight", (2 * ic, d), "f"
            yield f"{p}.attn.indexer.compressor.wgate.weight", (2 * ic, d), "f"
            yield f"{p}.attn.indexer.compressor.ape", (r, 2 * ic), "f"
            yield f"{p}.attn.indexer.compressor.norm.weight", (ic,), "f"
        E, I = cfg.n_routed_experts, cfg.moe_inter_dim
        yield f"{p}.ffn.gate.weight", (E, d), "f"
        if cfg.hash_layers[i]:
            yield f"{p}.ffn.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), "i"
        else:
            yield f"{p}.ffn.gate.bias", (E,), "f"
        for e in experts if experts is not None else range(E):
            yield expert_name(p, e, "w1"), (I, d), "f"
            yield expert_name(p, e, "w3"), (I, d), "f"
            yield expert_name(p, e, "w2"), (d, I), "f"
        if cfg.n_shared_experts:
            yield f"{p}.ffn.shared_experts.w1.weight", (I, d), "f"
            yield f"{p}.ffn.shared_experts.w3.weight", (I, d), "f"
            yield f"{p}.ffn.shared_experts.w2.weight", (d, I), "f"
        if i >= cfg.n_layers:
            yield f"{p}.e_proj.weight", (d, d), "f"
            yield f"{p}.h_proj.weight", (d, d), "f"
            yield f"{p}.enorm.weight", (d,), "f"
            yield f"{p}.hnorm.weight", (d,), "f"
            yield f"{p}.norm.weight", (d,), "f"
            yield f"{p}.hc_head_fn", (hc, hc * d), "f"
            yield f"{p}.hc_head_base", (hc,), "f"
            yield f"{p}.hc_head_scale", (1,), "f"


# ---- tensor roles: what a tensor is, which decides how a release stores it and how a recipe converts it ----

ROLES = (
    "embed", "head", "norm", "hc", "attn_linear", "attn_out_a", "compressor", "indexer_linear", "indexer_weights",
    "router", "router_bias", "hash_table", "sink", "ape", "expert", "shared_expert", "mtp_proj",
)

_ROLE_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^embed\.weight$"), "embed"),
    (re.compile(r"^head\.weight$"), "head"),
    (re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$"), "hc"),
    (re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$"), "expert"),
    (re.compile(r"\.ffn\.shared_experts\.w[123]\.weight$"), "shared_expert"),
    (re.compile(r"\.ffn\.gate\.weight$"), "router"),
    (re.compile(r"\.ffn\.gate\.bias$"), "router_bias"),
    (re.compile(r"\.ffn\.gate\.tid2eid$"), "hash_table"),
    (re.compile(r"\.attn\.attn_sink$"), "sink"),
    (re.compile(r"\.ape$"), "ape"),
    (re.compile(r"\.attn\.wo_a\.weight$"), "attn_out_a"),
    (re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_b)\.weight$"), "attn_linear"),
    (re.compile(r"\.attn\.indexer\.wq_b\.weight$"), "indexer_linear"),
    (re.compile(r"\.attn\.indexer\.weights_proj\.weight$"), "indexer_weights"),
    (re.compile(r"\.compressor\.(wkv|wgate)\.weight$"), "compressor"),
    (re.compile(r"^mtp\.\d+\.(e_proj|h_proj)\.weight$"), "mtp_proj"),
    (re.compile(r"norm\.weight$"), "norm"),
]

# Roles the model multiplies tokens through with Backend.linear (or grouped_linear, which dequantizes): the only
# ones an integer weight format (w8a8 / w4a8) may take. The embedding is a lookup table, the router's logits are
# computed in float by moe_gate, the rest are vectors or mHC maps.
LINEAR_ROLES = frozenset({"head", "attn_linear", "attn_out_a", "compressor", "indexer_linear", "indexer_weights",
                          "expert", "shared_expert", "mtp_proj"})

# How DeepSeek's release stores each role (section 2 of the model spec): FP8 e4m3 with a 128x128 block
# `.scale`, routed experts as packed FP4 with a per-32 `.scale` (or FP8 in Base checkpoints), the rest as is.
RELEASE_STORAGE = {
    "embed": "bf16", "head": "bf16", "norm": "bf16", "hc": "f32", "attn_linear": "fp8", "attn_out_a": "fp8",
    "compressor": "bf16", "indexer_linear": "fp8", "indexer_weights": "bf16", "router": "bf16",
    "router_bias": "f32", "hash_table": "int", "sink": "f32", "ape": "f32", "expert": "fp4",
    "shared_expert": "fp8", "mtp_proj": "fp8",
}


def role(name: str) -> str:
    """The role of an official tensor name (see ROLES); ValueError for a name the model does not use."""
    for rx, r in _ROLE_RULES:
        if rx.search(name):
            return r
    raise ValueError(f"tensor {name!r} has no known role")


def scale_name(weight_name: str) -> str:
    """The sibling scale tensor of a quantized weight (`x.weight` -> `x.scale`)."""
    return weight_name[: -len(".weight")] + ".scale" if weight_name.endswith(".weight") else weight_name + ".scale"


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def device_dtype(name: str, act_dtype: str) -> str:
    """The dtype a floating weight is held in on a device running activations in `act_dtype`: float32 for the
    roles the release itself stores in float32 (mHC fn/scale/base, router bias, attention sinks, compressor
    ape; RELEASE_STORAGE above), `act_dtype` for the rest."""
    if act_dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {act_dtype!r}")
    try:
        kept = RELEASE_STORAGE[role(name)] == "f32"
    except ValueError:
        kept = False
    return "float32" if kept else act_dtype
