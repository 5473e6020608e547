"""Masks kept through the optimizer's steps.

A pruned weight does not stay zero by itself: AdamW moves it as soon as its gradient or its
moments are non-zero, and DeepSpeed keeps two copies of every weight (the fp32 master in the
optimizer, the 16-bit copy the model computes with). So at every step:

  before `step()`  the gradients of pruned weights are zeroed,
  after  `step()`  the mask is applied to the fp32 master and to the 16-bit copy,
  when a mask grows (gradual pruning) the optimizer moments of the newly pruned weights are
                   zeroed, so they cannot push the weight back later.

Masks are held in the layout of the pruning stage: one bool tensor per target over this rank's
ZeRO-3 slice (True = pruned). How each ZeRO stage reaches those elements in its own buffers is
the `Training` adapter's business (dist_prune/sharding/training.py).
"""

from __future__ import annotations

import torch

from dist_prune.sharding.training import Training


class KeptMasks:
    """The masks of the targets `training` trains, kept at every step."""

    def __init__(self, training: Training, masks: dict[str, torch.Tensor]):
        self.training = training
        self.update(masks)

    def mask_gradients(self) -> None:
        self.training.mask_gradients()

    def apply(self) -> None:
        """Zero the pruned weights in the fp32 master and in the 16-bit copy."""
        self.training.zero_pruned(moments=False)

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """New masks (a superset of the old ones): weights, masters and moments follow. Collective."""
        self.masks = {name: m.clone() for name, m in masks.items()}
        self.training.set_masks(self.masks)
        self.training.zero_pruned(moments=True)


class NoMasks:
    """Nothing is pruned and nothing will be (a dense fine-tune): no mask work at all."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    def mask_gradients(self) -> None:
        pass

    def apply(self) -> None:
        pass

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        if any(bool(m.any()) for m in masks.values()):
            raise RuntimeError("NoMasks cannot keep masks that prune something")
        self.masks = masks
