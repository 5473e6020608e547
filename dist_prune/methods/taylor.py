"""taylor: |w * sum_s g_s|, the first-order Taylor estimate of the loss change when w is removed
(Molchanov et al. 2017; SNIP's |g * w|, Lee et al. 2019).

Gradient methods default to one global threshold, as in SNIP, the Taylor criterion of Molchanov et
al. (2019, global ranking), OBD and SEVEN's reference code: their scores estimate the increase of
the loss when a weight is removed, in the same unit (loss) in every layer, unlike |w|, whose scale
differs per layer. `scope: layer` is there for when that over-prunes single layers.
"""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def taylor(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """`stats["grad_sum"]`: the gradient summed over calibration steps (dist_prune/gradients.py);
    summing instead of averaging scales every score alike, so the ranking is the same."""
    return (local.weight.float() * stats["grad_sum"].float()).abs()


METHOD = Method("taylor", calibration="gradients", stats=("grad_sum",), score=taylor, default_scope="global",
                schedules=("oneshot", "cubic"), summary="|w * sum g|")
