"""magnitude: |w| (Han et al. 2015); with `prune.norm l2`, the L2 norm of each block, head or
channel pools the element scores. No calibration: the weights alone decide."""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def magnitude(local: LocalSlice, stats: Stats) -> torch.Tensor:
    return local.weight.float().abs()


METHOD = Method("magnitude", score=magnitude, default_scope="layer", schedules=("oneshot", "cubic"),
                summary="|w|")
