"""Stage 3, scoring: one score per local weight element, higher = keep.

A scorer is a pure function of a rank's slice of one weight (`LocalSlice`) and the
statistics calibration collected for that weight. Scores have the slice's layout,
so selection never needs to know how the weight was partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch


@dataclass(frozen=True)
class LocalSlice:
    """This rank's ZeRO-3 slice of a 2-D weight: flat elements [start, start + numel)."""

    weight: torch.Tensor  # 1-D, the local elements only (padding excluded)
    start: int
    shape: tuple[int, int]  # full (out_features, in_features)

    def columns(self) -> torch.Tensor:
        """Input column of every local element: (start + i) % in_features."""
        return torch.arange(self.start, self.start + self.weight.numel()) % self.shape[1]


Stats = Mapping[str, torch.Tensor]


def magnitude(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """|w| (Han et al. 2015)."""
    return local.weight.float().abs()


def wanda(local: LocalSlice, stats: Stats) -> torch.Tensor:
    """|w_ij| * ||X_j||_2 (Sun et al. 2023): weights times the norm of their input column
    over all calibration tokens. `stats["input_sq_sum"][j]` = sum over tokens of x_j^2."""
    column_norm = stats["input_sq_sum"].float().sqrt()
    return local.weight.float().abs() * column_norm[local.columns()]


@dataclass(frozen=True)
class Scorer:
    score: Callable[[LocalSlice, Stats], torch.Tensor] | None  # None: prunes by reconstruction
    needs: str  # statistics calibration collects: "weights" (none), "activations", "hessian"
    default_scope: str


# SparseGPT is not a score-then-select method: it chooses each mask while updating the
# remaining weights (dist_prune/sparsegpt.py); the worker runs it instead of selection.
SCORERS: dict[str, Scorer] = {
    "magnitude": Scorer(magnitude, needs="weights", default_scope="layer"),
    "wanda": Scorer(wanda, needs="activations", default_scope="row"),
    "sparsegpt": Scorer(None, needs="hessian", default_scope="layer"),
}
