"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2023), `prune.layer_sparsity: owl`.

Layers whose Wanda scores have more outliers are pruned less. On the dense model (one calibration
pass, as in the reference code, `lib/prune_all.py`), per decoder layer l:

    D_l = fraction of the Wanda scores |W_ij| * ||X_j||_2 of the layer's pruned weights (all of its
          targets together) greater than M * (mean of those scores),      M = prune.owl_threshold
    keep_l = (D_l - min D) / (max D - min D) * 2 * lambda, shifted so its mean is 1 - s
    s_l = 1 - keep_l, in [s - lambda, s + lambda]                          lambda = prune.owl_lambda

(all layers equal when max D = min D). The reference shifts by the plain mean over layers, which
gives exactly s overall when the layers are the same size, as in Llama; here the mean is weighted by
the layer sizes so that it holds for any model. Integer counts: the model prunes exactly
K = round(s * prunable) weights; layer l gets floor or ceil of s_l * n_l (largest remainder, ties
to the lower layer), and each layer's count is shared out the same way over its selection groups
(its tensors for scope layer, its rows for scope row), in proportion to their sizes.

Distributed: each rank scores its own slices; per layer one all-reduce of the score sum (float64,
for the mean) and one of the outlier count.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dist_prune.calibrate import InputNormCollector
from dist_prune.collectives import all_reduce_
from dist_prune.errors import UserError
from dist_prune.layerwise import LayerRunner
from dist_prune.masking import Target, local_start
from dist_prune.sharding.partition import local_weight
from dist_prune.local import LocalSlice
from dist_prune.methods.wanda import wanda
from dist_prune.selection import group_sizes


def layer_sparsities(ratios: torch.Tensor, sizes: torch.Tensor, sparsity: float, lam: float) -> torch.Tensor:
    """float64 s_l from the outlier ratios D_l (see the module docstring)."""
    d, n = ratios.double(), sizes.double()
    spread = d.max() - d.min()
    keep = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    keep = keep - (keep * n).sum() / n.sum() + (1 - sparsity)
    return (1 - keep).clamp(0, 1)


def apportion(total: int, quotas: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """int64 counts summing to `total`, each the floor or ceil of its quota (quotas sum to about
    `total`, each within [0, cap]): the largest remainders get the extra ones, ties by index."""
    base = torch.minimum(quotas.double().floor(), caps.double()).long()
    extra = int(total) - int(base.sum())
    if not 0 <= extra <= len(base):
        raise ValueError(f"cannot share {total} out over quotas summing to {float(quotas.sum())}")
    order = torch.argsort(-(quotas.double() - base), stable=True)
    base[order[:extra]] += 1
    if bool((base > caps).any()):
        raise ValueError("a count exceeds its group")
    return base


def layer_budgets(ratios: torch.Tensor, sizes: torch.Tensor, sparsity: float, lam: float) -> torch.Tensor:
    """Weights to prune in each layer: exactly round(sparsity * sizes.sum()) in all."""
    total = math.floor(sparsity * int(sizes.sum()) + 0.5)
    return apportion(total, layer_sparsities(ratios, sizes, sparsity, lam) * sizes.double(), sizes)


def group_counts(budgets: dict[int, int], targets: Sequence[Target], scope: str) -> torch.Tensor:
    """Counts per selection group of `targets` (selection.group_sizes order): each layer's budget
    shared out over its groups in proportion to their sizes."""
    numels, rows = [t.numel for t in targets], [t.shape[1] for t in targets]
    sizes = torch.tensor(group_sizes(numels, scope, rows), dtype=torch.long)
    per_tensor = [1 if scope == "layer" else n // r for n, r in zip(numels, rows)]
    layer_of = torch.tensor([t.layer for t, g in zip(targets, per_tensor) for _ in range(g)])
    counts = torch.zeros_like(sizes)
    for layer in layer_of.unique().tolist():
        where = layer_of == layer
        share = sizes[where].double() * budgets[layer] / sizes[where].sum()
        counts[where] = apportion(budgets[layer], share, sizes[where])
    return counts


def owl_budgets(model: torch.nn.Module, targets: Sequence[Target], calibration: torch.Tensor,
                threshold: float, sparsity: float, lam: float) -> dict[int, int]:
    """Outlier ratios on the dense model (one layer-by-layer pass), then the per-layer budgets.
    Collective: every rank calls it with the same targets and its own calibration windows."""
    outside = [t.name for t in targets if t.layer is None]
    if outside:
        raise UserError(f"prune.layer_sparsity owl spreads the sparsity over decoder layers: add "
                        f"{outside[0]} to prune.exclude")
    runner = LayerRunner(model)
    batches = runner.start(calibration)
    layers = sorted({t.layer for t in targets})
    ratios = torch.zeros(len(layers), dtype=torch.float64)
    sizes = torch.zeros(len(layers), dtype=torch.long)
    for index in range(layers[-1] + 1):  # layers without targets still pass their outputs on
        layer_targets = [t for t in targets if t.layer == index]
        with InputNormCollector({t.name: t.module for t in layer_targets}) as collector:
            outputs = runner.run_layer(index, batches)
        batches = outputs
        if not layer_targets:
            continue
        stats, i = collector.reduce(), layers.index(index)
        scores = [wanda(LocalSlice(local_weight(t.param), local_start(t), t.shape), stats[t.name])
                  for t in layer_targets]
        sizes[i] = sum(t.numel for t in layer_targets)
        mean = float(all_reduce_(torch.tensor([sum(float(s.double().sum()) for s in scores)]))[0]) / int(sizes[i])
        count = all_reduce_(torch.tensor([sum(int((s > threshold * mean).sum()) for s in scores)]))
        ratios[i] = int(count[0]) / int(sizes[i])
    return dict(zip(layers, layer_budgets(ratios, sizes, sparsity, lam).tolist()))
