"""infogain: for a whole head, channel or layer G, (L(theta without G) - L(theta)) / ||w_G||_2,
the loss increase measured by ablating G on calibration batches (dist_prune/infogain.py) per unit
of its weights' norm. Scores groups only: prune.structure heads, channels or layers."""

from __future__ import annotations

from dist_prune.infogain import GroupLossCollector
from dist_prune.methods.base import GROUP_STRUCTURES, Method


def group_losses(linears: dict, structure=None, geometry=None) -> GroupLossCollector:
    return GroupLossCollector(linears, structure=structure, geometry=geometry)


METHOD = Method("infogain", calibration="layerwise", collector=group_losses, group_loss=True,
                structures=GROUP_STRUCTURES, defaults={"prune.structure": "channels"},
                summary="loss increase of ablating a group / its weight norm")
