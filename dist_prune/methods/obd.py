"""obd: 0.5 * F * w^2 (Optimal Brain Damage, LeCun et al. 1990; the IRB importance ranking), the
empirical Fisher diagonal F = mean over calibration steps of g^2 standing in for the Hessian's."""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def obd(local: LocalSlice, stats: Stats) -> torch.Tensor:
    fisher = stats["grad_sq_sum"].float() / float(stats["steps"])
    return 0.5 * fisher * local.weight.float().square()


METHOD = Method("obd", calibration="gradients", stats=("grad_sq_sum",), score=obd, default_scope="global",
                summary="0.5 * mean(g^2) * w^2")
