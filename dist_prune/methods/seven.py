"""seven (Xiao et al. 2024): sum_s |w * a_s| * m_hat / v_hat, a = |dL/dw| per sample, where m_hat / v_hat
(the mean of a over the root mean square of a, in (0, 1]) keeps the weights whose gradients are
steady ("sentinels") and damps noisy ones.

One-shot (SEVENpre) the samples are the calibration tokens, a_t = |delta_t x_t|, and the moments are
plain means over them: m = token_abs / N, v = sqrt(token_sq / N) ("token_abs", "token_sq" of
dist_prune/gradients.py), so the score is |w| * token_abs^2 / sqrt(token_sq) up to the constant
1 / sqrt(N), compared within each output row. SEVEN's Adam-like moments (b = 0.8, 0.9) belong to an
optimizer's trajectory; over 4 calibration steps of 4 windows, with no step between them, they gave
1.17x / 1.38x Wanda's perplexity (WikiText-2 / the second text, global scope; 1.70x / 2.03x within
rows), per token 1.20x / 1.23x within rows (benchmarks/results/gradient_methods.md). The factor
mean/rms differs between layers, and one global threshold over these scores fails (38x).

Re-scored while fine-tuning (prune.schedule cubic) it is SEVENdyn: the moments of |g| along the
optimizer steps, accumulated in dist_prune/gradients.update_stats, at global scope.
"""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def seven(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """One-shot: from `stats["token_abs"]` and `stats["token_sq"]`; while fine-tuning, `stats["seven"]`
    as accumulated step by step (returned as is: selection never writes scores)."""
    if "token_abs" not in stats:
        return stats["seven"].float()
    steady = stats["token_abs"].float()
    rms = stats["token_sq"].float().sqrt()
    # a weight no token's gradient reaches (a = 0 throughout) scores 0
    return torch.where(rms > 0, local.weight.float().abs() * steady.square() / rms.clamp_min(1e-38),
                       torch.zeros_like(rms))


METHOD = Method("seven", calibration="gradients", stats=("token_abs", "token_sq"), training_stats=("seven",),
                score=seven, default_scope="row", training_scope="global", schedules=("oneshot", "cubic"),
                summary="SEVEN per token: |w| * sum_t a_t * mean(a) / rms(a), a = |dL/dy_t x_t| "
                        "(while fine-tuning SEVENdyn)")
