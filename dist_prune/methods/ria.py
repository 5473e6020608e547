"""ria: Relative Importance and Activations (Zhang et al., ICLR 2024),

    score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a,   a = 0.5,

a weight's share of its output row and of its input column, times its input's norm. The row and
column sums span the whole tensor, which a ZeRO-3 slice never holds: each rank adds up what it
holds (index_add over its elements' rows and columns) and one all-reduce per tensor gives every
rank the full sums. Compared within each output row, as Wanda."""

from __future__ import annotations

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.masking import local_start
from dist_prune.methods.base import LocalSlice, Method, Stats
from dist_prune.methods.wanda import input_norms

ALPHA = 0.5  # the paper's exponent of the activation norm


def ria(local: LocalSlice, stats: Stats) -> torch.Tensor:
    w = local.weight.float().abs()
    row = stats["row_abs_sum"].to(w.device).float()[local.rows()]
    col = stats["col_abs_sum"].to(w.device).float()[local.columns()]
    relative = w / row.clamp_min(torch.finfo(torch.float32).tiny) + w / col.clamp_min(torch.finfo(torch.float32).tiny)
    norm = stats["input_sq_sum"].to(w.device).float().sqrt()[local.columns()]
    return relative * norm.pow(ALPHA)


def abs_sums(targets: list, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: {"row_abs_sum": [out], "col_abs_sum": [in]}} of every full tensor, from the slices.
    Collective: one all-reduce of out + in float64 sums per target, same order on every rank."""
    sums = {}
    for t in targets:
        local = LocalSlice(weights[t.name], local_start(t), t.shape)
        w = local.weight.double().abs()
        out_f, in_f = t.shape
        both = torch.zeros(out_f + in_f, dtype=torch.float64, device=w.device)
        both.index_add_(0, local.rows(), w)
        both.index_add_(0, out_f + local.columns(), w)
        all_reduce_(both)
        sums[t.name] = {"row_abs_sum": both[:out_f], "col_abs_sum": both[out_f:]}
    return sums


METHOD = Method("ria", calibration="layerwise", collector=input_norms, weight_stats=abs_sums, score=ria,
                default_scope="row", summary="(|w|/row sum + |w|/column sum) * ||X_j||^0.5")
