"""Schedules of the fine-tuning stage, as pure functions of the optimizer step.

Everything that changes with the step (sparsity target, learning rate, the data
windows of a step) is computed from the step number alone, so a run resumed from a
checkpoint at step k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math

import torch


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))^3,
    s_i before `start`, s_f from `end` on. Prunes fast while many redundant weights are
    left and slowly near the target."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def is_pruning_step(step: int, start: int, end: int, interval: int) -> bool:
    """Steps (before their forward pass) at which masks are re-selected: every `interval`
    steps from `start`, and `end` itself, so the final sparsity is always reached."""
    if step < start or step > end:
        return False
    return (step - start) % interval == 0 or step == end


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear
    warm-up over `warmup` steps, then cosine or linear decay to 0 at `total`, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def window_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which an epoch visits the training windows (a seeded permutation)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=generator)


def step_windows(step: int, num_windows: int, global_batch: int, seed: int, *, sampled: int = 0,
                 share: float = 0.0) -> torch.Tensor:
    """Indices of the `global_batch` windows of optimizer step `step`: the windows are
    visited in a seeded order, reshuffled every epoch, and a step may span two epochs.
    With `sampled` > 0, rows [num_windows, num_windows + sampled) are a second pool (windows
    sampled from the dense model) visited the same way on a stream of its own, and a `share` of
    the steps' windows comes from it: floor((step + 1) * global_batch * share) of them up to and
    including this step, so a share of 1/2 at a global batch of 1 alternates. They take the
    step's last slots."""
    if sampled == 0:
        return _visit(step * global_batch, global_batch, num_windows, seed)
    before = math.floor(step * global_batch * share)
    mine = math.floor((step + 1) * global_batch * share) - before
    text = _visit(step * global_batch - before, global_batch - mine, num_windows, seed)
    return torch.cat([text, num_windows + _visit(before, mine, sampled, seed + 1)])


def _visit(start: int, count: int, num_windows: int, seed: int) -> torch.Tensor:
    """Positions [start, start + count) of the seeded walk over `num_windows` windows."""
    positions = torch.arange(start, start + count)
    epochs, offsets = positions // max(num_windows, 1), positions % max(num_windows, 1)
    indices = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        chosen = epochs == epoch
        indices[chosen] = window_order(num_windows, seed, epoch)[offsets[chosen]]
    return indices


def micro_rounds(batch: torch.Tensor, world: int, micro_batch: int) -> list[torch.Tensor]:
    """The windows of each accumulation round across all ranks, the one place the global batch's
    [accumulation, world, micro] layout is written: round a holds every rank's micro-batch a, what a
    collective per micro-batch must agree on."""
    span = world * micro_batch
    return [batch[a * span:(a + 1) * span] for a in range(batch.numel() // span)]


def rank_share(batch: torch.Tensor, rank: int, world: int, micro_batch: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: its slot of every round of micro_rounds, so
    micro-batch a of rank r is batch[(a * world + r) * micro : ... + micro]."""
    return [r[rank * micro_batch:(rank + 1) * micro_batch] for r in micro_rounds(batch, world, micro_batch)]
