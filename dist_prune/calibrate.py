"""Stage 2b, calibrate: statistics of the inputs of the linears being pruned.

Each rank runs its own share of the calibration windows; the sums are then all-reduced, so every
rank ends up with the statistics of all calibration tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_prune.collectives import all_reduce_
from dist_prune.sharding.partition import model_device


class InputCollector:
    """Forward pre-hooks on linears that hand each one's input to `add(name, inputs)`.

    Use as a context manager around the forward passes. Linears that receive the very same input
    tensor one after another (q/k/v, gate/up) share what is collected: only the first of them, the
    owner, accumulates (`_accumulate`, what subclasses implement) and `reduce()` hands the owner's
    statistics to the others. Which linears share is agreed across ranks in `reduce()`, since a rank
    without calibration windows sees no input at all.
    """

    # Only inputs are collected, so a pass that measures them may stop once every linear has had its
    # input (LayerRunner.feed_inputs). A subclass that needs outputs hooks after the forward instead.
    inputs_only = True

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.linears = linears  # weight name -> module whose input is the weight's input
        self.owner: dict[str, str] = {}  # name -> the linear whose statistics it shares
        self._fed: set[str] = set()  # names that accumulated inputs of their own
        self._last: tuple[torch.Tensor, str] | None = None  # the last input accumulated, and by whom
        self._hooks: list = []
        self._stats: dict[str, dict] | None = None  # reduce()'s result

    def _accumulate(self, name: str, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def _reduce_owned(self, names: list[str]) -> dict[str, dict]:
        """All-reduce the sums of `names` (the owners, the same list on every rank); their stats."""
        raise NotImplementedError

    def add(self, name: str, inputs: torch.Tensor) -> None:
        """Account for a batch of inputs [..., in_features] of weight `name`."""
        if self._stats is not None:  # a second reduce would not all-reduce the late additions
            raise RuntimeError(f"{type(self).__name__}.add after reduce()")
        last = self._last
        if last is not None and last[0] is inputs and last[1] != name:  # the previous linear's input
            if self.owner.setdefault(name, last[1]) != last[1] or name in self._fed:
                raise RuntimeError(f"{type(self).__name__}: {name} shares its input with {last[1]} only sometimes")
            return
        if name in self.owner:
            raise RuntimeError(f"{type(self).__name__}: {name} no longer receives the input of {self.owner[name]}")
        self._accumulate(name, inputs)
        self._fed.add(name)
        self._last = (inputs, name)

    def reduce(self) -> dict[str, dict]:
        """Every rank's statistics summed (collective, once; later calls return the same), keyed by
        weight name; linears that share an input get the very same stats."""
        if self._stats is None:
            self._agree_owners()
            owned = self._reduce_owned([n for n in self.linears if n not in self.owner])
            self._stats = {n: owned[self.owner.get(n, n)] for n in self.linears}
        return self._stats

    def _agree_owners(self) -> None:
        """Make `owner` the same on every rank: one MAX all-reduce of each linear's owner index and
        its negation (-1 / -n where this rank saw no input), so every rank also sees a disagreement."""
        names = list(self.linears)
        index, n = {name: i for i, name in enumerate(names)}, len(names)
        seen = torch.tensor([[-1] * n, [-n] * n], dtype=torch.long)
        for i, name in enumerate(names):
            if name in self._fed or name in self.owner:
                owner = index[self.owner.get(name, name)]
                seen[0, i], seen[1, i] = owner, -owner
        all_reduce_(seen, op=dist.ReduceOp.MAX)
        for i, name in enumerate(names):
            highest, lowest = int(seen[0, i]), -int(seen[1, i])
            if highest >= 0 and highest != lowest:
                raise RuntimeError(f"{type(self).__name__}: ranks disagree on whether {name} shares its "
                                   f"input with {names[lowest]}")
            if highest >= 0 and highest != i:
                self.owner[name] = names[highest]

    def _register(self, name: str, module: torch.nn.Module):
        def accumulate(module, inputs):
            self.add(name, inputs[0])
        return module.register_forward_pre_hook(accumulate)

    def __enter__(self):
        self._hooks = [self._register(n, m) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._last = None  # do not keep the last batch alive

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

    def _accumulate(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        self.sums[name] += (x * x).sum(0).to(self.sums[name].device)

    def _reduce_owned(self, names: list[str]) -> dict[str, dict]:
        sums = self.all_reduce_parts({name: self.sums[name] for name in names})
        return {name: {"input_sq_sum": s} for name, s in sums.items()}
