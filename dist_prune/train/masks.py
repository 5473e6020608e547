"""Masks kept through the optimizer's steps.

A pruned weight does not stay zero by itself: AdamW moves it as soon as its gradient or its
moments are non-zero, and DeepSpeed keeps two copies of every weight (the fp32 master in the
optimizer, the 16-bit copy the model computes with). So:

  when a mask is set or grows  the pruned weights are zeroed in the fp32 master and in the
                               16-bit copy, and so are their optimizer moments;
  before every `step()`        the gradients of pruned weights are zeroed.

Nothing has to be re-applied after a step: with a zero gradient and zero moments, AdamW's
moments stay exactly 0 (b*0 + (1-b)*0), its update is lr * 0 / (sqrt(0) + eps) = 0, decoupled
weight decay multiplies 0, gradient clipping scales 0, and the 16-bit copy is cast from the
master. So a pruned weight stays exactly 0 bit for bit (tests/test_finetune.py checks the
exported zeros against the mask at ZeRO stages 2 and 3). Re-applying the masks after every step
cost 0.4 s of a 7 s ZeRO-3 step of SmolLM2-135M on 2 ranks (profile in
benchmarks/results/finetune_speed.md).

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

    def update(self, masks: dict[str, torch.Tensor]) -> None:
        if any(bool(m.any()) for m in masks.values()):
            raise RuntimeError("NoMasks cannot keep masks that prune something")
        self.masks = masks
