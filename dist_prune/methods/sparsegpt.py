"""sparsegpt (Frantar & Alistarh 2023): per linear, the OBS saliency w^2 / [H^-1]_jj^2 chooses
the mask inside 128-column tiles while the remaining weights are updated to compensate (the maths:
dist_prune/sparsegpt.py). Layers are processed in order, each on the outputs of the already-pruned
layers before it; one Hessian per linear exists for one layer at a time."""

from __future__ import annotations

import torch

from dist_prune.collectives import all_reduce_, rank_and_world
from dist_prune.methods.base import Method
from dist_prune.sharding.partition import gathered, local_range, local_weight
from dist_prune.sparsegpt import HessianCollector, sparsegpt_prune

TILE = 128  # columns per block of the reference implementation


def hessians(linears: dict, structure=None, geometry=None) -> HessianCollector:
    return HessianCollector(linears)


def reconstruct(targets: list, stats: dict, sparsity: float, structure) -> dict[str, torch.Tensor]:
    """SparseGPT on one layer's targets: rank r reconstructs every W-th tensor of the layer
    (gathered read-only), then each result reaches every rank's partition."""
    rank, world = rank_and_world()
    n, m = (structure.n, structure.m) if structure.kind == "n:m" else (0, 0)
    results = {}
    with gathered(t.param for t in targets):
        for index, t in enumerate(targets):
            if index % world == rank:
                results[t.name] = sparsegpt_prune(t.param.data, stats[t.name]["hessian"], sparsity,
                                                  prune_n=n, prune_m=m)
    masks = {}
    for index, t in enumerate(targets):  # one tensor at a time: the owner's result, summed with zeros
        device = local_weight(t.param).device  # nccl reduces there
        weight = torch.zeros(t.numel, dtype=torch.float32, device=device)
        mask = torch.zeros(t.numel, dtype=torch.uint8, device=device)
        if t.name in results:
            weight.copy_(results[t.name][0].reshape(-1))
            mask.copy_(results.pop(t.name)[1].reshape(-1))
        all_reduce_(weight)
        all_reduce_(mask)
        start, stop = local_range(t.param)
        local_weight(t.param).copy_(weight[start:stop])
        masks[t.name] = mask[start:stop].bool()
    return masks


def _check(prune, structure) -> str | None:
    if prune.scope is not None:
        return f"prune.method sparsegpt chooses its masks per {TILE}-column tile: leave prune.scope empty"
    if structure.kind == "n:m" and TILE % structure.m:
        return f"prune.structure {structure}: sparsegpt needs M to divide its {TILE}-column tiles"
    return None


METHOD = Method("sparsegpt", calibration="layerwise", collector=hessians, reconstruct=reconstruct,
                scopes=(), structures=("unstructured", "n:m"), always_sequential=True, check=_check,
                summary="OBS reconstruction in 128-column tiles")
