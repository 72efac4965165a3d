"""How a model is split over ranks: the routed-expert slice of each expert-parallel rank and the tensors that
attention tensor parallelism splits. `dsv4 convert --ep/--tp` writes these splits, the multi-rank runtimes
(ascend/ep.py, ascend/mindspore_comm.py) load them and `dsv4 plan` counts them; all read them here."""

from __future__ import annotations

import re

# Tensors split across tensor-parallel ranks: (pattern, axis, style, config attribute of the unit a slice
# must hold whole). Column-parallel splits output rows (whole heads / o-groups / rows), row-parallel splits
# input columns (whole o-groups for wo_b). A scale with that axis is split with its weight; a scale
# without it (the per-output-channel W8A8 scale of a row-parallel weight) is replicated to every slice.
TP_RULES: list[tuple[re.Pattern, int, str, str | None]] = [
    (re.compile(r"\.attn\.wq_b\.weight$"), 0, "column (whole heads)", "head_dim"),
    (re.compile(r"\.attn\.indexer\.wq_b\.weight$"), 0, "column (whole indexer heads)", "index_head_dim"),
    (re.compile(r"\.attn\.wo_a\.weight$"), 0, "column (whole o_groups)", "o_lora_rank"),
    (re.compile(r"\.ffn\.shared_experts\.w[13]\.weight$"), 0, "column", None),
    (re.compile(r"^head\.weight$"), 0, "column (vocab rows)", None),
    (re.compile(r"\.attn\.wo_b\.weight$"), 1, "row (whole o_groups)", "o_lora_rank"),
    (re.compile(r"\.ffn\.shared_experts\.w2\.weight$"), 1, "row", None),
]


def tp_rule(name: str) -> tuple[int, str, str | None] | None:
    """(axis, style, whole unit) of a tensor attention TP splits; None for a replicated tensor."""
    for rx, axis, style, unit in TP_RULES:
        if rx.search(name):
            return axis, style, unit
    return None


def tp_split(name: str) -> bool:
    """True for a tensor attention tensor parallelism splits (see TP_RULES)."""
    return tp_rule(name) is not None


def expert_split_error(n_experts: int, world: int) -> str | None:
    """Why `world` ranks cannot share `n_experts` routed experts evenly, or None if they can."""
    if world < 1:
        return f"the number of ranks must be >= 1, got {world}"
    if n_experts % world:
        return (f"{world} ranks do not divide the model's {n_experts} routed experts (n_routed_experts); "
                f"expert parallelism gives every rank an equal slice, use a divisor of {n_experts}")
    return None


def expert_slice(n_experts: int, world: int, rank: int) -> tuple[int, int]:
    """(first, count) of the routed experts expert-parallel rank `rank` of `world` holds: experts
    [rank * E / world, (rank + 1) * E / world)."""
    err = expert_split_error(n_experts, world)
    if err:
        raise ValueError(err)
    per = n_experts // world
    return rank * per, per


def expert_owner(expert: int, n_experts: int, world: int) -> int:
    """The expert-parallel rank holding routed expert `expert`."""
    return expert // expert_slice(n_experts, world, 0)[1]
