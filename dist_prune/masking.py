"""Stage 5, mask: which weights are pruning targets, and zeroing the pruned elements.

A mask is a bool tensor over a rank's local slice (True = pruned). Masks are kept
explicitly, never recovered as `W == 0`: a weight can be zero and still alive.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.errors import UserError
from dist_prune.sharding.partition import full_numel, full_shape, local_range, local_weight

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """A 2-D weight to prune, with the module that consumes it."""

    name: str  # parameter name, e.g. model.layers.3.mlp.up_proj.weight
    param: torch.nn.Parameter
    module: torch.nn.Module
    layer: int | None  # decoder layer index, None outside the layers

    @property
    def shape(self) -> tuple[int, int]:
        return full_shape(self.param)

    @property
    def numel(self) -> int:
        return full_numel(self.param)


def find_targets(model: torch.nn.Module, exclude: list[str]) -> list[Target]:
    """Every 2-D weight of a Linear whose names match none of the `exclude` globs.

    A tied weight has two names (lm_head.weight is model.embed_tokens.weight): it is a
    target only if neither is excluded, and it is known by its parameter name, the one
    the exported checkpoint uses. Pruning a tied lm_head prunes the input embeddings. No target
    at all is a UserError: the job would export and register the dense model as a pruned one.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    targets = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        names = {f"{module_name}.weight", canonical[id(module.weight)]}
        if any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in exclude):
            continue
        name = canonical[id(module.weight)]
        match = _LAYER_INDEX.search(f".{module_name}.")
        targets.append(Target(name, module.weight, module, int(match.group(1)) if match else None))
    if not targets:
        raise UserError(f"prune.exclude {exclude} leaves no Linear weight of the model to prune; the "
                        "job would register the dense model unchanged")
    return targets


def apply_mask(target: Target, mask: torch.Tensor) -> None:
    """Zero the pruned elements of this rank's slice."""
    view = local_weight(target.param)
    view.masked_fill_(mask.to(view.device), 0)


def pruned_counts(targets: list[Target], masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Pruned elements of each full tensor (all ranks' masks summed; one all-reduce)."""
    counts = all_reduce_(torch.tensor([int(masks[t.name].sum()) for t in targets], dtype=torch.long))
    return {t.name: int(c) for t, c in zip(targets, counts)}


def local_start(target: Target) -> int:
    return local_range(target.param)[0]
