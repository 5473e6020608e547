"""taylor: the first-order Taylor estimate of the loss change when w is removed, |w * dL/dw|
(Molchanov et al. 2017; SNIP's |g * w|, Lee et al. 2019), taken per calibration token and summed:
|w| * sum_t |delta_t x_t| ("token_abs" of dist_prune/gradients.py), compared within each output row.

Why per token and per row (benchmarks/results/gradient_methods.md, SmolLM2-135M, 50%, the default
targets): at a trained minimum the summed gradient is near zero and its sign noise ranks |w * sum g|
(10.8x Wanda's perplexity within rows, 3.6x at global scope, with 16 windows); per token the terms
cannot cancel (1.01x). It is no loss estimate, and one global threshold hurts it out of domain
(1.30x on the second text against 1.05x within rows).

While fine-tuning (prune.schedule cubic) the weights move, so it re-scores |w * sum_s g_s| over the
optimizer steps' gradients, at global scope, as measured in benchmarks/results/finetune_quality.md.
"""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def taylor(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """One-shot: `stats["token_abs"]`; while fine-tuning: `stats["grad_sum"]`, the gradient summed over
    the steps (summing instead of averaging scales every score alike: the same ranking)."""
    if "token_abs" in stats:
        return local.weight.float().abs() * stats["token_abs"].float()
    return (local.weight.float() * stats["grad_sum"].float()).abs()


METHOD = Method("taylor", calibration="gradients", stats=("token_abs",), training_stats=("grad_sum",),
                score=taylor, default_scope="row", training_scope="global", schedules=("oneshot", "cubic"),
                summary="|w| * sum_t |dL/dy_t x_t| per token (while fine-tuning: |w * sum g|)")
