"""movement: S = -sum_t w_t * dL/dw_t over the fine-tuning steps (Sanh et al. 2020): high when
training pushes a weight away from zero, low when it pulls it towards zero, whatever its size
now. Only meaningful while the weights train: pruned gradually during fine-tuning.

It needs a long fine-tuning, and dist-prune refuses a short one. -w * dL/dw is the first-order
change of the loss when w is set to zero, so at a trained minimum, where the gradient is mostly
noise, the lowest sums belong to the largest weights on a coin toss. Measured on SmolLM2-135M
(benchmarks/results/movement_study.md): pruned to 50% by the sums of 4, 16, 48 and 100 recovery
steps, at global, layer or row scope, the model measures 1e8 to 4e16 perplexity on WikiText-2
test, against 108 to 221 by magnitude on the same weights, with no trend towards usable. Sanh et
al. accumulate the scores over a warm-up of one epoch of SQuAD (about 5,400 steps of 16 sequences)
before the first pruning step and fine-tune for 10 epochs, each matrix keeping its own top-k
(scope layer); the defaults below are that schedule. For a recovery of a few hundred steps use
prune.schedule cubic with prune.method seven (SEVENdyn) or magnitude."""

from __future__ import annotations

import torch

from dist_prune.methods.base import LocalSlice, Method, Stats

# Sanh et al. 2020's SQuAD schedule, in steps of 16 sequences: 1 epoch of warm-up before pruning,
# the target reached after 7 epochs, 10 in all
WARMUP_STEPS = 5_400


def movement(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """Accumulated by the training loop (`stats["movement"]`, dist_prune/gradients.update_stats)."""
    return stats["movement"].float()


def _check(prune, structure) -> str | None:
    if prune.start_step < WARMUP_STEPS:
        return (f"prune.method movement needs prune.start_step >= {WARMUP_STEPS:,} steps of warm-up "
                f"(got {prune.start_step}): over fewer its scores pruned the largest weights "
                "(benchmarks/results/movement_study.md); for a short recovery use prune.method seven or magnitude")
    return None


METHOD = Method("movement", calibration="training", stats=("movement",), score=movement,
                default_scope="layer", schedules=("cubic",), structures=("unstructured",), check=_check,
                defaults={"prune.schedule": "cubic", "prune.start_step": WARMUP_STEPS,
                          "prune.end_step": 7 * WARMUP_STEPS, "finetune.steps": 10 * WARMUP_STEPS,
                          "prune.interval": 100},
                summary="-sum_t w * dL/dw while fine-tuning (a long one: Sanh et al.'s schedule)")
