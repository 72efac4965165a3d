"""Model configuration: one dataclass, read from either config.json spelling or a YAML preset.

DeepSeek ships `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`; transformers
saves `layer_types`, `mlp_layer_types`, `compress_rates`, `rope_parameters`, `partial_rotary_factor`.
Both fold into `ModelConfig`, whose per-layer lists cover the main layers followed by the MTP layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or field is missing, unknown or inconsistent."""


SWA, CSA, HCA = "swa", "csa", "hca"
ATTN_KINDS = (SWA, CSA, HCA)

# transformers' layer-type names for each attention kind
HF_LAYER_TYPES = {
    "sliding_attention": SWA,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
HF_MLP_TYPES = ("hash_moe", "moe")
CSA_RATIO = 4  # the overlapping compressor with a lightning indexer; any other ratio > 0 is HCA

# Keys that change nothing in inference (training knobs, bookkeeping, HF generic attributes).
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
    "use_cache", "attention_dropout", "attention_bias", "mlp_bias", "hidden_act", "topk_method",
    "n_group", "topk_group", "num_key_value_heads", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "pad_token_id", "auto_map", "_name_or_path", "name_or_path", "keys_to_ignore_at_inference",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "problem_type", "id2label", "label2id", "task_specific_params",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "ep_size",
    "aux_loss_alpha", "seq_aux", "first_k_dense_replace", "moe_layer_freq", "scale_fmt", "quantization_config",
    "expert_dtype", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "num_experts_per_token",
    "embedding_multiplier", "layer_norm_eps", "use_sliding_window", "max_window_layers", "rope_interleave",
    "intermediate_size", "num_local_experts", "compress_rope_parameters",
}

# Field name in config.json -> ModelConfig attribute.
_RENAMES = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "head_dim": "head_dim", "q_lora_rank": "q_lora_rank",
    "o_lora_rank": "o_lora_rank", "o_groups": "o_groups", "moe_intermediate_size": "moe_inter_dim",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "scoring_func": "score_func", "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "route_scale", "swiglu_limit": "swiglu_limit", "sliding_window": "window",
    "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim", "index_topk": "index_topk",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
    "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta",
    "max_position_embeddings": "max_position_embeddings", "num_nextn_predict_layers": "n_mtp_layers",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "tie_word_embeddings": "tie_word_embeddings",
}
# Keys that are read by dedicated logic below.
_SPECIAL_KEYS = {
    "compress_ratios", "layer_types", "compress_rates", "compress_rate_csa", "compress_rate_hca",
    "num_hash_layers", "mlp_layer_types", "qk_rope_head_dim", "partial_rotary_factor", "rope_scaling",
    "rope_parameters",
}


@dataclass(frozen=True)
class Yarn:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    moe_inter_dim: int
    n_routed_experts: int
    n_activated_experts: int
    # per layer, main layers then MTP layers
    compress_ratios: tuple[int, ...]
    attn_kinds: tuple[str, ...]
    hash_layers: tuple[bool, ...]
    n_shared_experts: int = 1
    score_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    swiglu_limit: float = 0.0
    window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: Yarn | None = None
    max_position_embeddings: int = 1048576
    n_mtp_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def n_total_layers(self) -> int:
        return self.n_layers + self.n_mtp_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    def describe_layers(self) -> list[str]:
        out = []
        for i in range(self.n_total_layers):
            kind, r = self.attn_kinds[i], self.compress_ratios[i]
            tag = "mtp" if i >= self.n_layers else str(i)
            moe = "hash-moe" if self.hash_layers[i] else "moe"
            out.append(f"layer {tag}: {kind.upper()}" + (f" (ratio {r})" if r else "") + f", {moe}")
        return out


def _kind_of_ratio(r: int, where: str) -> str:
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ConfigError(f"{where}: compress ratio {r!r} is not a non-negative integer")
    if r == 0:
        return SWA
    return CSA if r == CSA_RATIO else HCA


def _number(d: dict, key: str, where: str, default: float | None = None, low: float | None = None) -> float:
    """A finite number (not a bool or a string), > `low` when given."""
    v = d.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or (low is not None and v <= low):
        bound = f" > {low:g}" if low is not None else ""
        raise ConfigError(f"{where}: field {key!r} must be a finite number{bound}, got {v!r}")
    return float(v)


def _yarn_from(d: dict, where: str) -> Yarn | None:
    rtype = d.get("rope_type", d.get("type", "default"))
    if rtype in (None, "default"):
        return None
    if rtype != "yarn":
        raise ConfigError(f"{where}: rope type {rtype!r} is not supported (DeepSeek-V4 uses 'yarn' or 'default')")
    for k in ("factor", "original_max_position_embeddings"):
        if k not in d:
            raise ConfigError(f"{where}: yarn needs field {k!r}")
    orig = d["original_max_position_embeddings"]
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise ConfigError(f"{where}: field 'original_max_position_embeddings' must be a positive integer, got {orig!r}")
    return Yarn(factor=_number(d, "factor", where, low=0), original_max_position_embeddings=orig,
                beta_fast=_number(d, "beta_fast", where, 32.0) or 32.0,
                beta_slow=_number(d, "beta_slow", where, 1.0) or 1.0)


def _list_field(raw: dict, key: str, source: str) -> list:
    v = raw[key]
    if not isinstance(v, list):  # a string would be counted by its characters
        raise ConfigError(f"{source}: field {key!r} must be a list, got {type(v).__name__} {v!r}")
    return v


def _check_keys(raw: Any, source: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON/YAML object at top level")
    if "text_config" in raw:
        raise ConfigError(f"{source}: field 'text_config' (DeepSeek-V4.1 layout) is not supported by this port yet")
    unknown = sorted(k for k in raw if k not in _RENAMES and k not in _SPECIAL_KEYS and k not in _IGNORED_KEYS
                     and not k.startswith("dspark_"))
    if unknown:
        raise ConfigError(f"{source}: unknown field {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else ""))


_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_lora_rank", "o_groups",
             "moe_inter_dim", "n_routed_experts", "n_activated_experts")


def _renamed_fields(raw: dict, source: str) -> dict[str, Any]:
    kw = {attr: raw[k] for k, attr in _RENAMES.items() if raw.get(k) is not None}
    inv = {v: k for k, v in _RENAMES.items()}
    for req in _REQUIRED:
        if req not in kw:
            raise ConfigError(f"{source}: missing field {inv[req]!r}")
    for attr in ("n_layers", "n_mtp_layers"):
        v = kw.get(attr, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{source}: field {inv[attr]!r} must be a non-negative integer, got {v!r}")
    eos = kw.get("eos_token_id", 1)
    kw["eos_token_id"] = tuple(eos) if isinstance(eos, list | tuple) else ((eos,) if eos is not None else ())
    return kw


def _kinds_from_layer_types(raw: dict, n: int, n_mtp: int, source: str) -> tuple[list[str], list[int]]:
    """transformers' spelling: layer_types + compress_rates (or compress_rate_csa / _hca)."""
    types = _list_field(raw, "layer_types", source)
    rates = dict(raw.get("compress_rates") or {})
    for key, hf in (("compress_rate_csa", "compressed_sparse_attention"),
                    ("compress_rate_hca", "heavily_compressed_attention")):
        if key in raw:
            rates[hf] = raw[key]
    rates.setdefault("compressed_sparse_attention", CSA_RATIO)
    rates.setdefault("heavily_compressed_attention", 128)
    for k, r in rates.items():
        if k not in HF_LAYER_TYPES or k == "sliding_attention":
            raise ConfigError(f"{source}: compress_rates has unknown attention type {k!r}")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"{source}: compress_rates[{k!r}] must be a positive integer, got {r!r}")
    if len(types) != n:
        raise ConfigError(f"{source}: layer_types has {len(types)} entries, num_hidden_layers is {n}")
    kinds, ratios = [], []
    for i, t in enumerate(types):
        if t not in HF_LAYER_TYPES:
            raise ConfigError(f"{source}: layer_types[{i}] = {t!r} is not one of {sorted(HF_LAYER_TYPES)}")
        kinds.append(HF_LAYER_TYPES[t])
        ratios.append(0 if t == "sliding_attention" else int(rates[t]))
    # MTP layers are sliding-window in every release
    return kinds + [SWA] * n_mtp, ratios + [0] * n_mtp


def _kinds_from_ratios(raw: dict, n: int, n_mtp: int, source: str) -> tuple[list[str], list[int]]:
    """DeepSeek's spelling: compress_ratios per layer (0 = SWA, 4 = CSA, else HCA), MTP layers optional."""
    ratios = list(_list_field(raw, "compress_ratios", source))
    if len(ratios) == n:
        ratios += [0] * n_mtp
    elif len(ratios) < n + n_mtp:
        raise ConfigError(f"{source}: compress_ratios has {len(ratios)} entries, expected "
                          f"{n} (num_hidden_layers) or {n + n_mtp} (+ num_nextn_predict_layers)")
    ratios = ratios[: n + n_mtp]  # DSpark checkpoints list extra stage layers; only the first n + n_mtp matter
    return [_kind_of_ratio(r, f"{source}: compress_ratios[{i}]") for i, r in enumerate(ratios)], ratios


def _attention_kinds(raw: dict, n: int, n_mtp: int, source: str) -> tuple[list[str], list[int]]:
    if raw.get("layer_types") is not None:
        return _kinds_from_layer_types(raw, n, n_mtp, source)
    if "compress_ratios" in raw:
        return _kinds_from_ratios(raw, n, n_mtp, source)
    raise ConfigError(f"{source}: missing field 'compress_ratios' (or 'layer_types')")


def _hash_layers(raw: dict, n: int, n_mtp: int, source: str) -> list[bool]:
    if raw.get("mlp_layer_types") is not None:
        mtypes = _list_field(raw, "mlp_layer_types", source)
        if len(mtypes) != n:
            raise ConfigError(f"{source}: mlp_layer_types has {len(mtypes)} entries, num_hidden_layers is {n}")
        for i, t in enumerate(mtypes):
            if t not in HF_MLP_TYPES:
                raise ConfigError(f"{source}: mlp_layer_types[{i}] = {t!r} is not one of {list(HF_MLP_TYPES)}")
        return [t == "hash_moe" for t in mtypes] + [False] * n_mtp
    nh = raw.get("num_hash_layers", 0) or 0
    if not isinstance(nh, int) or isinstance(nh, bool) or nh < 0 or nh > n:
        raise ConfigError(f"{source}: num_hash_layers = {nh!r} outside [0, {n}]")
    return [i < nh for i in range(n)] + [False] * n_mtp


def _rope_dim(raw: dict, head_dim: int, source: str) -> int:
    rope_params = raw.get("rope_parameters")
    if "qk_rope_head_dim" in raw:
        return int(raw["qk_rope_head_dim"])
    if raw.get("partial_rotary_factor") is not None:
        return int(head_dim * _number(raw, "partial_rotary_factor", source, low=0))
    if isinstance(rope_params, dict) and isinstance(rope_params.get("main"), dict) \
            and "partial_rotary_factor" in rope_params["main"]:
        return int(head_dim * _number(rope_params["main"], "partial_rotary_factor", f"{source}: rope_parameters.main",
                                      low=0))
    return 64


def _yarn(raw: dict, kw: dict[str, Any], source: str) -> Yarn | None:
    """YaRN of the compressed layers' rope; transformers' nested rope_parameters also set the two thetas."""
    rope_params = raw.get("rope_parameters")
    if isinstance(rope_params, dict) and isinstance(rope_params.get("compress"), dict):
        comp = rope_params["compress"]
        main = rope_params.get("main") or {}
        if main.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"{source}: rope_parameters.main must be plain rope (got {main.get('rope_type')!r})")
        if "rope_theta" in main:
            kw["rope_theta"] = main["rope_theta"]
        if "rope_theta" in comp:
            kw["compress_rope_theta"] = comp["rope_theta"]
        yarn = _yarn_from(comp, f"{source}: rope_parameters.compress")
        af = comp.get("attention_factor", 1.0)
        if yarn is not None and af not in (None, 1, 1.0):
            raise ConfigError(f"{source}: rope_parameters.compress.attention_factor = {af}; "
                              f"V4 uses no YaRN mscale (1.0)")
        return yarn
    if isinstance(rope_params, dict) and rope_params:
        return _yarn_from(rope_params, f"{source}: rope_parameters")
    if raw.get("rope_scaling"):
        return _yarn_from(raw["rope_scaling"], f"{source}: rope_scaling")
    return None


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    """Fold a config.json / preset dict (either spelling) into a ModelConfig."""
    _check_keys(raw, source)
    raw = dict(raw)
    kw = _renamed_fields(raw, source)
    n, n_mtp = int(kw["n_layers"]), int(kw.get("n_mtp_layers", 0) or 0)
    kinds, ratios = _attention_kinds(raw, n, n_mtp, source)
    hashes = _hash_layers(raw, n, n_mtp, source)
    rope_dim = _rope_dim(raw, int(kw["head_dim"]), source)
    kw["yarn"] = _yarn(raw, kw, source)
    cfg = ModelConfig(
        rope_dim=rope_dim,
        compress_ratios=tuple(int(r) for r in ratios),
        attn_kinds=tuple(kinds),
        hash_layers=tuple(hashes),
        extra={k: raw[k] for k in ("quantization_config", "expert_dtype", "scale_fmt") if k in raw},
        **kw,
    )
    validate(cfg, source)
    return cfg


def _is_finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_numbers(cfg: ModelConfig, bad: Any) -> None:
    """Floating fields: finite, and in range where the model divides or takes a root by them."""
    for name, field_, positive in (("norm_eps", "rms_norm_eps", True), ("hc_eps", "hc_eps", False),
                                   ("route_scale", "routed_scaling_factor", True),
                                   ("swiglu_limit", "swiglu_limit", False)):
        v = getattr(cfg, name)
        if not _is_finite(v) or v < 0 or (positive and v == 0):
            bad(field_, f"must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    for name, field_ in (("rope_theta", "rope_theta"), ("compress_rope_theta", "compress_rope_theta")):
        v = getattr(cfg, name)
        if not _is_finite(v) or v <= 1:
            bad(field_, f"must be a finite number > 1, got {v!r}")


def _check_tokens(cfg: ModelConfig, bad: Any) -> None:
    for t in cfg.eos_token_id:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size:
            bad("eos_token_id", f"{t!r} outside the vocabulary [0, {cfg.vocab_size})")
    b = cfg.bos_token_id
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < cfg.vocab_size):
        bad("bos_token_id", f"{b!r} outside the vocabulary [0, {cfg.vocab_size})")
    m = cfg.max_position_embeddings
    if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
        bad("max_position_embeddings", f"must be a positive integer, got {m!r}")


def validate(cfg: ModelConfig, source: str = "config") -> None:
    def bad(field_: str, msg: str) -> None:
        raise ConfigError(f"{source}: {field_}: {msg}")

    for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_lora_rank",
                 "o_groups", "moe_inter_dim", "n_routed_experts", "n_activated_experts", "window",
                 "hc_mult", "hc_sinkhorn_iters"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(name, f"must be a positive integer, got {v!r}")
    if cfg.rope_dim <= 0 or cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        bad("qk_rope_head_dim", f"{cfg.rope_dim} must be even and in (0, head_dim={cfg.head_dim}]")
    if cfg.n_heads % cfg.o_groups:
        bad("o_groups", f"{cfg.o_groups} does not divide num_attention_heads={cfg.n_heads}")
    if cfg.n_activated_experts > cfg.n_routed_experts:
        bad("num_experts_per_tok", f"{cfg.n_activated_experts} > n_routed_experts={cfg.n_routed_experts}")
    if cfg.n_shared_experts not in (0, 1):
        bad("n_shared_experts", f"{cfg.n_shared_experts}; DeepSeek-V4 has exactly one shared expert")
    if cfg.score_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
        bad("scoring_func", f"{cfg.score_func!r} is not one of sqrtsoftplus, sigmoid, softmax")
    if CSA in cfg.attn_kinds and (cfg.index_head_dim < cfg.rope_dim or cfg.index_n_heads <= 0 or cfg.index_topk <= 0):
        bad("index_head_dim", f"indexer needs index_head_dim >= rope dim ({cfg.rope_dim}) and positive "
                              f"index_n_heads / index_topk")
    if any(r > 0 for r in cfg.compress_ratios[cfg.n_layers:]):
        bad("compress_ratios", "MTP layers must be sliding-window (ratio 0)")
    _check_numbers(cfg, bad)
    _check_tokens(cfg, bad)


# ---- files ----------------------------------------------------------------------------------

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> tuple[ModelConfig, dict[str, Any]]:
    """A YAML preset: `model:` holds config.json fields, `preset:` how to build weights without a checkpoint."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r}; known presets: {', '.join(preset_names())}")
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or "model" not in doc:
        raise ConfigError(f"{path}: a preset needs a 'model' mapping")
    cfg = config_from_dict(doc["model"], str(path))
    return cfg, dict(doc.get("preset") or {})


def is_preset(spec: str | Path) -> bool:
    """A bundled preset name that is not also a path on this machine (a directory wins)."""
    return not Path(spec).exists() and str(spec) in preset_names()


def model_config(spec: str | Path, need_weights: bool = False) -> tuple[ModelConfig, dict[str, Any] | None]:
    """`--model DIR|PRESET` -> (config, the preset's `preset:` section, or None for a directory). The one place
    a model argument is resolved; `need_weights` refuses a shape-only preset (v4-flash, v4-pro) that has no
    random weights to run."""
    if is_preset(spec):
        cfg, preset = load_preset(str(spec))
        if need_weights and not preset.get("random_weights"):
            raise ConfigError(f"preset {str(spec)!r} describes the released model's shape only and has no weights; "
                              f"pass --model with a checkpoint directory")
        return cfg, preset
    return load_config(spec), None


def _refuse_unfinished(d: Path) -> None:
    """A directory a `dsv4 convert` run left unfinished (journal, no manifest), or weights without a config."""
    from .converted import JOURNAL, MANIFEST

    if (d / JOURNAL).is_file() and not (d / MANIFEST).is_file():
        raise ConfigError(f"{d}: an unfinished `dsv4 convert` output ({JOURNAL} present, no {MANIFEST}); finish it "
                          f"with `dsv4 convert --src SRC --dst {d} ... --resume` (same arguments as the first run)")
    if not (d / "config.json").is_file():
        shards = sorted(p.name for p in d.glob("*.safetensors"))
        parts = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name.startswith(("shared", "ep-", "rank-")))
        if shards or parts:
            held = ", ".join((shards + parts)[:3]) + (", ..." if len(shards) + len(parts) > 3 else "")
            raise ConfigError(f"{d}: no config.json, although it holds weights ({held}); a complete `dsv4 convert` "
                              f"output has config.json and {MANIFEST}; copy the model's config.json here or re-run "
                              f"the conversion")


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ConfigError(f"{model_dir}: not a directory (and not a preset name: {', '.join(preset_names())})")
    _refuse_unfinished(Path(model_dir))
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json in the model directory")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(raw, str(path))
