"""obd: 0.5 * F * w^2 (Optimal Brain Damage, LeCun et al. 1990; the IRB importance ranking), the loss
increase when w is removed, with the empirical Fisher diagonal F standing in for the Hessian's, one
sample per calibration token: F = sum_t (delta_t x_t)^2 ("token_sq" of dist_prune/gradients.py).
One threshold over the whole model.

Why (benchmarks/results/gradient_methods.md, SmolLM2-135M, 50%, the default targets, 16 windows):
with one sample per step of 4 windows (the statistic before) F rests on 4 samples and the model
reaches 82.5 within each row; one per window, 54.9; one per token (8,176 samples), 50.0, Wanda's
level (50.8). With that estimate the scores are losses in every layer alike, and one global threshold
(42.2) beats rows, layers (47.4) and scores normalised per layer (67.0): it prunes 20% of some
tensors and 95% of others.
"""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def obd(local: LocalSlice, stats: Stats) -> torch.Tensor:
    return 0.5 * stats["token_sq"].float() * local.weight.float().square()


METHOD = Method("obd", calibration="gradients", stats=("token_sq",), score=obd, default_scope="global",
                summary="0.5 * F * w^2, F = sum_t (dL/dy_t x_t)^2 per token")
