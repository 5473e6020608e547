"""seven (Xiao et al. 2024): sum_s |w * a_s * m_hat_s / v_hat_s|, a = |g|, with Adam-like
bias-corrected moments of |g| that damp noisy gradients. One-shot over calibration batches it is
SEVENpre; re-scored while fine-tuning (prune.schedule cubic) it is SEVENdyn."""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def seven(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """Accumulated step by step in dist_prune/gradients.py (`stats["seven"]`, already in the
    slice's layout); returned as is (may share memory with it: selection never writes scores)."""
    return stats["seven"].float()


METHOD = Method("seven", calibration="gradients", stats=("seven",), score=seven, default_scope="global",
                schedules=("oneshot", "cubic"), summary="SEVEN: |w * |g| * m_hat / v_hat|")
