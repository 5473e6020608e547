"""Stage 2b, calibrate: statistics of the inputs of the linears being pruned.

Each rank runs its own share of the calibration windows; the per-column sums are then
all-reduced, so every rank ends up with the statistics of all calibration tokens.
"""

from __future__ import annotations

import torch

from dist_prune.collectives import all_reduce_
from dist_prune.partition import model_device


class InputCollector:
    """Forward hooks on linears that hand each one's input to `add(name, inputs)`.

    Use as a context manager around the forward passes; subclasses decide what to keep.
    """

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.linears = linears  # weight name -> module whose input is the weight's input
        self._hooks: list = []

    def add(self, name: str, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def _hook(self, name: str):
        def accumulate(module, inputs, output):
            self.add(name, inputs[0])
        return accumulate

    def __enter__(self):
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def all_reduce_parts(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's tensors of `parts` summed, in one collective (same keys on every rank)."""
        if not parts:
            return {}
        flat = all_reduce_(torch.cat(list(parts.values())))
        return dict(zip(parts, flat.split([p.numel() for p in parts.values()])))


class InputNormCollector(InputCollector):
    """Per input column j of each linear, sum_t x_tj^2 (float64: sums over ~10^5 tokens);
    `reduce()` gives {"input_sq_sum": tensor[in_features]} per weight name, on the module's
    device: the inputs are summed where they are computed (no copy to the host per batch) and
    the scores that use the sums are computed there too."""

    def __init__(self, linears: dict[str, torch.nn.Module]):
        super().__init__(linears)
        self.sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=model_device(m))
                     for name, m in linears.items()}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, their column sums)

    def add(self, name: str, inputs: torch.Tensor) -> None:
        """Account for a batch of inputs [..., in_features] of weight `name`."""
        # q/k/v (and gate/up) receive the very same tensor one after another: sum it once
        if self._last is None or self._last[0] is not inputs:
            x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
            self._last = (inputs, (x * x).sum(0))
        self.sums[name] += self._last[1].to(self.sums[name].device)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._last = None

    def reduce(self) -> dict[str, dict[str, torch.Tensor]]:
        """All-reduce the sums across ranks (one collective) and return the stats."""
        self.sums = self.all_reduce_parts(self.sums)
        return {name: {"input_sq_sum": s} for name, s in self.sums.items()}
