"""movement: S = -sum_t w_t * dL/dw_t over the fine-tuning steps (Sanh et al. 2020): high when
training pushes a weight away from zero, low when it pulls it towards zero, whatever its size
now. Only meaningful while the weights train: pruned gradually during fine-tuning."""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats


def movement(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """Accumulated by the training loop (`stats["movement"]`, dist_prune/gradients.update_stats)."""
    return stats["movement"].float()


# re-selected every 10 of 100 steps unless the config says otherwise
METHOD = Method("movement", calibration="training", stats=("movement",), score=movement,
                default_scope="global", schedules=("cubic",), structures=("unstructured",),
                defaults={"prune.schedule": "cubic", "finetune.steps": 100, "prune.interval": 10},
                summary="-sum_t w * dL/dw while fine-tuning")
