"""Stage 3, scoring: one score per local weight element, higher = keep.

A scorer is a pure function of a rank's slice of one weight (`LocalSlice`) and the
statistics calibration collected for that weight. Scores have the slice's layout,
so selection never needs to know how the weight was partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch


@dataclass(frozen=True)
class LocalSlice:
    """This rank's ZeRO-3 slice of a 2-D weight: flat elements [start, start + numel)."""

    weight: torch.Tensor  # 1-D, the local elements only (padding excluded)
    start: int
    shape: tuple[int, int]  # full (out_features, in_features)

    def columns(self) -> torch.Tensor:
        """Input column of every local element: (start + i) % in_features (on the weight's device)."""
        positions = torch.arange(self.start, self.start + self.weight.numel(), device=self.weight.device)
        return positions % self.shape[1]


Stats = Mapping[str, torch.Tensor]


def magnitude(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """|w| (Han et al. 2015)."""
    return local.weight.float().abs()


def wanda(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """|w_ij| * ||X_j||_2 (Sun et al. 2023): weights times the norm of their input column
    over all calibration tokens. `stats["input_sq_sum"][j]` = sum over tokens of x_j^2."""
    column_norm = stats["input_sq_sum"].to(local.weight.device).float().sqrt()
    return local.weight.float().abs() * column_norm[local.columns()]


def taylor(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """|w * sum_s g_s|: first-order Taylor estimate of the loss change when w is removed
    (Molchanov et al. 2017; SNIP's |g * w|, Lee et al. 2019). `stats["grad_sum"]` is the
    gradient summed over calibration steps (dist_prune/gradients.py); summing instead of
    averaging scales every score by the same step count, so the ranking is the same."""
    return (local.weight.float() * stats["grad_sum"].float()).abs()


def obd(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """0.5 * F * w^2 (Optimal Brain Damage, LeCun et al. 1990) with the empirical Fisher
    diagonal F = mean over calibration steps of g^2 standing in for the Hessian diagonal."""
    fisher = stats["grad_sq_sum"].float() / float(stats["steps"])
    return 0.5 * fisher * local.weight.float().square()


def seven(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """SEVEN (Xiao et al. 2024): sum_s |w * a_s * m_hat_s / v_hat_s|, a = |g|, with Adam-like
    bias-corrected moments of |g| that damp noisy gradients. Accumulated step by step in
    dist_prune/gradients.py (`stats["seven"]`, already in the slice's layout); returned as is
    (may share memory with the statistic: selection never writes into scores)."""
    return stats["seven"].float()


def movement(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """S = -sum_t w_t * dL/dw_t over the fine-tuning steps (movement pruning, Sanh et al.
    2020): high when training pushes a weight away from zero, low when it pulls it
    towards zero, whatever its size now. Accumulated by the training loop
    (`stats["movement"]`, dist_prune/gradients.update_stats)."""
    return stats["movement"].float()


def threshold(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """|w|, for the `threshold` method: keep iff |w| >= epsilon, an absolute cut-off instead
    of a sparsity ratio. The mask is not chosen by k-th selection but by comparing these
    scores with epsilon: use `threshold_mask` (pruned iff |w| < epsilon)."""
    return local.weight.float().abs()


def threshold_mask(local: LocalSlice, epsilon: float) -> torch.Tensor:
    """Pruned (True) iff |w| < epsilon; NaN weights count as pruned. Local, no collective."""
    return ~(threshold(local, {}) >= epsilon)


def threshold_counts(slices: Sequence[LocalSlice], epsilon: float) -> list[int]:
    """How many elements of each full tensor `threshold_mask` prunes, summed over ranks (one
    all-reduce; collective). Used as the per-tensor counts of k-th selection at layer scope,
    they prune exactly the same elements: the k smallest |w| are those below epsilon."""
    from dist_prune.collectives import all_reduce_

    counts = torch.tensor([int(threshold_mask(s, epsilon).sum()) for s in slices], dtype=torch.long)
    return all_reduce_(counts).tolist()


@dataclass(frozen=True)
class Scorer:
    # None: not an element score (sparsegpt reconstructs; infogain scores whole groups)
    score: Callable[[LocalSlice, Stats], torch.Tensor] | None
    # statistics calibration collects: "weights" (none), "activations", "hessian", "ablation"
    # (loss increase per structural group, dist_prune/infogain.py),
    # "gradients" (dist_prune.gradients.accumulate_gradient_stats), "training" (only during
    # fine-tuning, with prune.schedule cubic: dist_prune/train/loop.py)
    needs: str
    default_scope: str
    stats: tuple[str, ...] = ()  # gradient statistics to accumulate (calibration or training)
    # config keys ("section.key") this method needs set otherwise than the job defaults; each
    # applies when neither the YAML file nor an override names the key, so switching
    # `prune.method` on any config gives the method's own defaults (dist_prune.config.load_config)
    defaults: Mapping[str, Any] = field(default_factory=dict)


# SparseGPT is not a score-then-select method: it chooses each mask while updating the
# remaining weights (dist_prune/sparsegpt.py); the worker runs it instead of selection.
#
# Gradient scorers default to one global threshold, as in SNIP (Lee et al. 2019), the
# Taylor criterion of Molchanov et al. (2019, global ranking), OBD (LeCun et al. 1990) and
# SEVEN's reference code (one top-k over all layers): their scores estimate the increase
# of the loss when a weight is removed, so they are in the same unit (loss) in every layer
# and comparable across layers, unlike |w|, whose scale differs per layer. A global cut can
# therefore spend the sparsity where it costs the least loss; `scope: layer` is there for
# when that over-prunes single layers.
#
# `threshold` is not selected by a ratio: the worker prunes |w| < epsilon
# (`threshold_mask`); its scope is never used.
SCORERS: dict[str, Scorer] = {
    "magnitude": Scorer(magnitude, needs="weights", default_scope="layer"),
    "wanda": Scorer(wanda, needs="activations", default_scope="row"),
    "sparsegpt": Scorer(None, needs="hessian", default_scope="layer"),
    "taylor": Scorer(taylor, needs="gradients", default_scope="global", stats=("grad_sum",)),
    "obd": Scorer(obd, needs="gradients", default_scope="global", stats=("grad_sq_sum",)),
    "seven": Scorer(seven, needs="gradients", default_scope="global", stats=("seven",)),
    # |w| < 0.01: a cut-off in the units of the weights, about their typical size in a trained
    # LLM's linears (N(0, 0.02) initialisation); set prune.epsilon for your model
    "threshold": Scorer(threshold, needs="weights", default_scope="layer",
                        defaults={"prune.epsilon": 0.01}),
    # whole heads / channels / layers only: the loss increase when a group is ablated, per unit
    # of its weights' L2 norm (dist_prune/infogain.py, dist_prune/structural.select_groups)
    "infogain": Scorer(None, needs="ablation", default_scope="layer",
                       defaults={"prune.structure": "channels"}),
    # movement scores are the weights' movement while they train: pruned gradually during
    # fine-tuning, re-selected every 10 of 100 steps unless the config says otherwise
    "movement": Scorer(movement, needs="training", default_scope="global", stats=("movement",),
                       defaults={"prune.schedule": "cubic", "finetune.steps": 100, "prune.interval": 10}),
}
