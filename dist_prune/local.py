"""A rank's slice of one weight, as scores read it: the local elements and where they sit in the
full tensor. Its own module so that everything (methods, structures, OWL) can import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class LocalSlice:
    """This rank's ZeRO-3 slice of a 2-D weight: flat elements [start, start + numel)."""

    weight: torch.Tensor  # 1-D, the local elements only (padding excluded)
    start: int
    shape: tuple[int, int]  # full (out_features, in_features)

    def columns(self) -> torch.Tensor:
        """Input column of every local element: (start + i) % in_features (on the weight's device)."""
        return self.positions() % self.shape[1]

    def rows(self) -> torch.Tensor:
        """Output row of every local element: (start + i) // in_features."""
        return self.positions() // self.shape[1]

    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.weight.numel(), device=self.weight.device)


Stats = Mapping[str, torch.Tensor]
