"""Reconstruction methods (sparsegpt, admm) on ZeRO-3 partitions: each tensor of a layer is solved
whole on one rank (gathered read-only), then its new weights and mask reach every rank's partition.
Collective: every rank calls it with the same targets in the same order."""

from __future__ import annotations

from typing import Callable

import torch

from dist_prune.collectives import all_reduce_, rank_and_world
from dist_prune.sharding.partition import gathered, local_range, local_weight

# (target, its full weight) -> (the new weight with the pruned entries 0, bool mask True = pruned)
Solve = Callable[[object, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def from_hessians(prune: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    """A `Method.reconstruct` from prune(weight, hessian, sparsity, prune_n=, prune_m=, pruned=)
    (sparsegpt_prune, admm_prune) on the Hessians of dist_prune.sparsegpt.HessianCollector."""
    def reconstruct(targets: list, stats: dict, sparsity: float, structure,
                    counts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """`counts` (OWL's layer budgets shared over the tensors) replaces round(sparsity * numel)."""
        n, m = (structure.n, structure.m) if structure.kind == "n:m" else (0, 0)

        def solve(t, weight):
            return prune(weight, stats[t.name]["hessian"], sparsity, prune_n=n, prune_m=m,
                         pruned=None if counts is None else counts[t.name])
        return reconstruct_tensors(targets, solve)
    return reconstruct


def owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """The rank that solves each tensor: largest first, each to the least-loaded rank (ties to the
    lower rank), the load of [out, in] being out * in^2, the flops of its matmuls with H. A Llama
    layer on 2 ranks, taken round-robin, puts gate and down on rank 0: 2.8x rank 1's load."""
    loads, owner = [0] * world, [0] * len(shapes)
    for index in sorted(range(len(shapes)), key=lambda i: (-shapes[i][0] * shapes[i][1] ** 2, i)):
        owner[index] = min(range(world), key=lambda r: (loads[r], r))
        loads[owner[index]] += shapes[index][0] * shapes[index][1] ** 2
    return owner


def reconstruct_tensors(targets: list, solve: Solve) -> dict[str, torch.Tensor]:
    """Every target solved by its owner rank, written into every partition; the local masks."""
    rank, world = rank_and_world()
    owner = owners([t.shape for t in targets], world)
    results = {}
    with gathered(t.param for t in targets):
        for index, t in enumerate(targets):
            if owner[index] == rank:
                results[t.name] = solve(t, t.param.data)
    masks = {}
    for t in targets:  # one tensor at a time: the owner's result, summed with zeros
        device = local_weight(t.param).device  # nccl reduces there
        weight = torch.zeros(t.numel, dtype=torch.float32, device=device)
        mask = torch.zeros(t.numel, dtype=torch.uint8, device=device)
        if t.name in results:
            new, pruned = results.pop(t.name)
            weight.copy_(new.reshape(-1))
            mask.copy_(pruned.reshape(-1))
        all_reduce_(weight)
        all_reduce_(mask)
        start, stop = local_range(t.param)
        local_weight(t.param).copy_(weight[start:stop])
        masks[t.name] = mask[start:stop].bool()
    return masks
