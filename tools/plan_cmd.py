"""`dsv4 plan`: will this model fit this cluster, how should it be laid out, and how fast can it be at best.

Everything is computed from the model config (tensor shapes from `common.names.expected_tensors`), the
quantization recipe (`configs/quant/FORMAT.yaml`: a storage scheme per tensor role) and the hardware profile
(`configs/hardware/*.yaml`) through the cluster file. Nothing is measured: memory is arithmetic on shapes,
speed is a roofline (peak bandwidth and peak throughput, no efficiency factor), and every assumption is
printed with the numbers. docs/planning.md checks the arithmetic by hand for V4-Flash.

Parallel layout (what `dsv4 convert --ep/--tp` writes and the multi-rank runtime loads):
* routed experts: expert parallelism (EP) over all ranks by default, n_routed_experts / EP per rank;
  multi-node clusters also consider EP inside each node (experts replicated per node, dispatch on HCCS only);
* attention: tensor parallelism (TP, inside one node) times data parallelism (DP = ranks / TP). TP splits
  the column/row-parallel linears (wq_b, wo_a, wo_b, the indexer's wq_b, the shared expert, the head);
  everything else is replicated. V4 attention has ONE KV head (an MQA latent), so every TP rank keeps the
  whole KV cache of its sequences: TP saves weight memory and weight traffic, DP saves KV memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from common import names
from common.config import CSA, HCA, SWA, ModelConfig, model_config
from common.converted import CONVERT_INFO
from common.paged_cache import DEFAULT_BLOCK_SIZE, CacheFormat, cache_format, family, layer_bytes
from common.parallel import tp_split
from common.recipes import Recipe, bundled_formats
from common.recipes import bundled_recipe as load_recipe  # plan and deploy name a bundled format

from .cluster import Cluster, Hardware, check_model, load_cluster
from .errors import EXIT_USAGE, CliError

GiB = float(1 << 30)
GB = 1e9

# Report categories and the tensor roles (common.names.ROLES) in each; MTP-layer tensors go to "mtp layer".
CATEGORIES = ("attention", "routed experts", "shared experts", "embedding/head", "norms/mHC", "compressor/indexer",
              "router", "mtp layer")
ROLE_CATEGORY = {
    "attn_linear": "attention", "attn_out_a": "attention", "sink": "attention",
    "expert": "routed experts", "shared_expert": "shared experts", "embed": "embedding/head", "head": "embedding/head",
    "norm": "norms/mHC", "hc": "norms/mHC", "compressor": "compressor/indexer", "ape": "compressor/indexer",
    "indexer_linear": "compressor/indexer", "indexer_weights": "compressor/indexer", "router": "router",
    "router_bias": "router", "hash_table": "router", "mtp_proj": "mtp layer",
}
# Tensors the model multiplies tokens through (2 FLOPs per parameter per token): the linear weights, plus the
# router and the mHC maps (float matmuls outside Backend.linear); the rest are lookups or vectors.
MATMUL_ROLES = names.LINEAR_ROLES | {"router", "hc"}
# Read per token only as rows (gathered), not streamed whole every step.
LOOKUP_ROLES = frozenset({"embed", "hash_table"})
NOT_RUNNABLE = ("not runnable by this runtime, which has data-parallel attention and experts split over every "
                "rank; modelled for comparison")
# layout choice: decode steps within NEAR of the fastest count as equal (then most free memory wins);
# layouts with less than TIGHT_GIB free are chosen only if nothing roomier fits
NEAR = 0.05
TIGHT_GIB = 2.0


# ---- recipes and bytes -------------------------------------------------------------------------------------

def stored_bytes(shape: tuple[int, ...], scheme: str, role: str, group: int) -> int:
    """Bytes of one tensor (weight plus its scale tensor) stored with `scheme` (see ops/quant.py FORMATS)."""
    n = prod(shape)
    if scheme == "keep":
        scheme = names.RELEASE_STORAGE[role]
    if scheme == "bf16":
        return 2 * n
    if scheme == "f32":
        return 4 * n
    if scheme == "int":  # tid2eid as released: int64
        return 8 * n
    rows, cols = shape[0], prod(shape[1:])
    if scheme == "w8a8":  # int8 [N, K] + float32 per output channel [N]
        return n + 4 * rows
    if scheme == "w4a8":  # int4 packed two per byte + float32 per (row, group of K)
        return rows * math.ceil(cols / 2) + 4 * rows * math.ceil(cols / group)
    if scheme == "fp8":  # e4m3 + ue8m0 per 128x128 block
        return n + math.ceil(rows / 128) * math.ceil(cols / 128)
    if scheme == "fp4":  # e2m1 packed + ue8m0 per 32 inputs
        return rows * math.ceil(cols / 2) + rows * math.ceil(cols / 32)
    raise ValueError(f"unknown scheme {scheme!r}")


@dataclass
class WeightTable:
    """Bytes and parameters of the whole model, bucketed so any layout is a few divisions away."""

    params: dict[str, int] = field(default_factory=dict)  # category -> parameters
    rep: dict[str, int] = field(default_factory=dict)  # category -> bytes replicated on every rank
    tp: dict[str, int] = field(default_factory=dict)  # category -> bytes split by attention TP
    exp: dict[str, int] = field(default_factory=dict)  # category -> bytes split by EP (routed experts)
    lookup_rep: int = 0  # bytes of gathered tables (embedding, hash tables): not streamed per step
    # main-model (non-MTP) linear parameters the decode step multiplies through, by split and peak class
    flop_params: dict[str, int] = field(default_factory=dict)  # "rep/int8", "rep/bf16", "tp/int8", "tp/bf16"
    expert_bytes: int = 0  # one routed expert (w1, w2, w3 with scales) of a main layer
    expert_params: int = 0
    expert_peak: str = "bf16"
    moe_layers: int = 0  # main layers (every V4 layer has a MoE)


def weight_table(cfg: ModelConfig, recipe: Recipe, with_mtp: bool) -> WeightTable:
    wt = WeightTable()
    for c in CATEGORIES:
        wt.params[c] = wt.rep[c] = wt.tp[c] = wt.exp[c] = 0
    for k in ("rep/int8", "rep/bf16", "tp/int8", "tp/bf16"):
        wt.flop_params[k] = 0
    for name, shape, _kind in names.expected_tensors(cfg, with_mtp=with_mtp):
        role = names.role(name)
        scheme = recipe.roles[role]
        nbytes = stored_bytes(shape, scheme, role, recipe.group_size)
        mtp = name.startswith("mtp.")
        cat = "mtp layer" if mtp else ROLE_CATEGORY[role]
        wt.params[cat] += prod(shape)
        if role == "expert":
            wt.exp[cat] += nbytes
            continue
        split = "tp" if tp_split(name) else "rep"
        (wt.tp if split == "tp" else wt.rep)[cat] += nbytes
        if role in LOOKUP_ROLES:
            wt.lookup_rep += nbytes
        if not mtp and role in MATMUL_ROLES and len(shape) == 2:
            wt.flop_params[f"{split}/{'int8' if scheme in ('w8a8', 'w4a8') else 'bf16'}"] += prod(shape)
    # one routed expert of a main layer: w1, w3 [I, d] and w2 [d, I] with their scales
    scheme, d, inter = recipe.roles["expert"], cfg.dim, cfg.moe_inter_dim
    wt.expert_bytes = (2 * stored_bytes((inter, d), scheme, "expert", recipe.group_size)
                       + stored_bytes((d, inter), scheme, "expert", recipe.group_size))
    wt.expert_params = 3 * d * inter
    wt.expert_peak = "int8" if scheme in ("w8a8", "w4a8") else "bf16"
    wt.moe_layers = cfg.n_layers
    return wt


# ---- KV cache and compressor state ---------------------------------------------------------------------------

# the cache formats and the bytes each kind holds are common.paged_cache's (the manager the model runs on)
KVLayout = CacheFormat


def kv_layout(cfg: ModelConfig, kv_dtype: str) -> CacheFormat:
    return cache_format(cfg, kv_dtype)


def _layer_kinds(cfg: ModelConfig, with_mtp: bool) -> list[tuple[str, int]]:
    n = cfg.n_total_layers if with_mtp else cfg.n_layers
    return [(cfg.attn_kinds[i], cfg.compress_ratios[i]) for i in range(n)]


def kv_per_sequence(cfg: ModelConfig, kvl: CacheFormat, context: int, with_mtp: bool,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    """Bytes one sequence of `context` tokens holds in the paged caches (whole blocks, common.paged_cache
    .layer_bytes), per attention kind: window ring, compressed entries, indexer keys, compressor state; and the
    marginal bytes per extra token."""
    out: dict[str, Any] = {}
    total = 0
    n = cfg.n_total_layers if with_mtp else cfg.n_layers
    for kind in (SWA, CSA, HCA):
        layers = [i for i in range(n) if cfg.attn_kinds[i] == kind]
        if not layers:
            continue
        fam = {"swa": 0, "kv": 0, "idx": 0, "state": 0, "idx_state": 0}
        for i in layers:
            for name, b in layer_bytes(cfg, kvl, i, context, block_size).items():
                fam[family(name)] += b
        ratios = [cfg.compress_ratios[i] for i in layers]
        per_token = sum((kvl.kv_entry + (kvl.index_entry if kind == CSA else 0)) / r for r in ratios) \
            if kind != SWA else 0.0
        sub = sum(fam.values())
        out[kind] = {"layers": len(layers), "ratio": ratios[0], "window": fam["swa"], "compressed": fam["kv"],
                     "indexer_keys": fam["idx"], "compressor_state": fam["state"] + fam["idx_state"], "total": sub,
                     "per_token_all_layers": per_token}
        total += sub
    out["total"] = total
    out["block_size"] = block_size
    return out


def kv_read_per_step(cfg: ModelConfig, kvl: KVLayout, context: int) -> int:
    """Bytes of KV one decode token reads for one sequence at position `context` (main layers)."""
    win = min(context, cfg.window)
    b = 0
    for kind, r in _layer_kinds(cfg, False):
        b += win * kvl.kv_entry
        if kind == CSA:  # top-k selected entries + a full scan of the indexer keys
            b += min(cfg.index_topk, context // r) * kvl.kv_entry + (context // r) * kvl.index_entry
        elif kind == HCA:  # every visible compressed entry
            b += (context // r) * kvl.kv_entry
    return b


def attention_flops_per_token(cfg: ModelConfig, position: np.ndarray | int) -> np.ndarray | float:
    """Attention-core FLOPs for one query token at `position` (all heads, main layers): QK and PV over the
    attended entries (MQA: K = V = the 512-d latent), plus the lightning indexer's scores on CSA layers."""
    s = np.asarray(position, dtype=np.float64)
    total = np.zeros_like(s)
    per_entry = 4.0 * cfg.n_heads * cfg.head_dim
    for kind, r in _layer_kinds(cfg, False):
        n = np.minimum(s + 1, cfg.window)
        if kind == CSA:
            visible = np.floor((s + 1) / r)
            n = n + np.minimum(cfg.index_topk, visible)
            total += 2.0 * cfg.index_n_heads * cfg.index_head_dim * visible
        elif kind == HCA:
            n = n + np.floor((s + 1) / r)
        total += per_entry * n
    return total if total.ndim else float(total)


# ---- layouts and estimates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    world: int
    ep: int
    tp: int

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def replicas(self) -> int:
        return self.world // self.ep

    @property
    def runnable(self) -> bool:
        """The multi-rank runtime runs attention data-parallel and splits the experts over every rank."""
        return self.tp == 1 and self.ep == self.world

    def label(self) -> str:
        return f"EP{self.ep} x attn TP{self.tp}/DP{self.dp}" + (f" (experts x{self.replicas})" if self.replicas > 1
                                                                  else "")


@dataclass(frozen=True)
class Options:
    fmt: str
    context: int
    concurrency: int
    kv_dtype: str = "fp8"
    mem_util: float = 0.90
    max_batched_tokens: int = 8192
    decode_tokens: int = 1
    with_mtp: bool = True


def candidate_layouts(cfg: ModelConfig, cluster: Cluster, tp_pin: int | None = None,
                      ep_pin: int | None = None) -> tuple[list[Layout], list[str]]:
    """Every layout the cluster can run, and the reasons the others were dropped."""
    W, rpn = cluster.world_size, cluster.ranks_per_node
    E = cfg.n_routed_experts
    dropped = []
    eps = [ep_pin or cluster.ep_size] if (ep_pin or cluster.ep_size) else sorted({W, rpn}, reverse=True)
    tps = [tp_pin or cluster.attn_tp] if (tp_pin or cluster.attn_tp) else [t for t in range(1, rpn + 1) if rpn % t == 0]
    out = []
    for ep in eps:
        if W % ep or E % ep:
            dropped.append(f"EP{ep}: n_routed_experts={E} or the {W} ranks are not divisible by {ep}")
            continue
        for t in tps:
            why = []
            if rpn % t or W % t:
                why.append(f"TP{t} must divide the {rpn} ranks of a node")
            for attr, label in (("n_heads", "attention heads"), ("o_groups", "o_groups"),
                                ("index_n_heads", "indexer heads")):
                if getattr(cfg, attr) % t:
                    why.append(f"{label}={getattr(cfg, attr)} not divisible by {t}")
            if why:
                dropped.append(f"EP{ep} TP{t}: " + "; ".join(why))
                continue
            out.append(Layout(W, ep, t))
    return out, dropped


def _busiest_rank(E: int, k: int, ep: int, tokens: int, seed: int = 0) -> tuple[float, float]:
    """Expected (distinct experts, token-expert pairs) on the busiest EP rank of one MoE layer when `tokens`
    tokens each pick k distinct experts uniformly (Monte Carlo, fixed seed, so the planner is deterministic).
    Real routing is skewed, so this is optimistic."""
    if tokens <= 0:
        return 0.0, 0.0
    per = E // ep
    rng = np.random.default_rng(seed)
    trials = int(max(8, min(256, 4_000_000 // max(1, tokens * E))))
    distinct, pairs = 0.0, 0.0
    for _ in range(trials):
        picks = np.argpartition(rng.random((tokens, E)), k - 1, axis=1)[:, :k]
        counts = np.bincount(picks.ravel(), minlength=E)
        by_rank = counts.reshape(ep, per)
        distinct += float((by_rank > 0).sum(axis=1).max())
        pairs += float(by_rank.sum(axis=1).max())
    return distinct / trials, pairs / trials


def _peak(hw: Hardware, cls: str) -> float:
    return (hw.int8_tops if cls == "int8" else hw.bf16_tflops) * 1e12


def _ep_link(cluster: Cluster, ep: int) -> tuple[float, float, float]:
    """(intra bytes fraction, inter bytes fraction, extra latency s) of traffic to the other EP ranks."""
    rpn = cluster.ranks_per_node
    if ep <= rpn:
        return (ep - 1) / ep, 0.0, 0.0
    return (rpn - 1) / ep, (ep - rpn) / ep, cluster.hardware.inter_node.latency_us * 1e-6


def _xfer(cluster: Cluster, intra_bytes: float, inter_bytes: float) -> float:
    hw = cluster.hardware
    return max(intra_bytes / (hw.intra_node.bw_gbs * GB), inter_bytes / (hw.inter_node.bw_gbs * GB))


def moe_comm(cfg: ModelConfig, cluster: Cluster, lay: Layout, tokens_dp: int, act_bytes: int,
             busiest_pairs: float) -> dict[str, Any]:
    """One MoE layer's communication on the busiest rank: the cheaper of
    * dispatch/combine (MC2 / all-to-all): each rank sends its tokens to the ranks owning their experts and
      gets the weighted outputs back; two ops of `moe_op_latency_us` each plus bytes over the links;
    * all-gather / all-reduce: every EP rank gets all tokens of the EP group (nothing to gather when attention
      TP already replicates them), runs its local experts, then one all-reduce sums the outputs; two (or one)
      plain collectives, more bytes. vllm-ascend picks between these by token count (spec 3.1)."""
    hw = cluster.hardware
    d, k, ep, t = cfg.dim, cfg.n_activated_experts, lay.ep, lay.tp
    if ep == 1:
        return {"strategy": "none (EP1)", "seconds": 0.0, "bytes": 0}
    intra, inter, extra_lat = _ep_link(cluster, ep)
    tokens_out = math.ceil(tokens_dp / t)  # TP ranks split their group's tokens for the dispatch
    pairs = max(tokens_out * min(k, ep), busiest_pairs)
    disp_b = pairs * (d * act_bytes + 4)
    comb_b = pairs * d * 2
    dc = 2 * (hw.moe_op_latency_us * 1e-6 + extra_lat) + _xfer(cluster, (disp_b + comb_b) * intra,
                                                                  (disp_b + comb_b) * inter)
    # all-gather path: tokens of the whole EP group (ep/t DP groups' worth), then a ring all-reduce of outputs
    group_tokens = tokens_dp * max(1, ep // t)
    lat = hw.intra_node.latency_us * 1e-6 + extra_lat
    gather_b = 0 if t >= ep else group_tokens * d * act_bytes * (ep - t) / ep
    reduce_b = 2 * (ep - 1) / ep * group_tokens * d * 2
    ops = (1 if t >= ep else 2)
    ag = ops * lat + _xfer(cluster, (gather_b + reduce_b) * (intra / max(intra + inter, 1e-9)),
                           (gather_b + reduce_b) * (inter / max(intra + inter, 1e-9)))
    if ag < dc:
        return {"strategy": "all-gather + all-reduce" if t < ep else "all-reduce (tokens already replicated by TP)",
                "seconds": ag, "bytes": gather_b + reduce_b}
    return {"strategy": "dispatch/combine", "seconds": dc, "bytes": disp_b + comb_b}


def memory_per_rank(cfg: ModelConfig, wt: WeightTable, cluster: Cluster, lay: Layout, opt: Options,
                    kv_seq: int) -> dict[str, Any]:
    hw = cluster.hardware
    weights = {c: wt.rep[c] + wt.tp[c] / lay.tp + wt.exp[c] / lay.ep for c in CATEGORIES}
    seqs = math.ceil(opt.concurrency / lay.dp)
    kv = seqs * kv_seq
    # activations (estimate): live tensors of the largest forward (a prefill chunk), per token: mHC residual
    # streams in and out (f32), normalized input, q and attention output for the local heads, q/kv latents,
    # and the MoE share: routed token copies received, expert intermediate (w1, w3) and outputs; x2 for
    # allocator fragmentation and temporaries. Kernel workspaces are tiled and left to the runtime reserve.
    chunk = min(opt.max_batched_tokens, max(opt.context, 1))
    per_tok = (2 * cfg.hc_mult * cfg.dim * 4 + cfg.dim * 2 + 2 * (cfg.n_heads // lay.tp) * cfg.head_dim * 2
               + (cfg.q_lora_rank + cfg.head_dim) * 2
               + cfg.n_activated_experts / lay.tp * (2 * cfg.dim * 2 + 2 * cfg.moe_inter_dim * 2))
    act = 2 * chunk * per_tok
    comms = 1 + (lay.tp > 1) + (1 < lay.dp < lay.world) if hw.is_npu else 0
    hccl = comms * 2 * cluster.hccl_buffsize_mb * (1 << 20)
    reserve = hw.runtime_reserve_gib * GiB
    total = sum(weights.values()) + kv + act + hccl + reserve
    usable = hw.memory_gib * GiB * opt.mem_util
    return {"weights": weights, "weights_total": sum(weights.values()), "kv": kv, "sequences_per_rank": seqs,
            "activations": act, "activation_tokens": chunk, "hccl": hccl, "hccl_communicators": comms,
            "reserve": reserve, "total": total, "usable": usable, "headroom": usable - total,
            "fits": total <= usable, "extra_sequences": max(0, int((usable - total) // kv_seq)) if kv_seq else 0}


def decode_estimate(cfg: ModelConfig, wt: WeightTable, cluster: Cluster, lay: Layout, opt: Options,
                    kvl: KVLayout) -> dict[str, Any]:
    """Roofline time of one decode step on the busiest rank: max(memory, compute) + communication."""
    hw = cluster.hardware
    q, k = opt.decode_tokens, cfg.n_activated_experts
    seqs = math.ceil(opt.concurrency / lay.dp)
    t_rank = seqs * q  # tokens through this rank's attention
    group_tokens = opt.concurrency * q * lay.ep // lay.world  # tokens routed inside one EP group
    distinct, pairs = _busiest_rank(cfg.n_routed_experts, k, lay.ep, group_tokens)
    dense = sum(wt.rep[c] + wt.tp[c] / lay.tp for c in CATEGORIES if c not in ("mtp layer", "routed experts"))
    dense -= wt.lookup_rep
    expert = wt.moe_layers * distinct * wt.expert_bytes
    kv = seqs * kv_read_per_step(cfg, kvl, opt.context)
    mem_bytes = dense + expert + kv
    t_mem = mem_bytes / (hw.memory_bw_gbs * GB)

    fp = wt.flop_params
    flops_int8 = 2 * t_rank * (fp["rep/int8"] + fp["tp/int8"] / lay.tp)
    flops_bf16 = 2 * t_rank * (fp["rep/bf16"] + fp["tp/bf16"] / lay.tp)
    flops_exp = wt.moe_layers * pairs * 2 * wt.expert_params
    flops_attn = t_rank * attention_flops_per_token(cfg, opt.context) / lay.tp
    t_comp = (flops_int8 / _peak(hw, "int8") + flops_bf16 / _peak(hw, "bf16")
              + flops_exp / _peak(hw, wt.expert_peak) + flops_attn / _peak(hw, "bf16"))

    act_bytes = 1 if wt.expert_peak == "int8" else 2
    moe = moe_comm(cfg, cluster, lay, t_rank, act_bytes, pairs)
    lat = hw.intra_node.latency_us * 1e-6
    t_ar = 0.0
    if lay.tp > 1:  # one all-reduce of the attention output per layer, one all-gather of the logits
        ar_b = 2 * (lay.tp - 1) / lay.tp * t_rank * cfg.dim * 2
        t_ar = cfg.n_layers * (lat + ar_b / (hw.intra_node.bw_gbs * GB))
        t_ar += lat + t_rank * cfg.vocab_size * 4 * (lay.tp - 1) / lay.tp / (hw.intra_node.bw_gbs * GB)
    t_comm = wt.moe_layers * moe["seconds"] + t_ar
    step = max(t_mem, t_comp) + t_comm
    return {
        "tokens_per_rank": t_rank, "sequences_per_rank": seqs, "busiest_rank_experts_per_layer": distinct,
        "busiest_rank_token_expert_pairs_per_layer": pairs,
        "bytes": {"dense_weights": dense, "routed_experts": expert, "kv": kv, "total": mem_bytes},
        "flops": {"linear_int8": flops_int8, "linear_bf16": flops_bf16, "routed_experts": flops_exp,
                  "attention": flops_attn},
        "seconds": {"memory": t_mem, "compute": t_comp, "moe_comm": wt.moe_layers * moe["seconds"],
                    "tp_comm": t_ar, "comm": t_comm, "step": step},
        "moe_strategy": moe["strategy"], "moe_comm_per_layer_s": moe["seconds"],
        "tokens_per_s_per_sequence": q / step, "tokens_per_s_cluster": opt.concurrency * q / step,
    }


def prefill_estimate(cfg: ModelConfig, wt: WeightTable, cluster: Cluster, lay: Layout, opt: Options,
                     kvl: KVLayout, weights_rank: float) -> dict[str, Any]:
    """Roofline prefill throughput: every DP group prefills one prompt of `context` tokens at once."""
    hw = cluster.hardware
    P = opt.context
    k = cfg.n_activated_experts
    fp = wt.flop_params
    pos = np.arange(P, dtype=np.float64)
    attn = float(np.sum(attention_flops_per_token(cfg, pos))) / lay.tp
    f_int8 = 2 * P * (fp["rep/int8"] + fp["tp/int8"] / lay.tp)
    f_bf16 = 2 * P * (fp["rep/bf16"] + fp["tp/bf16"] / lay.tp)
    pairs_rank = P * k / lay.tp  # balanced: the EP group's token-expert pairs spread over its ranks
    f_exp = wt.moe_layers * pairs_rank * 2 * wt.expert_params
    t_comp = (f_int8 / _peak(hw, "int8") + f_bf16 / _peak(hw, "bf16") + f_exp / _peak(hw, wt.expert_peak)
              + attn / _peak(hw, "bf16"))
    chunks = math.ceil(P / opt.max_batched_tokens)
    kv_write = kv_per_sequence(cfg, kvl, P, False)["total"]
    t_mem = (chunks * weights_rank + kv_write) / (hw.memory_bw_gbs * GB)
    intra, inter, extra_lat = _ep_link(cluster, lay.ep)
    act_bytes = 1 if wt.expert_peak == "int8" else 2
    moe_b = (P / lay.tp) * min(k, lay.ep) * (cfg.dim * act_bytes + 4 + 2 * cfg.dim) if lay.ep > 1 else 0.0
    t_moe = wt.moe_layers * (chunks * 2 * (hw.moe_op_latency_us * 1e-6 + extra_lat)
                             + _xfer(cluster, moe_b * intra, moe_b * inter)) if lay.ep > 1 else 0.0
    t_tp = 0.0
    if lay.tp > 1:
        t_tp = cfg.n_layers * (chunks * hw.intra_node.latency_us * 1e-6
                               + 2 * (lay.tp - 1) / lay.tp * P * cfg.dim * 2 / (hw.intra_node.bw_gbs * GB))
    total = max(t_comp, t_mem) + t_moe + t_tp
    return {"prompt_tokens": P, "prompts_in_flight": lay.dp, "chunks": chunks,
            "seconds": {"compute": t_comp, "memory": t_mem, "comm": t_moe + t_tp, "prompt": total},
            "flops_per_rank": f_int8 + f_bf16 + f_exp + attn,
            "tokens_per_s_cluster": lay.dp * P / total, "tokens_per_s_per_rank": lay.dp * P / total / lay.world}


def plan(cfg: ModelConfig, cluster: Cluster, opt: Options, recipe: Recipe, tp_pin: int | None = None,
         ep_pin: int | None = None) -> dict[str, Any]:
    """Evaluate every layout; recommend the fitting one with the shortest decode step (ties: more headroom)."""
    with_mtp = opt.with_mtp and cfg.n_mtp_layers > 0
    wt = weight_table(cfg, recipe, with_mtp)
    kvl = kv_layout(cfg, opt.kv_dtype)
    kvs = kv_per_sequence(cfg, kvl, opt.context, with_mtp)
    layouts, dropped = candidate_layouts(cfg, cluster, tp_pin, ep_pin)
    if not layouts:
        raise CliError(f"no parallel layout of {cluster.world_size} ranks suits this model: {'; '.join(dropped)}")
    cands = []
    for lay in layouts:
        mem = memory_per_rank(cfg, wt, cluster, lay, opt, kvs["total"])
        dec = decode_estimate(cfg, wt, cluster, lay, opt, kvl)
        pre = prefill_estimate(cfg, wt, cluster, lay, opt, kvl, mem["weights_total"])
        cands.append({"layout": lay, "memory": mem, "decode": dec, "prefill": pre})
    fitting = [c for c in cands if c["memory"]["fits"]]
    # recommend what the runtime runs (DP attention + EP over all ranks) whenever one of those fits
    fitting = [c for c in fitting if c["layout"].runnable] or fitting
    # a layout that fits with almost nothing to spare breaks on the first long prompt: keep it only if
    # nothing roomier fits
    roomy = [c for c in fitting if c["memory"]["headroom"] >= min(TIGHT_GIB * GiB, 0.05 * c["memory"]["usable"])]
    pool = roomy or fitting
    if pool:
        best_step = min(c["decode"]["seconds"]["step"] for c in pool)
        # within NEAR of the fastest decode step, prefer the layout with the most free memory (KV capacity)
        near = [c for c in pool if c["decode"]["seconds"]["step"] <= best_step * (1 + NEAR)]
        best = max(near, key=lambda c: c["memory"]["headroom"])
    else:
        best = min(cands, key=lambda c: c["memory"]["total"])
    return {"weights": wt, "kv_layout": kvl, "kv_per_sequence": kvs, "candidates": cands, "dropped": dropped,
            "best": best, "fits": bool(fitting), "with_mtp": with_mtp, "recipe": recipe}


# ---- reasoning and report ------------------------------------------------------------------------------------

def _g(b: float) -> str:
    return f"{b / GiB:.2f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def reasons(cfg: ModelConfig, cluster: Cluster, res: dict[str, Any], opt: Options) -> list[str]:
    best, wt = res["best"], res["weights"]
    lay: Layout = best["layout"]
    mem = best["memory"]
    out = []
    exp_share = sum(wt.exp.values()) / max(1, sum(wt.rep.values()) + sum(wt.tp.values()) + sum(wt.exp.values()))
    out.append(f"EP{lay.ep}: routed experts are {exp_share:.0%} of the weight bytes; {cfg.n_routed_experts} experts / "
               f"{lay.ep} = {cfg.n_routed_experts // lay.ep} per rank per layer "
               f"({_g(mem['weights']['routed experts'])} GiB per rank)"
               + (f", replicated x{lay.replicas} so dispatch stays inside a node" if lay.replicas > 1 else "") + ".")
    for c in res["candidates"]:
        other: Layout = c["layout"]
        if other == lay:
            continue
        if other.ep != lay.ep and other.tp == lay.tp:
            d = c["decode"]["seconds"]["step"] - best["decode"]["seconds"]["step"]
            if not c["memory"]["fits"]:
                out.append(f"EP{other.ep} rejected: needs {_g(c['memory']['total'])} GiB per rank, "
                           f"{_g(-c['memory']['headroom'])} GiB over the usable {_g(c['memory']['usable'])} GiB.")
            else:
                out.append(f"EP{other.ep} ({'replicated experts' if other.replicas > 1 else 'all ranks'}): fits, "
                           f"decode {_ms(c['decode']['seconds']['step'])} ({'+' if d >= 0 else ''}{d * 1e3:.2f} ms); "
                           f"MoE traffic {c['decode']['moe_strategy']}.")
    out.append(f"attention TP{lay.tp} x DP{lay.dp}: V4 attention has one KV head (MQA latent), so every TP rank keeps "
               f"the whole KV cache of its sequences ({_g(mem['kv'])} GiB here for {mem['sequences_per_rank']} "
               f"sequence(s) of {opt.context} tokens); TP instead divides the attention/shared-expert/head weights "
               f"and their per-step reads, at one all-reduce per layer.")
    for c in res["candidates"]:
        other = c["layout"]
        if other == lay or other.ep != lay.ep:
            continue
        if not c["memory"]["fits"]:
            out.append(f"TP{other.tp}/DP{other.dp} rejected: needs {_g(c['memory']['total'])} GiB per rank, "
                       f"{_g(-c['memory']['headroom'])} GiB too much.")
        else:
            d = c["decode"]["seconds"]["step"] - best["decode"]["seconds"]["step"]
            out.append(f"TP{other.tp}/DP{other.dp}: fits ({_g(c['memory']['headroom'])} GiB free), decode "
                       f"{_ms(c['decode']['seconds']['step'])} ({'+' if d >= 0 else ''}{d * 1e3:.2f} ms vs chosen)"
                       + (", but not runnable here (the runtime has no attention TP)" if not other.runnable and
                          lay.runnable else ", less free memory" if d < 0 else "") + ".")
    for d in res["dropped"]:
        out.append(f"not considered: {d}.")
    out.append(f"rule: among the layouts the runtime runs (all of them if none of those fits) that fit with at least "
               f"{TIGHT_GIB:g} GiB free (any that fit if none does), take the fastest decode step; steps within "
               f"{NEAR:.0%} of it tie and the most free memory wins.")
    return out


ASSUMPTIONS = [
    "weights: exact bytes from the tensor shapes and the recipe's scheme per tensor role (w8a8: int8 + f32 per "
    "output channel; w4a8: packed int4 + f32 per (row, group)); TP splits wq_b, wo_a, wo_b, indexer wq_b, shared "
    "expert and head (as `dsv4 convert --tp`), the rest is replicated; embedding is replicated.",
    "KV: vLLM-style layout (spec 3.8); every layer keeps a 128-entry window ring; CSA layers add one entry and one "
    "indexer key per 4 tokens, HCA one entry per 128 tokens; compressor state is float32 (spec 3.4). The cache is "
    "sized for exactly `--context` tokens per sequence (no paging slack).",
    "activations: an estimate (live tensors of one prefill chunk x2); HCCL: 2 x HCCL_BUFFSIZE per communicator "
    "(CANN docs), communicators = world + attention-TP group + attention-DP group where they exist; runtime "
    "reserve from the hardware profile.",
    "decode: roofline per step on the busiest rank = max(bytes read / HBM bandwidth, FLOPs / peak) + "
    "communication; peak figures with no efficiency factor; communication not overlapped with compute; no host "
    "(Python, launch) overhead; uniform expert routing (Monte Carlo), real routing is skewed.",
    "decode reads: all dense weights on the rank, the distinct experts its tokens touch, the KV window + CSA top-k "
    "entries + the full indexer key scan + all HCA entries of each sequence; MTP / draft model not run.",
    "communication: per MoE layer the cheaper of dispatch/combine (2 x moe_op_latency + bytes) and all-gather + "
    "all-reduce (plain collectives); attention TP adds one all-reduce per layer and a logits all-gather.",
    "prefill: every DP group prefills one prompt of `--context` tokens in chunks of `--max-batched-tokens`; "
    "compute at peak (int8 peak for w8a8/w4a8 linears, bf16 otherwise and for attention), weights re-read per chunk.",
]


def _round(x: Any) -> Any:
    if isinstance(x, float):  # byte counts stay exact; derived figures keep 9 significant digits
        return int(x) if x.is_integer() and abs(x) < 2**62 else float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x


def to_json(cfg: ModelConfig, cluster: Cluster, opt: Options, res: dict[str, Any], model: str) -> dict[str, Any]:
    def cand(c):
        lay = c["layout"]
        return {"layout": {"ep": lay.ep, "attn_tp": lay.tp, "attn_dp": lay.dp, "expert_replicas": lay.replicas,
                           "label": lay.label(), "runnable": lay.runnable},
                "memory_bytes": c["memory"], "decode": c["decode"], "prefill": c["prefill"]}
    wt = res["weights"]
    return _round({
        "model": model, "cluster": cluster.path, "cluster_name": cluster.name, "hardware": cluster.hardware.name,
        "world_size": cluster.world_size, "format": opt.fmt, "recipe": res["recipe"].path, "options": asdict(opt),
        "fits": res["fits"], "recommended": cand(res["best"]),
        "reasons": reasons(cfg, cluster, res, opt),
        "weights_total_bytes": {c: wt.rep[c] + wt.tp[c] + wt.exp[c] for c in CATEGORIES},
        "parameters": wt.params,
        "kv": {"layout": asdict(res["kv_layout"]), "per_sequence": res["kv_per_sequence"]},
        "candidates": [cand(c) for c in res["candidates"]], "not_considered": res["dropped"],
        "assumptions": ASSUMPTIONS,
    })


def render_text(cfg: ModelConfig, cluster: Cluster, opt: Options, res: dict[str, Any], model: str) -> str:
    hw = cluster.hardware
    best = res["best"]
    lay, mem, dec, pre = best["layout"], best["memory"], best["decode"], best["prefill"]
    L = []
    L.append(f"plan      {model}, format {opt.fmt} ({Path(res['recipe'].path).name}), "
             f"{'with' if res['with_mtp'] else 'without'} the MTP layer")
    L.append(f"cluster   {cluster.name}: {cluster.describe()}; profile {hw.name} ({hw.product})")
    L.append(f"workload  context {opt.context} tokens x {opt.concurrency} sequence(s), KV {opt.kv_dtype}, "
             f"{opt.decode_tokens} token(s) per sequence per decode step, memory utilisation {opt.mem_util:.2f}")
    L.append("")
    L.append(f"layout    {lay.label()}   <- {'recommended' if res['fits'] else 'closest (does NOT fit)'}"
             + ("" if lay.runnable else f" ({NOT_RUNNABLE})"))
    L.append("why")
    for r in reasons(cfg, cluster, res, opt):
        L.append(f"  - {r}")
    L.append("")
    L.append(f"memory per rank (GiB)                      {lay.label()}")
    for c in CATEGORIES:
        L.append(f"  weights  {c:24s} {_g(mem['weights'][c]):>10}")
    L.append(f"  weights  total                    {_g(mem['weights_total']):>10}")
    L.append(f"  KV + compressor state            {_g(mem['kv']):>10}   ({mem['sequences_per_rank']} seq x "
             f"{opt.context} tokens)")
    L.append(f"  activations (estimate)           {_g(mem['activations']):>10}   ({mem['activation_tokens']}-token "
             f"prefill chunk)")
    L.append(f"  HCCL buffers                     {_g(mem['hccl']):>10}   ({mem['hccl_communicators']} comm x 2 x "
             f"HCCL_BUFFSIZE {cluster.hccl_buffsize_mb} MB)")
    L.append(f"  runtime reserve                  {_g(mem['reserve']):>10}")
    L.append(f"  total                            {_g(mem['total']):>10}   of {_g(mem['usable'])} usable "
             f"({hw.memory_gib:g} GiB x {opt.mem_util:.2f})")
    if mem["fits"]:
        L.append(f"  fits: {_g(mem['headroom'])} GiB headroom = room for {mem['extra_sequences']} more sequence(s) "
                 f"of {opt.context} tokens per attention-DP group")
    else:
        L.append(f"  DOES NOT FIT: {_g(-mem['headroom'])} GiB over")
    L.append("")
    kvl, kvs = res["kv_layout"], res["kv_per_sequence"]
    L.append(f"KV cache per sequence ({kvl.note})")
    for kind in (SWA, CSA, HCA):
        if kind not in kvs:
            continue
        e = kvs[kind]
        L.append(f"  {kind.upper()} x{e['layers']:<3d} window {e['window'] / 2**20:8.2f} MiB  compressed "
                 f"{e['compressed'] / 2**20:9.2f} MiB  indexer {e['indexer_keys'] / 2**20:8.2f} MiB  state "
                 f"{e['compressor_state'] / 2**20:6.2f} MiB  (+{e['per_token_all_layers']:.1f} B per token)")
    L.append(f"  total {kvs['total'] / GiB:.3f} GiB per sequence at {opt.context} tokens")
    L.append("")
    s = dec["seconds"]
    L.append(f"decode step (roofline, busiest rank, {dec['sequences_per_rank']} seq x {opt.decode_tokens} tok)")
    b = dec["bytes"]
    L.append(f"  memory   {b['total'] / GB:8.3f} GB / {hw.memory_bw_gbs:g} GB/s = {_ms(s['memory'])}   "
             f"(dense {b['dense_weights'] / GB:.3f} GB, experts {b['routed_experts'] / GB:.3f} GB = "
             f"{dec['busiest_rank_experts_per_layer']:.2f}/layer, KV {b['kv'] / GB:.3f} GB)")
    f = dec["flops"]
    L.append(f"  compute  {sum(f.values()) / 1e12:8.4f} TFLOP ({hw.int8_tops:g} TOPS int8 / {hw.bf16_tflops:g} "
             f"TFLOPS bf16) = {_ms(s['compute'])}")
    L.append(f"  comm     MoE {res['weights'].moe_layers} x {dec['moe_comm_per_layer_s'] * 1e6:.1f} us "
             f"({dec['moe_strategy']}) = {_ms(s['moe_comm'])}; attention TP {_ms(s['tp_comm'])}")
    L.append(f"  step     max(memory, compute) + comm = {_ms(s['step'])}  -> {dec['tokens_per_s_per_sequence']:.1f} "
             f"tok/s per sequence, {dec['tokens_per_s_cluster']:.1f} tok/s in total"
             + (" (if every verified token is accepted)" if opt.decode_tokens > 1 else ""))
    p = pre["seconds"]
    L.append(f"prefill (roofline, {pre['prompts_in_flight']} prompt(s) of {pre['prompt_tokens']} tokens, "
             f"{pre['chunks']} chunk(s))")
    L.append(f"  compute {p['compute']:.3f} s, memory {p['memory']:.3f} s, comm {p['comm']:.3f} s -> "
             f"{pre['tokens_per_s_cluster']:,.0f} tok/s cluster, {pre['tokens_per_s_per_rank']:,.0f} tok/s per rank")
    L.append("")
    L.append("candidates")
    for c in res["candidates"]:
        m, d = c["memory"], c["decode"]
        mark = "*" if c is best else " "
        L.append(f" {mark} {c['layout'].label():34s} {_g(m['total']):>7} GiB  "
                 f"{'fits' if m['fits'] else 'over':4s} {_g(m['headroom']):>7} GiB free  decode "
                 f"{_ms(d['seconds']['step']):>10}  prefill {c['prefill']['tokens_per_s_cluster']:>10,.0f} tok/s"
                 + ("" if c["layout"].runnable else "  (not runnable here)"))
    L.append("")
    L.append("assumptions")
    for a in ASSUMPTIONS:
        L.append(f"  - {a}")
    return "\n".join(L)



# ---- command ---------------------------------------------------------------------------------------------------

def resolve_model(spec: str) -> tuple[ModelConfig, str, str | None]:
    """(config, description, format recorded by `dsv4 convert` if any) for a preset name or a directory."""
    cfg, preset = model_config(spec)
    if preset is not None:
        return cfg, f"preset {spec}", None
    fmt = None
    conv = Path(spec) / CONVERT_INFO
    if conv.is_file():
        try:
            fmt = json.loads(conv.read_text()).get("format")
        except (OSError, json.JSONDecodeError):
            fmt = None
    return cfg, str(spec), fmt


def options_from_args(args, cfg: ModelConfig, fmt: str) -> Options:
    if args.context <= 0 or args.concurrency <= 0 or args.decode_tokens <= 0 or args.max_batched_tokens <= 0:
        raise CliError("--context, --concurrency, --decode-tokens and --max-batched-tokens must be positive",
                       EXIT_USAGE)
    if args.context > cfg.max_position_embeddings:
        raise CliError(f"--context {args.context} exceeds the model's max_position_embeddings "
                       f"{cfg.max_position_embeddings}", EXIT_USAGE)
    if not 0 < args.mem_util <= 1:
        raise CliError("--mem-util must be in (0, 1]", EXIT_USAGE)
    return Options(fmt=fmt, context=args.context, concurrency=args.concurrency, kv_dtype=args.kv_dtype,
                   mem_util=args.mem_util, max_batched_tokens=args.max_batched_tokens,
                   decode_tokens=args.decode_tokens, with_mtp=not args.no_mtp)


def run_plan(args) -> int:
    for flag, v in (("--tp", args.tp), ("--ep", args.ep)):
        if v is not None and v <= 0:
            raise CliError(f"{flag} must be a positive integer, got {v}", EXIT_USAGE)
    cfg, model, conv_fmt = resolve_model(args.model)
    fmt = args.format or conv_fmt
    if fmt is None:
        raise CliError(f"--format is required ({', '.join(bundled_formats())}): {args.model} records none",
                       EXIT_USAGE)
    recipe = load_recipe(fmt)
    if recipe.uses("w4a8") and recipe.group_size is None:
        raise CliError(f"recipe {recipe.path} uses w4a8 but sets no group_size", EXIT_USAGE)
    cluster = load_cluster(args.cluster)
    if args.ep is not None:  # a pinned EP size replaces the cluster's for the divisibility check
        if args.ep <= 0 or cluster.world_size % args.ep or cfg.n_routed_experts % args.ep:
            raise CliError(f"--ep {args.ep}: must divide the world size {cluster.world_size} and n_routed_experts "
                           f"{cfg.n_routed_experts}", EXIT_USAGE)
    else:
        check_model(cluster, cfg)
    opt = options_from_args(args, cfg, fmt)
    res = plan(cfg, cluster, opt, recipe, args.tp, args.ep)
    if args.json:
        print(json.dumps(to_json(cfg, cluster, opt, res, model), indent=1))
    else:
        print(render_text(cfg, cluster, opt, res, model))
    if not res["fits"]:
        best = res["best"]["memory"]
        raise CliError(f"{model} ({fmt}) does not fit {cluster.name} ({cluster.describe()}): the smallest layout "
                       f"{res['best']['layout'].label()} needs {_g(best['total'])} GiB per rank "
                       f"(weights {_g(best['weights_total'])} GiB), {_g(best['usable'])} GiB usable: "
                       f"{_g(-best['headroom'])} GiB short; use a smaller format, a shorter --context / lower "
                       f"--concurrency, or more nodes")
    return 0
