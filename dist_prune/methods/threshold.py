"""threshold: prune every weight with |w| < epsilon, an absolute cut-off instead of a sparsity
ratio. No selection and no agreement between ranks: each element is decided on its own."""

from __future__ import annotations

from typing import Sequence

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.methods.base import LocalSlice, Method


def threshold_mask(local: LocalSlice, epsilon: float) -> torch.Tensor:
    """Pruned (True) iff |w| < epsilon; NaN weights count as pruned. Local, no collective."""
    return ~(local.weight.float().abs() >= epsilon)


def threshold_counts(slices: Sequence[LocalSlice], epsilon: float) -> list[int]:
    """How many elements of each full tensor `threshold_mask` prunes, summed over ranks (one
    all-reduce; collective). Used as the per-tensor counts of k-th selection at layer scope,
    they prune exactly the same elements: the k smallest |w| are those below epsilon."""
    counts = torch.tensor([int(threshold_mask(s, epsilon).sum()) for s in slices], dtype=torch.long)
    return all_reduce_(counts).tolist()


def _check(prune, structure) -> str | None:
    if prune.epsilon is None or not prune.epsilon >= 0:
        return "prune.method threshold needs prune.epsilon >= 0 (the absolute cut-off)"
    return None


# |w| < 0.01: a cut-off in the units of the weights, about their typical size in a trained LLM's
# linears (N(0, 0.02) initialisation); set prune.epsilon for your model
METHOD = Method("threshold", mask_rule=lambda local, prune: threshold_mask(local, prune.epsilon),
                structures=("unstructured",), defaults={"prune.epsilon": 0.01}, check=_check,
                summary="|w| < prune.epsilon")
